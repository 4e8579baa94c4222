"""The merged namespace: lookups, and every change, over the layer stack and the inode table.

Async (trio) but free of pyfuse3: errors are OSError, which the FUSE boundary (`fs`) maps to errno.
Blocking work (copy-up, directory listings, creating objects) runs in worker threads; cheap lstats
run inline.

Changes to the namespace (create, remove, rename, copy-up) are serialised by one lock: each is a
few syscalls, a copy-up waits for its data, and holding the lock keeps "which layer has this name"
true from the moment it is decided to the moment it is acted on. Reads, lookups and writes to open
files never take it, so a long copy-up holds up other changes but not readers.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from ..linux import syscalls
from . import layers, treecopy, upper, whiteout
from .changelock import ChangeLock
from .copyup import Workspace
from .features import REDIRECT_MAX
from .inodes import ROOT_INODE, InodeTable, Name, Node, identity
from .layers import Branch, Fd, LayerStack, Resolved
from .metachange import MetadataChange
from .upper import NewObject, UpperDir
from .whiteout import NO_MARKERS
from .workers import Workers

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks for a change: new objects are theirs, as with the kernel's overlay."""

    uid: int
    gid: int
    umask: int = 0
    """Applied to a new object's mode where its directory has no default ACL (0: the kernel did)."""
    inherits_acl: bool = False
    """New objects inherit their directory's default ACL (the mount has POSIX ACLs)."""


def _error(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code), what) if what else OSError(code, os.strerror(code))


