"""A container's upper dir as an OCI layer tar: the commit direction of `unpack`.

The upper dir may have been written by the overlayfuse daemon (0:0 devices or ``.wh.`` files,
trusted or user opaque xattrs) or by kernel overlayfs (devices, xattr whiteouts in ``opaque=x``
dirs); every form becomes the OCI one, because a layer must mean the same thing to every unpacker:

- a whiteout of NAME, in any form, becomes an empty ``.wh.NAME`` entry;
- an opaque directory becomes its own entry followed by ``DIR/.wh..wh..opq``;
- a directory that is both whited out and present (``.wh.NAME`` beside ``NAME``: replaced) is an
  opaque directory; a non-directory that is both is just itself (it hides what is below anyway);
- overlay-private xattrs (``trusted.overlay.*``, ``user.overlay.*``) are dropped, others kept as PAX
  ``SCHILY.xattr.*`` records;
- a second name of an inode already written becomes a hardlink entry; sockets are skipped (they
  mean nothing once their process is gone, and tar cannot hold them);
- a file with holes becomes a PAX 1.0 sparse entry holding only its data (`sparse`).

The output is deterministic: names sorted bytewise within each directory (depth first), PAX format,
numeric owners with no user or group names, times from the files (to the nanosecond). Two commits of
the same upper dir give the same bytes, so the same diff_id.

What a layer cannot say is refused with an ImageError naming the path: a kernel ``redirect_dir``
rename (the moved content lives at the old path in a lower layer, which a layer tar cannot point
to) and a kernel ``metacopy`` file (its data is in a lower layer).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

from ..errors import ImageError
from ..images.compression import CHUNK
from ..overlay import whiteout
from .sparse import data_pieces, sparse_member

log = logging.getLogger(__name__)

_XATTR_PAX = "SCHILY.xattr."
_NS = 1_000_000_000


class _CountingWriter:
    """Gives tarfile the ``tell()`` its plain (not stream) write mode wants, over any writable
    stream. Stream mode (``w|``) would do without it, but its buffer is a bytes object grown by
    concatenation, which costs a copy of the whole buffer for every header."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos


def write_layer_tar(upper: Path, out: BinaryIO) -> None:
    """Write the upper dir UPPER to OUT as an uncompressed OCI layer tar (see the module doc)."""
    upper_str = os.fspath(upper)
    writer = _CountingWriter(out)
    with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                      encoding="utf-8", errors="surrogateescape", copybufsize=CHUNK) as tf:
        state = _Writer(tf)
        try:
            # The root's own opaque marker means nothing to overlayfs (nor does a redirect there).
            state.add_dir(".", upper_str, os.lstat(upper_str), opaque=False)
            state.walk(upper_str, "", whiteout.read_dir_markers(upper_str))
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise ImageError(f"cannot read the upper dir {upper}:{where}: {exc.strerror}") from exc
    if state.sockets:
        log.info("skipped %d socket(s): a layer cannot hold them", state.sockets)


