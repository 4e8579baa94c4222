"""The upper dir as one object (`UpperDir`) and every change to it: new objects, deletions
(whiteouts), renames, copy-ups, redirects and the hardlink index's names, each crash-safe.

Every change is built in the workdir's staging dir and published with one rename(2) (or renameat2
EXCHANGE / WHITEOUT), so whatever moment a crash or kill -9 lands on, the merged view shows either the
state before the change or the state after it. The one exception is the OCI marker style (used only
when the daemon may not create devices): there a whiteout is a separate ``.wh.NAME`` file, and the
order of steps is chosen so every intermediate state reads as the old or the new view (a ``.wh.NAME``
beside NAME reads as "NAME replaced", see `layers`).

Synchronous, run in worker threads; errors are OSError.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..linux import ownwrite, syscalls
from . import acl, copyup, layers, whiteout
from .copyup import Workspace
from .features import DEFAULT as features_default
from .features import NONE as features_none
from .features import CopyUpFeatures, FeatureXattrs
from .features import xattrs_for as features_xattrs
from .layers import Fd, Resolved
from .links import LinkIndex
from .links import indexes as goes_in_index
from .metachange import MetadataChange
from .whiteout import MarkerStyle

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    link_fd: int | None = None
    """For naming a file made with no name (`UpperDir.create_unnamed`): the descriptor holding it."""
    open_flags: int = 0
    """For a regular file: the access mode and O_APPEND of the descriptor to return."""
    umask: int = 0
    """The caller's umask, applied here where the parent has no default ACL (0: MODE is final)."""
    inherits_acl: bool = False
    """The parent's default ACL, if it has one, decides the permissions in the umask's place, as
    `acl.inherit` says (mounts with POSIX ACLs)."""

    @property
    def is_link(self) -> bool:
        """A new name for an object that exists: nothing is made, and it keeps its mode and ACLs."""
        return bool(self.link_source) or self.link_fd is not None


