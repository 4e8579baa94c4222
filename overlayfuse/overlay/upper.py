"""Changes to the upper dir: new objects, deletions (whiteouts) and renames, each crash-safe.

Every change is built in the workdir's staging dir and published with one rename(2) (or renameat2
EXCHANGE / WHITEOUT), so whatever moment a crash or kill -9 lands on, the merged view shows either the
state before the change or the state after it. The one exception is the OCI marker style (used only
when the daemon may not create devices): there a whiteout is a separate ``.wh.NAME`` file, and the
order of steps is chosen so every intermediate state reads as the old or the new view (a ``.wh.NAME``
beside NAME reads as "NAME replaced", see `layers`).

Synchronous, run in worker threads; errors are OSError.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..linux import syscalls
from . import copyup, layers, whiteout
from .copyup import Workspace
from .features import DEFAULT as features_default
from .features import NONE as features_none
from .features import CopyUpFeatures, FeatureXattrs
from .features import xattrs_for as features_xattrs
from .layers import Branch, Resolved
from .links import LinkIndex
from .whiteout import MarkerStyle

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UpperDir:
    """The writable side of a mount as one object: where changes are staged (the workspace), which
    marker forms this mount may write, and the hardlink index. Prepared once, at mount time."""

    workspace: Workspace
    style: MarkerStyle
    links: LinkIndex | None
    """None where the upper keeps no overlay xattr (see `prepare`)."""
    features: FeatureXattrs = features_none
    """The redirect and metacopy xattrs this mount writes ("" for a feature off or unavailable)."""

    @classmethod
    def prepare(
        cls, upperdir: str, workdir: str, upper_layer: layers.Layer, wanted: CopyUpFeatures = features_default
    ) -> UpperDir:
        """Clear WORKDIR's staging of interrupted changes, probe the marker forms, open the index.

        The index counts lower names in an xattr: an upper without xattrs keeps none, and copy-up
        breaks hardlinks instead, as the kernel does without index=on. WANTED: the copy-up features
        the options ask for; they are written in the marker forms' xattr namespace, if any."""
        workspace = Workspace.prepare(upperdir, workdir)
        style = whiteout.probe_marker_style(workspace.staging)
        links = LinkIndex.prepare(workdir, style.opaque_xattr, upper_layer) if style.opaque_xattr else None
        return cls(workspace, style, links, features_xattrs(wanted, style.opaque_xattr))


@dataclass(frozen=True, slots=True)
class NewObject:
    """What to create: the caller has already decided owner and mode (umask, setgid dirs)."""

    mode: int
    """Full st_mode, file type included."""
    uid: int
    gid: int
    rdev: int = 0
    symlink_target: str = ""
    link_source: str = ""
    """For a hard link: the upper path of the object to link."""
    open_flags: int = 0
    """For a regular file: the access mode and O_APPEND of the descriptor to return."""


def create(
    ws: Workspace, style: MarkerStyle, parent_dir: str, name: str, obj: NewObject
) -> tuple[os.stat_result, int | None]:
    """Create NAME in the upper dir PARENT_DIR, replacing a whiteout there.

    A directory created over a whiteout is made opaque: what the whiteout hid stays hidden (the
    kernel does the same). Returns the new object's lstat and, for a regular file, an open fd.
    """
    target = os.path.join(parent_dir, name)
    existing = _lstat_or_none(target)
    oci_whited = whiteout.oci_whiteout_exists(parent_dir, name)
    if existing is not None and not whiteout.is_device_whiteout(existing):
        raise FileExistsError(17, os.strerror(17), target)
    staged = copyup.staging_path(ws)
    fd = None
    try:
        fd = _build(staged, obj, ws)
        if stat.S_ISDIR(obj.mode) and (existing is not None or oci_whited):
            whiteout.mark_opaque(staged, style)
        if existing is None:
            syscalls.rename_noreplace(staged, target)
        elif stat.S_ISDIR(obj.mode):
            syscalls.rename_exchange(staged, target)  # rename(2) cannot put a dir over a device
            os.unlink(staged)
        else:
            os.rename(staged, target)
    except BaseException:
        if fd is not None:
            os.close(fd)
        _discard(staged)
        raise
    if oci_whited:
        whiteout.remove_oci_whiteout(parent_dir, name)
    return os.lstat(target), fd


