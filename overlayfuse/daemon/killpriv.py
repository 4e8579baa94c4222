"""Killpriv v2: the daemon, not the kernel, clears set-id bits and file capabilities.

Without it, the kernel clears S_ISUID, S_ISGID and ``security.capability`` of a FUSE file itself
before a write: it asks the daemon for ``security.capability`` before every write (a GETXATTR each,
for passed-through files too) and refreshes the attributes before every chown (a GETATTR). With
FUSE_HANDLE_KILLPRIV_V2 (libfuse 3.17, pyfuse3 patch 0008) it marks the mount SB_NOSEC: once a
file without set-id bits has been written, later writes send nothing more, and a chown needs no
refresh. `tar xf` of files of 11 KB (two writes each, a chown, a chmod, a utimes) then sends 9
requests per file instead of 11.

In exchange the daemon owes what the kernel did (its rules: FUSE_CAP_HANDLE_KILLPRIV_V2 in
libfuse's fuse_common.h, and fs/attr.c's ``setattr_should_drop_suidgid``). Most of it comes from
the upper filesystem itself, because the daemon writes there:
- ``security.capability`` goes on every write, truncate and chown the daemon makes there, whoever
  the caller (the upper filesystem's VFS clears it, as for any writer);
- on a chown of a non-directory, S_ISUID and a group-executable S_ISGID go, even for root.

What the daemon clears itself (`clear_set_id`) is S_ISUID and S_ISGID on a write or truncate by a
caller without CAP_FSETID: the daemon holds it, so its own write keeps them. The caller is
- for a truncate or an open with O_TRUNC, the request's;
- for a write through a cached open, the process that opened the file (the kernel's verdict,
  FUSE_WRITE_KILL_SUIDGID, is in the WRITE request, but libfuse 3.17 does not pass it on; the
  opener is who writes through a descriptor all but always);
- for a write through a passed-through open (files with a set-id bit are not passed through, but a
  chmod may add one while the open lasts), the writer: the kernel still runs its own check before
  such a write, and under killpriv v2 it sends for it a SETATTR that changes nothing.

Asked for only where all of that holds: the daemon is root in the first user namespace (the
kernel's CAP_FSETID check is made there), and the mode on disk is the mode shown (no override
xattrs, no ID mapping: `owners`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import pyfuse3

from ..linux.namespaces import in_initial_user_namespace
from ..linux.peers import Peer, status_of

#: include/uapi/linux/capability.h
CAP_FSETID = 4


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the kernel's set-id rules ask of a caller."""

    fsetid: bool
    """CAP_FSETID, effective, in the first user namespace."""
    fsgid: int
    groups: frozenset[int]


def wanted(*, owners: bool) -> bool:
    """Whether to ask the kernel for killpriv v2 at init (see the module's docstring)."""
    return not owners and in_initial_user_namespace()


def active() -> bool:
    """The kernel agreed at init (pyfuse3 patch 0008; only where `Binding.killpriv_v2`)."""
    return cast(Callable[[], bool], vars(pyfuse3)["killpriv_v2_active"])()


def credentials(requester: Peer) -> Credentials:
    """REQUESTER's credentials, read from /proc. A process that is gone is judged by its uid: root
    holds CAP_FSETID, anyone else does not."""
    try:
        fields = status_of(requester.pid)
        same_namespace = os.readlink(f"/proc/{requester.pid}/ns/user") == os.readlink("/proc/self/ns/user")
    except OSError:
        return Credentials(requester.uid == 0, requester.gid, frozenset())
    gids = fields.get("Gid", "").split()
    effective = int(fields.get("CapEff", "0"), 16)
    return Credentials(
        fsetid=same_namespace and bool(effective >> CAP_FSETID & 1),
        fsgid=int(gids[3]) if len(gids) == 4 else requester.gid,
        groups=frozenset(int(gid) for gid in fields.get("Groups", "").split()),
    )


def set_id_to_clear(st: os.stat_result, who: Callable[[], Credentials]) -> int:
    """The set-id bits a write or truncate by WHO clears from a file with ST (fs/attr.c): S_ISUID,
    and S_ISGID where group execute is set or WHO is not in the file's group; none for a caller
    with CAP_FSETID. WHO is asked only for a set-id file."""
    mode = st.st_mode
    if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
        return 0
    creds = who()
    if creds.fsetid:
        return 0
    clear = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or (st.st_gid != creds.fsgid and st.st_gid not in creds.groups)):
        clear |= stat.S_ISGID
    return clear


def clear_set_id(target: int | str, requester: Peer) -> bool:
    """Clear what a write or truncate by REQUESTER clears from TARGET, a descriptor or a /proc/self/fd
    path of the file (blocking: in a worker thread); True if a bit went."""
    st = os.stat(target)
    clear = set_id_to_clear(st, lambda: credentials(requester))
    if clear:
        os.chmod(target, stat.S_IMODE(st.st_mode) & ~clear)
    return bool(clear)


def write(fd: int, data: bytes, offset: int, requester: Peer) -> tuple[int, bool]:
    """A write through FD by REQUESTER, set-id bits cleared first as the kernel would (blocking: in
    a worker thread): the bytes written, and whether a bit went."""
    cleared = clear_set_id(fd, requester)
    return os.pwrite(fd, data, offset), cleared


__all__ = ["Credentials", "active", "clear_set_id", "credentials", "set_id_to_clear", "wanted", "write"]
