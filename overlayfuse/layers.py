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

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

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
    below: tuple[Layer, ...] = ()
    """The layers under this one, top first: where an absolute redirect continues the lookup."""


@dataclass(frozen=True, slots=True)
class Branch:
    """One layer's real directory taking part in a merged directory."""

    layer: Layer
    path: str
    markers: DirMarkers
    dev: int
    ino: int
    """The real directory's st_dev and st_ino (the lowest branch numbers a merged directory)."""


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a merged name resolves to."""

    layer: Layer
    """The layer holding the topmost (visible) object."""
    path: str
    """Real path of the topmost object: its data, metadata and xattrs are the merged object's."""
    stat: os.stat_result
    branches: tuple[Branch, ...]
    """For a directory, every real directory merged into it, topmost first; empty otherwise."""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.stat.st_mode)

    @property
    def is_merged(self) -> bool:
        """A directory with more than one layer behind it (the kernel reports st_nlink 1 for these)."""
        return len(self.branches) > 1


@dataclass(frozen=True, slots=True)
class LayerStack:
    """The ordered layers of one mount, topmost first."""

    layers: tuple[Layer, ...]

    @classmethod
    def from_dirs(cls, lowerdirs: Sequence[str], upperdir: str | None) -> LayerStack:
        roots = ([upperdir] if upperdir else []) + list(lowerdirs)
        built: list[Layer] = []
        for i in reversed(range(len(roots))):
            built.insert(0, Layer(i, roots[i], upperdir is not None and i == 0, tuple(built)))
        return cls(tuple(built))

    @property
    def upper(self) -> Layer | None:
        return self.layers[0] if self.layers[0].writable else None

    def resolve_root(self) -> Resolved:
        """The merged root: every layer's root merges into it (layer roots are never opaque)."""
        stats = [os.lstat(layer.root) for layer in self.layers]
        branches = tuple(
            Branch(layer, layer.root, _root_markers(layer.root), st.st_dev, st.st_ino)
            for layer, st in zip(self.layers, stats)
        )
        return Resolved(self.layers[0], self.layers[0].root, stats[0], branches)

    def lower_part(self, branches: Sequence[Branch]) -> tuple[Branch, ...]:
        """The branches below the upper dir: what a name would show if upper did not have it."""
        return tuple(b for b in branches if not b.layer.writable)


def resolve_alone(layer: Layer, path: str, st: os.stat_result | None = None) -> Resolved:
    """PATH in LAYER as an object of its own, nothing below merged in (a new or wholly copied-up
    object). ST: its lstat, if the caller has it."""
    st = os.lstat(path) if st is None else st
    branches: tuple[Branch, ...] = ()
    if stat.S_ISDIR(st.st_mode):
        branches = (Branch(layer, path, whiteout.read_dir_markers(path), st.st_dev, st.st_ino),)
    return Resolved(layer, path, st, branches)


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
    listings = [_Listing.read(branch.path) for branch in parent]
    order: dict[str, None] = {}
    for listing in listings:
        for name in listing.entries:
            if not whiteout.is_reserved_name(name):
                order.setdefault(name, None)
    probe = _ListedProbe(dict(zip((b.path for b in parent), listings)))
    result = []
    for name in order:
        resolved = _merge(parent, name, probe)
        if resolved is not None:
            result.append((name, resolved))
    return result


class _LiveProbe:
    """Asks the real filesystem, one syscall per question (used by single-name lookups)."""

    def lstat(self, branch: Branch, name: str, path: str) -> os.stat_result | None:
        try:
            return os.lstat(path)
        except FileNotFoundError:
            return None

    def oci_whiteout(self, branch: Branch, name: str) -> bool:
        return whiteout.oci_whiteout_exists(branch.path, name)


@dataclass(slots=True)
class _Listing:
    """One real directory, read once."""

    entries: dict[str, os.DirEntry[str]]

    @classmethod
    def read(cls, path: str) -> _Listing:
        with os.scandir(path) as it:
            return cls({entry.name: entry for entry in it})


@dataclass(slots=True)
class _ListedProbe:
    """Answers from directory listings already read (used when listing a whole directory)."""

    listings: dict[str, _Listing]

    def lstat(self, branch: Branch, name: str, path: str) -> os.stat_result | None:
        listing = self.listings.get(branch.path)
        if listing is None:  # a directory reached through an absolute redirect: not listed
            return _LiveProbe().lstat(branch, name, path)
        entry = listing.entries.get(name)
        if entry is None:
            return None
        try:
            return entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None

    def oci_whiteout(self, branch: Branch, name: str) -> bool:
        listing = self.listings.get(branch.path)
        if listing is None:
            return whiteout.oci_whiteout_exists(branch.path, name)
        return whiteout.oci_whiteout_name(name) in listing.entries


def _merge(parent: Sequence[Branch], name: str, probe: _LiveProbe | _ListedProbe) -> Resolved | None:
    """The overlay lookup rules, for one name, over the parent's branches topmost first."""
    top: tuple[Layer, str, os.stat_result] | None = None
    branches: list[Branch] = []
    # Where to look next: (directory, name) pairs, one per layer; a redirect rewrites the rest.
    places: list[tuple[Branch, str]] = [(branch, name) for branch in parent]
    i = 0
    while i < len(places):
        branch, here = places[i]
        i += 1
        path = os.path.join(branch.path, here)
        st = probe.lstat(branch, here, path)
        if st is None:
            if probe.oci_whiteout(branch, here):
                break
            continue
        if whiteout.is_whiteout(path, st, branch.markers):
            break
        if top is None:
            top = (branch.layer, path, st)
            if not stat.S_ISDIR(st.st_mode):
                break
        elif not stat.S_ISDIR(st.st_mode):
            break  # a non-directory below a directory ends the merge (the kernel stops there too)
        markers = whiteout.read_dir_markers(path)
        branches.append(Branch(branch.layer, path, markers, st.st_dev, st.st_ino))
        # A ".wh.NAME" beside NAME in the same layer means "replaced": nothing below shows through.
        if markers.opaque or probe.oci_whiteout(branch, here):
            break
        if markers.redirect:
            places[i:] = _redirected(markers.redirect, branch.layer, places[i:])
    if top is None:
        return None
    return Resolved(top[0], top[1], top[2], tuple(branches))


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
        parent_dir = _walk_dirs(below.root, parents)
        if parent_dir is not None:
            st = os.lstat(parent_dir)
            places.append((Branch(below, parent_dir, whiteout.NO_MARKERS, st.st_dev, st.st_ino), leaf))
    return places


def _walk_dirs(root: str, parts: Sequence[str]) -> str | None:
    """ROOT/PARTS if every component is a real directory (no symlink followed), else None."""
    path = root
    for part in parts:
        path = os.path.join(path, part)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
        except FileNotFoundError:
            return None
    return path


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

