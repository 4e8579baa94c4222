"""The inode table: which merged object each FUSE inode number stands for, and its lookup count.

No syscalls here: callers hand in what `layers` resolved.

Inode numbers (the kernel's "xino" idea). pyfuse3 uses ``st_ino`` as the FUSE node id, so the number we
report *is* the object's identity in the kernel. It is computed, not counted:

    st_ino = (fsid << 56) | real_ino

where ``fsid`` numbers the distinct filesystems the layers live on (0 for the top layer's, then in
order of first sight) and ``real_ino`` is the inode number of the object's *origin*:

- for a non-directory, its topmost real file;
- for a directory, the real directory of its *lowest* layer, which copy-up never changes (copy-up
  adds a branch on top).

So numbers are unique within the mount (real inode numbers are unique per filesystem), stable across
forget and re-lookup and across remounts, with no table to persist; hardlinks within a layer share one
number and so one kernel inode, with their real ``st_nlink``.

Copy-up of a non-directory, and a directory moved by rename, get a new real object; the table *pins*
the new object to the old number for the rest of the mount, so ``st_ino`` never changes while mounted.

A node holds its real objects by descriptor (see `layers.Branch`): a directory's branches are opened
when the node is made, and a non-directory is found by a name in its parent's held directory, kept
pointing at a live name when the kernel unlinks or renames others (``names``), and held by a
descriptor of its own (``detached``) once its last name is gone while it is open.

Exceptions get a number from a reserved range, remembered for the life of the mount: a real inode
number too wide for 56 bits, one that would equal the FUSE root's number (1), objects on a 255th
filesystem, and two merged objects on one origin (overlapping layers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .layers import Fd, Resolved

log = logging.getLogger(__name__)

#: FUSE_ROOT_ID (linux/fuse.h): the node id the kernel gives the root, fixed by the protocol.
ROOT_INODE = 1

#: Low bits carry the real inode number; ext4, xfs, btrfs and tmpfs numbers fit well within 56 bits.
FSID_SHIFT = 56
#: Filesystem ids 0..254 map layers' devices; 255 is the reserved range for allocated numbers.
ALLOCATED_FSID = 0xFF

Identity = tuple[bool, int, int]  # (is a directory, st_dev, st_ino) of the object's origin
Name = tuple[int, str]  # (parent inode, name)


class UnknownInode(LookupError):
    """The kernel named an inode number this table never gave it, or one it has forgotten.

    Its own type, not KeyError, so that the FUSE boundary answers exactly this with ESTALE and
    any other missing key (a bug of ours) with EIO and a traceback in the log."""


def identity(resolved: Resolved) -> Identity:
    """The real object that gives a merged object its number (see the module docstring)."""
    if resolved.is_dir and resolved.branches:
        origin = resolved.branches[-1]
        return (True, origin.dev, origin.ino)
    return (False, resolved.stat.st_dev, resolved.stat.st_ino)


class Names(list[Name]):
    """The names the kernel knows one object by, as a set would keep them: nearly every object has
    one, and a one-name list costs a third of a set's memory (80 bytes against 216)."""

    __slots__ = ()

    def add(self, name: Name) -> None:
        if name not in self:
            self.append(name)

    def discard(self, name: Name) -> None:
        if name in self:
            self.remove(name)


@dataclass(slots=True)
class DirState:
    """What a directory's node keeps about its listing: apart from `Node`, so that the many
    non-directories (most nodes) carry one empty slot for it, not three."""

    listing: list[tuple[str, Resolved]] | None = None
    """The merged listing, kept for the next readdir while nothing in it changes (on a stock
    pyfuse3 the kernel cannot cache listings for us; on the patched one it does, see fs)."""
    listing_epoch: int = -1
    version: int = 0
    """Bumped before and after every change in this directory: a listing read meanwhile is redone."""


@dataclass(slots=True)
class RareState:
    """What few nodes ever need (another identity, several names, an open object with no name, a
    file made with no name): apart from `Node`, so that the many plain nodes carry one empty slot
    for all four, not four (a walk of 200,000 files keeps a node for each, see `Node`)."""

    own_identity: Identity | None = None
    own_names: Names | None = None
    detached: Fd | None = None
    linkable: bool = False


