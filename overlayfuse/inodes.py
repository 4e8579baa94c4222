"""The inode table: which merged object each FUSE inode number stands for, and its lookup count.

No syscalls here: callers hand in what `layers` resolved.

Inode numbers (the kernel's "xino" idea). pyfuse3 uses ``st_ino`` as the FUSE node id, so the number we
report *is* the object's identity in the kernel. It is computed, not counted:

    st_ino = (fsid << 56) | real_ino

where ``real_ino`` is the inode number of the object's topmost real file and ``fsid`` numbers the
distinct filesystems the layers live on (0 for the filesystem of the top layer, then in order of
first sight). So:

- numbers are unique within the mount (real inode numbers are unique per filesystem);
- they are stable for as long as the object exists, even across forget and re-lookup, and across
  remounts of the same layers, with no table to persist;
- hardlinks within a layer (and across layers on one filesystem) share one number, the kernel sees
  them as one inode, and ``st_nlink`` is the real count: tar, du, cp -a and find -samefile behave.

Exceptions get a number from a reserved range, remembered for the life of the mount: a real inode
number too wide for 56 bits, one that would equal the FUSE root's number (1), objects on a 255th
filesystem, and two merged directories backed by one real directory (overlapping layers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyfuse3

from .layers import Resolved

log = logging.getLogger(__name__)

ROOT_INODE = int(pyfuse3.ROOT_INODE)

#: Low bits carry the real inode number; ext4, xfs, btrfs and tmpfs numbers fit well within 56 bits.
FSID_SHIFT = 56
#: Filesystem ids 0..254 map layers' devices; 255 is the reserved range for allocated numbers.
ALLOCATED_FSID = 0xFF

DirKey = tuple[str, str]  # ("dir", merged path): a directory is its merged path
FileKey = tuple[str, int, int]  # ("file", st_dev, st_ino): a non-directory is its real inode
NodeKey = DirKey | FileKey


@dataclass(slots=True)
class Node:
    """One merged object the kernel knows about."""

    ino: int
    key: NodeKey
    resolved: Resolved
    """The object's topmost real file; for a directory also its branches."""
    path: str
    """A merged path ("" for the root, "a/b" below it); for a hardlinked file, the first name seen."""
    parent: int
    """Inode number of the directory it was found in (for readdir's "..")."""
    lookups: int = 0
    names: set[str] = field(default_factory=set)
    """Every merged path this object was looked up by (hardlinks have several)."""


def node_key(merged_path: str, resolved: Resolved) -> NodeKey:
    if resolved.is_dir:
        return ("dir", merged_path)
    return ("file", resolved.stat.st_dev, resolved.stat.st_ino)


class InodeTable:
    """Inode numbers to nodes, with the lookup counts the kernel pays back in ``forget``."""

    def __init__(self, root: Resolved, layer_devices: list[int]) -> None:
        self._fsids: dict[int, int] = {}
        for dev in layer_devices:
            self._fsids.setdefault(dev, len(self._fsids))
        self._allocated: dict[NodeKey, int] = {}
        self._next_allocated = 1
        root_node = Node(ROOT_INODE, ("dir", ""), root, "", ROOT_INODE, lookups=1, names={""})
        self._nodes: dict[int, Node] = {ROOT_INODE: root_node}

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, ino: int) -> bool:
        return ino in self._nodes

    def get(self, ino: int) -> Node:
        """The node for INO; KeyError if the kernel asks for one it was never given (a bug)."""
        return self._nodes[ino]

    def number_for(self, merged_path: str, resolved: Resolved) -> int:
        """The inode number this object has (or will have) in the mount."""
        key = node_key(merged_path, resolved)
        if key == ("dir", ""):
            return ROOT_INODE
        allocated = self._allocated.get(key)
        if allocated is not None:
            return allocated
        ino = self._xino(resolved.stat.st_dev, resolved.stat.st_ino)
        if ino is not None:
            holder = self._nodes.get(ino)
            if holder is None or holder.key == key:
                return ino
        return self._allocate(key)

    def remember(self, merged_path: str, resolved: Resolved, parent: int) -> Node:
        """Record one more kernel reference (a lookup, or an accepted readdirplus entry)."""
        ino = self.number_for(merged_path, resolved)
        node = self._nodes.get(ino)
        if node is None:
            node = Node(ino, node_key(merged_path, resolved), resolved, merged_path, parent)
            self._nodes[ino] = node
        elif node.key[0] == "dir":
            node.resolved = resolved
        node.names.add(merged_path)
        node.lookups += 1
        return node

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped COUNT references; a node nobody references is freed (never the root)."""
        node = self._nodes.get(ino)
        if node is None:
            log.warning("forget of unknown inode %d", ino)
            return
        node.lookups -= count
        if node.lookups <= 0 and ino != ROOT_INODE:
            del self._nodes[ino]

    def _xino(self, dev: int, real_ino: int) -> int | None:
        fsid = self._fsids.get(dev)
        if fsid is None:
            if len(self._fsids) >= ALLOCATED_FSID:
                return None
            fsid = self._fsids[dev] = len(self._fsids)
            log.info("objects from a new filesystem (st_dev %#x) get fsid %d", dev, fsid)
        if real_ino >= 1 << FSID_SHIFT:
            return None
        ino = (fsid << FSID_SHIFT) | real_ino
        return None if ino == ROOT_INODE else ino

    def _allocate(self, key: NodeKey) -> int:
        ino = (ALLOCATED_FSID << FSID_SHIFT) | self._next_allocated
        self._next_allocated += 1
        self._allocated[key] = ino
        return ino
