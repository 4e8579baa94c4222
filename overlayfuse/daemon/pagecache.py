"""Small lower files handed to the kernel's page cache at their open, so reading them sends no READ.

A read of a file whose pages the kernel does not hold is a round trip through this daemon: a READ
request, its reply, the reader woken. For a small file that is the whole read, and a fresh mount
of an image reads many small files (a container's start: its configuration, its interpreter's
modules, its libraries' data) whose data the host's page cache usually holds already (every
container of an image after the first, any image whose layers were just unpacked). So at the open
of a small file of a lower layer, when the host's cache holds all of it (`nowait.read_cached`, which
never waits for the disk), the daemon stores it in the FUSE inode's page cache at once
(FUSE_NOTIFY_STORE, ``pyfuse3.notify_store``, in every pyfuse3 release): the kernel then serves the
open's reads, and later opens' (lower files are opened with ``keep_cache``), as it serves any cached
page. Where the host's cache does not hold it, the open starts reading it instead (`nowait.prefetch`)
and the first READ finds it there, as before.

Why the pages stay right: they hold what a READ would have returned at that moment, and a lower file
never changes under the mount. What changes its data later goes through this daemon and the kernel
as for pages a READ filled: a copy-up, then writes of a cached open (written through the page cache)
or a truncate (which drops what lies beyond), or a passthrough open (which drops the inode's pages).

Only while no other open of the inode exists (the daemon counts an open from its request to its
release, and `LowerDataStore.fill` is told how many there are). The kernel locks the pages it reads
ahead until their READ is answered, and a store locks each page it fills: a store from the event
loop while another open's READ of that file waits in /dev/fuse would wait for that READ, which only
the blocked loop can answer. (Seen: eight threads reading the same files after their caches were
dropped hung the daemon in ``fuse_dev_do_write``, in its first round.) With no other open there is
no READ of the file in flight: the kernel sends RELEASE only once the last READ of an open is
answered.

Not stored: files of the upper dir (their data changes, and most are passed through), metacopy files,
passthrough opens (a read-only mount: the kernel reads the backing file and no page cache), and a
name of a lower hardlink whose other name was copied up without an index (one inode for two files).
An inode is stored once while the kernel knows it (a set of inode numbers, emptied at FORGET): if
the kernel drops its pages meanwhile, under memory pressure, reads come as READs again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import pyfuse3

from ..linux import nowait

log = logging.getLogger(__name__)

#: The largest file stored at its open. Larger ones are read as they are asked for: a program may
#: want only their head, and READs of up to 1 MiB (the mount's readahead window) cost little per byte.
STORE_MAX = 128 * 1024


@dataclass(slots=True)
class LowerDataStore:
    """Which inodes' data this mount has stored in the kernel's page cache (see the module)."""

    _stored: set[int] = field(default_factory=set)

    def fill(self, ino: int, fd: int, st: os.stat_result, *, opens: int) -> bool:
        """Store the data of INO, a lower file open at FD (ST: its stat), if it is small, the host's
        cache holds it all and this is its only open (OPENS: INO's opens, this one counted, from
        their requests to their releases; see the module for the hang another one could cause);
        True if stored now or before. Never waits for the disk."""
        if opens != 1:
            return False
        if ino in self._stored:
            return True
        if not 0 < st.st_size <= STORE_MAX:
            return False
        data = nowait.read_cached(fd, st.st_size, 0, st.st_dev)
        if data is None or len(data) != st.st_size:
            return False
        try:
            # The stub says bytes; the binding takes any buffer, and a memoryview saves a copy.
            pyfuse3.notify_store(ino, 0, data)  # type: ignore[arg-type]
        except OSError as exc:  # nothing lost: its reads come as READs
            log.debug("storing inode %d's data in the kernel's cache: %s", ino, exc)
            return False
        self._stored.add(ino)
        return True

    def forget(self, ino: int) -> None:
        """The kernel forgot INO: a new lookup of its name may be a new inode of the same number."""
        self._stored.discard(ino)


__all__ = ["STORE_MAX", "LowerDataStore"]