@dataclass(frozen=True, slots=True)
class UpperDir:
    """The writable side of a mount as one object: where changes are staged (the workspace), which
    marker forms this mount may write, the hardlink index and the feature xattrs. Prepared once, at
    mount time; every change to the upper dir goes through it, so these travel together and the
    question "is there an index?" is asked here alone."""

    workspace: Workspace
    style: MarkerStyle
    links: LinkIndex | None
    """None where the upper keeps no overlay xattr (see `prepare`)."""
    features: FeatureXattrs = features_none
    """The redirect and metacopy xattrs this mount writes ("" for a feature off or unavailable)."""

    @classmethod
    def prepare(
        cls, upperdir: str, workdir: str, upper_layer: layers.Layer, wanted: CopyUpFeatures = features_default,
        style: MarkerStyle | None = None,
    ) -> UpperDir:
        """Clear WORKDIR's staging of interrupted changes, probe the marker forms, open the index.

        The index counts lower names in an xattr: an upper without xattrs keeps none, and copy-up
        breaks hardlinks instead, as the kernel does without index=on. WANTED: the copy-up features
        the options ask for; they are written in the marker forms' xattr namespace, if any (the
        origin xattr too, whatever the options: the kernel always writes it). STYLE: the marker
        forms to write instead of the probed ones (a root test playing an unprivileged daemon,
        whose ``trusted.*`` writes would fail)."""
        workspace = Workspace.prepare(upperdir, workdir)
        style = style or whiteout.probe_marker_style(workspace.staging)
        links = LinkIndex.prepare(workdir, style.opaque_xattr, upper_layer) if style.opaque_xattr else None
        features = features_xattrs(wanted, style.opaque_xattr)
        workspace = dataclasses.replace(workspace, origin_xattr=features.origin)
        return cls(workspace, style, links, features)

    @property
    def path(self) -> str:
        """The upper dir itself."""
        return self.workspace.upper

    # -- the hardlink index: the one place that knows whether this mount keeps one -----------------

    def indexed(self, resolved: Resolved) -> bool:
        """Whether RESOLVED is an index entry (a copy known to no upper name yet)."""
        return self.links is not None and self.links.holds(resolved)

    def find_indexed(self, lower: Resolved, upper_layer: layers.Layer) -> Resolved | None:
        """The upper copy of the hardlinked lower file LOWER, if one of its names was copied up."""
        return self.links.find(lower, upper_layer) if self.links is not None else None

    def covered(self, path: str) -> None:
        """One more lower name of the indexed file at PATH has its own upper name or whiteout."""
        if self.links is not None:
            self.links.covered(path)

    def link_count(self, resolved: Resolved, st: os.stat_result, held: Fd | None = None) -> int:
        """st_nlink of the upper object RESOLVED as the merged view shows it (see `LinkIndex`)."""
        return self.links.link_count(resolved, st, held) if self.links is not None else st.st_nlink

    def link_indexed(self, copy: str, parent_dir: str, name: str) -> os.stat_result:
        """Give the indexed COPY of a hardlinked lower file the upper name PARENT_DIR/NAME, one of
        its lower names, which from then on counts no more below. The one place an index copy gets
        a name: a rename of that name, and a tree copied up around it, both come here. The parent
        keeps its times: naming a copy is no visible change."""
        link = NewObject(os.lstat(copy).st_mode, 0, 0, link_source=copy)
        self.mark_impure(parent_dir)  # the copy carries an origin (the kernel's ovl_link_up)
        st, _ = keeping_times(parent_dir, self.create, parent_dir, name, link)
        self.covered(os.path.join(parent_dir, name))
        return st

    def indexes(self, lower: os.stat_result) -> bool:
        """Whether a copy of the lower object LOWER goes in the index (`links.indexes`), where the
        mount keeps one. Cheap: callers ask before they hop to a worker thread."""
        return self.links is not None and goes_in_index(lower)

    def index_lower(self, lower: Resolved) -> None:
        """Before a name of the hardlinked lower file LOWER is deleted or overwritten, copy the file
        into the index, so its other names count one link less (the kernel's index=on does the
        same). Only where `indexes` says so."""
        assert self.links is not None and self.indexes(lower.stat)
        entry = self.links.entry(lower.path, lower.stat)
        copyup.copy_up(self.workspace, lower.path, entry)
        self.links.mark(entry, lower.path, lower.stat, lower.stat.st_nlink - 1)

    # -- copy-up -----------------------------------------------------------------------------------

    def copy_up(
        self, source: str, lower: os.stat_result, target: str, size: int | None = None
    ) -> tuple[os.stat_result, str | None]:
        """Copy the lower object SOURCE (lstat'ed as LOWER) to TARGET (see `copyup.copy_up`; SIZE:
        `copyup.copy_up_size`); a hardlinked file's copy goes in the index, so its other lower names
        show it from then on. Returns the copy's lstat and the index entry made, if any."""
        self.mark_impure(os.path.dirname(target))
        st = self._copy(source, target, size)
        return st, self.links.record(source, lower, target) if self.links is not None else None

    def _copy(self, source: str, target: str, size: int | None) -> os.stat_result:
        if size is None:
            return copyup.copy_up(self.workspace, source, target)
        return copyup.copy_up_size(self.workspace, source, target, size)

    def copy_up_metadata(
        self, source: str, target: str, change: MetadataChange | None = None
    ) -> tuple[os.stat_result, bool]:
        """Copy the lower regular file SOURCE to TARGET as a metacopy file, CHANGE folded in where it
        can be (see `copyup.copy_up_metadata`); the caller checked that the mount writes them
        (``features.metacopy``)."""
        self.mark_impure(os.path.dirname(target))
        return copyup.copy_up_metadata(self.workspace, source, target, self.features.metacopy, change)

    def _carries_origin(self, path: str) -> bool:
        """Whether the upper object PATH records a lower object (copied up, or a directory moved by
        redirect, which was copied up first): the kernel's ``ovl_type_origin``."""
        if not self.features.impure:
            return False
        try:
            os.getxattr(path, self.features.origin, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                return False
            raise
        return True

    def mark_impure(self, dir_path: str) -> None:
        """Mark the upper directory DIR_PATH impure (``overlay.impure`` = "y") before it gets a child
        that carries an origin, as the kernel's ``ovl_set_impure`` does before a copy-up or a rename
        into another directory links one in (a crash in between leaves a mark that costs a kernel
        only some d_ino lookups). One syscall: XATTR_CREATE answers EEXIST when it is there."""
        if not self.features.impure:
            return
        # "DIR/.": a held directory's /proc/self/fd/N link is followed to it (never a name's symlink)
        try:
            ownwrite.setxattr(os.path.join(dir_path, "."), self.features.impure, b"y", os.XATTR_CREATE,
                              follow_symlinks=False)  # fmt: skip
        except FileExistsError:
            pass
        except OSError as exc:  # as the kernel's: never fail a change because the mark cannot go on
            if exc.errno != errno.ENOTSUP:
                raise
            log.debug("cannot mark %s impure: %s", dir_path, exc)

    def fill_metacopy(self, path: str, data: str, size: int | None) -> os.stat_result:
        """Copy the data of the metacopy file PATH in from DATA (see `copyup.fill_metacopy`)."""
        return copyup.fill_metacopy(self.workspace, path, data, size)

    def copy_up_unnamed(self, source: str, size: int | None) -> tuple[os.stat_result, int]:
        """Copy SOURCE up into a file with no name (its name went while an open was on its way):
        returns its lstat and an O_PATH descriptor, the only way to it."""
        staged = copyup.staging_path(self.workspace)
        st = self._copy(source, staged, size)
        fd = os.open(staged, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        os.unlink(staged)
        return st, fd

    def set_redirect(self, dir_path: str, redirect: str) -> None:
        """Record on the upper directory DIR_PATH where its lower content is (the kernel's format: a
        bare name in the same parent, or an absolute path from the overlay root; no NUL).

        Written before the rename that needs it, as the kernel does: a crash in between leaves a
        redirect naming the place the directory still is, which reads the same."""
        ownwrite.setxattr(dir_path, self.features.redirect, os.fsencode(redirect), follow_symlinks=False)

    # -- changes -----------------------------------------------------------------------------------

    def create(self, parent_dir: str, name: str, obj: NewObject) -> tuple[os.stat_result, int | None]:
        """Create NAME in the upper dir PARENT_DIR, replacing a whiteout there.

        A directory created over a whiteout is made opaque: what the whiteout hid stays hidden (the
        kernel does the same). Returns the new object's lstat and, for a regular file, an open fd.
        """
        target = os.path.join(parent_dir, name)
        existing = _lstat_or_none(target)
        oci_whited = whiteout.oci_whiteout_exists(parent_dir, name)
        if existing is not None and not whiteout.is_device_whiteout(existing):
            raise FileExistsError(17, os.strerror(17), target)
        # a file linked into a free name is built unnamed (`_build`); one that replaces a whiteout,
        # or is opened read-only (which O_TMPFILE refuses), under a name in staging, then renamed
        unnamed = (existing is None and self.workspace.tmpfile and stat.S_ISREG(obj.mode) and not obj.is_link
                   and obj.open_flags & os.O_ACCMODE != os.O_RDONLY)
        staged = None if unnamed else copyup.staging_path(self.workspace)
        inherited = self._inherited(parent_dir, obj)
        obj = dataclasses.replace(obj, mode=inherited.mode)
        fd = None
        try:
            fd = _build(staged, obj, self.workspace)
            _set_acls(fd if fd is not None else staged, inherited)
            if staged is None:
                assert fd is not None
                syscalls.link_open_file(fd, target)  # EEXIST if the name was taken meanwhile
            else:
                if stat.S_ISDIR(obj.mode) and (existing is not None or oci_whited):
                    whiteout.mark_opaque(staged, self.style)
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
            if staged is not None:
                _discard(staged)
            raise
        if oci_whited:
            whiteout.remove_oci_whiteout(parent_dir, name)
        return os.lstat(target), fd

    def _inherited(self, parent_dir: str, obj: NewObject) -> acl.Inherited:
        """OBJ's mode and ACLs in PARENT_DIR: the parent's default ACL where the mount has ACLs
        and owners are not kept in override xattrs (a mode there is not the disk's), else the
        umask. A hard link is what it is."""
        if obj.is_link:
            return acl.Inherited(obj.mode)
        default = None
        if obj.inherits_acl and self.workspace.owner is None:
            default = acl.default_of(os.path.join(parent_dir, "."))
        return acl.inherit(default, obj.mode, obj.umask)

    def create_unnamed(self, parent_dir: str, obj: NewObject) -> tuple[os.stat_result, int, Fd]:
        """A regular file with no name, as open(2) with O_TMPFILE in PARENT_DIR makes one: built in
        the staging dir (the upper's filesystem, so a link can name it anywhere in upper) with the
        owner, mode and ACLs a create in PARENT_DIR would give it. Returns its fstat, an fd open
        as OBJ asks, and an O_PATH descriptor that holds it (`create` with ``link_fd`` names it).
        EOPNOTSUPP where the upper filesystem has no O_TMPFILE (the kernel's overlay says the same)."""
        if not self.workspace.tmpfile:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), parent_dir)
        inherited = self._inherited(parent_dir, obj)
        fd = _build(None, dataclasses.replace(obj, mode=inherited.mode), self.workspace)
        assert fd is not None
        try:
            _set_acls(fd, inherited)
            held = Fd(os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC))
            return os.fstat(fd), fd, held
        except BaseException:
            os.close(fd)
            raise

    def remove(self, parent_dir: str, name: str, *, leave_whiteout: bool) -> None:
        """Remove NAME (a file, or a directory holding only markers) from upper; whiteout if lower has NAME."""
        target = os.path.join(parent_dir, name)
        existing = _lstat_or_none(target)
        if existing is not None and whiteout.is_device_whiteout(existing):
            existing = None  # already a whiteout: nothing of ours to remove
        if existing is None:
            if leave_whiteout:
                self._publish_whiteout(parent_dir, name)
            return
        is_dir = stat.S_ISDIR(existing.st_mode)
        if leave_whiteout and self.style.device_whiteouts:
            staged = copyup.staging_path(self.workspace)
            whiteout.write_device_whiteout(staged)
            if is_dir:
                syscalls.rename_exchange(staged, target)  # the dir ends up in staging
                _discard(staged)
            else:
                os.rename(staged, target)
            return
        if leave_whiteout:
            whiteout.write_oci_whiteout(parent_dir, name)
        self._move_out(target, is_dir)

    def rename(self, source: str, target: str, *, leave_whiteout: bool, make_opaque: bool) -> None:
        """Move the upper object SOURCE to TARGET, replacing what TARGET holds in upper.

        LEAVE_WHITEOUT: lower layers have SOURCE's name, so it must stay deleted. MAKE_OPAQUE: SOURCE is a
        directory and lower layers have TARGET's name, so they must not merge into it.
        """
        style = self.style
        src_st = os.lstat(source)
        src_is_dir = stat.S_ISDIR(src_st.st_mode)
        if make_opaque and src_is_dir:
            whiteout.mark_opaque(source, style)
        target_dir, target_name = os.path.split(target)
        source_dir, source_name = os.path.split(source)
        if target_dir != source_dir and self._carries_origin(source):
            self.mark_impure(target_dir)  # the kernel's ovl_rename, before the move
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
                staged = copyup.staging_path(self.workspace)
                whiteout.write_device_whiteout(staged)
                syscalls.rename_exchange(staged, source)
                _discard(staged)
            else:
                if leave_whiteout:
                    whiteout.write_oci_whiteout(source_dir, source_name)
                self._move_out(source, stat.S_ISDIR(existing.st_mode))
        elif leave_whiteout and style.device_whiteouts:
            # (a read-only directory moving to another parent needs its owner's write bit: `ownwrite`)
            ownwrite.retry(lambda: syscalls.rename_whiteout(source, target), source, False, moved_to=target)
        else:
            if leave_whiteout:
                whiteout.write_oci_whiteout(source_dir, source_name)
            ownwrite.retry(lambda: os.rename(source, target), source, False, moved_to=target)
        whiteout.remove_oci_whiteout(target_dir, target_name)

    def exchange(self, a: str, b: str, *, opaque_at_a: bool, opaque_at_b: bool) -> None:
        """Swap two upper objects; a directory arriving where lower layers have that name is made opaque."""
        if opaque_at_b and os.path.isdir(a) and not os.path.islink(a):
            whiteout.mark_opaque(a, self.style)
        if opaque_at_a and os.path.isdir(b) and not os.path.islink(b):
            whiteout.mark_opaque(b, self.style)
        (dir_a, _), (dir_b, _) = os.path.split(a), os.path.split(b)
        if dir_a != dir_b:  # as in `rename`, for each of the two
            if self._carries_origin(a):
                self.mark_impure(dir_b)
            if self._carries_origin(b):
                self.mark_impure(dir_a)
        syscalls.rename_exchange(a, b)

    def _publish_whiteout(self, parent_dir: str, name: str) -> None:
        if self.style.device_whiteouts:
            staged = copyup.staging_path(self.workspace)
            whiteout.write_device_whiteout(staged)
            try:
                syscalls.rename_noreplace(staged, os.path.join(parent_dir, name))
            except BaseException:
                _discard(staged)
                raise
        else:
            whiteout.write_oci_whiteout(parent_dir, name)

    def _move_out(self, path: str, is_dir: bool) -> None:
        """Take PATH out of the upper dir in one step; a directory is emptied in staging afterwards."""
        if not is_dir:
            os.unlink(path)
            return
        staged = copyup.staging_path(self.workspace)
        os.rename(path, staged)
        _discard(staged)


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