class MergedTree:
    """The merged view of one mount: its layer stack, inode table and (if writable) upper dir."""

    def __init__(
        self, stack: LayerStack, upper_dir: UpperDir | None = None, workers: Workers | None = None
    ) -> None:
        """UPPER_DIR: the writable side; without it the tree is read-only. WORKERS: the mount's
        worker threads, shared with whoever else blocks on its behalf (the FUSE handlers)."""
        self.stack = stack
        self.upper_dir = upper_dir
        self.inodes = InodeTable(
            stack.resolve_root(), [os.lstat(layer.root).st_dev for layer in stack.layers]
        )
        self.workers = workers or Workers()
        self._changes = ChangeLock()  # one change at a time (see `changelock`)
        self._kept: OrderedDict[int, Node] = OrderedDict()
        """Directories whose listing is kept (`list_dir`), least recently used first."""
        self.listing_epoch = 0
        """Bumped by changes whose effect reaches other directories' listings (a hardlinked file
        copied up shows in every directory holding one of its lower names; a tree copied up)."""

    @property
    def writable(self) -> bool:
        return self.upper_dir is not None

    @property
    def workspace(self) -> Workspace | None:
        """Where copy-ups are built (its owner policy is the FUSE side's business too)."""
        return self.upper_dir.workspace if self.upper_dir is not None else None

    async def in_thread(self, func: Callable[..., T], *args: Any) -> T:
        return await self.workers.run(func, *args)

    async def settled(self) -> None:
        """Wait until the change in flight (if any) is done: its objects are where it put them."""
        async with self._changes:
            pass

    # -- the kernel's references (the FUSE layer's view of the node table) --------------------------

    def node(self, ino: int) -> Node:
        """The node the kernel knows by INO; `UnknownInode` if it was never given or is forgotten."""
        return self.inodes.get(ino)

    def find_node(self, ino: int) -> Node | None:
        return self.inodes.find(ino)

    def number_for(self, resolved: Resolved) -> int:
        """The inode number RESOLVED's object has (or will have) in the mount."""
        return self.inodes.number_for(resolved)

    def remember_listed(self, directory: Node, name: str, resolved: Resolved, number: int) -> None:
        """The kernel accepted NAME of DIRECTORY in a readdirplus reply (NUMBER: what `number_for`
        said): that counts as a lookup, which `forget` pays back."""
        self.inodes.remember(directory.ino, name, resolved, number)

    def forget(self, ino: int, count: int) -> bool:
        """The kernel dropped COUNT references to INO; True if it holds none now (the node is gone,
        with whatever was kept for it)."""
        self.inodes.forget(ino, count)
        if ino in self.inodes:
            return False
        self._kept.pop(ino, None)
        return True

    # -- reading -----------------------------------------------------------------------------------

    def fresh(self, node: Node) -> Resolved:
        """NODE's resolution: its directories are held by descriptor, so it stays right when an
        ancestor is renamed; every change that moves or replaces NODE's own object rebinds it."""
        return node.resolved

    def directory(self, ino: int) -> tuple[Node, Resolved]:
        node = self.inodes.get(ino)
        if not node.resolved.is_dir:
            raise _error(errno.ENOTDIR)
        return node, node.resolved

    def current_stat(self, node: Node) -> os.stat_result | None:
        """NODE's object's lstat now, or None when its name does not lead to it at this moment (a
        change is moving it, or its last name is gone): the caller waits for `settled` and asks again."""
        resolved = node.resolved
        if resolved.branches:
            top = resolved.branches[0]
            if top.fd is not None:
                return os.fstat(top.fd.fd)
        if node.detached is not None and not node.names:
            return os.fstat(node.detached.fd)
        try:
            if resolved.dir is None:
                return os.lstat(resolved.path)
            st = resolved.dir.lstat(resolved.name)
        except FileNotFoundError:
            st = None
        if st is not None and resolved.same_object(st):
            return st
        if node.detached is not None:
            return os.fstat(node.detached.fd)
        return None

    def find(self, parent: Resolved, name: str) -> Resolved | None:
        return self._through_index(layers.lookup(parent.branches, name))

    def _through_index(self, resolved: Resolved | None) -> Resolved | None:
        """A lower name of a hardlinked file whose other name was copied up shows the upper copy."""
        if resolved is None or self.upper_dir is None or resolved.layer.writable:
            return resolved
        return self.upper_dir.find_indexed(resolved, self.stack.layers[0]) or resolved

    def _indexed(self, resolved: Resolved) -> bool:
        return self.upper_dir is not None and self.upper_dir.indexed(resolved)

    def link_count(self, resolved: Resolved, st: os.stat_result, held: Fd | None = None) -> int:
        if resolved.is_merged:
            return 1  # like the kernel: a merged directory's count cannot be known cheaply
        if self.upper_dir is None or not resolved.layer.writable:
            return st.st_nlink
        return self.upper_dir.link_count(resolved, st, held)

    def lookup(self, parent_ino: int, name: str) -> Node:
        """Resolve NAME in a directory and count one kernel reference to it."""
        parent, parent_res = self.directory(parent_ino)
        if name == ".":
            return self.inodes.remember(parent.parent, parent.name, parent_res)
        if name == "..":
            grandparent = self.inodes.get(parent.parent)
            return self.inodes.remember(grandparent.parent, grandparent.name, grandparent.resolved)
        found = self.find(parent_res, name)
        if found is None:
            raise _error(errno.ENOENT, name)
        return self.inodes.remember(parent.ino, name, found)

    async def list_dir(self, ino: int) -> tuple[Node, list[tuple[str, Resolved]]]:
        """A directory's merged listing as it is now: read and merged once, then replayed until
        something in it changes.

        Entries of lower objects carry their stat, which never changes; callers must re-stat upper
        ones. A listing read while a change in the directory was under way is read again (each change
        bumps the directory's version when it starts and when it ends).
        """
        node, _resolved = self.directory(ino)
        for _ in range(_LISTING_TRIES):
            if node.listing is not None and node.listing_epoch == self.listing_epoch:
                self._keep(node)
                return node, node.listing
            version, epoch = node.version, self.listing_epoch
            entries = await self._read_listing(node.resolved)
            if node.version == version and self.listing_epoch == epoch:
                node.listing, node.listing_epoch = entries, epoch
                self._keep(node)
                return node, entries
        async with self._changes:  # busy directory: read it with changes held back
            entries = await self._read_listing(node.resolved)
            node.listing, node.listing_epoch = entries, self.listing_epoch
            self._keep(node)
        return node, entries

    async def _read_listing(self, resolved: Resolved) -> list[tuple[str, Resolved]]:
        return await self.in_thread(self._list_merged, resolved.branches)

    def _list_merged(self, branches: tuple[Branch, ...]) -> list[tuple[str, Resolved]]:
        """(In a worker thread.) The merged listing of BRANCHES, each lower name of a hardlinked
        file that was copied up through another name showing its upper copy: finding that copy
        reads the index (a handle and an lstat per such file), disk work the loop must not do."""
        entries = layers.list_dir(branches)
        if self.upper_dir is not None:
            entries = [(name, self._through_index(r) or r) for name, r in entries]
        return entries

    def drop_listing(self, directory: Node) -> None:
        """Free DIRECTORY's cached listing (the kernel keeps its own); the next `list_dir` reads it."""
        directory.listing = None
        self._kept.pop(directory.ino, None)

    def _keep(self, directory: Node) -> None:
        """DIRECTORY's listing was just used: the last to go when more than KEPT_LISTINGS are kept."""
        self._kept[directory.ino] = directory
        self._kept.move_to_end(directory.ino)
        while len(self._kept) > KEPT_LISTINGS:
            _, oldest = self._kept.popitem(last=False)
            oldest.listing = None

    def _changed(self, directory: Node) -> None:
        """Something in DIRECTORY changes (called before and after): its cached listing is stale."""
        directory.listing = None
        directory.version += 1

    # -- copy-up -----------------------------------------------------------------------------------

    async def _ensure_upper(
        self, node: Node, *, size: int | None = None, for_open: bool = False, meta_only: bool = False,
        then: FollowUp | None = None,
    ) -> Resolved:  # fmt: skip
        """Copy NODE (and its missing parents, top down) into the upper dir; caller holds the lock.

        SIZE: the file is about to be truncated to SIZE, so only that much data is copied.
        FOR_OPEN: an open for writing; see `_copy_up_one` for a file whose name went meanwhile.
        META_ONLY: only its metadata is about to change: a lower regular file may be copied up as a
        metacopy file (metacopy=on); otherwise a metacopy file gets its data now.
        THEN: the change that follows, run in the copy-up's own worker-thread hop where NODE is
        copied up now (``then.done`` says whether it ran).
        """
        resolved = node.resolved
        if resolved.layer.writable and not self._indexed(resolved):
            if resolved.data is not None and not meta_only:
                return await self._fill_metacopy(node, size)
            return resolved
        missing = []  # ancestors not yet in upper, nearest first (the root always is)
        ancestor = self.inodes.get(node.parent)
        while not ancestor.resolved.layer.writable:
            missing.append(ancestor)
            ancestor = self.inodes.get(ancestor.parent)
        if missing:
            if meta_only and size is None and self._metacopy_alone(node):
                copied = await self._copy_up_dirs(list(reversed(missing)), (node, then))
                assert copied is not None
                return copied
            if resolved.is_dir and then is None:
                # a directory is copied up alone, as its parents are: in the same hop as them
                await self._copy_up_dirs([*reversed(missing), node])
                return node.resolved
            await self._copy_up_dirs(list(reversed(missing)))
        copied = await self._copy_up_one(node, size, for_open, meta_only, then)
        if copied.data is not None and not meta_only:
            # another name of a hardlinked file, whose copy in the index holds metadata only (the
            # kernel's metacopy=on writes such copies): its data comes in now, for every name
            return await self._fill_metacopy(node, size)
        return copied

    async def _fill_metacopy(self, node: Node, size: int | None) -> Resolved:
        """Copy a metacopy file's data in from its lower file (first open for writing, truncate,
        rename, link), in place: the node keeps its object and number."""
        up = self._require_writable()
        resolved = node.resolved
        assert resolved.data is not None
        held = self.hold_object(node)
        if held is None:
            raise _error(errno.ENOENT, node.name)
        parent = self.inodes.find(node.parent)
        if parent is not None:
            self._changed(parent)
        try:
            st = await self.in_thread(up.fill_metacopy, held.proc, resolved.data.path, size)
        finally:
            if parent is not None:
                self._changed(parent)
        filled = Resolved(resolved.layer, resolved.dir, resolved.name, st, ())
        self.inodes.rebind(node, filled)
        log.debug("copied the data of %s in", node.name)
        return filled

    def _metacopy_xattr(self, resolved: Resolved) -> str:
        """The metacopy xattr to copy RESOLVED up with, or "" for a full copy: the feature is off,
        or the file is not a non-empty regular file with one name (a hardlinked one goes through
        the link index, whole)."""
        xattr = self.upper_dir.features.metacopy if self.upper_dir else ""
        st = resolved.stat
        return xattr if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size > 0 else ""

    def _metacopy_alone(self, node: Node) -> bool:
        """Whether NODE is copied up as a metacopy file into the name that shows it, with nothing
        else to settle first (`_copy_up_one`'s plainest case), so `_copy_up_dirs` can fold it into
        the hop that copies up its missing parents."""
        resolved = node.resolved
        if resolved.is_dir or not self._metacopy_xattr(resolved) or self._indexed(resolved):
            return False
        here = self.find(self.inodes.get(node.parent).resolved, node.name)
        return here is not None and not here.layer.writable and here.same_object(resolved.stat)

    async def _copy_up_one(
        self, node: Node, size: int | None, for_open: bool, meta_only: bool = False, then: FollowUp | None = None
    ) -> Resolved:
        """Copy NODE alone into its parent's upper dir, which exists.

        A file whose name now shows another object, or nothing (it was unlinked or renamed over
        after the caller found it): a change through a descriptor held since (fchmod, fsetxattr)
        to a regular file fails as the kernel's does, with EEXIST (a whiteout or another object
        has the name); an open for writing that raced the change (a window the kernel's VFS all
        but closes, FUSE's request queue does not) gets a copy with no name, held by descriptor,
        as if it had won. So does a change through a descriptor to a special file (a FIFO or a
        device, which an open for writing never copies up): the kernel copies it up into its old
        name, over the whiteout, bringing a removed name back (see the README's differences)."""
        up = self._require_writable()
        resolved = node.resolved
        parent = self.inodes.get(node.parent)
        into = parent.resolved.branches[0]
        self._changed(parent)
        try:
            if not resolved.is_dir:
                here = self.find(parent.resolved, node.name)
                mine = self._through_index(resolved) or resolved
                if here is not None and here.same_object(mine.stat):
                    if self._indexed(here):
                        # another name of this hardlinked file was copied up: link that copy here
                        return await self._name_indexed_copy(node, here, into)
                    if here.layer.writable:
                        # the node held the index copy, and its name was linked to it meanwhile
                        self.inodes.rebind(node, here)
                        return here
                elif self._indexed(resolved):
                    return resolved  # its name went; the index copy is the object, in upper already
                elif for_open or not stat.S_ISREG(resolved.stat.st_mode):
                    return await self._copy_up_orphan(node, size)
                else:
                    # the kernel tries to copy up to the old name, which a whiteout or another
                    # object holds now: EEXIST either way
                    raise _error(errno.EEXIST, node.name)
            target = into.child(node.name)
            metacopy = self._metacopy_xattr(resolved) if meta_only and size is None else ""
            # A copy-up is not a change anyone sees: the parent keeps its times, as with the kernel.
            if metacopy:
                st = await self.in_thread(_copy_metadata_then, then, up, into.path, resolved.path, target)
                return self._record_metacopy(node, into, st)
            st, entry = await self.in_thread(
                _copy_then, then, target, upper.keeping_times, into.path, up.copy_up, resolved.path, resolved.stat,
                target, size,
            )  # fmt: skip
            if entry is not None:
                self.listing_epoch += 1  # its other lower names, wherever they are, show the copy now
            return self._record_copy(node, into, st)
        finally:
            self._changed(parent)

    def _record_metacopy(self, node: Node, into: Branch, st: os.stat_result) -> Resolved:
        """NODE, a lower file, was copied up into INTO as the metacopy file ST: rebind it there,
        its data still read from the lower file it was."""
        copied = Resolved(self.stack.layers[0], into, node.name, st, (), node.resolved)
        self.inodes.rebind(node, copied)
        log.debug("copied up the metadata of %s", node.name)
        return copied

    def _record_copy(self, node: Node, into: Branch, st: os.stat_result) -> Resolved:
        """NODE was copied up into INTO (its parent's upper dir) as the object ST: rebind it there.
        A directory keeps its lower branches below the new upper one (a copied-up directory is
        merged with what it copied)."""
        upper_layer = self.stack.layers[0]
        branches: tuple[Branch, ...] = ()
        if node.resolved.is_dir:
            top = Branch(upper_layer, into, node.name, NO_MARKERS, st.st_dev, st.st_ino)
            branches = (top, *node.resolved.branches)
        copied = Resolved(upper_layer, into, node.name, st, branches)
        self.inodes.rebind(node, copied)
        log.debug("copied up %s", node.name)
        return copied

    async def _copy_up_dirs(
        self, chain: list[Node], file: tuple[Node, FollowUp | None] | None = None
    ) -> Resolved | None:
        """Copy up the directories CHAIN (each the parent of the next; the first one's parent is in
        upper), alone, in one worker-thread hop: a change deep in a lower tree pays one hop for its
        missing parents, not one each. A chain whose path would grow long goes one by one.

        FILE: a file in the last directory of CHAIN, with the metadata change to follow, copied up
        as a metacopy file in the same hop (see `_metacopy_alone`), and returned: a chown of a file
        deep in a lower tree (every file's first in its directory under ``chown -R``) is one hop."""
        up = self._require_writable()
        parents = [self.inodes.get(node.parent) for node in chain]
        into = parents[0].resolved.branches[0]
        plan = [(node.resolved.path, node.resolved.stat, node.name) for node in chain]
        if sum(len(name) + 1 for _, _, name in plan) > _CHAIN_PATH_MAX:
            for node in chain:
                await self._copy_up_one(node, None, False)
            return None if file is None else await self._copy_up_one(file[0], None, False, True, file[1])
        if file is not None:
            parents.append(chain[-1])
        metadata = None if file is None else (file[1], file[0].resolved.path, file[0].name)
        for parent in parents:
            self._changed(parent)
        try:
            copies, error, file_st = await self.in_thread(_copy_dirs, up, into.path, plan, metadata)
            for node, parent, st in zip(chain, parents, copies, strict=False):
                # into the parent's upper dir, recorded just before
                self._record_copy(node, parent.resolved.branches[0], st)
            if error is not None:
                raise error
            if file is None:
                return None
            assert file_st is not None
            return self._record_metacopy(file[0], chain[-1].resolved.branches[0], file_st)
        finally:
            for parent in parents:
                self._changed(parent)

    async def _copy_up_orphan(self, node: Node, size: int | None) -> Resolved:
        """Copy up a file whose name now shows another object (it was unlinked or renamed over while
        an open or a write to it was on its way): like the kernel, into a copy with no name, held by
        descriptor, which the open file then uses."""
        up = self._require_writable()
        resolved = node.resolved
        st, fd = await self.in_thread(up.copy_up_unnamed, resolved.path, size)
        node.detached = Fd(fd)
        node.names.clear()
        orphan = Resolved(self.stack.layers[0], resolved.dir, resolved.name, st, ())
        self.inodes.rebind(node, orphan)
        return orphan

    async def _name_indexed_copy(self, node: Node, indexed: Resolved, into: Branch) -> Resolved:
        """A lower name whose file was copied up through another name: link the copy to it in upper."""
        up = self._require_writable()
        st = await self.in_thread(up.link_indexed, indexed.path, into.path, node.name)
        linked = Resolved(self.stack.layers[0], into, node.name, st, (), indexed.data)
        self.inodes.rebind(node, linked)
        return linked

    def _lower_has(self, parent: Resolved, name: str) -> bool:
        """Whether lower layers show NAME in this directory: removing it then needs a whiteout."""
        lower = self.stack.lower_part(parent.branches)
        return bool(lower) and layers.lookup(lower, name) is not None

    def _require_writable(self) -> UpperDir:
        if self.upper_dir is None:
            raise _error(errno.EROFS)
        return self.upper_dir

    # -- changes -----------------------------------------------------------------------------------

    async def copy_up(
        self, node: Node, *, size: int | None = None, for_open: bool = False, meta_only: bool = False,
        then: FollowUp | None = None,
    ) -> Resolved:  # fmt: skip
        """Make NODE's object an upper object (for an open for writing, a truncate, a chmod...);
        META_ONLY: for a change of metadata only; THEN: that change (see `_ensure_upper`)."""
        self._require_writable()
        async with self._changes:
            return await self._ensure_upper(node, size=size, for_open=for_open, meta_only=meta_only, then=then)

    async def create(
        self, parent_ino: int, name: str, mode: int, caller: Caller, *,
        rdev: int = 0, symlink_target: str = "", open_flags: int = 0,
    ) -> tuple[Node, int | None]:  # fmt: skip
        """Create a new object NAME; returns its node (one reference counted) and a regular file's fd."""
        up = self._require_writable()
        async with self._changes:
            parent, parent_res = self.directory(parent_ino)
            if self.find(parent_res, name) is not None:
                raise _error(errno.EEXIST, name)
            parent_res = await self._ensure_upper(parent)
            into = parent_res.branches[0]
            obj = _new_object(parent_res, mode, caller, rdev=rdev, symlink_target=symlink_target,
                              open_flags=open_flags)
            self._changed(parent)
            try:
                st, fd = await self.in_thread(up.create, into.path, name, obj)
            finally:
                self._changed(parent)
            return self._remember_new(parent, parent_res, name, st), fd

    async def create_unnamed(self, parent_ino: int, mode: int, caller: Caller, open_flags: int) -> tuple[Node, int]:
        """A regular file with no name in directory PARENT_INO, open (open(2) with O_TMPFILE), as
        the kernel's overlay makes one (``ovl_tmpfile``): in upper, the directory copied up first,
        owned and moded as a create there would make it. Its node holds it by descriptor, with
        no name, until `link` names it (linkat(2) of the open file) or the kernel forgets it,
        which frees it. Returns the node (one reference counted) and the open fd."""
        up = self._require_writable()
        async with self._changes:
            parent, parent_res = self.directory(parent_ino)
            parent_res = await self._ensure_upper(parent)
            into = parent_res.branches[0]
            obj = _new_object(parent_res, mode, caller, open_flags=open_flags)
            st, fd, held = await self.in_thread(up.create_unnamed, into.path, obj)
        # Remembered under the name "", which nothing has (an empty name resolves to nothing), and
        # then under none: every path to it goes through the descriptor (`hold_object`).
        node = self.inodes.remember(parent.ino, "", Resolved(self.stack.layers[0], into, "", st, ()))
        node.names.clear()
        node.detached = held
        node.linkable = not open_flags & os.O_EXCL
        return node, fd

    async def link(self, ino: int, parent_ino: int, name: str) -> Node:
        up = self._require_writable()
        async with self._changes:
            parent, parent_res = self.directory(parent_ino)
            if self.find(parent_res, name) is not None:
                raise _error(errno.EEXIST, name)
            node = self.inodes.get(ino)
            if not node.names and node.detached is not None:
                # No name left to link to: the kernel refuses too, but for a file made with no
                # name (`create_unnamed`), linked through the descriptor that holds it.
                if not node.linkable:
                    raise _error(errno.ENOENT, name)
                source = node.resolved
                redirects: list[tuple[str, str]] = []
                obj = NewObject(source.stat.st_mode, 0, 0, link_fd=node.detached.fd)
            else:
                source, redirects = await self._make_linkable(node)
                obj = NewObject(source.stat.st_mode, 0, 0, link_source=source.path)
            parent_res = await self._ensure_upper(parent)
            into = parent_res.branches[0]
            self._changed(parent)
            try:
                st, _ = await self.in_thread(_redirect_then, up, redirects, lambda: up.create(into.path, name, obj))
            finally:
                self._changed(parent)
            node.linkable = False  # the kernel lets a file made with no name be linked so once only
            if source.data is not None:  # a metacopy file: the new name reads the same lower data
                return self.inodes.remember(parent.ino, name, Resolved(source.layer, into, name, st, (), source.data))
            return self._remember_new(parent, parent_res, name, st)

    async def _make_linkable(self, node: Node) -> tuple[Resolved, list[tuple[str, str]]]:
        """NODE's object in upper, ready for a new name, and the redirect to set first: a lower
        regular file is copied up as a metacopy file where the mount writes them, and gets an
        absolute redirect to its data, which every name then finds (the kernel's ovl_link with
        metacopy=on does the same); a metacopy file that cannot have one gets its data first."""
        was_upper = node.resolved.layer.writable
        source = await self._ensure_upper(node, meta_only=self._redirecting)
        if source.data is None:
            return source, []
        redirects = await self._keep_data_below(node, source, was_upper, node.name, samedir=False)
        return node.resolved, redirects  # (a file whose data came in is linked whole)

    @property
    def _redirecting(self) -> bool:
        """Whether the mount writes redirects (so a metacopy file may move or get more names)."""
        return self.upper_dir is not None and bool(self.upper_dir.features.redirect)

    async def _keep_data_below(
        self, node: Node, resolved: Resolved, was_upper: bool, name: str, *, samedir: bool
    ) -> list[tuple[str, str]]:
        """The redirect (as ``[(path, redirect)]``, or none) the metacopy file RESOLVED (NODE's
        object, at NAME; WAS_UPPER: it was a metacopy file before this change, which may have one
        already) needs before it moves or gets another name, as `_redirect_for` computes it; where
        it cannot keep its data below, its data comes in now instead. A redirect is the inode's: a
        file with other names keeps only an absolute one, which every name follows."""
        redirect = None
        if not self._indexed(resolved):
            current = await self.in_thread(whiteout.file_redirect, resolved.path) if was_upper else None
            if resolved.stat.st_nlink == 1:
                redirect = self._redirect_for(node, name, samedir, current or "")
            elif current and current.startswith("/"):
                redirect = ""
        if redirect is None:
            await self._ensure_upper(node)  # its data comes in: a whole file moves or gets the name
            return []
        if not redirect:
            return []
        log.debug("%s: redirect %s", name, redirect)
        return [(resolved.path, redirect)]

    def _remember_new(self, parent: Node, parent_res: Resolved, name: str, st: os.stat_result) -> Node:
        into = parent_res.branches[0]
        resolved = layers.resolve_alone(self.stack.layers[0], into, name, st)
        if resolved.is_dir and not resolved.branches[0].markers.opaque:
            lower = layers.lookup(self.stack.lower_part(parent_res.branches), name)
            if lower is not None and lower.is_dir:
                resolved = Resolved(resolved.layer, into, name, st, resolved.branches + lower.branches)
        return self.inodes.remember(parent.ino, name, resolved)

    async def remove(self, parent_ino: int, name: str, *, directory: bool) -> None:
        """unlink (DIRECTORY false) or rmdir (true), with the kernel's errors and a whiteout if needed."""
        up = self._require_writable()
        async with self._changes:
            parent, parent_res = self.directory(parent_ino)
            victim = self.find(parent_res, name)
            if victim is None:
                raise _error(errno.ENOENT, name)
            if directory and not victim.is_dir:
                raise _error(errno.ENOTDIR, name)
            if not directory and victim.is_dir:
                raise _error(errno.EISDIR, name)
            # In a parent already in upper (nothing to copy up first), an rmdir checks for content
            # and removes in one trip to a worker thread (`_remove_in_upper`); otherwise ENOTEMPTY
            # must be known before the parent is copied up, as the kernel refuses before changing.
            checked_here = directory and not parent_res.layer.writable
            if checked_here and bool(await self.in_thread(layers.list_dir, victim.branches)):
                raise _error(errno.ENOTEMPTY, name)
            parent_res = await self._ensure_upper(parent)
            victim_node = self.inodes.node_of(victim)
            await self._index_lower_link(victim)
            leave_whiteout = self._lower_has(parent_res, name)
            into = parent_res.branches[0]
            self._prepare_detach(victim_node, (parent.ino, name), victim)
            empty_check = victim.branches if directory and not checked_here else None
            self._changed(parent)
            try:
                await self.in_thread(_remove_in_upper, up, into.path, name, leave_whiteout, empty_check,
                                     victim.path if up.indexed(victim) else None)
            finally:
                self._changed(parent)
            self._forget_object(victim)
            if victim_node is not None:
                self._name_gone(victim_node, (parent.ino, name))

    def _prepare_detach(self, node: Node | None, name: Name, victim: Resolved) -> None:
        """NODE is about to lose NAME: the kernel still holds it (an open file, or an open or stat
        that found it just before), so hold the object itself: fstat, open, read and write go on
        working whatever happens to its names (st_nlink 0 if no name is left on disk either, as on
        any filesystem). Released when the kernel forgets NODE."""
        if node is None or node.is_dir or node.detached is not None:
            return
        # VICTIM was looked up just now; a node the index took over is held by its index copy.
        target = node.resolved if self._indexed(node.resolved) else victim
        fd, rel = target.at()
        held = Fd(os.open(rel, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd.fd))
        if target.same_object(os.fstat(held.fd)):
            node.detached = held

    def _name_gone(self, node: Node, name: Name) -> None:
        """NAME of NODE was unlinked or overwritten: keep NODE found by another of its live names.

        The kernel's names of a node may be stale (it forgets a dentry without saying which), so
        each candidate is checked to lead to this very object, and dropped if it does not."""
        was_current = (node.parent, node.name) == name
        self.inodes.unlinked(node, name)
        if not was_current or node.is_dir:
            return
        for parent_ino, candidate in list(node.names):
            parent = self.inodes.find(parent_ino)
            found = self.find(parent.resolved, candidate) if parent is not None and parent.is_dir else None
            if found is not None and not found.is_dir and found.same_object(node.resolved.stat):
                node.parent, node.name = parent_ino, candidate
                node.resolved = found
                return
            node.names.discard((parent_ino, candidate))

    async def rename(self, old_ino: int, old_name: str, new_ino: int, new_name: str, flags: int) -> None:
        """rename(2) and renameat2's NOREPLACE and EXCHANGE, over the merged view.

        A directory with lower content moves by redirect (redirect_dir, see `_make_movable`), or, where
        the mount writes none, is first copied up whole (`treecopy.copy_up_tree`) so it can move.
        """
        up = self._require_writable()
        async with self._changes:
            old_parent, old_res = self.directory(old_ino)
            new_parent, new_res = self.directory(new_ino)
            source = self.find(old_res, old_name)
            if source is None:
                raise _error(errno.ENOENT, old_name)
            target = self.find(new_res, new_name)
            exchange = bool(flags & syscalls.RENAME_EXCHANGE)
            if flags & syscalls.RENAME_NOREPLACE and target is not None:
                raise _error(errno.EEXIST, new_name)
            if exchange and target is None:
                raise _error(errno.ENOENT, new_name)
            if target is not None and not exchange:
                if source.is_dir and not target.is_dir:
                    raise _error(errno.ENOTDIR, new_name)
                if target.is_dir and not source.is_dir:
                    raise _error(errno.EISDIR, new_name)
                if target.is_dir and bool(await self.in_thread(layers.list_dir, target.branches)):
                    raise _error(errno.ENOTEMPTY, new_name)
            source_node = self.inodes.remember(old_parent.ino, old_name, source)
            target_node = self.inodes.remember(new_parent.ino, new_name, target) if target else None
            try:
                if source_node is target_node:
                    return  # two names of one file: rename(2) does nothing
                self._changed(old_parent)
                self._changed(new_parent)
                try:
                    await self._rename_in_upper(
                        up, (old_parent, old_name, source_node), (new_parent, new_name, target_node),
                        exchange, target,
                    )  # fmt: skip
                finally:
                    self._changed(old_parent)
                    self._changed(new_parent)
            finally:
                self.inodes.forget(source_node.ino, 1)
                if target_node is not None:
                    self.inodes.forget(target_node.ino, 1)

    async def _rename_in_upper(
        self, up: UpperDir,
        old: tuple[Node, str, Node], new: tuple[Node, str, Node | None], exchange: bool,
        target: Resolved | None,
    ) -> None:  # fmt: skip
        """TARGET: what NEW's name resolved to just now (its link count is current)."""
        old_parent, old_name, source_node = old
        new_parent, new_name, target_node = new
        samedir = old_parent.ino == new_parent.ino
        # The source first: its copy-up brings its missing parents up in the same hop.
        redirects: list[tuple[str, str]] = []
        source_redirected = await self._make_movable(up, source_node, old_parent, old_name, redirects, samedir=samedir)
        await self._ensure_upper(old_parent)
        await self._ensure_upper(new_parent)
        target_redirected = False
        if exchange:
            assert target_node is not None
            target_redirected = await self._make_movable(
                up, target_node, new_parent, new_name, redirects, samedir=samedir
            )
        old_res, new_res = old_parent.resolved, new_parent.resolved
        overwritten = target if target_node is not None and not exchange else None
        if overwritten is not None:
            await self._index_lower_link(overwritten)
            self._prepare_detach(target_node, (new_parent.ino, new_name), overwritten)
        old_dir, new_dir = old_res.branches[0], new_res.branches[0]
        source_path = old_dir.child(old_name)
        target_path = new_dir.child(new_name)
        if exchange:
            opaque_at_a = not target_redirected and self._lower_has(old_res, old_name)
            opaque_at_b = not source_redirected and self._lower_has(new_res, new_name)
            await self.in_thread(
                _redirect_then, up, redirects,
                lambda: up.exchange(source_path, target_path, opaque_at_a=opaque_at_a, opaque_at_b=opaque_at_b),
            )  # fmt: skip
        else:
            leave_whiteout = self._lower_has(old_res, old_name)
            make_opaque = not source_redirected and self._lower_has(new_res, new_name)
            await self.in_thread(
                _redirect_then, up, redirects,
                lambda: up.rename(source_path, target_path, leave_whiteout=leave_whiteout, make_opaque=make_opaque),
            )  # fmt: skip
        old_key, new_key = (old_parent.ino, old_name), (new_parent.ino, new_name)
        if target_node is not None:
            if exchange:
                self.inodes.renamed(target_node, new_key, old_key)
            else:
                self._name_gone(target_node, new_key)
        self.inodes.renamed(source_node, old_key, new_key)
        if overwritten is not None:
            if up.indexed(overwritten):
                await self.in_thread(up.covered, overwritten.path)
            self._forget_object(overwritten)
        # Only the moved objects get their new place: an overwritten target is gone, and its number
        # must not follow whatever now sits at its old name.
        for node in (source_node, target_node) if exchange else (source_node,):
            assert node is not None
            found = self.find(self.inodes.get(node.parent).resolved, node.name)
            if found is not None:
                self.inodes.rebind(node, found)

    def _forget_object(self, gone: Resolved) -> None:
        """An upper object lost a name; if that was its last, its real inode number may be reused.

        A lower name shown through its index copy is not the object's last: the index keeps it."""
        if self._indexed(gone):
            return
        if gone.layer.writable and (gone.is_dir or gone.stat.st_nlink <= 1):
            node = self.inodes.node_of(gone)
            if node is not None and node.identity == identity(gone):
                self.inodes.retire(node)
            self.inodes.unpin(gone)

    async def _index_lower_link(self, victim: Resolved) -> None:
        """Before a name of a hardlinked lower file is deleted or overwritten, put the file in the link
        index, so its other names count one link less (the kernel's index=on does the same). The
        node the kernel knows the file by is the index copy from then on."""
        if self.upper_dir is None or victim.layer.writable or not self.upper_dir.indexes(victim.stat):
            return
        await self.in_thread(self.upper_dir.index_lower, victim)
        self.listing_epoch += 1
        node = self.inodes.node_of(victim)
        indexed = self.upper_dir.find_indexed(victim, self.stack.layers[0])
        if node is not None and indexed is not None:
            self.inodes.rebind(node, indexed)

    async def _make_movable(
        self, up: UpperDir, node: Node, parent: Node, name: str, redirects: list[tuple[str, str]], *, samedir: bool
    ) -> bool:
        """An object about to be renamed from NAME in PARENT must live in upper, under that name:
        copy it up. A directory with lower content moves by redirect where the mount writes them
        (the kernel's redirect_dir=on: the directory alone is copied up and records where its lower
        content is, which stays below); otherwise its whole tree is copied up and made opaque, and
        nothing of a tree copy that fails (ENOSPC, say) is left behind. SAMEDIR: the rename keeps
        the parent (a redirect is then a bare name). Returns whether the directory moves by
        redirect: it must not be made opaque where it lands, or its lower content would be hidden.
        The redirect to set (the upper object's path, the redirect) goes into REDIRECTS: the
        rename's own hop sets it just before it moves the object (`_redirect_then`), as the
        kernel's ovl_rename does, rather than a hop of its own.

        A file: see `_make_file_movable`."""
        if not node.resolved.is_dir:
            return await self._make_file_movable(node, parent, name, redirects, samedir=samedir)
        resolved = await self._ensure_upper(node)
        if len(resolved.branches) <= 1:
            return False
        redirect = self._redirect_for(node, name, samedir, resolved.branches[0].markers.redirect or "")
        if redirect is not None:
            if redirect:
                redirects.append((resolved.branches[0].path, redirect))
                log.debug("%s: redirect %s", name, redirect)
            return True
        copied = await self.in_thread(treecopy.copy_up_tree, up, resolved)
        self.listing_epoch += 1
        for old, new in copied:
            self.inodes.pin(old, new)
        assert resolved.dir is not None
        alone = await self.in_thread(layers.resolve_alone, resolved.layer, resolved.dir, resolved.name)
        self.inodes.rebind(node, alone)
        self._changed(node)
        return False

    async def _make_file_movable(
        self, node: Node, parent: Node, name: str, redirects: list[tuple[str, str]], *, samedir: bool
    ) -> bool:
        """`_make_movable` of a file. A lower regular file moves as a metacopy file where the mount
        writes them (the kernel's metacopy=on copies up no data for a rename either): its data
        stays below, found after the move through a redirect, as a moved directory's content is.
        A metacopy file that cannot get one (redirects off or too long, or other names without an
        absolute one: a redirect is the inode's) gets its data first.

        A hardlinked file may be in upper already under another name (its node then holds that
        copy) while NAME is still a lower name showing it through the link index: NAME is linked
        to the copy in upper first, or the rename would find nothing there to move."""
        was_upper = node.resolved.layer.writable
        resolved = await self._ensure_upper(node, meta_only=self._redirecting)
        into = parent.resolved.branches[0]
        here = self.find(parent.resolved, name)
        if here is not None and self._indexed(here):  # an index entry is never NAME itself
            await self._name_indexed_copy(node, here, into)
            resolved = node.resolved
        if resolved.data is None:
            return False
        # a metacopy file: where its data is must survive the move
        redirects += await self._keep_data_below(node, resolved, was_upper, name, samedir=samedir)
        return False

    def _redirect_for(self, node: Node, name: str, samedir: bool, current: str) -> str | None:
        """The redirect the upper object NODE (a directory with lower content, or a metacopy file),
        still at its old NAME with the redirect CURRENT ("": none), needs before it moves, as the
        kernel's ovl_set_redirect computes it: "" if the one it has will do, None if it cannot move
        by redirect (feature off or unavailable, or an absolute path longer than the kernel's
        redirect_max, where the kernel says EXDEV and tools copy).

        Same parent: its old name, unless it has a redirect already. Another parent: the absolute
        path of its old place, each ancestor named by its own redirect where it has one (an
        absolute one ends the walk), unless it has an absolute redirect already."""
        if not self._redirecting:
            return None
        if current and (samedir or current.startswith("/")):
            return ""
        if samedir:
            return name
        parts = [current or name]
        walk = self.inodes.get(node.parent)
        while not parts[-1].startswith("/") and walk.ino != ROOT_INODE:
            own = walk.resolved.branches[0].markers.redirect if walk.resolved.branches else None
            parts.append(own or walk.name)
            walk = self.inodes.get(walk.parent)
        redirect = "/".join(reversed(parts))
        redirect = redirect if redirect.startswith("/") else "/" + redirect
        if len(os.fsencode(redirect)) > REDIRECT_MAX:
            log.info("%s: redirect longer than %d bytes: moving a copy of it instead", node.name, REDIRECT_MAX)
            return None
        return redirect

    # -- attributes --------------------------------------------------------------------------------

    async def truncate(self, node: Node, size: int, then: Callable[[str], object] | None = None) -> Resolved:
        """Truncate NODE to SIZE (copied up first), then run THEN on its object in the same hop."""
        resolved = node.resolved
        if not resolved.layer.writable or resolved.data is not None:
            resolved = await self.copy_up(node, size=size)
        await self.on_object(node, lambda path: _truncate(path, size, then))
        return node.resolved

    async def change_metadata(self, node: Node, change: Callable[[str], None]) -> os.stat_result | None:
        """chmod/chown/utimens/setxattr: copy up (a lower regular file as a metacopy file, where the
        mount writes them: its data stays below), then change.

        CHANGE gets a path to the object itself (/proc/self/fd/N of a checked O_PATH descriptor):
        calls on it follow that link to the object, never a symlink found at its name. Where the
        object is copied up now, CHANGE runs in the copy-up's worker-thread hop, right after it: one
        hop per chown of a lower file instead of two (a hop is most of what such a chown costs); a
        chown/chmod (a `MetadataChange`) of a lower file is folded into its metacopy copy-up where
        that is the same (the copy is created with its new owner and mode). Returns the object's
        stat after the change where that is known without asking the disk again (folded), else None.
        """
        then = FollowUp(change)
        resolved = await self.copy_up(node, meta_only=True, then=then)
        if then.error is not None:
            raise then.error
        if then.folded:
            return resolved.stat
        if not then.done:
            await self.on_object(node, change)
        return None

    async def on_object(self, node: Node, action: Callable[[str], T]) -> T:
        """Run ACTION (in a worker thread) on a path that is NODE's object itself; if a change is
        moving the object right now, after that change."""
        for attempt in range(2):
            held = self.hold_object(node)
            if held is not None:
                return await self.in_thread(action, held.proc)
            if attempt == 0:
                await self.settled()
        raise _error(errno.ENOENT, node.name)

    def hold_object(self, node: Node) -> Fd | None:
        """An O_PATH descriptor of NODE's object, checked to be it; None if its name leads elsewhere."""
        resolved = node.resolved
        if node.detached is not None and not node.names:
            return node.detached
        fd, rel = resolved.at()
        try:
            held = Fd(os.open(rel, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd.fd))
        except FileNotFoundError:
            return node.detached
        if resolved.same_object(os.fstat(held.fd)):
            return held
        return node.detached


