"""Unpack one layer blob into a new directory, safely, verifying its digest and diff_id on the way.

One pass over the blob: the raw bytes are hashed (and teed to the caller's store file), decompressed,
hashed again (the diff_id) and extracted. The tar is read to its very end, so both digests cover
every byte. This module knows nothing about manifests or the store (umoci's split): the caller
passes what the descriptors say and gets back what the blob really was.

Safety, as the mature unpackers do it: every entry is placed through directory fds opened
component by component with ``O_NOFOLLOW``, so no symlink (in the layer or planted by an earlier
entry) is ever followed; ``..`` may not climb above the layer root; absolute names are taken as
relative to it; a hardlink must point at a non-directory this same layer created. Anything else is
refused with an `ImageError` naming the layer and the entry, and the half-built directory is removed.

Whiteouts are written in the form overlayfuse and the kernel read fastest: when we may (root), a
``.wh.NAME`` becomes a 0:0 character device and ``.wh..wh..opq`` the ``trusted.overlay.opaque``
xattr; otherwise the OCI files are kept as they are (the daemon reads those too). Markers are
applied after all entries, because OCI lets a whiteout appear anywhere in its directory and a
layer's own entries win over its whiteouts.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO

from .. import whiteout
from ..errors import ImageError
from . import oci
from .compression import CHUNK, HashingReader, open_decompressed

log = logging.getLogger(__name__)

#: tarfile's stream buffer: each small read copies what is left of it, so it must stay small
#: (see `tarfile._Stream.__read`); 64 KiB keeps headers cheap and large files at full speed.
TAR_BUFSIZE = 1 << 16
_XATTR_PAX = "SCHILY.xattr."
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Implicit parents (named by an entry but absent from the tar) get docker's mode.
_IMPLICIT_DIR_MODE = 0o755
_XATTR_SKIPPABLE = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES)

Parts = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnpackedLayer:
    """What a layer blob turned out to be: digest and size of the blob, diff_id of its tar, and the
    bytes of regular-file data it unpacked to (each hardlinked file once)."""

    digest: str
    size: int
    diff_id: str
    unpacked_size: int


class _Refused(Exception):
    """An entry that must not be extracted; the message says why (the caller adds where)."""


def unpack_layer(raw: BinaryIO, media_type: str, dest: Path, *, digest: str | None = None,
                 size: int | None = None, diff_id: str | None = None,
                 copy_to: BinaryIO | None = None,
                 progress: Callable[[int], None] | None = None) -> UnpackedLayer:
    """Unpack the layer blob read from RAW into DEST, which must not exist and is created here.

    DIGEST, SIZE (the descriptor's) and DIFF_ID (the config's) are checked when given. COPY_TO
    receives every raw byte as it is read. PROGRESS is called with the number of raw bytes each
    read consumed (an increment, for a progress bar's update). Any failure raises ImageError and
    leaves no DEST.
    """
    compression = oci.LAYER_COMPRESSION.get(media_type)
    label = f"layer {digest}" if digest else "layer"
    if compression is None:
        known = ", ".join(sorted(oci.LAYER_COMPRESSION))
        raise ImageError(f"{label}: unsupported layer media type {media_type!r} (known: {known})")
    for what, value in (("digest", digest), ("diff_id", diff_id)):
        if value is not None and not value.startswith("sha256:"):
            raise ImageError(f"{label}: unsupported {what} algorithm in {value!r} (only sha256)")
    dest = Path(dest)
    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        raise ImageError(f"{label}: cannot unpack into {dest}: it already exists") from None
    blob = HashingReader(raw, copy_to=copy_to, progress=progress, limit=size, what="the blob")
    try:
        result = _unpack(blob, compression, dest, label, digest, size, diff_id)
    except BaseException as exc:
        remove_tree(dest)
        if isinstance(exc, ImageError) and digest is not None:
            _raise_if_digest_wrong(blob, digest, label, exc)
        raise
    log.debug("unpacked %s: %d bytes of blob, %d bytes of files", label, result.size,
              result.unpacked_size)
    return result


def _raise_if_digest_wrong(blob: HashingReader, digest: str, label: str, exc: ImageError) -> None:
    """A blob that fails to unpack because it is not the blob the manifest names is reported as
    that (the root cause), not as whatever its wrong bytes happened to trip over."""
    try:
        blob.drain()
    except (ImageError, OSError):
        return  # longer than its descriptor (the size error says so), or unreadable
    if blob.digest != digest:
        raise ImageError(f"{label}: the blob does not match its digest (its content is "
                         f"{blob.digest})") from exc


def _unpack(blob: HashingReader, compression: str, dest: Path, label: str, digest: str | None,
            size: int | None, diff_id: str | None) -> UnpackedLayer:
    tar_stream = _TarStream(open_decompressed(blob, compression))
    root_fd = os.open(dest, _DIR_FLAGS)
    try:
        os.fchmod(root_fd, _IMPLICIT_DIR_MODE)
        style = whiteout.probe_marker_style(str(dest))
        kernel_markers = style.device_whiteouts and style.opaque_xattr == whiteout.TRUSTED_OPAQUE
        extractor = _Extractor(root_fd, kernel_markers=kernel_markers, chown=os.geteuid() == 0)
        try:
            _extract_all(tar_stream, extractor, label)
            _check(blob, tar_stream, label, digest, size, diff_id)
            extractor.finish()
        finally:
            extractor.close()
        _syncfs(root_fd)
    finally:
        os.close(root_fd)
    return UnpackedLayer(blob.digest, blob.size, tar_stream.digest, extractor.unpacked_size)


def _extract_all(tar_stream: _TarStream, extractor: _Extractor, label: str) -> None:
    where = "at the start of the tar"
    try:
        with tarfile.open(fileobj=tar_stream, mode="r|", bufsize=TAR_BUFSIZE, encoding="utf-8",  # type: ignore[call-overload]
                          errors="surrogateescape") as tf:
            while (member := tf.next()) is not None:
                where = f"entry {member.name!r}"
                extractor.add(member, tf)
                where = f"after entry {member.name!r}"
            end = tf.offset
        tar_stream.drain()
        if tar_stream.last_data > end:
            raise _Refused(f"data after the end of the archive (offset {end}): corrupt tar header?")
        if tar_stream.size < end + tarfile.BLOCKSIZE:
            raise _Refused("the tar ends without its end-of-archive blocks (truncated?)")
    except _Refused as exc:
        raise ImageError(f"{label}: {where}: {exc}") from None
    except ImageError as exc:
        raise ImageError(f"{label}: {where}: {exc}") from None
    except tarfile.TarError as exc:
        raise ImageError(f"{label}: {where}: invalid tar: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{label}: {where}: {_describe(exc)}") from None


def _check(blob: HashingReader, tar_stream: _TarStream, label: str, digest: str | None,
           size: int | None, diff_id: str | None) -> None:
    """Both digests, once every byte has been read (the tar's end is not the blob's end)."""
    blob.drain()
    if size is not None and blob.size != size:
        raise ImageError(f"{label}: the blob is {blob.size} bytes, its descriptor says {size}")
    if digest is not None and blob.digest != digest:
        raise ImageError(f"{label}: the blob does not match its digest (its content is {blob.digest})")
    if diff_id is not None and tar_stream.digest != diff_id:
        raise ImageError(f"{label}: the uncompressed tar is {tar_stream.digest}, "
                         f"but the image config says its diff_id is {diff_id}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class _TarStream(HashingReader):
    """The uncompressed tar: hashed for the diff_id, and watched for the offset just past its last
    non-zero byte, so that an archive tarfile stopped reading early (it treats a corrupt header
    after the first as the end) is caught."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__(raw, what="the tar")
        self.last_data = 0

    def read(self, n: int = -1) -> bytes:
        start = self.size
        chunk = super().read(n)
        if chunk:
            kept = len(chunk.rstrip(b"\0"))
            if kept:
                self.last_data = start + kept
        return chunk


def _components(name: str) -> Parts:
    """NAME as components below the layer root: absolute names are relative to it, ``.`` and empty
    components vanish, ``..`` removes one component and may not climb above the root."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise _Refused(f"{name!r} climbs out of the layer")
            parts.pop()
        else:
            parts.append(part)
    return tuple(parts)


def _times_ns(member: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns; PAX times are decimal strings, exact to the ns (a float is not)."""
    mtime = _pax_time(member, "mtime")
    if mtime is None:
        mtime = int(member.mtime) * 1_000_000_000
    atime = _pax_time(member, "atime")
    return (mtime if atime is None else atime), mtime


def _pax_time(member: tarfile.TarInfo, key: str) -> int | None:
    value = member.pax_headers.get(key)
    if value is None:
        return None
    try:
        return int(Decimal(value).scaleb(9).to_integral_value())
    except InvalidOperation:
        raise _Refused(f"invalid PAX {key} {value!r}") from None


class _Extractor:
    """Places entries under the root fd; remembers what the end of the layer must still do (markers,
    directory modes and times)."""

    def __init__(self, root_fd: int, *, kernel_markers: bool, chown: bool) -> None:
        self.root_fd = root_fd
        self.kernel_markers = kernel_markers
        self.chown = chown
        self.unpacked_size = 0
        self._chain: list[tuple[str, int]] = []  # open fds of the last parent path, root excluded
        self._dirs: dict[Parts, tuple[int, int, int]] = {}  # explicit dirs: mode, atime, mtime
        self._files: set[Parts] = set()  # non-directories this layer made (hardlink targets)
        self._whiteouts: set[Parts] = set()
        self._opaque: set[Parts] = set()
        self._skipped_devices = 0
        self._dropped_xattrs: set[str] = set()
        self._unset_xattrs: set[str] = set()

    # -- directories, walked without following anything -------------------------------------

    def _parent_fd(self, parents: Parts) -> int:
        """The directory PARENTS (created if missing), from the cached chain of open fds."""
        common = 0
        while common < min(len(self._chain), len(parents)) and self._chain[common][0] == parents[common]:
            common += 1
        self._drop_chain(common)
        fd = self._chain[-1][1] if self._chain else self.root_fd
        for i in range(common, len(parents)):
            fd = self._open_dir(fd, parents[: i + 1], create=True)
            self._chain.append((parents[i], fd))
        return fd

    def _drop_chain(self, keep: int = 0) -> None:
        for _, fd in self._chain[keep:]:
            os.close(fd)
        del self._chain[keep:]

    def _open_dir(self, parent_fd: int, parts: Parts, *, create: bool) -> int:
        name = parts[-1]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, _IMPLICIT_DIR_MODE, dir_fd=parent_fd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            os.fchmod(fd, _IMPLICIT_DIR_MODE)  # whatever the umask
            return fd
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.lstat(name, dir_fd=parent_fd)
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise _Refused(f"{'/'.join(parts)!r} is {what}") from None

    def _open_path(self, parts: Parts, *, create: bool = False) -> int:
        """An fd of its own for the directory PARTS, walked from the root (the caller closes it)."""
        fd = os.dup(self.root_fd)
        try:
            for i in range(len(parts)):
                child = self._open_dir(fd, parts[: i + 1], create=create)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- entries ------------------------------------------------------------------------------

    def add(self, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        parts = _components(member.name)
        if not parts:
            if not member.isdir():
                raise _Refused("the layer root can only be a directory")
            self._apply_dir(self.root_fd, (), member)
            return
        parents, leaf = parts[:-1], parts[-1]
        for part in parents:
            if whiteout.is_reserved_name(part):
                raise _Refused(f"whiteout name {part!r} used as a directory")
        if whiteout.is_reserved_name(leaf):
            self._add_marker(parents, leaf)
            return
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()
                or member.ischr() or member.isblk() or member.isfifo()):
            raise _Refused(f"unsupported tar entry type {member.type!r}")
        parent_fd = self._parent_fd(parents)
        try:
            existing: os.stat_result | None = os.lstat(leaf, dir_fd=parent_fd)
        except FileNotFoundError:
            existing = None
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                self._remove(parent_fd, leaf, parts, existing)
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(leaf, 0o700, dir_fd=parent_fd)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=parent_fd)
            try:
                self._apply_dir(fd, parts, member)
            finally:
                os.close(fd)
            return
        if member.islnk():
            self._add_hardlink(parent_fd, leaf, parts, member, existing)
            return
        if existing is not None:
            self._remove(parent_fd, leaf, parts, existing)
        if member.isreg():
            self._add_file(parent_fd, leaf, member, tf)
        elif member.issym():
            os.symlink(member.linkname, leaf, dir_fd=parent_fd)
            self._apply_meta(parent_fd, leaf, member, chmod=False)
        elif member.isfifo():
            os.mkfifo(leaf, 0o600, dir_fd=parent_fd)
            self._apply_meta(parent_fd, leaf, member)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            try:
                os.mknod(leaf, kind | 0o600, os.makedev(member.devmajor, member.devminor),
                         dir_fd=parent_fd)
            except PermissionError:
                self._skipped_devices += 1
                return
            self._apply_meta(parent_fd, leaf, member)
        self._files.add(parts)

    def _remove(self, parent_fd: int, leaf: str, parts: Parts, existing: os.stat_result) -> None:
        """Clear the way for a new entry: a directory goes with its content (and every fd and
        record under it), anything else is unlinked."""
        if not stat.S_ISDIR(existing.st_mode):
            os.unlink(leaf, dir_fd=parent_fd)
            return
        # The fd chain holds PARTS' parents only, never anything inside it: it stays valid.
        shutil.rmtree(leaf, dir_fd=parent_fd)
        depth = len(parts)
        for records in (self._dirs, self._opaque, self._whiteouts, self._files):
            for key in [k for k in records if k[:depth] == parts]:
                if isinstance(records, dict):
                    del records[key]
                else:
                    records.discard(key)

    def _add_marker(self, parents: Parts, leaf: str) -> None:
        if whiteout.is_oci_opaque_marker(leaf):
            self._opaque.add(parents)
        else:
            target = whiteout.oci_whiteout_target(leaf)
            if target is None:
                log.debug("skipping AUFS metadata %r", "/".join(parents + (leaf,)))
                return
            if target in ("", ".", ".."):
                raise _Refused(f"whiteout of {target!r}")
            self._whiteouts.add(parents + (target,))
        if not self.kernel_markers:
            parent_fd = self._parent_fd(parents)
            try:
                st = os.lstat(leaf, dir_fd=parent_fd)
                if not stat.S_ISREG(st.st_mode):
                    raise _Refused(f"{leaf!r} exists and is not a marker file")
            except FileNotFoundError:
                whiteout.write_oci_marker_at(parent_fd, leaf)

    def _add_hardlink(self, parent_fd: int, leaf: str, parts: Parts, member: tarfile.TarInfo,
                      existing: os.stat_result | None) -> None:
        try:
            target = _components(member.linkname)
        except _Refused:
            raise _Refused(f"hardlink target {member.linkname!r} is outside the layer") from None
        if target not in self._files:
            raise _Refused(f"hardlink to {member.linkname!r}, which this layer does not contain")
        if target == parts:
            return
        target_fd = self._open_path(target[:-1])
        try:
            if existing is not None:
                self._remove(parent_fd, leaf, parts, existing)
            os.link(target[-1], leaf, src_dir_fd=target_fd, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
        finally:
            os.close(target_fd)
        self._files.add(parts)

    def _add_file(self, parent_fd: int, leaf: str, member: tarfile.TarInfo,
                  tf: tarfile.TarFile) -> None:
        fd = os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=parent_fd)
        try:
            source = tf.extractfile(member)
            assert source is not None
            left = member.size
            while left > 0:
                chunk = source.read(min(left, CHUNK))
                if not chunk:
                    raise _Refused("unexpected end of data (truncated tar?)")
                left -= len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            self._apply_meta(fd, None, member)
        finally:
            os.close(fd)
        self.unpacked_size += member.size

    # -- metadata -----------------------------------------------------------------------------

    def _apply_meta(self, fd: int, leaf: str | None, member: tarfile.TarInfo, *,
                    chmod: bool = True) -> None:
        """Owner, then mode (chown clears set-id bits), then xattrs (chown clears capabilities),
        then times. FD is the object itself when LEAF is None, else its directory."""
        if self.chown:
            self._lchown(fd, leaf, member.uid, member.gid)
        if chmod:
            if leaf is None:
                os.fchmod(fd, stat.S_IMODE(member.mode))
            else:
                os.chmod(leaf, stat.S_IMODE(member.mode), dir_fd=fd)  # a node we just made
        self._set_xattrs(fd if leaf is None else f"/proc/self/fd/{fd}/{leaf}", member)
        atime, mtime = _times_ns(member)
        if leaf is None:
            os.utime(fd, ns=(atime, mtime))
        else:
            os.utime(leaf, ns=(atime, mtime), dir_fd=fd, follow_symlinks=False)

    def _apply_dir(self, fd: int, parts: Parts, member: tarfile.TarInfo) -> None:
        """Owner and xattrs now; mode and times at the end (children would change the times, and a
        read-only mode would stop an unprivileged unpack from filling the directory)."""
        if self.chown:
            self._lchown(fd, None, member.uid, member.gid)
        self._set_xattrs(fd, member)
        self._dirs[parts] = (stat.S_IMODE(member.mode), *_times_ns(member))

    def _lchown(self, fd: int, leaf: str | None, uid: int, gid: int) -> None:
        try:
            if leaf is None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(leaf, uid, gid, dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM):
                raise
            # Root in a user namespace without a mapping for these ids: keep ours, say so once.
            log.warning("cannot give files their owners (%s); keeping the unpacking user's", exc.strerror)
            self.chown = False

    def _set_xattrs(self, target: int | str, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith(_XATTR_PAX):
                continue
            name = key[len(_XATTR_PAX):]
            if whiteout.is_private_xattr(name):
                # A layer could fake opaque dirs or redirects with these: markers come from
                # whiteout entries only.
                self._dropped_xattrs.add(name)
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value.encode("utf-8", "surrogateescape"))
                else:
                    os.setxattr(target, name, value.encode("utf-8", "surrogateescape"),
                                follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _XATTR_SKIPPABLE:
                    raise
                self._unset_xattrs.add(name)

    # -- the end of the layer -----------------------------------------------------------------

    def finish(self) -> None:
        """Markers (kernel form), then directory modes and times deepest first, then warnings."""
        self._drop_chain()
        if self.kernel_markers:
            for parts in sorted(self._opaque):
                self._mark_opaque(parts)
            for parts in sorted(self._whiteouts):
                self._write_whiteout(parts)
        for parts in sorted(self._dirs, key=len, reverse=True):
            mode, atime, mtime = self._dirs[parts]
            fd = self._open_path(parts)
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)
        if self._skipped_devices:
            log.warning("skipped %d device node(s): creating devices needs root",
                        self._skipped_devices)
        if self._dropped_xattrs:
            log.warning("dropped overlay xattrs from the layer tar: %s",
                        ", ".join(sorted(self._dropped_xattrs)))
        if self._unset_xattrs:
            log.warning("could not set xattrs (not permitted or not supported here): %s",
                        ", ".join(sorted(self._unset_xattrs)))

    def _mark_opaque(self, parts: Parts) -> None:
        if not parts:
            log.warning("ignoring an opaque marker at the layer root (overlayfs ignores it there)")
            return
        fd = self._open_path(parts, create=True)
        try:
            whiteout.mark_opaque_fd(fd)
        finally:
            os.close(fd)

    def _write_whiteout(self, parts: Parts) -> None:
        """A 0:0 device, unless this layer has a real entry of that name: the entry wins, and a
        directory becomes opaque (the whiteout deleted what was below it)."""
        fd = self._open_path(parts[:-1], create=True)
        try:
            try:
                st = os.lstat(parts[-1], dir_fd=fd)
            except FileNotFoundError:
                whiteout.write_device_whiteout(parts[-1], dir_fd=fd)
                return
            if stat.S_ISDIR(st.st_mode):
                child = os.open(parts[-1], _DIR_FLAGS, dir_fd=fd)
                try:
                    whiteout.mark_opaque_fd(child)
                finally:
                    os.close(child)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._drop_chain()


def remove_tree(path: Path) -> None:
    """Remove a (half-)unpacked layer, even one whose directories were made read-only."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except PermissionError:
        for dirpath, _, _ in os.walk(path):
            os.chmod(dirpath, 0o700)
        shutil.rmtree(path)


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    """One syncfs for the whole layer instead of an fsync per file: the caller renames the layer
    into the store next, and a crash must not leave a renamed layer with missing data."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
