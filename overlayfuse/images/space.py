"""Free space on the store's filesystem, watched while a layer unpacks.

A few KiB of gzip or zstd can expand to terabytes, and a tar entry may claim any size. Before each
file's data is written, its size is set against what the filesystem has free (`os.fstatvfs`, asked
again every `REFRESH_BYTES` written and whenever the estimate runs short), keeping a reserve
(`limits.reserve_bytes`); inodes are checked every `REFRESH_ENTRIES` entries. Running short stops
the unpack with `NoSpace`, naming how much the layer needed and how much was free: the caller
removes the half-built layer, so the store is as it was.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .limits import RESERVE_INODES, reserve_bytes

log = logging.getLogger(__name__)

#: Bytes claimed between two fstatvfs calls: other writers on the filesystem make our running
#: estimate optimistic, this bounds by how much.
REFRESH_BYTES = 64 << 20
#: Entries between two inode checks (one fstatvfs each).
REFRESH_ENTRIES = 4096


class NoSpace(Exception):
    """The store's filesystem cannot hold what the layer needs; the message says how much."""


@dataclass(slots=True)
class SpaceWatch:
    """Free bytes and inodes of the filesystem FD is on, as last asked, minus claims since."""

    fd: int
    free: int = 0
    reserve: int = 0
    claimed_since_refresh: int = 0
    entries_since_refresh: int = 0

    @classmethod
    def of(cls, fd: int) -> SpaceWatch:
        watch = cls(fd)
        watch.refresh()
        return watch

    def refresh(self) -> None:
        st = os.fstatvfs(self.fd)
        self.free = st.f_bavail * st.f_frsize
        self.reserve = reserve_bytes(st.f_blocks * st.f_frsize)
        self.claimed_since_refresh = 0
        self.entries_since_refresh = 0
        if st.f_files and st.f_favail < RESERVE_INODES:
            raise NoSpace(f"the store's filesystem has only {st.f_favail} inodes free "
                          f"(keeping {RESERVE_INODES})")

    def claim(self, nbytes: int, so_far: int) -> None:
        """Room for NBYTES more (SO_FAR already written by this layer), or `NoSpace`."""
        if nbytes > self.free - self.reserve or self.claimed_since_refresh >= REFRESH_BYTES:
            self.refresh()
            if nbytes > self.free - self.reserve:
                raise NoSpace(f"needs at least {so_far + nbytes} bytes of file data, more than the store's "
                              f"filesystem has: {self.free} bytes free, of which {self.reserve} are kept free")
        self.free -= nbytes
        self.claimed_since_refresh += nbytes

    def entry(self) -> None:
        """Count one more entry (an inode); every `REFRESH_ENTRIES`, check inodes and bytes."""
        self.entries_since_refresh += 1
        if self.entries_since_refresh >= REFRESH_ENTRIES:
            self.refresh()
