"""The layer stack, and how a merged name resolves through it.

Pure and synchronous: plain directories in, plain values out, no pyfuse3. The rules are kernel
overlayfs's (Documentation/filesystems/overlayfs.rst):

- layers are searched top-down (the upper dir, then lowerdirs left to right) and the first match wins;
- a non-directory hides everything below it; a whiteout hides everything below it;
- only directories merge, down to the first opaque one, and a non-directory found below a directory
  ends the merge; a merged directory's own metadata and xattrs come from its topmost layer.

A merged directory is represented by its *branches*: one real directory per layer that takes part,
topmost first. Looking a name up in it needs only those branches.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import whiteout
from .whiteout import DirMarkers


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of the stack: the upper dir (writable) or a lowerdir."""

    index: int
    """0 is the top of the stack."""
    root: str
    """Absolute path of the layer's root directory."""
    writable: bool
    below: tuple[Branch, ...] = ()
    """The roots of the layers under this one, top first (the stack's own, held once per mount):
    where an absolute redirect continues the lookup."""


class Fd:
    """An owned descriptor (O_PATH), closed when the last reference to it goes.

    Real directories are held this way, not by path strings: a path may grow past PATH_MAX, go stale
    when a name is renamed or unlinked, or be redirected by a component swapped for a symlink; a
    descriptor stays on its object. Calls that take no descriptor (xattrs, the ``*at`` calls Python
    lacks) reach the object as ``/proc/self/fd/N``, so no path longer than a short prefix plus one name
    is ever built.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass

    @property
    def proc(self) -> str:
        return f"/proc/self/fd/{self.fd}"


#: How real directories are opened to be held: no following, no data access, no leaking to children.
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(slots=True, eq=False)
class Branch:
    """One layer's real directory taking part in a merged directory.

    Held by descriptor once pinned (`pin`); until then (an entry of a listing nobody looked up yet) by
    its name in its parent branch, which is pinned. Compared by identity.
    """

    layer: Layer
    parent: Branch | None
    """The real directory holding this one (None for a layer root, which is always pinned)."""
    name: str
    markers: DirMarkers
    dev: int
    ino: int
    """The real directory's st_dev and st_ino (the lowest branch numbers a merged directory)."""
    fd: Fd | None = None

    def pin(self) -> Branch:
        """Hold the directory by descriptor from now on; checked to be the same directory.

        Out of descriptors (EMFILE, ENFILE), it stays held by name: slower, still correct."""
        if self.fd is None and self.parent is not None:
            fd, rel = self.parent.at()
            try:
                opened = Fd(os.open(_join(rel, self.name), DIR_FLAGS, dir_fd=fd.fd))
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    return self
                raise
            st = os.fstat(opened.fd)
            if (st.st_dev, st.st_ino) != (self.dev, self.ino):
                raise OSError(errno.ESTALE, "directory replaced while being looked up", self.name)
            self.fd = opened
        return self

    def unpin(self) -> None:
        """Let the descriptor go (the kernel forgot the directory): held by name again, below its
        parent, as an entry of a cached listing is. Layer roots stay held."""
        if self.parent is not None:
            self.fd = None

    def at(self) -> tuple[Fd, str]:
        """A held ancestor (or this directory itself) and the relative path from it ("." for itself)."""
        if self.fd is not None:
            return self.fd, "."
        assert self.parent is not None, "an unpinned branch always has a parent"
        fd, rel = self.parent.at()
        return fd, _join(rel, self.name)

    @property
    def path(self) -> str:
        """A short path to this directory (through /proc/self/fd); valid while this branch lives.

        It ends in "/." or a name, never in the /proc link itself, so calls that do not follow a
        last symlink (lstat, lchown, lsetxattr) still reach the directory."""
        fd, rel = self.at()
        return f"{fd.proc}/{rel}"

    def child(self, name: str) -> str:
        """A short path to NAME inside this directory."""
        fd, rel = self.at()
        return f"{fd.proc}/{_join(rel, name)}"

    def lstat(self, name: str) -> os.stat_result:
        fd, rel = self.at()
        return os.stat(_join(rel, name), dir_fd=fd.fd, follow_symlinks=False)

    def read_markers(self) -> DirMarkers:
        """This directory's markers as they are on disk (`whiteout.read_dir_markers_at`)."""
        fd, rel = self.at()
        return whiteout.read_dir_markers_at(fd.fd, rel)


