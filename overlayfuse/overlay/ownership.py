"""Owners and modes as the layers store them: real, or in fuse-overlayfs's ``override_stat`` xattrs.

An unprivileged daemon cannot chown, so with ``xattr_permissions`` (or a layer written that way by
fuse-overlayfs or containers-storage) the owner and mode an object shows live in an xattr, and the
object itself belongs to the daemon. This module reads and writes that form, and gives a new or
copied-up object its owner and mode either way (`DiskOwner`, carried by the `copyup.Workspace`).
How the mount *shows* owners (ID mapping, squashing, ACL ids) is the daemon's: `daemon.owners`.

The override xattr holds ``UID:GID:MODE`` (mode in octal, permission bits only), ids as on disk:
fuse-overlayfs's format. Which xattr a layer uses is marked on its root directory, as fuse-overlayfs
does: ``security.fuseoverlayfs.override_stat`` (xattr_permissions=1),
``user.fuseoverlayfs.override_stat`` (xattr_permissions=2) or ``user.containers.override_stat``
(containers-storage's ``force_mask``). All three are hidden from the merged view.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

log = logging.getLogger(__name__)

PRIVILEGED_OVERRIDE = "security.fuseoverlayfs.override_stat"
USER_OVERRIDE = "user.fuseoverlayfs.override_stat"
CONTAINERS_OVERRIDE = "user.containers.override_stat"
#: In the order fuse-overlayfs looks for them on a layer's root.
OVERRIDE_XATTRS = (PRIVILEGED_OVERRIDE, CONTAINERS_OVERRIDE, USER_OVERRIDE)
#: What each ``xattr_permissions=`` level writes.
LEVEL_XATTR = {1: PRIVILEGED_OVERRIDE, 2: USER_OVERRIDE}
#: The mode fuse-overlayfs gives the upper root when no layer says one.
DEFAULT_ROOT_OVERRIDE = b"0:0:555"
#: Without force_mask, what a backing object gets on top of its shown mode so the daemon (its owner)
#: can always read, search and write it: fuse-overlayfs's ``mode | 0755``.
DEFAULT_BACKING_BITS = 0o755



@dataclass(frozen=True, slots=True)
class Override:
    uid: int
    gid: int
    mode: int
    """Permission bits only (07777)."""


def parse_override(value: bytes) -> Override | None:
    """``UID:GID:MODE`` (mode octal) as fuse-overlayfs writes it; None if malformed."""
    try:
        uid, gid, mode = value.split(b"\0", 1)[0].decode().split(":")
        return Override(int(uid), int(gid), int(mode, 8) & 0o7777)
    except (ValueError, UnicodeDecodeError):
        return None


def format_override(uid: int, gid: int, mode: int) -> bytes:
    return f"{uid}:{gid}:{stat.S_IMODE(mode):o}".encode()


def read_override(path: str, name: str) -> Override | None:
    """The override kept in xattr NAME of PATH (not followed), or None if there is none."""
    try:
        value = os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise
    return parse_override(value)


def layer_override_xattr(root: str) -> str | None:
    """Which override xattr the layer at ROOT uses (marked on its root), or None."""
    for name in OVERRIDE_XATTRS:
        if read_override(root, name) is not None:
            return name
    return None


def prepare_upper(upper: str, lowers: tuple[str, ...], level: int) -> str:
    """Mark the upper root for ``xattr_permissions=LEVEL`` as fuse-overlayfs does: keep its own
    override, else take the first lower root's (a lower of containers-storage's may carry
    ``user.containers.override_stat``), else 0:0:555. Returns the xattr name the upper layer uses."""
    name = LEVEL_XATTR[level]
    if read_override(upper, name) is not None:
        return name
    value = DEFAULT_ROOT_OVERRIDE
    for lower in lowers:
        for candidate in (name, CONTAINERS_OVERRIDE) if level == 2 else (name,):
            try:
                value = os.getxattr(lower, candidate)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise
        else:
            continue
        break
    os.setxattr(upper, name, value)
    return name


@dataclass(frozen=True, slots=True)
class DiskOwner:
    """How a new or copied-up object gets its owner and mode on disk, when not by plain chown/chmod.

    Used by `upper` (create) and `copyup` through the `Workspace`; None there means the plain way.
    """

    override_xattr: str | None
    """Write owner and mode into this xattr; the object itself gets the daemon's ids and the
    backing mode (force_mask, or the shown mode | 0755)."""
    force_mask: int | None
    tolerate_chown_failure: bool
    """squash_to_*: a chown that fails is ignored (the mount shows the squashed ids anyway)."""

    def backing_mode(self, mode: int) -> int:
        if self.force_mask is not None:
            return self.force_mask | (0o700 if stat.S_ISDIR(mode) else 0o600)
        return stat.S_IMODE(mode) | DEFAULT_BACKING_BITS

    def apply(self, target: int | str, uid: int, gid: int, mode: int) -> None:
        """Give TARGET (an fd, or a path not followed) owner UID:GID and mode MODE (with file type)."""
        follow = isinstance(target, int)
        is_link = stat.S_ISLNK(mode)
        if self.override_xattr is not None:
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # what fuse-overlayfs reads overrides on
                os.setxattr(target, self.override_xattr, format_override(uid, gid, mode), follow_symlinks=follow)
                os.chmod(target, self.backing_mode(mode), follow_symlinks=follow)
            elif not is_link:
                os.chmod(target, stat.S_IMODE(mode), follow_symlinks=follow)
            return
        try:
            os.chown(target, uid, gid, follow_symlinks=follow)
        except OSError:
            if not self.tolerate_chown_failure:
                raise
        if not is_link:
            os.chmod(target, stat.S_IMODE(mode), follow_symlinks=follow)

    def change(self, path: str, uid: int, gid: int, mode: int | None) -> None:
        """A chown (UID/GID of -1: unchanged) and/or chmod (MODE None: unchanged) of the object at
        PATH (a /proc/self/fd link, followed to the object)."""
        st = os.stat(path)
        if self.override_xattr is not None and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            current = effective(path, st, self.override_xattr, follow=True)
            new_mode = current.mode if mode is None else stat.S_IMODE(mode)
            if mode is None and (uid != -1 or gid != -1) and not stat.S_ISDIR(st.st_mode):
                new_mode &= ~(stat.S_ISUID | stat.S_ISGID)  # a chown clears set-id bits, as the kernel's
            value = format_override(current.uid if uid == -1 else uid, current.gid if gid == -1 else gid, new_mode)
            os.setxattr(path, self.override_xattr, value)
            if mode is not None:
                os.chmod(path, self.backing_mode(st.st_mode & ~0o7777 | new_mode))
            return
        if uid != -1 or gid != -1:
            try:
                os.chown(path, uid, gid)
            except OSError:
                if not self.tolerate_chown_failure:
                    raise
        if mode is not None and not stat.S_ISLNK(st.st_mode):
            os.chmod(path, stat.S_IMODE(mode))


def effective(path: str | int, st: os.stat_result, xattr: str | None, *, follow: bool = False) -> Override:
    """Owner and mode of the object at PATH (lstat ST), its override xattr winning where it has one."""
    if xattr is not None and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        try:
            value = os.getxattr(path, xattr, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise
        else:
            found = parse_override(value)
            if found is not None:
                return found
    return Override(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))


def source_override(src: int | str, st: os.stat_result, names: list[str] | None = None) -> Override:
    """What a copy-up must give the copy: the source's override (any of the three forms), else its
    real owner and mode. One listxattr answers for the common file that has none; NAMES: its
    answer, where the caller has it already (a copy-up lists the xattrs once, for both uses)."""
    real = Override(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return real
    follow = isinstance(src, int)
    if names is not None:
        present = set(names)
    else:
        try:
            present = set(os.listxattr(src, follow_symlinks=follow))
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                return real
            raise
    for name in OVERRIDE_XATTRS:
        if name in present:
            found = effective(src, st, name, follow=follow)
            if found != real:
                return found
    return real
