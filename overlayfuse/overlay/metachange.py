"""A setattr's chown/chmod/utimens as data: applied to an object, or folded into its copy-up.

A chown of a lower file is a copy-up followed by a chown. Where the copy can simply be *created*
with the new owner (and mode), that is the same result in fewer syscalls: no chown to the lower
owner and then to the new one, no reopen of the published copy to change it. `MetadataChange.folded`
says when that is exactly the same: only then, and the copy is still published with one rename,
so it is never visible with the old owner or a half-made one.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .ownership import DiskOwner, Override

#: What a chown clears on a regular file (the kernel's ATTR_KILL_SUID/SGID/PRIV, even for root) and
#: what a chmod rewrites (an access ACL's mask): with any of these the order chown-after-copy
#: matters, so such a change is not folded.
_CHANGED_BY_CHOWN_OR_CHMOD = frozenset({"security.capability", "system.posix_acl_access"})


@dataclass(frozen=True, slots=True)
class MetadataChange:
    """The chown/chmod/utimens part of one setattr: -1/None where a field is not changed."""

    uid: int = -1
    gid: int = -1
    mode: int | None = None
    """The new permission bits (07777), or None."""
    atime_ns: int | None = None
    mtime_ns: int | None = None
    owner: DiskOwner | None = None
    """chown and chmod go through it (override xattrs, squashed ids: see `ownership`)."""

    def __call__(self, path: str) -> None:
        """Apply to PATH: /proc/self/fd/N of the object itself (following it reaches the object, a
        symlink included, never what a symlink points to)."""
        chown = self.uid != -1 or self.gid != -1
        if self.owner is not None and (chown or self.mode is not None):
            self.owner.change(path, self.uid, self.gid, self.mode)
        elif chown:
            os.chown(path, self.uid, self.gid)
        if self.mode is not None and self.owner is None and not stat.S_ISLNK(os.stat(path).st_mode):
            os.chmod(path, self.mode)  # after chown, which clears setuid
        if self.atime_ns is not None or self.mtime_ns is not None:
            current = os.stat(path)
            atime = self.atime_ns if self.atime_ns is not None else current.st_atime_ns
            mtime = self.mtime_ns if self.mtime_ns is not None else current.st_mtime_ns
            os.utime(path, ns=(atime, mtime))

    def folded(self, st: os.stat_result, found: Override, xattrs: list[str]) -> Override | None:
        """The owner and mode a copy of the lower regular file ST (whose copy would get FOUND, with
        the xattrs XATTRS) can be created with so that this change is already made; None where
        copying then changing gives something else, and the change must run after the copy.

        Folded only for a plain chown/chmod (no override xattrs or squashed ids, no times) of a
        file with no set-id bits, no file capability and no access ACL: a chown clears the first
        two, a chmod rewrites the third, so for those the two-step order is the meaning."""
        if self.owner is not None or self.atime_ns is not None or self.mtime_ns is not None:
            return None
        if not stat.S_ISREG(st.st_mode) or found.mode & (stat.S_ISUID | stat.S_ISGID):
            return None
        if not _CHANGED_BY_CHOWN_OR_CHMOD.isdisjoint(xattrs):
            return None
        return Override(
            found.uid if self.uid == -1 else self.uid,
            found.gid if self.gid == -1 else self.gid,
            found.mode if self.mode is None else self.mode,
        )