def _join(rel: str, name: str) -> str:
    return name if rel == "." else f"{rel}/{name}"


def root_branch(layer: Layer, markers: DirMarkers | None = None) -> Branch:
    """A layer root, held by descriptor."""
    fd = Fd(os.open(layer.root, DIR_FLAGS))
    st = os.fstat(fd.fd)
    return Branch(layer, None, "", markers or _root_markers(fd.proc), st.st_dev, st.st_ino, fd)


#: Values many stat results share (modes, owners, devices, block sizes, link counts): one object
#: each instead of one per result. Bounded, so odd values (big ids, many devices) are not kept.
_SHARED: dict[int, int] = {}
_SHARED_MAX = 4096


def compact_stat(st: os.stat_result) -> os.stat_result:
    """ST as a `Resolved` keeps it: an ``os.stat_result`` of a third of the memory (about 300 bytes
    instead of 600 on CPython 3.11, most of a node's cost in a walk of many files).

    Kept: every field but the derived times: ``st_atime``, ``st_mtime``, ``st_ctime`` (floats) and
    the whole seconds of ``st[7:10]`` are None; the exact ``st_*_ns`` stay, and nothing in the
    overlay reads the others. Values many results share are shared objects, and an atime or ctime
    equal to the mtime is the mtime's object. A result compacted already is returned as it is."""
    if st.st_atime is None:
        return st
    mtime = st.st_mtime_ns
    atime, ctime = st.st_atime_ns, st.st_ctime_ns
    # The kept object for a value (kept now if there is room), else the value itself. A bound dict
    # method, not a function of ours: this runs for every entry of every listing read.
    shared = _SHARED.setdefault if len(_SHARED) < _SHARED_MAX else _SHARED.get
    fields: tuple[Any, ...] = (  # None where the derived times were (typeshed says float)
        shared(st.st_mode, st.st_mode), st.st_ino, shared(st.st_dev, st.st_dev),
        shared(st.st_nlink, st.st_nlink), shared(st.st_uid, st.st_uid), shared(st.st_gid, st.st_gid),
        st.st_size, None, None, None, None, None, None,
        mtime if atime == mtime else atime, mtime, mtime if ctime == mtime else ctime,
        shared(st.st_blksize, st.st_blksize), st.st_blocks, shared(st.st_rdev, st.st_rdev),
    )  # fmt: skip
    return os.stat_result(fields)


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a merged name resolves to."""

    layer: Layer
    """The layer holding the topmost (visible) object."""
    dir: Branch | None
    """The real directory holding the topmost object (None for the merged root)."""
    name: str
    """Its name there: the topmost object's data, metadata and xattrs are the merged object's."""
    stat: os.stat_result
    branches: tuple[Branch, ...]
    """For a directory, every real directory merged into it, topmost first; empty otherwise."""
    data: Resolved | None = None
    """For a metacopy file (an upper file holding metadata only, kernel ``metacopy=on``): the lower
    file holding its data, which reads, st_blocks and the copy-in at the first write use."""

    def __post_init__(self) -> None:
        # Kept for every object the kernel knows (the node table) and every entry of a kept
        # listing: a plain lstat result is most of what one costs (see `compact_stat`).
        object.__setattr__(self, "stat", compact_stat(self.stat))

    @property
    def readable(self) -> Resolved:
        """The object whose data a read returns: the data file of a metacopy file, else this one."""
        return self if self.data is None else self.data

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.stat.st_mode)

    @property
    def is_merged(self) -> bool:
        """A directory with more than one layer behind it (the kernel reports st_nlink 1 for these)."""
        return len(self.branches) > 1

    def at(self) -> tuple[Fd, str]:
        """A held directory and the relative path of the topmost object from it, for ``*at`` calls."""
        if self.branches:
            return self.branches[0].at()
        assert self.dir is not None
        fd, rel = self.dir.at()
        return fd, _join(rel, self.name)

    @property
    def path(self) -> str:
        """A short path to the topmost object; valid while this resolution lives."""
        if self.branches:
            return self.branches[0].path
        assert self.dir is not None
        return self.dir.child(self.name)

    def same_object(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == (self.stat.st_dev, self.stat.st_ino)


@dataclass(frozen=True, slots=True)
class LayerStack:
    """The ordered layers of one mount, topmost first, each root held by descriptor."""

    layers: tuple[Layer, ...]
    roots: tuple[Branch, ...]

    @classmethod
    def from_dirs(cls, lowerdirs: Sequence[str], upperdir: str | None) -> LayerStack:
        roots = ([upperdir] if upperdir else []) + list(lowerdirs)
        built: list[Layer] = []
        held: list[Branch] = []
        for i in reversed(range(len(roots))):
            layer = Layer(i, roots[i], upperdir is not None and i == 0, tuple(held))
            built.insert(0, layer)
            held.insert(0, root_branch(layer))
        return cls(tuple(built), tuple(held))

    @property
    def upper(self) -> Layer | None:
        return self.layers[0] if self.layers[0].writable else None

    def resolve_root(self) -> Resolved:
        """The merged root: every layer's root merges into it (layer roots are never opaque)."""
        top = self.roots[0]
        return Resolved(self.layers[0], None, "", os.fstat(top.fd.fd) if top.fd else os.lstat(top.path),
                        self.roots)

    def lower_part(self, branches: Sequence[Branch]) -> tuple[Branch, ...]:
        """The branches below the upper dir: what a name would show if upper did not have it."""
        return tuple(b for b in branches if not b.layer.writable)