def _tar_name(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


class _Writer:
    def __init__(self, tf: tarfile.TarFile) -> None:
        self.tf = tf
        self.links: dict[tuple[int, int], str] = {}  # (dev, ino) -> first tar name
        self.sockets = 0

    def walk(self, dir_path: str, rel: str, markers: whiteout.DirMarkers) -> None:
        """Emit DIR_PATH's content (its own entry is written already); MARKERS are its own."""
        listing = whiteout.read_layer_dir(dir_path, markers)
        # Everything this directory emits, (name in the tar, lstat, is a marker), sorted bytewise.
        order = [(name, st, False) for name, st in listing.entries.items()]
        order += [(whiteout.oci_whiteout_name(name), st, True)
                  for name, st in listing.whiteouts.items() if name not in listing.entries]
        order.sort(key=lambda item: os.fsencode(item[0]))
        for name, st, is_marker in order:
            tar_name = _tar_name(rel, name)
            if is_marker:
                self.add_marker(tar_name, st)
                continue
            path = os.path.join(dir_path, name)
            if stat.S_ISDIR(st.st_mode):
                child = whiteout.read_dir_markers(path)
                if child.redirect:
                    raise ImageError(
                        f"/{tar_name}: this directory was renamed by kernel overlayfs with "
                        "redirect_dir=on, which a layer cannot express; commit from a mount with "
                        "redirect_dir=off (overlayctl's containers have it)")
                # Whited out and present means replaced: nothing below may show through.
                opaque = child.opaque or name in listing.whiteouts
                self.add_dir(tar_name, path, st, opaque=opaque)
                self.walk(path, tar_name, child)
            else:
                self.add_other(tar_name, path, st)

    # -- entries ------------------------------------------------------------------------------

    def add_dir(self, tar_name: str, path: str, st: os.stat_result, *, opaque: bool) -> None:
        info = _info(tar_name, tarfile.DIRTYPE, st, _xattrs(path, tar_name))
        self.tf.addfile(info)
        if opaque:
            marker = _tar_name("" if tar_name == "." else tar_name, whiteout.OCI_OPAQUE_MARKER)
            self.add_marker(marker, st)

    def add_marker(self, tar_name: str, st: os.stat_result) -> None:
        """An empty, ownerless, modeless file: only its name means something."""
        info = tarfile.TarInfo(tar_name)
        info.type, info.mode, info.uid, info.gid = tarfile.REGTYPE, 0, 0, 0
        info.uname = info.gname = ""
        _set_mtime(info, st.st_mtime_ns)
        self.tf.addfile(info)

    def add_other(self, tar_name: str, path: str, st: os.stat_result) -> None:
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            log.debug("skipping socket /%s: a layer cannot hold one", tar_name)
            self.sockets += 1
            return
        if st.st_nlink > 1:
            first = self.links.get((st.st_dev, st.st_ino))
            if first is not None:
                info = _info(tar_name, tarfile.LNKTYPE, st, {})
                info.linkname = first
                self.tf.addfile(info)
                return
            self.links[(st.st_dev, st.st_ino)] = tar_name
        xattrs = _xattrs(path, tar_name)
        if stat.S_ISREG(mode):
            info = _info(tar_name, tarfile.REGTYPE, st, xattrs)
            info.size = st.st_size
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb", buffering=0) as data:
                # Fewer blocks than its size: it may have holes, which stay holes in the layer.
                pieces = data_pieces(fd, st.st_size) if st.st_blocks * 512 < st.st_size else None
                if pieces is None:
                    self.tf.addfile(info, data)
                else:
                    self.tf.addfile(info, sparse_member(info, fd, pieces))
        elif stat.S_ISLNK(mode):
            info = _info(tar_name, tarfile.SYMTYPE, st, xattrs)
            info.linkname = os.readlink(path)
            self.tf.addfile(info)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info = _info(tar_name, tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE, st,
                         xattrs)
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self.tf.addfile(info)
        elif stat.S_ISFIFO(mode):
            self.tf.addfile(_info(tar_name, tarfile.FIFOTYPE, st, xattrs))
        else:
            raise ImageError(f"/{tar_name}: unsupported file type {stat.S_IFMT(mode):o}")


def _info(tar_name: str, kind: bytes, st: os.stat_result, xattrs: dict[str, str]) -> tarfile.TarInfo:
    info = tarfile.TarInfo(tar_name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.pax_headers = dict(xattrs)
    _set_mtime(info, st.st_mtime_ns)
    return info


def _set_mtime(info: tarfile.TarInfo, mtime_ns: int) -> None:
    """Whole seconds in the header; nanoseconds, when there are any, as an exact PAX record."""
    seconds, ns = divmod(mtime_ns, _NS)
    info.mtime = seconds
    if ns:
        info.pax_headers = {**info.pax_headers, "mtime": f"{seconds}.{ns:09d}".rstrip("0")}


def _xattrs(path: str, tar_name: str) -> dict[str, str]:
    """PAX records for PATH's xattrs, overlay-private ones dropped; a metacopy file is refused."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    records = {}
    for name in sorted(names):
        if name in whiteout.METACOPY_XATTRS:
            raise ImageError(
                f"/{tar_name}: a kernel metacopy file (its data is in a lower layer), which a layer "
                "cannot express; commit from a mount with metacopy=off (overlayctl's containers have it)")
        if whiteout.is_private_xattr(name):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue  # removed since it was listed
            raise
        records[_XATTR_PAX + name] = value.decode("utf-8", "surrogateescape")
    return records
