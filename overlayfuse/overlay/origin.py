"""The kernel's ``overlay.origin`` xattr: which lower object an upper object was copied up from.

Kernel overlayfs records, on every copy-up of a directory or of a file with one name, an encoded
file handle of the lower object, so that a later mount (index=on, or all layers on one filesystem)
finds the lower object again: copied-up files keep the lower ``st_ino``, a directory's index and
hardlinks stay right. Written here in the same bytes, so an upper dir written by overlayfuse reads
the same under ``mount -t overlay -o redirect_dir=on,metacopy=on,index=on``.

The format is ``struct ovl_fb`` (fs/overlayfs/overlayfs.h), packed, as ``ovl_encode_real_fh`` in
fs/overlayfs/copy_up.c fills it and ``ovl_set_origin_fh`` stores it (the xattr holds ``fb.len``
bytes, from ``version`` on)::

    u8 version = 0; u8 magic = 0xfb; u8 len = 21 + len(fid); u8 flags; u8 type;
    u8 uuid[16];    /* the lower filesystem's sb->s_uuid */
    u8 fid[];       /* exportfs_encode_inode_fh(lower, fid, NULL parent): name_to_handle_at's */

``flags`` is OVL_FH_FLAG_CPU_ENDIAN (0 on little-endian, OVL_FH_FLAG_BIG_ENDIAN = 1 otherwise);
OVL_FH_FLAG_PATH_UPPER is only for handles of upper objects (the index), never an origin. Where the
lower filesystem cannot export handles (``ovl_can_decode_fh`` false: name_to_handle_at answers
EOPNOTSUPP), the kernel stores a "null" origin, an empty value, which still says "copied up, not
created in upper" (``ovl_get_origin_fh``); so do we. A null uuid is written as it is: the kernel
does the same, and decodes such handles when the lower is on the upper's filesystem.

A file with several names gets its origin through the hardlink index instead (`links`), as the
kernel writes one for it only with index=on, where the copy goes through its index dir.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import sys

from ..linux import ownwrite, syscalls

log = logging.getLogger(__name__)

OVL_FH_VERSION = 0
OVL_FH_MAGIC = 0xFB
OVL_FH_FLAG_BIG_ENDIAN = 1
#: The flags of a handle encoded on this machine (OVL_FH_FLAG_CPU_ENDIAN).
CPU_ENDIAN = 0 if sys.byteorder == "little" else OVL_FH_FLAG_BIG_ENDIAN
#: version, magic, len, flags, type, then the 16-byte uuid.
_HEADER = struct.Struct("<BBBBB16s")
NULL_UUID = bytes(16)

#: Why name_to_handle_at fails where the kernel stores a null origin: the filesystem has no export
#: operations (EOPNOTSUPP), or a handle does not fit (EOVERFLOW; the kernel fails there with EIO,
#: never hit with real filesystems' handles of at most MAX_HANDLE_SZ bytes).
_NO_HANDLE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EOVERFLOW})

_uuids: dict[int, bytes] = {}
"""st_dev -> that filesystem's uuid; filled once per lower filesystem (a dict write is atomic in
CPython, and two threads computing the same entry agree)."""


def wanted(st: os.stat_result) -> bool:
    """Whether a copy-up records an origin for an object lstat'ed as ST on its own: a directory,
    or anything with one name (ovl_do_copy_up; a hardlinked file gets it from `links`)."""
    return stat.S_ISDIR(st.st_mode) or st.st_nlink == 1


def encode(source: int | str, st: os.stat_result) -> bytes:
    """The origin xattr value for the lower object SOURCE (an open fd, or a path never followed)
    lstat'ed as ST: an encoded ``struct ovl_fb``, or b"" where its filesystem exports no handles."""
    try:
        if isinstance(source, int):
            fid_type, fid = syscalls.name_to_handle_at(source, "", syscalls.AT_EMPTY_PATH)
        else:
            fid_type, fid = syscalls.name_to_handle_at(syscalls.AT_FDCWD, source, 0)
    except OSError as exc:
        if exc.errno in _NO_HANDLE:
            return b""
        raise
    uuid = _uuids.get(st.st_dev)
    if uuid is None:
        uuid = _uuids[st.st_dev] = _fs_uuid(source, st)
    header = _HEADER.pack(OVL_FH_VERSION, OVL_FH_MAGIC, _HEADER.size + len(fid), CPU_ENDIAN, fid_type, uuid)
    return header + fid


def set_origin(target: int | str, xattr: str, value: bytes) -> None:
    """Store VALUE as TARGET's origin (an fd, or a path never followed). A ``user.`` xattr cannot go
    on a symlink or a device (EPERM): skipped there, as the kernel's ``ovl_set_origin_fh`` does."""
    try:
        ownwrite.setxattr(target, xattr, value, follow_symlinks=isinstance(target, int))
    except PermissionError:
        if not xattr.startswith("user."):
            raise
        log.debug("%s: no %s on this kind of file", target, xattr)


def _fs_uuid(source: int | str, st: os.stat_result) -> bytes:
    """The uuid of the filesystem SOURCE is on: asked through SOURCE itself if it is an fd or a
    directory, else through its parent directory (never by opening a device or a fifo)."""
    if isinstance(source, int):
        return syscalls.fs_uuid(source) or NULL_UUID
    path = source if stat.S_ISDIR(st.st_mode) else os.path.dirname(source) or "."
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_dev != st.st_dev:  # a mount point: its parent is on another filesystem
            return NULL_UUID
        return syscalls.fs_uuid(fd) or NULL_UUID
    finally:
        os.close(fd)