def _new_object(parent: Resolved, mode: int, caller: Caller, **extra: Any) -> NewObject:
    """What CALLER's new object of MODE in the upper directory PARENT is made as: the caller's,
    with BSD group semantics in a setgid directory (its group, and a new directory setgid too);
    EXTRA: the rest of `NewObject`."""
    gid = caller.gid
    if parent.stat.st_mode & stat.S_ISGID:
        gid = parent.stat.st_gid
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    return NewObject(mode, caller.uid, gid, umask=caller.umask, inherits_acl=caller.inherits_acl, **extra)


#: Longest path (below a held upper dir) a chain of missing parents is copied up through in one hop;
#: a longer chain (deep, long names: PATH_MAX is 4096) goes one directory at a time.
_CHAIN_PATH_MAX = 2048


def _copy_dirs(
    up: UpperDir, into: str, plan: list[tuple[str, os.stat_result, str]],
    metadata: tuple[FollowUp | None, str, str] | None = None,
) -> tuple[list[os.stat_result], OSError | None, os.stat_result | None]:
    """Copy each directory of PLAN (source, its lstat, name) up alone, each into the one before
    (the first into INTO), keeping each parent's times; then METADATA's file (its change, source,
    name), if any, as a metacopy file into the last (`_copy_metadata_then`). Returns the copies'
    lstats, the error that stopped the chain, if any (the copies made before it stay: each is
    complete, and the caller records them), and the file's copy's lstat."""
    copies: list[os.stat_result] = []
    parent = into
    for source, st, name in plan:
        target = os.path.join(parent, name)
        try:
            copied, _ = upper.keeping_times(parent, up.copy_up, source, st, target, None)
        except OSError as exc:
            return copies, exc, None
        copies.append(copied)
        parent = target
    if metadata is None:
        return copies, None, None
    then, source, name = metadata
    try:
        return copies, None, _copy_metadata_then(then, up, parent, source, os.path.join(parent, name))
    except OSError as exc:
        return copies, exc, None