@dataclass(slots=True)
class Node:
    """One merged object the kernel knows about.

    The kernel keeps a node for every object it has met until it forgets them, so their count is
    the size of a walk: every slot here is 8 bytes per object the kernel holds. What few nodes need
    is in `RareState`, read and written through the properties below as if it were here."""

    ino: int
    resolved: Resolved
    """The object's topmost real file, found by its name in a held directory (``resolved.name`` is
    one of the object's live names); for a directory also its branches, each held by descriptor."""
    parent: int
    name: str
    """One live name of the object (parent inode, name): where a copy-up puts it."""
    lookups: int = 0
    opened: int = 0
    """Open file handles on this object: if its last name goes meanwhile, it is `detached`."""
    dir_state: DirState | None = None
    """A directory's listing state, made the first time it is listed or changed (see `DirState`)."""
    rare: RareState | None = None
    """Made the first time one of its fields is set to other than its default."""

    @property
    def own_identity(self) -> Identity | None:
        """`identity` once it is not `identity(resolved)`; None while it is (nearly every node)."""
        return None if self.rare is None else self.rare.own_identity

    @own_identity.setter
    def own_identity(self, value: Identity | None) -> None:
        if self.rare is not None or value is not None:
            self._rare().own_identity = value

    @property
    def own_names(self) -> Names | None:
        """`names` once it is not just (parent, name); None while it is (nearly every object)."""
        return None if self.rare is None else self.rare.own_names

    @own_names.setter
    def own_names(self, value: Names | None) -> None:
        if self.rare is not None or value is not None:
            self._rare().own_names = value

    @property
    def detached(self) -> Fd | None:
        """The object itself (O_PATH), once it has no name left but is still open (unlinked, in use)."""
        return None if self.rare is None else self.rare.detached

    @detached.setter
    def detached(self, value: Fd | None) -> None:
        if self.rare is not None or value is not None:
            self._rare().detached = value

    @property
    def linkable(self) -> bool:
        """Made with no name (open(2) with O_TMPFILE, without O_EXCL) and not named yet: `link` may
        give it its first name, as the kernel allows for such a file (I_LINKABLE)."""
        return self.rare is not None and self.rare.linkable

    @linkable.setter
    def linkable(self, value: bool) -> None:
        if self.rare is not None or value:
            self._rare().linkable = value

    def _rare(self) -> RareState:
        if self.rare is None:
            self.rare = RareState()
        return self.rare

    @property
    def is_dir(self) -> bool:
        return self.resolved.is_dir

    @property
    def listing(self) -> list[tuple[str, Resolved]] | None:
        return None if self.dir_state is None else self.dir_state.listing

    @listing.setter
    def listing(self, value: list[tuple[str, Resolved]] | None) -> None:
        if self.dir_state is not None or value is not None:
            self._dir_state().listing = value

    @property
    def listing_epoch(self) -> int:
        return -1 if self.dir_state is None else self.dir_state.listing_epoch

    @listing_epoch.setter
    def listing_epoch(self, value: int) -> None:
        self._dir_state().listing_epoch = value

    @property
    def version(self) -> int:
        return 0 if self.dir_state is None else self.dir_state.version

    @version.setter
    def version(self, value: int) -> None:
        self._dir_state().version = value

    def _dir_state(self) -> DirState:
        """The directory state, made on the first write to it (reads of a node without one get the
        defaults above)."""
        if self.dir_state is None:
            self.dir_state = DirState()
        return self.dir_state

    @property
    def identity(self) -> Identity:
        """The object whose number this node has (see the module docstring): its resolution's,
        unless set (`InodeTable.rebind`, `retire`, or a resolution replaced by another object's)."""
        return identity(self.resolved) if self.own_identity is None else self.own_identity

    @identity.setter
    def identity(self, value: Identity) -> None:
        self.own_identity = None if value == identity(self.resolved) else value

    @property
    def names(self) -> Names:
        """Every name the kernel knows this object by (hardlinks have several; a detached object
        none). Made on first use from (parent, name): whoever changes ``parent`` or ``name`` asks
        for it first (`InodeTable` does), so the name they replace stays in it."""
        names = self.own_names
        if names is None:
            names = self.own_names = Names(((self.parent, self.name),))
        return names