def remove(ws: Workspace, style: MarkerStyle, parent_dir: str, name: str, *, leave_whiteout: bool) -> None:
    """Remove NAME (a file, or a directory holding only markers) from upper; whiteout if lower has NAME."""
    target = os.path.join(parent_dir, name)
    existing = _lstat_or_none(target)
    if existing is not None and whiteout.is_device_whiteout(existing):
        existing = None  # already a whiteout: nothing of ours to remove
    if existing is None:
        if leave_whiteout:
            _publish_whiteout(ws, style, parent_dir, name)
        return
    is_dir = stat.S_ISDIR(existing.st_mode)
    if leave_whiteout and style.device_whiteouts:
        staged = copyup.staging_path(ws)
        whiteout.write_device_whiteout(staged)
        if is_dir:
            syscalls.rename_exchange(staged, target)  # the dir ends up in staging
            _discard(staged)
        else:
            os.rename(staged, target)
        return
    if leave_whiteout:
        whiteout.write_oci_whiteout(parent_dir, name)
    _move_out(ws, target, is_dir)


def rename(
    ws: Workspace,
    style: MarkerStyle,
    source: str,
    target: str,
    *,
    leave_whiteout: bool,
    make_opaque: bool,
) -> None:
    """Move the upper object SOURCE to TARGET, replacing what TARGET holds in upper.

    LEAVE_WHITEOUT: lower layers have SOURCE's name, so it must stay deleted. MAKE_OPAQUE: SOURCE is a
    directory and lower layers have TARGET's name, so they must not merge into it.
    """
    src_st = os.lstat(source)
    src_is_dir = stat.S_ISDIR(src_st.st_mode)
    if make_opaque and src_is_dir:
        whiteout.mark_opaque(source, style)
    target_dir, target_name = os.path.split(target)
    source_dir, source_name = os.path.split(source)
    existing = _lstat_or_none(target)
    swap = existing is not None and (
        stat.S_ISDIR(existing.st_mode) or (src_is_dir and whiteout.is_device_whiteout(existing))
    )
    if swap:
        # rename(2) cannot replace a non-empty dir (an upper dir holding only markers is one) nor
        # put a dir over a device: swap the two, then deal with what landed at SOURCE.
        assert existing is not None
        syscalls.rename_exchange(source, target)
        if leave_whiteout and whiteout.is_device_whiteout(existing):
            pass  # what landed at SOURCE is already the whiteout it needs
        elif leave_whiteout and style.device_whiteouts:
            staged = copyup.staging_path(ws)
            whiteout.write_device_whiteout(staged)
            syscalls.rename_exchange(staged, source)
            _discard(staged)
        else:
            if leave_whiteout:
                whiteout.write_oci_whiteout(source_dir, source_name)
            _move_out(ws, source, stat.S_ISDIR(existing.st_mode))
    elif leave_whiteout and style.device_whiteouts:
        syscalls.rename_whiteout(source, target)
    else:
        if leave_whiteout:
            whiteout.write_oci_whiteout(source_dir, source_name)
        os.rename(source, target)
    whiteout.remove_oci_whiteout(target_dir, target_name)


def exchange(style: MarkerStyle, a: str, b: str, *, opaque_at_a: bool, opaque_at_b: bool) -> None:
    """Swap two upper objects; a directory arriving where lower layers have that name is made opaque."""
    if opaque_at_b and os.path.isdir(a) and not os.path.islink(a):
        whiteout.mark_opaque(a, style)
    if opaque_at_a and os.path.isdir(b) and not os.path.islink(b):
        whiteout.mark_opaque(b, style)
    syscalls.rename_exchange(a, b)


def set_redirect(dir_path: str, xattr: str, redirect: str) -> None:
    """Record on the upper directory DIR_PATH where its lower content is (the kernel's format: a
    bare name in the same parent, or an absolute path from the overlay root; no NUL).

    Written before the rename that needs it, as the kernel does: a crash in between leaves a
    redirect naming the place the directory still is, which reads the same."""
    os.setxattr(dir_path, xattr, os.fsencode(redirect), follow_symlinks=False)