def resolve_alone(layer: Layer, parent: Branch, name: str, st: os.stat_result | None = None) -> Resolved:
    """NAME in PARENT (a real directory of LAYER) as an object of its own, nothing below merged in (a
    new or wholly copied-up object). ST: its lstat, if the caller has it."""
    st = parent.lstat(name) if st is None else st
    branches: tuple[Branch, ...] = ()
    if stat.S_ISDIR(st.st_mode):
        branch = Branch(layer, parent, name, whiteout.NO_MARKERS, st.st_dev, st.st_ino)
        branch.markers = branch.read_markers()
        branches = (branch,)
    return Resolved(layer, parent, name, st, branches)


def lookup(parent: Sequence[Branch], name: str) -> Resolved | None:
    """Resolve NAME in the merged directory made of PARENT's branches; None if it does not exist.

    Raises OSError for real errors (ENAMETOOLONG, EACCES, EIO...) so the FUSE boundary can report them.
    """
    if whiteout.is_reserved_name(name):
        return None
    return _merge(parent, name, _LiveProbe())


def list_dir(parent: Sequence[Branch]) -> list[tuple[str, Resolved]]:
    """Every visible name of a merged directory, each once, resolved: upper names first, then lower.

    Each branch is read once with scandir; the per-name merge then runs on those listings (the same
    rules as `lookup`), so a directory of N names costs N lstats per layer, not N lookups.
    """
    listings: list[_Listing] = []
    try:
        for branch in parent:
            listings.append(_Listing.read(branch))
        probe = _ListedProbe(dict(zip(parent, listings, strict=True)))
        order: dict[str, None] = {}
        for listing in listings:
            for name in listing.entries:
                if not whiteout.is_reserved_name(name):
                    order.setdefault(name, None)
        if not any(branch.layer.writable for branch in parent):
            return _list_lower(parent, listings, order, probe)
        result = []
        for name in order:
            resolved = _merge(parent, name, probe)
            if resolved is not None:
                result.append((name, resolved))
        return result
    finally:
        for listing in listings:
            os.close(listing.fd)


