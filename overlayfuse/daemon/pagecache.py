"""Small lower files handed to the kernel's page cache at their open, so reading them sends no READ.

A read of a file whose pages the kernel does not hold is a round trip through this daemon: a READ
request, its reply, the reader woken. For a small file that is the whole read, and a fresh mount
of an image reads many small files (a container's start: its configuration, its interpreter's
modules, its libraries' data). So at the open of a small file of a lower layer the daemon stores
its data in the FUSE inode's page cache before it answers (FUSE_NOTIFY_STORE,
``pyfuse3.notify_store``, in every pyfuse3 release): the kernel then serves the open's reads, and
later opens' (lower files are opened with ``keep_cache``), as it serves any cached page. Where the
host's cache holds the data (every container of an image after the first, any image whose layers
were just unpacked) it is taken from there on the event loop (`nowait.read_cached`, which never
waits for the disk); elsewhere a worker thread reads it, and the open waits for the disk as its
first READ would have. A READ's reply also makes the kernel drop the file's atime, so a reader's
fstat after it is a GETATTR: tar, reading a cold tree, sent two requests a file that the store saves.
Larger files are read by READs, started into the host's cache at the open (`nowait.prefetch`).

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
answered. A worker's read lets other requests run meanwhile, so the count is asked again when the
read is done, and whether the file was copied up meanwhile: a truncate(2) sends no OPEN, and a
truncate to 0 and back would leave zeros where the store would put the old lower data.

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

log = logging.getLogger(__name__)

#: The largest file stored at its open. Larger ones are read as they are asked for: a program may
#: want only their head, and READs of up to 1 MiB (the mount's readahead window) cost little per byte.
STORE_MAX = 128 * 1024


@dataclass(slots=True)
class LowerDataStore:
    """Which inodes' data this mount has stored in the kernel's page cache (see the module)."""

    _stored: set[int] = field(default_factory=set)

    def stored(self, ino: int) -> bool:
        """INO's data was stored since the kernel last learnt of it."""
        return ino in self._stored

    def may_store(self, st: os.stat_result, *, opens: int) -> bool:
        """Whether a lower file of stat ST may be stored now: small, not empty, and this its only
        open (OPENS: the inode's opens, this one counted, from their requests to their releases;
        see the module for the hang another one could cause)."""
        return opens == 1 and 0 < st.st_size <= STORE_MAX

    def store(self, ino: int, data: bytes | memoryview, st: os.stat_result) -> bool:
        """Hand DATA, the whole of INO's file (ST: its stat), to the kernel's cache; True if it took
        it. Call only where `may_store` said yes and nothing could have opened the inode since."""
        if len(data) != st.st_size:
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