def copy_up_tree(
    ws: Workspace, style: MarkerStyle, links: LinkIndex | None, merged: Resolved
) -> list[tuple[Resolved, Resolved]]:
    """Make MERGED's upper directory hold its whole merged content, then mark it opaque.

    This is how a directory with lower content becomes movable (the kernel answers EXDEV there unless
    redirect_dir is on): after it, the directory no longer depends on its lower paths. It costs a copy
    of every lower file below it (data by reflink/copy_file_range); hardlinked files go through the
    link index, so their names stay one file. Whiteouts left inside are dropped: below an opaque
    directory they hide nothing. Returns (old, new) resolutions of every object whose real file
    changed, so inode numbers can be kept.

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
        _copy_tree(ws, links, merged, top, layer, copied, added, indexed, dir_times)
        whiteout.mark_opaque(top.path, style)
    except BaseException:
        _undo(added, indexed)
        raise
    for directory, times in dir_times:
        clear_markers(directory.path)
        os.utime(directory.path, ns=times, follow_symlinks=False)  # copying into it was no visible change
    return copied


def _copy_tree(
    ws: Workspace, links: LinkIndex | None, merged: Resolved, into: Branch, layer: layers.Layer,
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
                    copyup.fill_metacopy(ws, path, child.data.path, None)
                if child.is_merged:  # stays, but loses its lower branches: keep its number
                    copied.append((child, layers.resolve_alone(layer, target_dir, name)))
                elif links is not None and links.holds(child):
                    os.link(child.path, path)
                    added.append((target_dir, name, False))
                    links.covered(path)
            else:
                copy = links.find(child.stat, layer) if links is not None else None
                if copy is not None:
                    assert links is not None
                    os.link(copy.path, path)  # another name of this file was copied up before
                    added.append((target_dir, name, False))
                    links.covered(path)
                else:
                    st = copyup.copy_up(ws, child.path, path)
                    added.append((target_dir, name, child.is_dir))
                    entry = links.record(child.stat, path) if links is not None else None
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


def keeping_times(directory: str, change: Callable[..., T], *args: Any) -> T:
    """Run CHANGE, then give DIRECTORY back the atime and mtime it had before."""
    before = os.lstat(directory)
    result = change(*args)
    os.utime(directory, ns=(before.st_atime_ns, before.st_mtime_ns), follow_symlinks=False)
    return result


def clear_markers(dir_path: str) -> None:
    """Drop whiteouts and OCI markers from an upper dir whose merged view is empty."""
    with os.scandir(dir_path) as it:
        for entry in it:
            st = entry.stat(follow_symlinks=False)
            if whiteout.is_marker_entry(entry.name, st):
                os.unlink(entry.path)


def _publish_whiteout(ws: Workspace, style: MarkerStyle, parent_dir: str, name: str) -> None:
    if style.device_whiteouts:
        staged = copyup.staging_path(ws)
        whiteout.write_device_whiteout(staged)
        try:
            syscalls.rename_noreplace(staged, os.path.join(parent_dir, name))
        except BaseException:
            _discard(staged)
            raise
    else:
        whiteout.write_oci_whiteout(parent_dir, name)


def _build(staged: str, obj: NewObject, ws: Workspace) -> int | None:
    """Create the object at STAGED with its final owner and mode; a regular file's fd is returned."""
    kind = stat.S_IFMT(obj.mode)
    perms = stat.S_IMODE(obj.mode)
    fd = None
    if obj.link_source:
        os.link(obj.link_source, staged)
        return None
    if kind == stat.S_IFREG:
        access = obj.open_flags & (os.O_ACCMODE | os.O_APPEND)
        fd = os.open(staged, os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | access, 0o600)
        if ws.owner is not None:  # override xattrs or squashed ids (see `ownership`)
            ws.owner.apply(fd, obj.uid, obj.gid, obj.mode)
            return fd
        os.fchown(fd, obj.uid, obj.gid)
        os.fchmod(fd, perms)  # after chown, which would clear setuid/setgid
        return fd
    if kind == stat.S_IFDIR:
        os.mkdir(staged, 0o700)
    elif kind == stat.S_IFLNK:
        os.symlink(obj.symlink_target, staged)
    else:
        os.mknod(staged, kind | 0o600, obj.rdev)
    if ws.owner is not None:
        ws.owner.apply(staged, obj.uid, obj.gid, obj.mode)
        return None
    os.chown(staged, obj.uid, obj.gid, follow_symlinks=False)
    if kind != stat.S_IFLNK:
        os.chmod(staged, perms)
    return None


def _move_out(ws: Workspace, path: str, is_dir: bool) -> None:
    """Take PATH out of the upper dir in one step; a directory is emptied in staging afterwards."""
    if not is_dir:
        os.unlink(path)
        return
    staged = copyup.staging_path(ws)
    os.rename(path, staged)
    _discard(staged)


def _discard(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


def _lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
