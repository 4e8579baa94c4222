"""renameat2(2), which Python's os module lacks: the one raw syscall binding the workers need.

Kept here rather than borrowed from overlayfuse's own binding, so the stress command does not
depend on the daemon's internals (which it exists to check).
"""

from __future__ import annotations

import ctypes
import os

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)
# glibc has had a wrapper since 2.28 (Debian 12 ships 2.36).
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(src: str, dst: str, flags: int, *, dir_fd: int) -> None:
    """renameat2(dir_fd, src, dir_fd, dst, flags), raising OSError like os.rename does."""
    if _renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)
