"""Copying a whole directory tree up: how a directory with lower content moves where the mount
writes no redirects (the kernel answers EXDEV there unless redirect_dir is on).

Synchronous, run in worker threads; errors are OSError.
"""

from __future__ import annotations

import logging
import os

from . import layers, whiteout
from .layers import Branch, Resolved
from .upper import UpperDir, clear_markers

log = logging.getLogger(__name__)


def copy_up_tree(upper: UpperDir, merged: Resolved) -> list[tuple[Resolved, Resolved]]:
    """Make MERGED's upper directory hold its whole merged content, then mark it opaque.

    After it, the directory no longer depends on its lower paths. It costs a copy of every lower
    file below it (data by reflink/copy_file_range); hardlinked files go through the link index,
    so their names stay one file. Whiteouts left inside are dropped: below an opaque directory they
    hide nothing. Returns (old, new) resolutions of every object whose real file changed, so inode
    numbers can be kept.

    All or nothing: if a copy fails (ENOSPC, EIO...), everything this call added is removed again, in
    reverse order, and the error is raised; the upper dir is as it was.
    """
    layer = merged.layer
    top = merged.branches[0]
    copied: list[tuple[Resolved, Resolved]] = []
    added: list[tuple[Branch, str, bool]] = []  # (directory, name, is a directory), in creation order
    indexed: list[str] = []
    st = os.fstat(top.fd.fd) if top.fd is not None else os.lstat(top.path)
    dir_times = [(top, (st.st_atime_ns, st.st_mtime_ns))]
    try:
        _copy_tree(upper, merged, top, layer, copied, added, indexed, dir_times)
        whiteout.mark_opaque(top.path, upper.style)
    except BaseException:
        _undo(added, indexed)
        raise
    for directory, times in dir_times:
        clear_markers(directory.path)
        os.utime(directory.path, ns=times, follow_symlinks=False)  # copying into it was no visible change
    return copied


def _copy_tree(
    upper: UpperDir, merged: Resolved, into: Branch, layer: layers.Layer,
    copied: list[tuple[Resolved, Resolved]], added: list[tuple[Branch, str, bool]], indexed: list[str],
    dir_times: list[tuple[Branch, tuple[int, int]]],
) -> None:  # fmt: skip
    """Copy what MERGED shows into INTO (its upper directory, held), depth first, iteratively, with
    every directory held by descriptor while its children are copied (no path grows with depth)."""
    pending: list[tuple[Resolved, Branch]] = [(merged, into)]
    while pending:
        source, target_dir = pending.pop()
        for branch in source.branches:
            branch.pin()
        for name, child in layers.list_dir(source.branches):
            path = target_dir.child(name)
            if child.layer.writable:
                if child.data is not None:  # a metacopy file: below an opaque dir its data would hide
                    upper.fill_metacopy(path, child.data.path, None)
                if child.is_merged:  # stays, but loses its lower branches: keep its number
                    copied.append((child, layers.resolve_alone(layer, target_dir, name)))
                elif upper.indexed(child):
                    upper.link_indexed(child.path, target_dir.path, name)
                    added.append((target_dir, name, False))
            else:
                copy = upper.find_indexed(child, layer)
                if copy is not None:  # another name of this file was copied up before
                    if copy.data is not None:  # metadata only (the kernel's): its data comes in
                        upper.fill_metacopy(copy.path, copy.data.path, None)
                    upper.link_indexed(copy.path, target_dir.path, name)
                    added.append((target_dir, name, False))
                else:
                    st, entry = upper.copy_up(child.path, child.stat, path)
                    added.append((target_dir, name, child.is_dir))
                    if entry is not None:
                        indexed.append(entry)
                    copied.append((child, layers.resolve_alone(layer, target_dir, name, st)))
            if child.is_dir:
                below = Branch(layer, target_dir, name, whiteout.NO_MARKERS, *_dev_ino(target_dir, name)).pin()
                dir_times.append((below, (child.stat.st_atime_ns, child.stat.st_mtime_ns)))
                pending.append((child, below))


def _dev_ino(directory: Branch, name: str) -> tuple[int, int]:
    st = directory.lstat(name)
    return st.st_dev, st.st_ino


def _undo(added: list[tuple[Branch, str, bool]], indexed: list[str]) -> None:
    """Remove what a failed `copy_up_tree` added, newest first (children before their parents)."""
    for directory, name, is_dir in reversed(added):
        fd, rel = directory.at()
        target = name if rel == "." else f"{rel}/{name}"
        try:
            if is_dir:
                clear_markers(directory.child(name))
                os.rmdir(target, dir_fd=fd.fd)
            else:
                os.unlink(target, dir_fd=fd.fd)
        except OSError as exc:
            log.error("could not undo part of a failed directory copy: %s/%s: %s", rel, name, exc)
    for entry in indexed:
        try:
            os.unlink(entry)
        except OSError:
            pass