class InodeTable:
    """Inode numbers to nodes, with the lookup counts the kernel pays back in ``forget``."""

    def __init__(self, root: Resolved, layer_devices: list[int]) -> None:
        self._fsids: dict[int, int] = {}
        for dev in layer_devices:
            self._fsids.setdefault(dev, len(self._fsids))
        self._pinned: dict[Identity, int] = {}
        self._next_allocated = 1
        root_identity = identity(root)
        self._pinned[root_identity] = ROOT_INODE
        self.root = Node(ROOT_INODE, root, ROOT_INODE, "", lookups=1)
        self.root.own_names = Names()  # the root has no name in any directory
        self._nodes: dict[int, Node] = {ROOT_INODE: self.root}

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, ino: int) -> bool:
        return ino in self._nodes

    def find(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def get(self, ino: int) -> Node:
        """The node for INO; `UnknownInode` if the kernel asks for one it was never given (a bug)."""
        node = self._nodes.get(ino)
        if node is None:
            raise UnknownInode(f"inode {ino}")
        return node

    def number_for(self, resolved: Resolved) -> int:
        """The inode number this object has (or will have) in the mount."""
        return self._number(identity(resolved))

    def _number(self, ident: Identity) -> int:
        pinned = self._pinned.get(ident)
        if pinned is not None:
            return pinned
        ino = self._xino(ident[1], ident[2])
        if ino is not None:
            holder = self._nodes.get(ino)
            if holder is None or holder.identity == ident:
                return ino
        return self._allocate(ident)

    def remember(self, parent: int, name: str, resolved: Resolved, number: int | None = None) -> Node:
        """Record one more kernel reference (a lookup, or an accepted readdirplus entry).

        NUMBER: what `number_for` already said for RESOLVED, when the caller asked first.
        """
        ident = identity(resolved)
        ino = self._number(ident) if number is None else number
        node = self._nodes.get(ino)
        if node is None:
            _hold(resolved)
            node = Node(ino, resolved, parent, name)  # names: just (parent, name); identity: IDENT
            self._nodes[ino] = node
            node.lookups += 1
            return node
        if node.own_names is not None or (parent, name) != (node.parent, node.name):
            node.names.add((parent, name))  # (made from the name it had first, if need be)
        if node.is_dir or not node.resolved.layer.writable or resolved.layer.writable:
            # A hardlinked file copied up through another name keeps its upper copy: the kernel
            # already treats both names as this one inode.
            _hold(resolved)
            if node.own_identity is None and ident != node.identity:
                node.own_identity = node.identity  # the number stays the object's it was given for
            node.resolved = resolved
            node.parent, node.name = parent, name
            node.detached = None
        node.lookups += 1
        return node

    def rebind(self, node: Node, resolved: Resolved) -> None:
        """NODE's object now lives elsewhere (copied up, moved): keep its number for the new one."""
        _hold(resolved)
        old_identity = node.identity
        node.resolved = resolved
        new_identity = identity(resolved)
        if new_identity != old_identity:
            self._pinned[new_identity] = node.ino
            # the object it was (a lower file, say) still leads to this node, not to a new number
            self._pinned.setdefault(old_identity, node.ino)
            node.identity = new_identity

    def retire(self, node: Node) -> None:
        """NODE's real object is deleted but the kernel still holds NODE (an open file, a cached
        entry): the filesystem may give the object's inode number to a new file, which must then
        get a number of its own, not NODE's (the kernel would see one inode change type: EIO)."""
        self._pinned.pop(node.identity, None)
        node.identity = (node.is_dir, -1, node.ino)

    def unpin(self, gone: Resolved) -> None:
        """GONE's real object was deleted: its inode number may be reused by a new file, which must
        not inherit GONE's pinned number."""
        self._pinned.pop(identity(gone), None)

    def pin(self, old: Resolved, new: Resolved) -> None:
        """An object with no node was replaced by a copy: the copy keeps the original's number."""
        number = self.number_for(old)
        self._pinned[identity(new)] = number
        node = self._nodes.get(number)
        if node is not None:
            self.rebind(node, new)

    def renamed(self, node: Node, old: Name, new: Name) -> None:
        node.names.discard(old)
        node.names.add(new)
        node.parent, node.name = new

    def unlinked(self, node: Node, name: Name) -> Name | None:
        """NAME of NODE is gone; returns the live name NODE is now known by, if NAME was that one
        and another is left (the caller re-resolves it there)."""
        node.names.discard(name)
        if (node.parent, node.name) == name and node.names:
            node.parent, node.name = next(iter(node.names))
            return node.parent, node.name
        return None

    def node_of(self, resolved: Resolved) -> Node | None:
        """The node the kernel knows RESOLVED's object by, if any."""
        return self._nodes.get(self.number_for(resolved))

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped COUNT references; a node nobody references is freed (never the root)."""
        node = self._nodes.get(ino)
        if node is None:
            log.warning("forget of unknown inode %d", ino)
            return
        node.lookups -= count
        if node.lookups <= 0 and ino != ROOT_INODE:
            del self._nodes[ino]
            for branch in node.resolved.branches:  # a cached listing may keep the branch itself
                branch.unpin()

    def _xino(self, dev: int, real_ino: int) -> int | None:
        fsid = self._fsids.get(dev)
        if fsid is None:
            if len(self._fsids) >= ALLOCATED_FSID:
                return None
            fsid = self._fsids[dev] = len(self._fsids)
            log.info("objects from a new filesystem (st_dev %#x) get fsid %d", dev, fsid)
        if real_ino >= 1 << FSID_SHIFT:
            return None
        if real_ino == ROOT_INODE and fsid == 0:
            return None
        # fsid 0 (the top layer's filesystem): the number is the real one, and the same object (one
        # int less per node: the node table holds one for each object the kernel knows)
        return real_ino if fsid == 0 else (fsid << FSID_SHIFT) | real_ino

    def _allocate(self, ident: Identity) -> int:
        ino = (ALLOCATED_FSID << FSID_SHIFT) | self._next_allocated
        self._next_allocated += 1
        self._pinned[ident] = ino
        return ino


def _hold(resolved: Resolved) -> None:
    """A node keeps its directories open: pin every branch (see `layers.Branch.pin`)."""
    for branch in resolved.branches:
        branch.pin()
