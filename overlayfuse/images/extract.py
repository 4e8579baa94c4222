"""Extraction of one layer's tar entries into a directory, without ever following a symlink.

Safety, as the mature unpackers do it: every entry is placed through directory fds opened
component by component with ``O_NOFOLLOW``, so no symlink (in the layer or planted by an earlier
entry) is ever followed; ``..`` may not climb above the layer root; absolute names are taken as
relative to it; a hardlink must point at a non-directory this same layer created. Anything else is
refused with `Refused`, which the caller turns into an error naming the layer and the entry.

Whiteouts are written in the form overlayfuse and the kernel read fastest: when we may (root), a
``.wh.NAME`` becomes a 0:0 character device and ``.wh..wh..opq`` the ``trusted.overlay.opaque``
xattr; otherwise the OCI files are kept as they are (the daemon reads those too). Markers are
applied after all entries (`Extractor.finish`), because OCI lets a whiteout appear anywhere in its
directory and a layer's own entries win over its whiteouts; they live here, not in the driver,
because a later entry that replaces a directory must forget the markers recorded under it.

This module knows nothing of compression, digests or the store: `unpack` feeds it tar members.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from .. import whiteout
from .compression import CHUNK
from .remove import remove_at

log = logging.getLogger(__name__)

_XATTR_PAX = "SCHILY.xattr."
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Implicit directories (named as a parent by an entry, or the layer root, but absent from the
#: tar as entries of their own) get docker's mode, root:root (when we may chown) and, as times, the
#: moment the unpack began. The importer then gives those that exist in the layers below the
#: metadata they have there (`inherit.inherit_implicit_dirs`).
IMPLICIT_DIR_MODE = 0o755
_XATTR_SKIPPABLE = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES)

Parts = tuple[str, ...]


class Refused(Exception):
    """An entry that must not be extracted; the message says why (the caller adds where)."""


def _components(name: str) -> Parts:
    """NAME as components below the layer root: absolute names are relative to it, ``.`` and empty
    components vanish, ``..`` removes one component and may not climb above the root."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise Refused(f"{name!r} climbs out of the layer")
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
        raise Refused(f"invalid PAX {key} {value!r}") from None


def open_dir_path(root_fd: int, depth: int, open_child: Callable[[int, int], int]) -> int:
    """An fd of its own (the caller closes it) for a directory DEPTH components below ROOT_FD,
    walked one component at a time: OPEN_CHILD(parent_fd, n) opens the nth (from 1) in its parent,
    never following a symlink. Every fd but the last is closed, also when a step fails."""
    fd = os.dup(root_fd)
    try:
        for n in range(1, depth + 1):
            child = open_child(fd, n)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


