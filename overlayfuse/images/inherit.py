"""Implicit directories of a new layer take their metadata from the layers below it.

A layer tar may name ``etc/foo`` without an ``etc/`` entry, or leave out ``./``: `unpack_layer` then
has to make those directories up (0755, root:root, the unpack's start time) and says which they
were. Applied on top of each other, as ``umoci unpack`` and docker do, such a layer leaves the
directory below as it was. Stacked as overlay lowerdirs, a directory shows the metadata of the
topmost layer that has it: the made-up one. So each made-up directory that exists below gets the
metadata the merged view of the layers below shows for it (containerd's unpacker does the same for
the parents it creates): mode, owner, atime and mtime, and every xattr but overlay's own. One that
exists nowhere below, or is not a directory there, keeps what unpack gave it.

"Below" is resolved with `layers.LayerStack` and `layers.lookup`, the daemon's own rules (whiteouts,
opaque directories, redirects), so the answer is what a mount of those layers would show.

A layer is stored once per diff_id: when two images share a layer over different layers below, its
directory keeps what it took from the image it was first imported with.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..overlay import whiteout
from ..overlay.layers import LayerStack, Resolved, lookup
from .extract import DIR_FLAGS, open_dir_path

log = logging.getLogger(__name__)

Parts = tuple[str, ...]
#: What keeps a directory from getting an owner or an xattr here (not root, a filesystem without
#: that namespace): the rest of its metadata is still given, and a warning says what was not.
_NOT_HERE = (errno.EPERM, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES)


def inherit_implicit_dirs(layer_dir: Path, implicit_dirs: Sequence[str], below: Sequence[Path]) -> int:
    """Give each of LAYER_DIR's IMPLICIT_DIRS (relative paths, ``.`` for the root, as
    `UnpackedLayer.implicit_dirs` lists them) the metadata of the same directory in the merged view
    of BELOW (layer content dirs, topmost first, like lowerdirs). Returns how many got it.

    Raises OSError (with the path) when a layer cannot be read or a directory cannot be changed.
    """
    if not implicit_dirs or not below:
        return 0
    view = _MergedView(LayerStack.from_dirs([os.fspath(path) for path in below], None))
    sources: dict[Parts, Resolved] = {}
    # Parents come first: an implicit directory whose implicit parent is not below is not below
    # either, and is skipped by name (a chain thousands deep that the layers below lack costs one
    # lookup, not one per level with its whole path).
    absent: set[str] = set()
    for rel in implicit_dirs:
        if rel != "." and (rel.rpartition("/")[0] or ".") in absent:
            absent.add(rel)
            continue
        parts = _parts(rel)
        resolved = view.directory(parts)
        if resolved is not None:
            sources[parts] = resolved
        else:
            absent.add(rel)
    unset: set[str] = set()
    root_fd = os.open(layer_dir, DIR_FLAGS)
    try:
        for parts in sorted(sources, key=len, reverse=True):  # children before their parents' modes
            fd = _open_dir(root_fd, parts, layer_dir)
            try:
                _copy_metadata(sources[parts], fd, unset)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    if unset:
        log.warning("%s: could not give implicit directories all the metadata of the layers below "
                    "(not permitted or not supported here): %s", layer_dir, ", ".join(sorted(unset)))
    log.debug("%s: %d of %d implicit directories took their metadata from below", layer_dir,
              len(sources), len(implicit_dirs))
    return len(sources)


def _parts(rel: str) -> Parts:
    return tuple(part for part in rel.split("/") if part not in ("", "."))


class _MergedView:
    """Directories of the merged view of a stack, each resolved once (parents are shared), kept in
    a tree by name: walking down it costs one dict lookup per level, with no recursion and no
    path tuples as keys (a chain thousands deep would make those quadratic)."""

    def __init__(self, stack: LayerStack) -> None:
        self._stack = stack
        self._root: _ViewNode | None = None

    def directory(self, parts: Parts) -> Resolved | None:
        """The merged directory PARTS, or None when the view has no directory there."""
        if self._root is None:
            found: Resolved | None = self._stack.resolve_root()
            self._root = _ViewNode(found if found is not None and found.is_dir else None)
        node = self._root
        for name in parts:
            if node.resolved is None:
                return None
            child = node.children.get(name)
            if child is None:
                found = lookup(node.resolved.branches, name)
                child = node.children[name] = _ViewNode(found if found is not None and found.is_dir else None)
            node = child
        return node.resolved


@dataclass(slots=True, eq=False)
class _ViewNode:
    resolved: Resolved | None
    children: dict[str, _ViewNode] = field(default_factory=dict)


def _open_dir(root_fd: int, parts: Parts, layer_dir: Path) -> int:
    """The directory PARTS of the new layer, walked without following a symlink."""
    def open_child(parent_fd: int, depth: int) -> int:
        try:
            return os.open(parts[depth - 1], DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, os.path.join(layer_dir, *parts[:depth])) from None

    return open_dir_path(root_fd, len(parts), open_child)


def _copy_metadata(source: Resolved, fd: int, unset: set[str]) -> None:
    """Owner, then mode, then xattrs, then times (the order unpack uses), from SOURCE's topmost
    directory, whose metadata is the merged directory's."""
    st = source.stat
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except OSError as exc:
        if exc.errno not in _NOT_HERE:
            raise
        unset.add("owner")
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    for name, value in _xattrs(source.path):
        try:
            os.setxattr(fd, name, value)
        except OSError as exc:
            if exc.errno not in _NOT_HERE:
                raise
            unset.add(name)
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _xattrs(path: str) -> list[tuple[str, bytes]]:
    """PATH's xattrs but overlay's own (markers describe that layer, not the directory)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    values = []
    for name in names:
        if whiteout.is_private_xattr(name):
            continue
        try:
            values.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, *_NOT_HERE):
                raise
    return values
