"""POSIX ACLs as their xattrs hold them, and what a new object inherits from its directory.

A new object in a directory with a default ACL gets that ACL, masked by the mode its creator
asked for, and the caller's umask is not applied at all; without one, the umask is (the kernel's
``posix_acl_create``, fs/posix_acl.c). A FUSE file system with POSIX ACLs does this itself, and
the kernel's overlay gets it from the upper filesystem, so `upper.UpperDir.create` applies
`inherit` to every object it makes.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"
XATTRS = (ACCESS, DEFAULT)

#: posix_acl_xattr_header (a version) and posix_acl_xattr_entry (tag, perm, id), little-endian.
HEADER = struct.Struct("<I")
ENTRY = struct.Struct("<HHI")
VERSION = 2

USER_OBJ = 0x01
USER = 0x02
GROUP_OBJ = 0x04
GROUP = 0x08
MASK = 0x10
OTHER = 0x20


@dataclass(frozen=True, slots=True)
class Inherited:
    """What a new object gets from its directory."""

    mode: int
    """Its mode: the permission bits as the default ACL or the umask left them, the rest as asked."""
    access: bytes | None = None
    """Its access ACL, where the mode alone cannot say it (named entries, a mask)."""
    default: bytes | None = None
    """A new directory's own default ACL: its parent's."""


def entries(value: bytes) -> list[tuple[int, int, int]]:
    """The (tag, perm, id) entries of an ACL xattr VALUE; EINVAL if it is malformed."""
    if len(value) < HEADER.size or (len(value) - HEADER.size) % ENTRY.size:
        raise OSError(errno.EINVAL, "malformed POSIX ACL xattr value")
    return [ENTRY.unpack_from(value, offset) for offset in range(HEADER.size, len(value), ENTRY.size)]


def pack(acl: list[tuple[int, int, int]]) -> bytes:
    return HEADER.pack(VERSION) + b"".join(ENTRY.pack(*entry) for entry in acl)


def default_of(directory: str) -> bytes | None:
    """The default ACL of DIRECTORY (a path to the directory itself, not followed), if it has one."""
    try:
        value = os.getxattr(directory, DEFAULT, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise
    return value if len(value) > HEADER.size else None  # an empty one is none


def inherit(default: bytes | None, mode: int, umask: int) -> Inherited:
    """What a new object of MODE (its full st_mode, as the caller asked for it) gets in a
    directory whose default ACL is DEFAULT (None: it has none, and UMASK applies)."""
    if stat.S_ISLNK(mode):
        return Inherited(mode)  # a symlink's mode means nothing, and it has no ACLs
    if default is None:
        return Inherited(mode & ~(umask & 0o777))
    acl = entries(default)
    perms = mode & 0o777
    equivalent = True
    group_obj = mask = -1
    for i, (tag, perm, ident) in enumerate(acl):
        if tag == USER_OBJ:
            perm &= (perms >> 6) | ~0o7
            perms &= (perm << 6) | ~0o700
        elif tag in (USER, GROUP):
            equivalent = False
        elif tag == GROUP_OBJ:
            group_obj = i
        elif tag == OTHER:
            perm &= perms | ~0o7
            perms &= perm | ~0o7
        elif tag == MASK:
            mask = i
            equivalent = False
        else:
            raise OSError(errno.EIO, f"unknown tag {tag:#x} in a default ACL")
        acl[i] = (tag, perm & 0o7, ident)
    middle = mask if mask >= 0 else group_obj
    if middle < 0:
        raise OSError(errno.EIO, "a default ACL with neither a mask nor a group entry")
    tag, perm, ident = acl[middle]
    perm &= (perms >> 3) & 0o7
    perms &= (perm << 3) | ~0o070
    acl[middle] = (tag, perm, ident)
    return Inherited((mode & ~0o777) | perms, None if equivalent else pack(acl),
                     default if stat.S_ISDIR(mode) else None)
