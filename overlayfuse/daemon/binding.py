"""What the pyfuse3 we run on offers beyond its stock release, found out at run time.

scripts/setup builds pyfuse3 from its release sdist with the patches in ``patches/pyfuse3`` (see
README, Performance). Each adds something that can be seen from Python, so the daemon asks rather
than assumes, and runs correctly on a stock pyfuse3 too, only slower:

- ``ReaddirToken.ino`` (patch 0001): readdir learns which directory it lists without a handle, so
  ``opendir`` can answer ENOSYS. The kernel then sends no opendir/releasedir at all and caches
  directory listings itself; keeping that cache true is `fs`'s business (``invalidate_inode``).
- ``Operations.enable_symlink_cache`` (0002): the kernel keeps symlink targets in its page cache.
- ``_pyfuse3.InlineFirst`` (0003): the request loop reads /dev/fuse non-blocking and runs handlers
  inline until one has to wait. Nothing here depends on it; it is reported for the log.
- ``main(poll_us=)`` (0005): the request loop polls /dev/fuse for a while before it sleeps (see
  `polling`).
- ``Handoff`` (0006): a worker that just finished a job spins for the next, and the event loop
  spins a bounded time for that job's result, both without the GIL (see
  `overlayfuse.overlay.workers`); with ``HANDOFF_WATCHES_REQUESTS`` (0009) the loop's wait also
  ends when a request waits.
- ``backing_open`` (0007): FUSE passthrough, where pyfuse3 was built against libfuse 3.17 (see
  `passthrough`); built against an older libfuse the calls exist and the kernel is never asked.
- ``killpriv_v2_active`` (0008): killpriv v2, likewise only with libfuse 3.17 (see `killpriv`).

``OVERLAYFUSE_BINDING=stock`` makes the daemon use none of it, as on a stock pyfuse3 (for tests
and for comparison with a patched build).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol, cast

import pyfuse3

from ..overlay.workers import Handoff

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Binding:
    """The extras of the running pyfuse3 that the daemon uses."""

    readdir_inode: bool
    """readdir can tell its directory by ``token.ino``: opendir may answer ENOSYS (kernel-cached
    listings)."""
    symlink_cache: bool
    """``Operations.enable_symlink_cache`` is honoured at init."""
    inline_loop: bool
    """The request loop reads first and switches tasks only when a handler waits."""
    poll: bool = False
    """``pyfuse3.main`` takes ``poll_us``: the request loop polls before it sleeps."""
    handoff: bool = False
    """``pyfuse3.Handoff``: worker threads take jobs from the event loop and hand results back
    without either side sleeping or taking the GIL to wait (`overlayfuse.overlay.workers`)."""
    handoff_watch: bool = False
    """``Handoff.post_and_wait(watch_requests=True)``: the loop's wait for a result ends when a
    request waits, so its window may be long (`overlayfuse.overlay.workers.HandoffTimes`)."""
    passthrough: bool = False
    """``pyfuse3.backing_open``: opens may name a backing file for the kernel to read and write
    itself (`overlayfuse.daemon.passthrough`), if the kernel and libfuse agree at init."""
    killpriv_v2: bool = False
    """``Operations.enable_killpriv_v2``: the daemon clears set-id bits and file capabilities
    itself (`overlayfuse.daemon.killpriv`), if the kernel and libfuse agree at init."""
    lseek: bool = False
    """``Operations.lseek``: lseek(2)'s SEEK_DATA and SEEK_HOLE reach the daemon, which asks the
    real file, so holes show through the mount (without it the kernel sees every file as data)."""
    fallocate: bool = False
    """``Operations.fallocate``: fallocate(2) reaches the daemon, which passes it to the real file
    (without it the kernel fails it with EOPNOTSUPP)."""
    tmpfile: bool = False
    """``Operations.tmpfile`` is registered (pyfuse3 built against libfuse 3.17): open(2) with
    O_TMPFILE reaches the daemon (without it the kernel fails it with EOPNOTSUPP)."""
    ioctl: bool = False
    """``Operations.ioctl``: the file attribute flags of lsattr and chattr (and xfs_io's fsxattr)
    reach the daemon, which reads and changes them on the real file (without it they fail)."""
    dont_mask: bool = False
    """``Operations.enable_dont_mask``: new objects' modes come as asked, umask not applied, so a
    directory's default ACL can take the umask's place exactly (without it the kernel applied the
    umask, and an inherited ACL's mask is narrowed by it)."""

    def describe(self) -> str:
        extras = [name for name, on in (
            ("kernel-cached listings", self.readdir_inode),
            ("symlink cache", self.symlink_cache),
            ("inline request loop", self.inline_loop),
            ("request polling", self.poll),
            ("worker handoff", self.handoff),
            ("handoff watching requests", self.handoff_watch),
            ("passthrough", self.passthrough),
            ("killpriv v2", self.killpriv_v2),
            ("holes (SEEK_DATA, SEEK_HOLE)", self.lseek),
            ("fallocate", self.fallocate),
            ("O_TMPFILE", self.tmpfile),
            ("file attributes (lsattr, chattr)", self.ioctl),
            ("modes as asked (dont_mask)", self.dont_mask),
        ) if on]  # fmt: skip
        return ", ".join(extras) if extras else "none (stock pyfuse3: every listing and readlink reaches the daemon)"


class _InodeToken(Protocol):
    @property
    def ino(self) -> int: ...


def readdir_inode(token: pyfuse3.ReaddirToken) -> int:
    """The directory a readdir lists, from its token (patch 0001; only where `Binding.readdir_inode`).

    Typed through a protocol so that the same code checks against the patched stubs and the stock
    ones, which have no ``ino``.
    """
    return cast(_InodeToken, token).ino


def new_handoff() -> Handoff:
    """A ``pyfuse3.Handoff`` (patch 0006; only where `Binding.handoff`), typed through the
    protocol of its one user so that this checks against the stock stubs too."""
    return cast(Handoff, vars(pyfuse3)["Handoff"]())


STOCK = Binding(readdir_inode=False, symlink_cache=False, inline_loop=False)


def detect() -> Binding:
    """What the imported pyfuse3 offers (all False with ``OVERLAYFUSE_BINDING=stock``)."""
    if os.environ.get("OVERLAYFUSE_BINDING") == "stock":
        return STOCK
    return Binding(
        readdir_inode=hasattr(pyfuse3.ReaddirToken, "ino"),
        symlink_cache=hasattr(pyfuse3.Operations, "enable_symlink_cache"),
        inline_loop=hasattr(getattr(pyfuse3, "_pyfuse3", None), "InlineFirst"),
        poll="poll_us" in _parameters(pyfuse3.main),
        handoff=hasattr(pyfuse3, "Handoff"),
        handoff_watch=hasattr(pyfuse3, "HANDOFF_WATCHES_REQUESTS"),
        passthrough=hasattr(pyfuse3, "backing_open"),
        killpriv_v2=hasattr(pyfuse3, "killpriv_v2_active"),
        lseek=hasattr(pyfuse3.Operations, "lseek"),
        fallocate=hasattr(pyfuse3.Operations, "fallocate"),
        tmpfile=bool(getattr(pyfuse3, "TMPFILE_SUPPORTED", False)),
        ioctl=hasattr(pyfuse3.Operations, "ioctl"),
        dont_mask=hasattr(pyfuse3.Operations, "enable_dont_mask"),
    )


def libfuse_version() -> int | None:
    """The libfuse pyfuse3 runs on, as libfuse numbers it (317 for 3.17), or None if it cannot be
    told. Asked of the extension module itself (a handle on it also finds the libraries it was
    linked with): scripts/setup links it with libfuse 3.17, a stock build with the system's."""
    import ctypes  # only here: this is asked once, where a mount option depends on it

    try:
        return int(ctypes.CDLL(pyfuse3.__file__).fuse_version())
    except (OSError, AttributeError, TypeError):
        return None


def _parameters(func: object) -> tuple[str, ...]:
    """The parameter names of FUNC (a Cython function behind pyfuse3's async wrapper), read from
    its code object: `inspect` is not worth importing on every daemon's start for this."""
    code = getattr(getattr(func, "__wrapped__", func), "__code__", None)
    return tuple(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]) if code is not None else ()


__all__ = ["STOCK", "Binding", "detect", "libfuse_version", "new_handoff", "readdir_inode"]
