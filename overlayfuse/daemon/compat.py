"""fuse-overlayfs's own mount options, with its meanings: ID mapping, squashing, xattr permissions,
fsync, ACLs, xattrs, static nlink, timeouts.

containers-storage drives its mount program with these (``uidmapping=:0:1:5000`` for ``podman run
--uidmap 0:1:5000``, ``volatile`` for ``--rm``), and users copy them from fuse-overlayfs's man page.
fuse-overlayfs's main.c and man page are the authority; where this module differs it says so.

`ViewOptions` is what the options ask for, parsed and checked, touching no file; `owners` (and, for
what reaches the disk, `overlay.ownership`) applies it at run time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

#: The kernel's overflow ids (/proc/sys/kernel/overflow{u,g}id, 65534 unless changed): what an id
#: with no mapping shows as, as in a user namespace.
OVERFLOW_ID = 65534

#: Options whose value may hold commas inside double quotes (SELinux contexts such as
#: ``context="system_u:object_r:container_file_t:s0:c1,c2"``), as the kernel's mount parser allows.
QUOTED_KEYS = frozenset({"context", "fscontext", "defcontext", "rootcontext"})

#: Options of fuse-overlayfs's that change nothing here, with the reason given in the README.
NO_EFFECT = frozenset({"threaded", "fast_ino", "writeback", "plugins", "splice_read", "splice_write",
                       "splice_move", "kernel_cache", "max_write"})  # fmt: skip

#: Every key this module takes.
KEYS = frozenset(
    {"uidmapping", "gidmapping", "squash_to_uid", "squash_to_gid", "squash_to_root", "xattr_permissions",
     "force_mask", "fsync", "volatile", "noacl", "noxattrs", "static_nlink", "timeout"}
) | QUOTED_KEYS | NO_EFFECT  # fmt: skip


class OptionError(ValueError):
    """A fuse-overlayfs option with a value it cannot have; the message names the option."""


@dataclass(frozen=True, slots=True)
class IdRange:
    """One ``uidmapping=`` triple: ids DISK..DISK+COUNT-1 in the layers show as SHOWN..SHOWN+COUNT-1.

    fuse-overlayfs's man page calls the first two numbers "UID" and "MAPPED-UID"; containers-storage
    writes them as a user namespace's uid_map line (inside:outside:count), the ids on disk being the
    container's own ones and the shown ones those of the daemon's namespace.
    """

    disk: int
    shown: int
    count: int


@dataclass(frozen=True, slots=True)
class IdMap:
    """A ``uidmapping=``/``gidmapping=`` value; with no ranges every id maps to itself."""

    ranges: tuple[IdRange, ...] = ()

    def shown(self, disk_id: int, overflow: int = OVERFLOW_ID) -> int:
        """The id a stat through the mount reports for DISK_ID (OVERFLOW if none maps it)."""
        if not self.ranges:
            return disk_id
        for r in self.ranges:
            if r.disk <= disk_id < r.disk + r.count:
                return r.shown + (disk_id - r.disk)
        return overflow

    def disk(self, shown_id: int) -> int | None:
        """The id to store on disk for SHOWN_ID (a caller's, or a chown's), or None if none maps it."""
        if not self.ranges:
            return shown_id
        for r in self.ranges:
            if r.shown <= shown_id < r.shown + r.count:
                return r.disk + (shown_id - r.shown)
        return None

    @property
    def identity(self) -> bool:
        return not self.ranges


@dataclass(frozen=True, slots=True)
class ViewOptions:
    """What fuse-overlayfs's options ask of the merged view. The defaults change nothing."""

    uid_map: IdMap = field(default_factory=IdMap)
    gid_map: IdMap = field(default_factory=IdMap)
    squash_uid: int | None = None
    """``squash_to_uid=`` (or 0 from ``squash_to_root``): every object shows this owner; a chown
    is accepted and changes nothing."""
    squash_gid: int | None = None
    xattr_permissions: int = 0
    """1: owner and mode kept in ``security.fuseoverlayfs.override_stat``; 2: in
    ``user.fuseoverlayfs.override_stat`` (fuse-overlayfs's numbering); 0: real chown/chmod."""
    force_mask: int | None = None
    """With xattr_permissions: the permission bits given on disk to what this mount creates, copies
    up or chmods (the mode it shows lives in the override xattr)."""
    fsync: bool = True
    """``fsync=0`` and ``volatile``: no fsync, neither asked for by callers nor after a copy-up."""
    acl: bool = True
    """``noacl``: POSIX ACL xattrs are refused (EOPNOTSUPP), as on a filesystem without ACLs."""
    xattrs: bool = True
    """``noxattrs=1``: no xattr calls through the mount at all."""
    static_nlink: bool = False
    """Directories report st_nlink 1 (no counting of subdirectories)."""
    timeout: float | None = None
    """``timeout=``: seconds the kernel may cache entries and attributes (default: a day)."""
    context: str | None = None
    """``context=``: an SELinux label for the whole mount; accepted, and logged (see README)."""

    @property
    def maps_ids(self) -> bool:
        return not (self.uid_map.identity and self.gid_map.identity) or self.squashes

    @property
    def squashes(self) -> bool:
        return self.squash_uid is not None or self.squash_gid is not None


