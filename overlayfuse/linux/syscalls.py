"""libc calls Python's os module lacks, bound once with ctypes: renameat2, sync_file_range, syncfs,
fallocate with a mode, umount2, name_to_handle_at, a linkat that follows (Python 3.11's os.link calls link(2) instead);
and the FS_IOC_GETFSUUID ioctl.

Each wrapper raises OSError (errno, strerror and the names involved) the way ``os`` functions do, so
callers handle them like any other failed call. A function this libc lacks is bound as None and
its wrapper fails with ENOSYS (renameat2 has a glibc wrapper since 2.28; Debian 12 ships 2.36).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: The one handle on libc; ``use_errno`` so that each wrapper reads errno with ctypes.get_errno.
LIBC = ctypes.CDLL(None, use_errno=True)

#: "Relative to the working directory" for the ``*at`` calls.
AT_FDCWD = -100

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

SYNC_FILE_RANGE_WRITE = 2
MNT_DETACH = 2

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400
#: include/linux/exportfs.h: the largest file handle any filesystem encodes (NFSv4's limit).
MAX_HANDLE_SZ = 128
#: _IOR(0x15, 0, struct fsuuid2 { __u8 len; __u8 uuid[16]; }) (include/uapi/linux/fs.h, Linux 6.5+).
FS_IOC_GETFSUUID = 0x80111500


def _bind(name: str, *argtypes: Any) -> Callable[..., int] | None:
    """libc's NAME (returning int, errno kept for ctypes.get_errno), or None if this libc lacks it."""
    try:
        func = getattr(LIBC, name)
    except AttributeError:
        return None
    func.argtypes = argtypes
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]


_renameat2 = _bind("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_sync_file_range = _bind("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_syncfs = _bind("syncfs", ctypes.c_int)
# the 64-bit-offset name, which is the plain one's alias on 64-bit systems
_fallocate = _bind("fallocate64", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64) or \
    _bind("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_linkat = _bind("linkat", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
_umount2 = _bind("umount2", ctypes.c_char_p, ctypes.c_int)
_name_to_handle_at = _bind("name_to_handle_at", ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                           ctypes.POINTER(ctypes.c_int), ctypes.c_int)


class _FileHandle(ctypes.Structure):
    """struct file_handle with room for the largest handle."""

    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def _error(*names: str | None) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), *names)


def _missing(name: str, *names: str | None) -> OSError:
    return OSError(errno.ENOSYS, f"{name} is not available in this libc", *names)


def renameat2(src: str, dst: str, flags: int) -> None:
    """renameat2(2) of two paths (relative to the working directory), with FLAGS (RENAME_*)."""
    if _renameat2 is None:
        raise _missing("renameat2", src, None, dst)
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        raise _error(src, None, dst)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename SRC to DST, failing with EEXIST instead of replacing an existing DST."""
    renameat2(src, dst, RENAME_NOREPLACE)


def rename_exchange(a: str, b: str) -> None:
    """Atomically swap the objects at A and B (both must exist; they may differ in type)."""
    renameat2(a, b, RENAME_EXCHANGE)


def rename_whiteout(src: str, dst: str) -> None:
    """Rename SRC to DST and leave a 0:0 whiteout device at SRC, in one step (needs CAP_MKNOD)."""
    renameat2(src, dst, RENAME_WHITEOUT)


def link_open_file(fd: int, target: str) -> None:
    """Give the open file FD the new name TARGET (EEXIST if TARGET exists): linkat(2) of
    /proc/self/fd/FD with AT_SYMLINK_FOLLOW, the way open(2) documents to name an O_TMPFILE file
    without CAP_DAC_READ_SEARCH (which AT_EMPTY_PATH needs). Python's os.link cannot: with no dir
    fds it calls link(2), which links the /proc symlink itself (EXDEV)."""
    source = f"/proc/self/fd/{fd}"
    if _linkat is None:
        raise _missing("linkat", source, None, target)
    if _linkat(AT_FDCWD, source.encode(), AT_FDCWD, os.fsencode(target), AT_SYMLINK_FOLLOW) != 0:
        raise _error(source, None, target)


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Start writing COUNT bytes at OFFSET of FD to disk, without waiting (a later fsync waits).
    Only a head start: where sync_file_range is missing or fails, the fsync does all the work."""
    if _sync_file_range is not None and count > 0 and _sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE) != 0:
        log.debug("sync_file_range: %s", os.strerror(ctypes.get_errno()))


def syncfs(fd: int) -> None:
    """syncfs(2): write out the whole filesystem FD is on."""
    if _syncfs is None:
        raise _missing("syncfs")
    if _syncfs(fd) != 0:
        raise _error()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2): allocate (or, by MODE's FALLOC_FL_* flags, punch or zero) LENGTH bytes at
    OFFSET of FD. Python's os has posix_fallocate only, which takes no mode."""
    if _fallocate is None:
        raise _missing("fallocate")
    if _fallocate(fd, mode, offset, length) != 0:
        raise _error()


def umount2(path: str, flags: int) -> None:
    """umount2(2) of PATH with FLAGS (MNT_DETACH...)."""
    if _umount2 is None:
        raise _missing("umount2", path)
    if _umount2(os.fsencode(path), flags) != 0:
        raise _error(path)


def name_to_handle_at(dir_fd: int, path: str, flags: int) -> tuple[int, bytes]:
    """name_to_handle_at(2): the (handle_type, f_handle) the filesystem encodes for PATH (relative
    to DIR_FD; "" with AT_EMPTY_PATH for DIR_FD itself). Without AT_HANDLE_FID the handle is one
    the filesystem can decode again, and PATH's last component is never followed unless
    AT_SYMLINK_FOLLOW is in FLAGS. EOPNOTSUPP where the filesystem cannot export handles."""
    if _name_to_handle_at is None:
        raise _missing("name_to_handle_at", path)
    handle = _FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _name_to_handle_at(dir_fd, os.fsencode(path), ctypes.byref(handle), ctypes.byref(mount_id), flags) != 0:
        raise _error(path)
    return handle.handle_type, bytes(handle.f_handle[: handle.handle_bytes])


def fs_uuid(fd: int) -> bytes | None:
    """The uuid of the filesystem FD is on, as the kernel holds it (``sb->s_uuid``, what overlayfs
    records in its file handles); None where the filesystem has none to give (ENOTTY, EINVAL...)."""
    buf = bytearray(17)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFSUUID, buf)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF):
            return None
        raise
    length = buf[0]
    return bytes(buf[1 : 1 + length]) if length == 16 else None