@dataclass(slots=True)
class FollowUp:
    """A change to run on an object right after its copy-up, in the same worker-thread hop; its
    error is kept for the caller, so the copy-up's own bookkeeping completes first."""

    action: Callable[[str], object]
    done: bool = False
    folded: bool = False
    """The change was made by creating the copy with it (`MetadataChange.folded`): the copy's
    recorded stat is its stat after the change."""
    error: OSError | None = None


def _copy_metadata_then(
    then: FollowUp | None, up: UpperDir, into: str, source: str, target: str
) -> os.stat_result:
    """`UpperDir.copy_up_metadata` of SOURCE to TARGET in the upper dir INTO (which keeps its times),
    with THEN's change folded into the copy where it is a chown/chmod that can be (then it is done,
    and the copy's stat is its final one), else run after it as `_copy_then` runs it."""
    change = then.action if then is not None and isinstance(then.action, MetadataChange) else None
    st, folded = upper.keeping_times(into, up.copy_up_metadata, source, target, change)
    if folded:
        assert then is not None
        then.done = then.folded = True
        return st
    return _copy_then(then, target, lambda: st)


def _copy_then(then: FollowUp | None, target: str, copy: Callable[..., T], *args: Any) -> T:
    """COPY(*ARGS), which publishes an object at TARGET, then THEN's action on that object, held by
    an O_PATH descriptor (a symlink there is the object, never followed), checked to be the copy."""
    result = copy(*args)
    if then is None:
        return result
    try:
        fd = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return result  # gone already: the caller acts on the object the usual way
    try:
        # an os.stat_result (a tuple itself), or (stat, index entry)
        copied = cast(os.stat_result, result if isinstance(result, os.stat_result) else result[0])  # type: ignore[index]
        held = os.fstat(fd)
        if (held.st_dev, held.st_ino) == (copied.st_dev, copied.st_ino):
            try:
                then.action(f"/proc/self/fd/{fd}")
            except OSError as exc:
                then.error = exc
            then.done = True
    finally:
        os.close(fd)
    return result


