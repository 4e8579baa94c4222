"""Which C library this is, and importing trio without its ``ldconfig -p`` subprocess.

trio names its worker threads with ``pthread_setname_np``, and finds the library holding it when
it is imported: ``ctypes.util.find_library("pthread")``, which on Linux runs ``/sbin/ldconfig -p``
in a subprocess and parses its whole output. On the 2-core VM that is ~6 ms of wall time and
~13 ms of CPU (a fork of an interpreter that has already imported most of trio, an exec, the
parse) in every daemon start, and every container start starts a daemon. Since glibc 2.34 the
pthread functions live in libc itself (``libpthread.so.0`` is an empty stub kept for old
binaries), and the interpreter has libc loaded already, so the answer is known without asking:
`pthread_in_libc` gives it to ``find_library`` while trio is imported, and only then.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: The first glibc whose libc holds the pthread functions (libpthread became a stub).
PTHREAD_IN_LIBC_SINCE = (2, 34)
LIBC_SONAME = "libc.so.6"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None on another C library (musl) or if unknown."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (ValueError, OSError):
        return None
    if not text or not text.startswith("glibc "):
        return None
    try:
        major, minor = text.split()[1].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


@contextlib.contextmanager
def pthread_in_libc() -> Iterator[None]:
    """While inside, ``ctypes.util.find_library("pthread")`` answers libc's soname at once on a glibc
    that holds the pthread functions; any other name, or another C library, is asked as usual.
    Meant around ``import trio`` (see the module's docstring): the function is restored after."""
    version = glibc_version()
    if version is None or version < PTHREAD_IN_LIBC_SINCE:
        yield
        return
    import ctypes.util

    real = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return LIBC_SONAME if name == "pthread" else real(name)

    ctypes.util.find_library = find_library
    try:
        yield
    finally:
        ctypes.util.find_library = real