def parse_id_map(key: str, value: str) -> IdMap:
    """``A:B:N[:A:B:N...]``. Empty fields are skipped, as fuse-overlayfs's strtok does:
    containers-storage writes ``uidmapping=:0:1:5000``."""
    fields = [part for part in value.split(":") if part]
    if not fields or len(fields) % 3:
        raise OptionError(f"{key}={value!r}: expected triples DISK:SHOWN:COUNT joined by ':'")
    try:
        numbers = [int(part, 10) for part in fields]
    except ValueError:
        raise OptionError(f"{key}={value!r}: the ids and counts must be decimal numbers") from None
    if any(n < 0 or n > 0xFFFFFFFF for n in numbers):
        raise OptionError(f"{key}={value!r}: ids and counts are 32-bit unsigned numbers")
    ranges = tuple(IdRange(*numbers[i:i + 3]) for i in range(0, len(numbers), 3))
    if any(r.count == 0 for r in ranges):
        raise OptionError(f"{key}={value!r}: a range of 0 ids maps nothing")
    return IdMap(ranges)


def apply(view: ViewOptions, key: str, has_value: bool, value: str) -> ViewOptions:
    """VIEW with the option KEY[=VALUE] (a key of `KEYS`) applied; raises OptionError on a bad value."""
    if key in ("uidmapping", "gidmapping"):
        mapping = parse_id_map(key, value)
        return replace(view, uid_map=mapping) if key == "uidmapping" else replace(view, gid_map=mapping)
    if key in ("squash_to_uid", "squash_to_gid"):
        number = _number(key, value)
        return replace(view, squash_uid=number) if key == "squash_to_uid" else replace(view, squash_gid=number)
    if key == "squash_to_root":
        # squash_to_uid/gid take precedence over squash_to_root, whatever the order given.
        return replace(view, squash_uid=0 if view.squash_uid is None else view.squash_uid,
                       squash_gid=0 if view.squash_gid is None else view.squash_gid)
    if key == "xattr_permissions":
        level = _number(key, value)
        if level not in (0, 1, 2):
            raise OptionError(f"xattr_permissions={value!r}: must be 0, 1 or 2")
        return replace(view, xattr_permissions=level)
    if key == "force_mask":
        mask = _number(key, value, base=8)
        if mask > 0o7777:
            raise OptionError(f"force_mask={value!r}: an octal mode of at most 7777")
        return replace(view, force_mask=mask)
    if key == "fsync":
        return replace(view, fsync=_number(key, value) != 0)
    if key == "volatile":
        return replace(view, fsync=False)
    if key == "noacl":
        return replace(view, acl=False)
    if key == "noxattrs":
        return replace(view, xattrs=has_value and _number(key, value) == 0)
    if key == "static_nlink":
        return replace(view, static_nlink=True)
    if key == "timeout":
        try:
            seconds = float(value)
        except ValueError:
            raise OptionError(f"timeout={value!r}: a number of seconds") from None
        if not seconds >= 0 or seconds == float("inf"):
            raise OptionError(f"timeout={value!r}: a finite number of seconds, 0 or more")
        return replace(view, timeout=seconds)
    if key in QUOTED_KEYS:
        return replace(view, context=unquote(value)) if key == "context" else view
    # NO_EFFECT options
    return view


def unquote(value: str) -> str:
    """A value wrapped in double quotes, without them (``"a,b"`` -> ``a,b``)."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _number(key: str, value: str, base: int = 10) -> int:
    try:
        number = int(value, base)
    except ValueError:
        kind = "an octal mode" if base == 8 else "a number"
        raise OptionError(f"{key}={value!r}: {kind} is required") from None
    if number < 0:
        raise OptionError(f"{key}={value!r}: must not be negative")
    return number
