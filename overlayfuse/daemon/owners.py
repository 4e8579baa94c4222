"""Owners and modes as the mount shows them and as callers' ids reach the disk (fuse-overlayfs's
ID mapping and squash options), for the FUSE operations.

Two directions, one place:

- shown: a stat through the mount reports the ids on disk through ``uidmapping=``/``gidmapping=``
  (an unmapped id shows as the overflow id, 65534, as in a user namespace), then ``squash_to_*``;
  owner and mode come from an ``override_stat`` xattr where the layer keeps them there (read with
  `overlay.ownership`, which also writes them);
- stored: a caller's ids (create, mkdir...) and a chown's ids are mapped back before they reach the
  disk (a chown to an id with no mapping is EINVAL, as the kernel answers in a user namespace); ACL
  xattrs carry ids too and are mapped both ways.

Here, not in `overlay`: the mapping is what `compat`'s options ask of the view; the overlay tree
stores the ids it is given.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence

import pyfuse3

from ..overlay import acl
from ..overlay.layers import Layer
from ..overlay.ownership import DiskOwner, effective, layer_override_xattr, prepare_upper
from .compat import OVERFLOW_ID, ViewOptions

log = logging.getLogger(__name__)

ACL_XATTRS = acl.XATTRS


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

    def present(self, attrs: pyfuse3.EntryAttributes, st: os.stat_result, layer_root: str, path: str | None,
                follow: bool = False) -> None:
        """Turn ATTRS (filled from ST, the real lstat of the object at PATH) into what the mount shows.
        FOLLOW: PATH is a /proc link to the object (one whose name went), to be followed."""
        uid, gid = st.st_uid, st.st_gid
        xattr = self.layer_xattrs.get(layer_root) if self.reads_overrides else None
        if xattr is not None and path is not None:
            found = effective(path, st, xattr, follow=follow)
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
        return (self.overflow_uid if disk_uid is None else disk_uid,
                self.overflow_gid if disk_gid is None else disk_gid)

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
        return _map_acl(value, lambda i: uid_map.shown(i, self.overflow_uid),
                        lambda i: gid_map.shown(i, self.overflow_gid))

    def acl_on_disk(self, value: bytes) -> bytes:
        """A POSIX ACL xattr value from a caller, with its ids as stored; EINVAL for an unmapped id."""

        def strict(mapper: Callable[[int], int | None]) -> Callable[[int], int]:
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


def _map_acl(value: bytes, map_uid: Callable[[int], int], map_gid: Callable[[int], int]) -> bytes:
    """VALUE (posix_acl_xattr_header + entries) with the ids of ACL_USER/ACL_GROUP entries mapped."""
    mapped = [(tag, perm, map_uid(ident) if tag == acl.USER else map_gid(ident) if tag == acl.GROUP else ident)
              for tag, perm, ident in acl.entries(value)]
    return value[: acl.HEADER.size] + b"".join(acl.ENTRY.pack(*entry) for entry in mapped)


def for_mount(
    view: ViewOptions, layers: Sequence[Layer], lowerdirs: Sequence[str], writable: bool
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
