"""System calls Python has no binding for, called directly through libc.

The tests drive the kernel side of a comparison with these rather than with the project's own
helpers (overlayfuse.overlay.copyup), so a bug in those helpers cannot show up on both sides at once.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src: str | os.PathLike[str], dst: str | os.PathLike[str], flags: int) -> None:
    """renameat2(2) relative to the working directory; raises OSError with both names."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    renameat2(src, dst, RENAME_NOREPLACE)


def rename_exchange(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    renameat2(src, dst, RENAME_EXCHANGE)