def _list_lower(
    parent: Sequence[Branch], listings: Sequence[_Listing], names: Iterable[str], probe: _ListedProbe
) -> list[tuple[str, Resolved]]:
    """`list_dir` of a directory with no upper branch (nearly every directory of a fresh mount's
    walk): NAMES resolved as `_merge` would, with a third less work for most. A lower file cannot
    be a metacopy file, so a name's first branch from the top that has it, or has a ".wh." whiteout
    of it, decides; a file found there is itself. Only what may resolve further (a directory: its
    markers, a redirect, what is merged under it) or be a whiteout (`whiteout.may_be_whiteout`)
    goes through `_merge`."""
    result = []
    pairs = list(zip(parent, listings, strict=True))
    for name in names:
        for branch, listing in pairs:
            entry = listing.entries.get(name)
            if entry is None:
                if whiteout.oci_whiteout_name(name) in listing.entries:
                    break  # whited out here: hidden
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # gone since the directory was read: the full rules
                st = None
            if st is None or stat.S_ISDIR(st.st_mode) or whiteout.may_be_whiteout(st, branch.markers):
                resolved = _merge(parent, name, probe)
                if resolved is not None:
                    result.append((name, resolved))
            else:
                result.append((name, Resolved(branch.layer, branch, name, st, ())))
            break
    return result


class _LiveProbe:
    """Asks the real filesystem, one syscall per question (used by single-name lookups)."""

    def lstat(self, branch: Branch, name: str) -> os.stat_result | None:
        try:
            return branch.lstat(name)
        except FileNotFoundError:
            return None

    def oci_whiteout(self, branch: Branch, name: str) -> bool:
        if len(os.fsencode(name)) > _OCI_NAME_MAX:
            return False  # ".wh." + NAME would be longer than any name can be
        try:
            branch.lstat(whiteout.oci_whiteout_name(name))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise
        return True


#: The longest name a ".wh.NAME" whiteout can exist for (NAME_MAX less the prefix).
_OCI_NAME_MAX = 255 - len(whiteout.OCI_WHITEOUT_PREFIX)


@dataclass(slots=True)
class _Listing:
    """One real directory, read once, and open while its names are merged (`list_dir` closes it)."""

    entries: dict[str, os.DirEntry[str]]
    fd: int
    """The directory, open: each entry's ``stat()`` is an fstatat on it, half the cost of an lstat
    of its /proc/self/fd path (which the kernel walks through procfs every time)."""

    @classmethod
    def read(cls, branch: Branch) -> _Listing:
        held, rel = branch.at()
        fd = os.open(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=held.fd)
        try:
            with os.scandir(fd) as it:
                return cls({entry.name: entry for entry in it}, fd)
        except BaseException:
            os.close(fd)
            raise


@dataclass(slots=True)
class _ListedProbe:
    """Answers from directory listings already read (used when listing a whole directory)."""

    listings: dict[Branch, _Listing]

    def lstat(self, branch: Branch, name: str) -> os.stat_result | None:
        listing = self.listings.get(branch)
        if listing is None:  # a directory reached through a redirect: not listed
            return _LiveProbe().lstat(branch, name)
        entry = listing.entries.get(name)
        if entry is None:
            return None
        try:
            return entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None

    def oci_whiteout(self, branch: Branch, name: str) -> bool:
        listing = self.listings.get(branch)
        if listing is None:
            return _LiveProbe().oci_whiteout(branch, name)
        return whiteout.oci_whiteout_name(name) in listing.entries