class Extractor:
    """Places entries under the root fd; remembers what the end of the layer must still do (markers,
    directory modes and times) and which directories it had to make up (`implicit_dirs`)."""

    def __init__(self, root_fd: int, *, kernel_markers: bool, chown: bool) -> None:
        self.root_fd = root_fd
        self.kernel_markers = kernel_markers
        self.chown = chown
        self.unpacked_size = 0
        self._chain: list[tuple[str, int]] = []  # open fds of the last parent path, root excluded
        self._dirs: dict[Parts, tuple[int, int, int]] = {}  # explicit dirs: mode, atime, mtime
        self._made_up: set[Parts] = {()}  # dirs made without an entry (the root until a ./ entry)
        self._started_ns = time.time_ns()
        self._files: set[Parts] = set()  # non-directories this layer made (hardlink targets)
        self._whiteouts: set[Parts] = set()
        self._opaque: set[Parts] = set()
        self._marked: set[Parts] = set()  # every dir (and its parents) a recorded marker is in
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
            return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, IMPLICIT_DIR_MODE, dir_fd=parent_fd)
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            os.fchmod(fd, IMPLICIT_DIR_MODE)  # whatever the umask
            self._made_up.add(parts)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.lstat(name, dir_fd=parent_fd)
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise Refused(f"{'/'.join(parts)!r} is {what}") from None

    def _open_path(self, parts: Parts, *, create: bool = False) -> int:
        """An fd of its own for the directory PARTS, walked from the root (the caller closes it)."""
        return open_dir_path(self.root_fd, len(parts),
                             lambda fd, depth: self._open_dir(fd, parts[:depth], create=create))

    # -- entries ------------------------------------------------------------------------------

    def add(self, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        parts = _components(member.name)
        if not parts:
            if not member.isdir():
                raise Refused("the layer root can only be a directory")
            self._apply_dir(self.root_fd, (), member)
            return
        parents, leaf = parts[:-1], parts[-1]
        for part in parents:
            if whiteout.is_reserved_name(part):
                raise Refused(f"whiteout name {part!r} used as a directory")
        if whiteout.is_reserved_name(leaf):
            self._add_marker(parents, leaf)
            return
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()
                or member.ischr() or member.isblk() or member.isfifo()):
            raise Refused(f"unsupported tar entry type {member.type!r}")
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
            fd = os.open(leaf, DIR_FLAGS, dir_fd=parent_fd)
            try:
                self._apply_dir(fd, parts, member)
            finally:
                os.close(fd)
            return
        if member.islnk():
            self._add_hardlink(parent_fd, leaf, parts, member, existing)
            return
        self._clear(parent_fd, leaf, parts, existing)
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

    def _clear(self, parent_fd: int, leaf: str, parts: Parts, existing: os.stat_result | None) -> None:
        """Make room for a non-directory at PARTS. With nothing there yet, kernel-form markers may
        still be recorded under that name (they are written at the end): the entry wins over
        them, as it wins over the OCI marker files `_remove` takes away with their directory."""
        if existing is not None:
            self._remove(parent_fd, leaf, parts, existing)
        elif parts in self._marked:
            self._forget(parts)

    def _remove(self, parent_fd: int, leaf: str, parts: Parts, existing: os.stat_result) -> None:
        """Clear the way for a new entry: a directory goes with its content (and every fd and
        record under it), anything else is unlinked."""
        if not stat.S_ISDIR(existing.st_mode):
            os.unlink(leaf, dir_fd=parent_fd)
            return
        # The fd chain holds PARTS' parents only, never anything inside it: it stays valid.
        remove_at(parent_fd, leaf)
        self._forget(parts)

    def _forget(self, parts: Parts) -> None:
        """Drop every record at or under PARTS (what was there is gone)."""
        depth = len(parts)
        for records in (self._dirs, self._made_up, self._opaque, self._whiteouts, self._files):
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
                raise Refused(f"whiteout of {target!r}")
            self._whiteouts.add(parents + (target,))
        if self.kernel_markers:
            self._marked.update(parents[:i] for i in range(1, len(parents) + 1))
        else:
            parent_fd = self._parent_fd(parents)
            try:
                st = os.lstat(leaf, dir_fd=parent_fd)
                if not stat.S_ISREG(st.st_mode):
                    raise Refused(f"{leaf!r} exists and is not a marker file")
            except FileNotFoundError:
                whiteout.write_oci_marker_at(parent_fd, leaf)

    def _add_hardlink(self, parent_fd: int, leaf: str, parts: Parts, member: tarfile.TarInfo,
                      existing: os.stat_result | None) -> None:
        try:
            target = _components(member.linkname)
        except Refused:
            raise Refused(f"hardlink target {member.linkname!r} is outside the layer") from None
        if target not in self._files:
            raise Refused(f"hardlink to {member.linkname!r}, which this layer does not contain")
        if target == parts:
            return
        target_fd = self._open_path(target[:-1])
        try:
            self._clear(parent_fd, leaf, parts, existing)
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
                    raise Refused("unexpected end of data (truncated tar?)")
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
        """Markers (kernel form), then directory modes and times deepest first (made-up ones
        included), then warnings."""
        self._drop_chain()
        if self.kernel_markers:
            for parts in sorted(self._opaque):
                self._mark_opaque(parts)
            for parts in sorted(self._whiteouts):
                self._write_whiteout(parts)
        made_up = self._made_up - self._dirs.keys()
        for parts in sorted(self._dirs.keys() | made_up, key=len, reverse=True):
            fd = self._open_path(parts)
            try:
                if parts in made_up:
                    if self.chown:
                        self._lchown(fd, None, 0, 0)
                    os.fchmod(fd, IMPLICIT_DIR_MODE)
                    os.utime(fd, ns=(self._started_ns, self._started_ns))
                else:
                    mode, atime, mtime = self._dirs[parts]
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

    @property
    def implicit_dirs(self) -> tuple[str, ...]:
        """The directories this layer made without an entry of their own, once `finish` has run:
        relative paths, ``.`` for the root (a tar without ``./``), parents before children."""
        made_up = self._made_up - self._dirs.keys()
        return tuple("/".join(parts) or "." for parts in sorted(made_up, key=lambda p: (len(p), p)))

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
                child = os.open(parts[-1], DIR_FLAGS, dir_fd=fd)
                try:
                    whiteout.mark_opaque_fd(child)
                finally:
                    os.close(child)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._drop_chain()