def _redirect_then(up: UpperDir, redirects: list[tuple[str, str]], change: Callable[[], T]) -> T:
    """Set each of REDIRECTS (the path in upper of a directory or a metacopy file, its redirect),
    then CHANGE (a rename, or a link): its blocking part in one worker call. A redirect left by a
    change that then fails names the object's own place, where its lower content is found anyway
    (the kernel's order too)."""
    for path, redirect in redirects:
        up.set_redirect(path, redirect)
    return change()


def _remove_in_upper(
    up: UpperDir, parent_dir: str, name: str, leave_whiteout: bool, empty_check: Sequence[Branch] | None,
    covered: str | None,
) -> None:  # fmt: skip
    """The blocking part of an unlink or rmdir, in one worker call (one trip to a thread per
    request): EMPTY_CHECK, a directory's branches to check for content first (ENOTEMPTY); then the
    removal; COVERED, an index copy one of whose lower names this was (see `UpperDir.covered`)."""
    if empty_check is not None and layers.list_dir(empty_check):
        raise _error(errno.ENOTEMPTY, name)
    up.remove(parent_dir, name, leave_whiteout=leave_whiteout)
    if covered is not None:
        up.covered(covered)


def _truncate(path: str, size: int, then: Callable[[str], object] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    if then is not None:
        then(path)


#: Optimistic reads of a listing before taking the change lock (a directory under constant change).
_LISTING_TRIES = 3

#: Directories whose merged listing is kept for the next readdir (least recently used go first).
#: With kernel-cached listings one is freed once the kernel has read it to the end, so this bounds
#: only what a stock pyfuse3 needs (every readdir reaches the daemon): a walk's working set is its
#: path from the root, and each listing costs about 400 bytes an entry.
KEPT_LISTINGS = 64
