"""File attribute flags (lsattr, chattr) and the ``struct fsxattr`` (xfs_io's lsattr and chattr),
read and changed with the ioctls that carry them.

The kernel's FUSE sends a daemon exactly these four ioctls for its fileattr operations
(fs/fuse/ioctl.c, ``fuse_fileattr_get`` and ``fuse_fileattr_set``): the flags as a 4-byte int,
the struct as its 28 bytes, both in the host's byte order. The daemon asks the real file with the
same ioctl, through a descriptor of its own: an O_PATH one cannot carry an ioctl.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Iterator

#: _IOR('f', 1, long), _IOW('f', 2, long), _IOR('X', 31, struct fsxattr), _IOW('X', 32, ...) on a
#: 64-bit kernel, which sends these numbers whatever the caller used (its fileattr operations).
GETFLAGS = 0x80086601
SETFLAGS = 0x40086602
FSGETXATTR = 0x801C581F
FSSETXATTR = 0x401C5820
COMMANDS = frozenset({GETFLAGS, SETFLAGS, FSGETXATTR, FSSETXATTR})

#: FS_APPEND_FL and FS_IMMUTABLE_FL (linux/fs.h), and their fsxattr forms.
APPEND_FL = 0x20
IMMUTABLE_FL = 0x10
XFLAG_IMMUTABLE = 0x8
XFLAG_APPEND = 0x10

#: FS_SYNC_FL and FS_NOATIME_FL: the flags the kernel's overlay carries to a copy-up's copy
#: (``OVL_COPY_FS_FLAGS_MASK``).
SYNC_FL = 0x8
NOATIME_FL = 0x80

#: Room for what any of the four carries (the flags as a long, the 28-byte struct).
_BUFFER = 32

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def reads(cmd: int) -> bool:
    return cmd in (GETFLAGS, FSGETXATTR)


def get(path: str, cmd: int, size: int) -> bytes:
    """The first SIZE bytes CMD (GETFLAGS or FSGETXATTR) answers for the file or directory PATH (a
    /proc/self/fd path of a held object: opened anew, read-only)."""
    with _opened(path) as fd:
        return _get(fd, cmd)[:size]


def set_(path: str, cmd: int, data: bytes) -> None:
    """CMD (SETFLAGS or FSSETXATTR) with DATA on the file or directory PATH."""
    with _opened(path) as fd:
        _set(fd, cmd, data)


def copy_kept_flags(src: int | str, dst: int | str) -> None:
    """Give DST the sync and noatime flags SRC has, as the kernel's overlay does at a copy-up
    (``ovl_copy_fileattr``); each is an fd, or a directory's path (never followed). Nothing where
    either filesystem keeps no flags."""
    try:
        with _opened(src, _DIRECTORY) as src_fd:
            kept = _flags(src_fd) & (SYNC_FL | NOATIME_FL)
        if kept:
            with _opened(dst, _DIRECTORY) as dst_fd:
                flags = (_flags(dst_fd) & ~(SYNC_FL | NOATIME_FL)) | kept
                _set(dst_fd, SETFLAGS, flags.to_bytes(4, sys.byteorder))
    except OSError as exc:
        if exc.errno not in _NOT_CARRIED:
            raise


#: What a filesystem that keeps no such flags answers (NTFS-3G: EINVAL, as the kernel notes), and
#: what a directory this daemon may not open for reading (a rootless one, a directory of an owner
#: it cannot map) answers: its copy-up goes on without them, as it went before flags were carried.
_NOT_CARRIED = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EACCES, errno.EPERM})


def _flags(fd: int) -> int:
    return int.from_bytes(_get(fd, GETFLAGS)[:4], sys.byteorder)


def _get(fd: int, cmd: int) -> bytes:
    buf = bytearray(_BUFFER)
    fcntl.ioctl(fd, cmd, buf)
    return bytes(buf)


def _set(fd: int, cmd: int, data: bytes) -> None:
    fcntl.ioctl(fd, cmd, bytearray(data.ljust(_BUFFER, b"\0")))


#: How `copy_kept_flags` opens a directory it is given by path: its last component never followed.
_DIRECTORY = os.O_DIRECTORY | os.O_NOFOLLOW


@contextlib.contextmanager
def _opened(target: int | str, flags: int = 0) -> Iterator[int]:
    """TARGET itself if it is an fd, else a read-only descriptor of TARGET (with FLAGS too), closed
    after."""
    if isinstance(target, int):
        yield target
        return
    fd = os.open(target, _OPEN_FLAGS | flags)
    try:
        yield fd
    finally:
        os.close(fd)


def with_protected(cmd: int, data: bytes, append: bool, immutable: bool) -> bytes:
    """DATA (what GETFLAGS or FSGETXATTR answered) with the append-only and immutable bits set
    where APPEND and IMMUTABLE say (the kernel's overlay keeps those two in an xattr of the upper
    object, ``overlay.protattr``, not on the object itself)."""
    if not (append or immutable) or len(data) < 4:
        return data
    word = int.from_bytes(data[:4], sys.byteorder)
    if cmd == GETFLAGS:
        word |= (APPEND_FL if append else 0) | (IMMUTABLE_FL if immutable else 0)
    else:
        word |= (XFLAG_APPEND if append else 0) | (XFLAG_IMMUTABLE if immutable else 0)
    return word.to_bytes(4, sys.byteorder) + data[4:]


__all__ = ["COMMANDS", "FSGETXATTR", "FSSETXATTR", "GETFLAGS", "SETFLAGS", "copy_kept_flags", "get", "reads",
           "set_", "with_protected"]
