"""Owners and modes as the mount shows them and as the layers store them (fuse-overlayfs's options).

Two directions, one place:

- shown: a stat through the mount reports the ids on disk through ``uidmapping=``/``gidmapping=``
  (an unmapped id shows as the overflow id, 65534, as in a user namespace), then ``squash_to_*``;
  owner and mode come from an ``override_stat`` xattr where the layer keeps them there;
- stored: a caller's ids (create, mkdir...) and a chown's ids are mapped back before they reach the
  disk (a chown to an id with no mapping is EINVAL, as the kernel answers in a user namespace); ACL
  xattrs carry ids too and are mapped both ways; with ``xattr_permissions`` the owner and mode go
  into the override xattr, since an unprivileged daemon cannot chown.

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
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .compat import OVERFLOW_ID, ViewOptions

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

ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_USER = 0x02
_ACL_GROUP = 0x08


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


def source_override(src: int | str, st: os.stat_result) -> Override:
    """What a copy-up must give the copy: the source's override (any of the three forms), else its
    real owner and mode. One listxattr answers for the common file that has none."""
    real = Override(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return real
    follow = isinstance(src, int)
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


class Ownership:
    """The mount's owner/mode policy, from its `ViewOptions` and its layers' override marks."""

    def __init__(self, view: ViewOptions, layer_xattrs: dict[str, str | None]) -> None:
        self.view = view
        self.layer_xattrs = layer_xattrs
        """Layer root -> the override xattr its objects use (None: their real owner and mode)."""
        self.reads_overrides = any(layer_xattrs.values())
        self.active = view.maps_ids or self.reads_overrides or view.static_nlink
        self.overflow_uid = _overflow_id("overflowuid") if view.maps_ids else OVERFLOW_ID
        self.overflow_gid = _overflow_id("overflowgid") if view.maps_ids else OVERFLOW_ID

    # -- shown --------------------------------------------------------------------------------

    def present(self, attrs: Any, st: os.stat_result, layer_root: str, path: str | None) -> None:
        """Turn ATTRS (filled from ST, the real lstat of the object at PATH) into what the mount shows."""
        uid, gid = st.st_uid, st.st_gid
        xattr = self.layer_xattrs.get(layer_root) if self.reads_overrides else None
        if xattr is not None and path is not None:
            found = effective(path, st, xattr)
            uid, gid = found.uid, found.gid
            attrs.st_mode = stat.S_IFMT(st.st_mode) | found.mode
        attrs.st_uid = self.shown_uid(uid)
        attrs.st_gid = self.shown_gid(gid)
        if self.view.static_nlink and stat.S_ISDIR(st.st_mode):
            attrs.st_nlink = 1

    def shown_uid(self, disk_uid: int) -> int:
        if self.view.squash_uid is not None:
            return self.view.squash_uid
        return self.view.uid_map.shown(disk_uid, self.overflow_uid)

    def shown_gid(self, disk_gid: int) -> int:
        if self.view.squash_gid is not None:
            return self.view.squash_gid
        return self.view.gid_map.shown(disk_gid, self.overflow_gid)

    # -- stored -------------------------------------------------------------------------------

    def caller_on_disk(self, uid: int, gid: int) -> tuple[int, int]:
        """The ids a caller's new object gets on disk (an unmapped caller: the overflow id, as
        fuse-overlayfs stores it)."""
        disk_uid = self.view.uid_map.disk(uid)
        disk_gid = self.view.gid_map.disk(gid)
        return (self.overflow_uid if disk_uid is None else disk_uid, self.overflow_gid if disk_gid is None else disk_gid)

    def chown_on_disk(self, uid: int, gid: int) -> tuple[int, int]:
        """A chown's ids (-1: unchanged) as stored; EINVAL for an id with no mapping."""
        disk_uid = uid if uid == -1 else self.view.uid_map.disk(uid)
        disk_gid = gid if gid == -1 else self.view.gid_map.disk(gid)
        if disk_uid is None or disk_gid is None:
            raise OSError(errno.EINVAL, f"chown to {uid}:{gid}: no mapping for that id in this mount")
        return disk_uid, disk_gid

    def acl_shown(self, value: bytes) -> bytes:
        """A POSIX ACL xattr value read from disk, with its ids as the mount shows them."""
        uid_map, gid_map = self.view.uid_map, self.view.gid_map  # mapped, never squashed: named entries stay apart
        return _map_acl(value, lambda i: uid_map.shown(i, self.overflow_uid), lambda i: gid_map.shown(i, self.overflow_gid))

    def acl_on_disk(self, value: bytes) -> bytes:
        """A POSIX ACL xattr value from a caller, with its ids as stored; EINVAL for an unmapped id."""

        def strict(mapper: Any) -> Any:
            def map_id(shown: int) -> int:
                disk = mapper(shown)
                if disk is None:
                    raise OSError(errno.EINVAL, f"ACL entry for id {shown}: no mapping for that id in this mount")
                return disk

            return map_id

        return _map_acl(value, strict(self.view.uid_map.disk), strict(self.view.gid_map.disk))


def _overflow_id(name: str) -> int:
    """The kernel's overflow id (/proc/sys/kernel/overflowuid or overflowgid), as fuse-overlayfs reads it."""
    try:
        with open(f"/proc/sys/kernel/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return OVERFLOW_ID


def _map_acl(value: bytes, map_uid: Any, map_gid: Any) -> bytes:
    """VALUE (posix_acl_xattr_header + entries) with the ids of ACL_USER/ACL_GROUP entries mapped."""
    if len(value) < _ACL_HEADER.size or (len(value) - _ACL_HEADER.size) % _ACL_ENTRY.size:
        raise OSError(errno.EINVAL, "malformed POSIX ACL xattr value")
    out = bytearray(value[: _ACL_HEADER.size])
    for offset in range(_ACL_HEADER.size, len(value), _ACL_ENTRY.size):
        tag, perm, ident = _ACL_ENTRY.unpack_from(value, offset)
        if tag == _ACL_USER:
            ident = map_uid(ident)
        elif tag == _ACL_GROUP:
            ident = map_gid(ident)
        out += _ACL_ENTRY.pack(tag, perm, ident)
    return bytes(out)


class _Layer(Protocol):
    root: str
    writable: bool


def for_mount(
    view: ViewOptions, layers: Sequence[_Layer], lowerdirs: Sequence[str], writable: bool
) -> tuple[Ownership, str | None]:
    """The mount's `Ownership`: which override xattr each layer uses, from its root's mark; for
    ``xattr_permissions`` on a writable mount the upper root is marked first (see `prepare_upper`).
    Also returns the xattr the upper layer writes (None: owners are kept by chown)."""
    upper_xattr = None
    xattrs: dict[str, str | None] = {}
    for layer in layers:
        if layer.writable and writable and view.xattr_permissions:
            upper_xattr = xattrs[layer.root] = prepare_upper(layer.root, tuple(lowerdirs), view.xattr_permissions)
        else:
            xattrs[layer.root] = layer_override_xattr(layer.root)
    if view.context:
        log.info("context=%s: accepted; the mount takes its SELinux label from the policy", view.context)
    return Ownership(view, xattrs), upper_xattr


def disk_owner(view: ViewOptions, upper_xattr: str | None) -> DiskOwner | None:
    """The `DiskOwner` for a mount's writes, or None where plain chown/chmod do (no options)."""
    if upper_xattr is None and not view.squashes:
        return None
    return DiskOwner(upper_xattr, view.force_mask if upper_xattr else None, view.squashes)
