"""System calls that refuse to wait for the disk, so the event loop can try them first.

Handing a request to a worker thread and back costs about 80-110 µs on a small VM, more than the
rest of the request; a cold `tar` of a rootfs spent half its time on those hops. Most opens and
reads never touch the disk: the path is in the dentry cache, the data in the page cache. These
calls do the work inline when that is so, and say "would block" otherwise, so the caller hands
only that case to a thread:

- `open_cached`: openat2(2) with RESOLVE_CACHED (Linux 5.12) fails with EAGAIN instead of reading
  a directory or an inode from disk.
- `read_cached`: preadv2(2) with RWF_NOWAIT (Linux 4.14) reads only what the page cache holds.
- `prefetch`: at open, posix_fadvise(2) WILLNEED starts reading the file's head into the page cache
  without waiting for it, so by the time the kernel sends the first READ, it is usually there
  (a cold `tar` of a rootfs: 368 of 6650 reads still needed a thread, against 5844 without).

Where the kernel lacks them, or a filesystem refuses them (tmpfs has no RWF_NOWAIT reads), they say
"would block" and the work goes to a thread as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

from .syscalls import AT_FDCWD, LIBC

log = logging.getLogger(__name__)

#: openat2's number is the same on every architecture (it is newer than the split tables).
_SYS_OPENAT2 = 437
_RESOLVE_CACHED = 0x20


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall = LIBC.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]

#: Turned off at the first sign that the kernel lacks openat2 or RESOLVE_CACHED.
_open_supported = True
#: Filesystems (by st_dev) that refuse RWF_NOWAIT reads, tmpfs among them: their reads go to threads.
_read_refused: set[int] = set()

#: Errors that mean "cannot be done without waiting" (or "not this way"): try the blocking call.
_WOULD_BLOCK = frozenset({errno.EAGAIN, errno.EINVAL, errno.ENOSYS, errno.E2BIG, errno.EOPNOTSUPP})


def open_cached(path: str, flags: int, dir_fd: int = AT_FDCWD) -> int | None:
    """``os.open(PATH, FLAGS, dir_fd=DIR_FD)`` if every step of PATH is cached; None if it would wait
    (or cannot be tried: flags openat2 refuses, such as O_CREAT, or no openat2); OSError as
    ``os.open`` would."""
    global _open_supported
    if not _open_supported:
        return None
    how = _OpenHow(flags, 0, _RESOLVE_CACHED)
    fd: int = _syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code in _WOULD_BLOCK:
        if code in (errno.ENOSYS, errno.E2BIG):
            log.info("openat2 with RESOLVE_CACHED is not available here (%s): opens go to threads",
                     os.strerror(code))
            _open_supported = False
        return None
    raise OSError(code, os.strerror(code), path)


#: How much of a file `prefetch` asks for: one full FUSE read request.
PREFETCH_BYTES = 1 << 20


def prefetch(fd: int, size: int) -> None:
    """Start reading the first PREFETCH_BYTES of the file at FD (SIZE bytes long) into the page
    cache. "Initiates a nonblocking read", as posix_fadvise(2) puts it: this does not wait for it."""
    if size:
        os.posix_fadvise(fd, 0, min(size, PREFETCH_BYTES), os.POSIX_FADV_WILLNEED)


def read_cached(fd: int, size: int, offset: int, dev: int) -> bytes | memoryview | None:
    """SIZE bytes at OFFSET (fewer at end of file) if the page cache holds them all; else None.
    DEV: the ``st_dev`` of the file at FD, so that a filesystem that refuses is asked only once.

    A miss starts the kernel's readahead (never waited for) before the cache is looked at again,
    so a disk fast enough to answer in between gives the data after all: never a wait, though."""
    if dev in _read_refused:
        return None
    buf = bytearray(size)
    try:
        got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return None
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            log.info("the filesystem of st_dev %#x cannot read with RWF_NOWAIT: its reads go to threads", dev)
            _read_refused.add(dev)
            return None
        raise
    if got < size and offset + got < os.fstat(fd).st_size:
        return None  # part of it is not cached yet
    return memoryview(buf)[:got]