def _merge(parent: Sequence[Branch], name: str, probe: _LiveProbe | _ListedProbe) -> Resolved | None:
    """The overlay lookup rules, for one name, over the parent's branches topmost first."""
    top: tuple[Layer, Branch, str, os.stat_result] | None = None
    branches: list[Branch] = []
    data: Resolved | None = None
    metacopy = False  # the top is a metacopy file: the lookup goes on down for its data
    # Where to look next: (directory, name) pairs, one per layer; a redirect rewrites the rest.
    places: list[tuple[Branch, str]] = [(branch, name) for branch in parent]
    i = 0
    while i < len(places):
        branch, here = places[i]
        i += 1
        st = probe.lstat(branch, here)
        if st is None:
            if probe.oci_whiteout(branch, here):
                break
            continue
        # The path only when the cheap test cannot tell: building it walks up unpinned branches.
        if whiteout.may_be_whiteout(st, branch.markers) and whiteout.is_whiteout(
            branch.child(here), st, branch.markers
        ):
            break
        if metacopy:
            if stat.S_ISREG(st.st_mode):
                data = Resolved(branch.layer, branch, here, st, ())
            break
        if top is None:
            top = (branch.layer, branch, here, st)
            if not stat.S_ISDIR(st.st_mode):
                redirect = _metacopy_redirect(branch, here, st)
                if redirect is None:
                    break
                metacopy = True
                if redirect:  # a metacopy file the kernel renamed: its data is at that path
                    places[i:] = _redirected(redirect, branch.layer, places[i:])
                continue
        elif not stat.S_ISDIR(st.st_mode):
            break  # a non-directory below a directory ends the merge (the kernel stops there too)
        found = Branch(branch.layer, branch, here, whiteout.NO_MARKERS, st.st_dev, st.st_ino)
        found.markers = markers = found.read_markers()
        branches.append(found)
        # A ".wh.NAME" beside NAME in the same layer means "replaced": nothing below shows through.
        if markers.opaque or probe.oci_whiteout(branch, here):
            break
        if markers.redirect:
            places[i:] = _redirected(markers.redirect, branch.layer, places[i:])
    if top is None:
        return None
    return Resolved(top[0], top[1], top[2], top[3], tuple(branches), data)


def _metacopy_redirect(branch: Branch, name: str, st: os.stat_result) -> str | None:
    """None unless NAME (lstat ST) is a metacopy file of the upper dir; then its redirect ("" for
    none: the data is at the same name below). Only the upper dir's non-empty regular files are
    asked (one getxattr): an empty file has no data to find, and lower layers hold none we wrote."""
    if not (branch.layer.writable and stat.S_ISREG(st.st_mode) and st.st_size > 0):
        return None
    path = branch.child(name)
    if not whiteout.is_metacopy(path):
        return None
    return whiteout.file_redirect(path) or ""


def _redirected(
    redirect: str, layer: Layer, rest: list[tuple[Branch, str]]
) -> list[tuple[Branch, str]]:
    """Where a renamed directory's lower content is, below LAYER (the kernel's redirect_dir).

    A bare name: the same parent, another name. An absolute path: that path from the root of every
    layer below, whether or not the directory's current parent exists there.
    """
    if not redirect.startswith("/"):
        return [(branch, redirect) for branch, _ in rest]
    *parents, leaf = [part for part in redirect.split("/") if part]
    places = []
    for below in layer.below:
        parent_dir = _walk_dirs(below, parents)
        if parent_dir is not None:
            places.append((parent_dir, leaf))
    return places


def _walk_dirs(root: Branch, parts: Sequence[str]) -> Branch | None:
    """ROOT/PARTS if every component is a real directory (no symlink followed), else None."""
    branch = root
    for part in parts:
        try:
            st = branch.lstat(part)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        branch = Branch(branch.layer, branch, part, whiteout.NO_MARKERS, st.st_dev, st.st_ino)
    return branch


def _root_markers(path: str) -> DirMarkers:
    """A layer root may carry xattr whiteouts, but its opaque marker is ignored, as in the kernel."""
    markers = whiteout.read_dir_markers(path)
    return DirMarkers(opaque=False, has_xattr_whiteouts=markers.has_xattr_whiteouts)


def check_layer_readable(path: str) -> None:
    """Open and read one entry of a layer root, so an unusable layer fails at mount time, not later."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as it:
            next(iter(it), None)
    finally:
        os.close(fd)

