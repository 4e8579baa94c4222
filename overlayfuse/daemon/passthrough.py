"""FUSE passthrough: files whose data stays put read and written by the kernel itself.

With passthrough (Linux 6.9, libfuse 3.17, pyfuse3 patch 0007) an open or create reply may name a
backing file: the kernel then serves that open file's reads, writes and mmap from the backing file
directly, and sends no READ or WRITE (it still asks for ``security.capability`` before a write:
with killpriv v2, `killpriv`, only before a file's first). For overlayfuse that is every
open of a file whose data is in the upper dir, the writable layer: a new file, a copied-up one;
and on a read-only mount, every open (nothing is ever copied up there). It is not used for data in
a lower layer of a writable mount: the kernel binds an open file to its backing file for good, and
a read-only open of a lower file must see the upper copy once another open copies it up (as the
kernel's overlay does; `OverlayOperations._readable_fd`).

The kernel's rules, which this module keeps (fs/fuse/iomode.c):
- every passthrough open of one inode uses the same backing id: an open naming another fails with
  EIO. So an inode's id is kept while any passthrough open of it lasts (`BackingFiles`);
- an inode is either in passthrough mode or in cached mode while files are open: an open of the
  other kind fails with EIO. So an open is passed through only when no other open of the inode
  exists that was not (the daemon counts every open from its request to its release; one in flight
  counts as not passed through, so two racing opens both stay cached).

Passthrough writes do not go through the inode's page cache, and none can be stale afterwards: a
passthrough open has no ``keep_cache`` (the kernel refuses it), so opening one drops the pages that
cached opens left, and no cached open can fill them again while it lasts.

Not passed through (a cached open instead): a file with S_ISUID or S_ISGID at its open (a write by
a caller without CAP_FSETID must clear them, and the daemon sees the writes of a cached open; for a
bit set while a passthrough open lasts, see `killpriv`), any open
on a mount with a control socket (a freeze for ``overlayctl commit`` must hold back writes, and a
passthrough write never reaches the daemon), and mounts with ``xattr_permissions`` (the mode shown is
not the mode on disk). Registering a backing file needs CAP_SYS_ADMIN, so rootless mounts never ask.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import pyfuse3

from ..linux.namespaces import in_initial_user_namespace
from ..overlay.inodes import Identity
from ..overlay.layers import Resolved

log = logging.getLogger(__name__)

#: How deep the file system holding a backing file may be stacked. 0: not on an overlayfs or
#: another passthrough FUSE mount (the kernel refuses those backing files: ELOOP). This mount's own
#: stacking depth is one more, and 1 leaves room under the kernel's limit of 2 for an overlayfs
#: with this mount as a layer, as on any FUSE mount; an upper dir on an overlayfs (a container's
#: root) gets no passthrough instead.
BACKING_STACK_DEPTH = 0


def wanted(*, asked: bool, control: bool, xattr_permissions: bool) -> bool:
    """Whether to ask the kernel for passthrough at init (see the module's docstring): root in the
    first user namespace (rootless podman's daemon is root only in its own)."""
    return asked and not control and not xattr_permissions and in_initial_user_namespace()


def active() -> bool:
    """The kernel agreed at init (pyfuse3 patch 0007; only where `Binding.passthrough`)."""
    return cast(Callable[[], bool], vars(pyfuse3)["passthrough_active"])()


def file_info(fh: int, backing_id: int) -> pyfuse3.FileInfo:
    """An open reply that passes the file through to BACKING_ID's file. The kernel refuses
    ``keep_cache`` with it (FOPEN_KEEP_CACHE is not among passthrough's open flags)."""
    info = pyfuse3.FileInfo(fh=fh, keep_cache=False)
    setattr(info, "backing_id", backing_id)  # noqa: B010 (not in the stock binding's stubs)
    return info


def stays_put(resolved: Resolved, mode: Callable[[], int], *, read_only: bool) -> bool:
    """Whether an open of RESOLVED, the real file an open reads, may be passed through: a regular
    file, not set-id, whose data stays where it is while the open lasts. That is a file in the
    upper dir with all its data (a metacopy file's data is copied in at its first open to write,
    to another file), or any file of a read-only mount. MODE gives the file's mode as it is now
    (RESOLVED's stat may predate a chmod), asked only for a file that stays put."""
    in_upper = resolved.layer.writable and resolved.data is None
    if not (read_only or in_upper) or not stat.S_ISREG(resolved.stat.st_mode):
        return False
    # S_ISGID without group execute too: an unprivileged caller outside the file's group clears it.
    return not mode() & (stat.S_ISUID | stat.S_ISGID)


_REFUSALS = {
    errno.ELOOP: "its layer is on a stacked filesystem, such as an overlayfs",
    errno.EPERM: "no CAP_SYS_ADMIN",
}


@dataclass(slots=True)
class _Backing:
    backing_id: int
    real: Identity  # the backing file's (`inodes.identity`)
    opens: int = 0


@dataclass(slots=True)
class BackingFiles:
    """The backing id of each inode with passthrough opens, and how many it has."""

    active: bool = False
    """The kernel agreed to passthrough at init; turned off for good by a refusal (see `acquire`)."""
    _by_inode: dict[int, _Backing] = field(default_factory=dict)

    def opens(self, ino: int) -> int:
        """INO's passthrough opens."""
        backing = self._by_inode.get(ino)
        return backing.opens if backing is not None else 0

    def acquire(self, ino: int, fd: int, real: Identity) -> int | None:
        """The backing id for one more passthrough open of INO, whose real file FD is (REAL: its
        `inodes.identity`), or None for a cached open instead.

        An inode with passthrough opens shares their id, but only for the same real file: an
        inode's name may now lead to another one (a hardlinked lower file whose other name was
        copied up and broke the link), and the opens counted may already be closed in the kernel,
        their release not yet read here; a cached open is right then. Where the kernel refuses to
        register FD, passthrough is off for the rest of the mount, said once in the log.
        """
        backing = self._by_inode.get(ino)
        if backing is not None and backing.real != real:
            return None
        if backing is None:
            try:
                backing = self._by_inode[ino] = _Backing(_call("backing_open", fd), real)
            except OSError as exc:
                self.active = False
                why = _REFUSALS.get(exc.errno or 0, os.strerror(exc.errno or 0))
                log.warning("FUSE passthrough off for this mount: the kernel refused a backing file (%s)", why)
                return None
        backing.opens += 1
        return backing.backing_id

    def release(self, ino: int) -> None:
        """One passthrough open of INO released: its id given back after the last."""
        backing = self._by_inode[ino]
        backing.opens -= 1
        if backing.opens == 0:
            del self._by_inode[ino]
            try:
                _call("backing_close", backing.backing_id)
            except OSError as exc:  # the kernel holds its own reference: nothing is lost
                log.debug("closing backing id %d: %s", backing.backing_id, exc)


def _call(name: str, arg: int) -> int:
    """pyfuse3.backing_open/backing_close (patch 0007), typed here so that this module checks
    against the stock binding's stubs too (as `binding.new_handoff`)."""
    return cast(Callable[[int], int], vars(pyfuse3)[name])(arg)


__all__ = ["BACKING_STACK_DEPTH", "BackingFiles", "active", "file_info", "stays_put", "wanted"]