def _build(staged: str | None, obj: NewObject, ws: Workspace) -> int | None:
    """Create the object at STAGED with its final owner and mode; a regular file's fd is returned.
    STAGED None: a regular file with no name (O_TMPFILE in the staging dir), for the caller to link
    into place, as the kernel's copy-up builds one (`copyup`): nothing is left if the daemon dies
    first, and a link is one directory change where a rename out of staging is two."""
    kind = stat.S_IFMT(obj.mode)
    perms = stat.S_IMODE(obj.mode)
    fd = None
    if kind == stat.S_IFREG and not obj.is_link:
        access = obj.open_flags & (os.O_ACCMODE | os.O_APPEND)
        if staged is None:
            fd = ws.open_unnamed(access, new=True)
        else:
            fd = os.open(staged, os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | access, 0o600)
        if ws.owner is not None:  # override xattrs or squashed ids (see `ownership`)
            ws.owner.apply(fd, obj.uid, obj.gid, obj.mode)
            return fd
        os.fchown(fd, obj.uid, obj.gid)
        os.fchmod(fd, perms)  # after chown, which would clear setuid/setgid
        return fd
    assert staged is not None, "only a new regular file is built unnamed"
    if obj.link_fd is not None:
        syscalls.link_open_file(obj.link_fd, staged)  # through /proc: the file has no name to link
        return None
    if obj.link_source:
        os.link(obj.link_source, staged)
        return None
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


def _set_acls(target: int | str | None, inherited: acl.Inherited) -> None:
    """Give the object just built (a regular file's fd, else its staged path) its inherited ACLs,
    before it is published: the access ACL also sets the mode's group bits to its mask."""
    if target is None:
        return
    for name, value in ((acl.ACCESS, inherited.access), (acl.DEFAULT, inherited.default)):
        if value is not None:  # a descriptor is what it is: Python refuses follow_symlinks=False with one
            os.setxattr(target, name, value, follow_symlinks=isinstance(target, int))


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
