"""Who is on the other end of a Unix socket, and whether it holds less privilege than we do.

The fork server (`overlayfuse.daemon.forkserver`) forks a daemon that takes its caller's place,
but what the kernel does not let it copy (capabilities, the bounding set, no_new_privs, seccomp
filters, the LSM label) the child keeps from the server. A caller of the server's own uid that
holds less of those (root under a unit with a smaller CapabilityBoundingSet=, a process with
no_new_privs or a seccomp filter, another AppArmor profile) would get a daemon with more than it
has itself; `lacks` names what it lacks, and the server refuses it (it then mounts in its own
process, with its own privileges).

The peer is identified by SO_PEERPIDFD (Linux 6.5) where there is one: its /proc entry is read
through the pid the pidfd names, and the pidfd then tells whether that process still lives, so a
peer that exited and whose pid was reused cannot lend us another process's privileges. On older
kernels the pid of SO_PEERCRED is used alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: include/uapi/asm-generic/socket.h (Linux 6.5); Python 3.11's socket module does not name it.
SO_PEERPIDFD = 77
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class Peer:
    """A process and the ids it acts with, as the kernel names them to us (ids as seen from our user
    namespace): a socket's peer (SO_PEERCRED), or the caller of a FUSE request (its context)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Privileges:
    """What a process holds that a fork of ours cannot take from it (proc(5): /proc/PID/status)."""

    effective: int  # CapEff
    permitted: int  # CapPrm
    bounding: int  # CapBnd
    no_new_privs: bool
    seccomp: bool  # in mode 1 (strict) or 2 (filter)
    label: str | None  # the LSM's (AppArmor, SELinux), None where no LSM answers
    user_namespace: str | None  # the readlink of /proc/PID/ns/user


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid, uid, gid)


def status_of(pid: int | str) -> dict[str, str]:
    """PID's /proc/PID/status as ``{"CapEff": "000001ffffffffff", "Gid": "0\t0\t0\t0", ...}``
    (``"self"`` for ours). OSError if it is gone or its /proc is closed to us."""
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def privileges_of(pid: int | str) -> Privileges:
    """PID's privileges (``"self"`` for ours). OSError if it is gone or its /proc is closed to us."""
    fields = status_of(pid)
    label = None
    with contextlib.suppress(OSError), open(f"/proc/{pid}/attr/current", "rb") as f:
        label = f.read().rstrip(b"\0\n").decode(errors="replace")
    userns = None
    with contextlib.suppress(OSError):
        userns = os.readlink(f"/proc/{pid}/ns/user")
    return Privileges(
        effective=int(fields["CapEff"], 16), permitted=int(fields["CapPrm"], 16),
        bounding=int(fields["CapBnd"], 16), no_new_privs=fields.get("NoNewPrivs", "0") != "0",
        seccomp=fields.get("Seccomp", "0") != "0", label=label, user_namespace=userns,
    )  # fmt: skip


def peer_privileges(sock: socket.socket, peer: Peer) -> Privileges:
    """The privileges of SOCK's PEER, read while it provably still lives (see the module's doc).
    OSError if it is gone."""
    try:
        pidfd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError:  # before Linux 6.5: the pid alone
        return privileges_of(peer.pid)
    try:
        found = privileges_of(peer.pid)
        signal.pidfd_send_signal(pidfd, 0)  # still the process that connected: no pid reuse
        return found
    finally:
        os.close(pidfd)


def all_capabilities() -> int:
    """The mask of every capability this kernel has (/proc/sys/kernel/cap_last_cap)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return (1 << (int(f.read()) + 1)) - 1


def lacks(peer: Privileges, ours: Privileges) -> str | None:
    """What PEER lacks that a process forked from OURS would hold, in words; None if nothing.

    In the peer's own user namespace the fork holds what we hold. A peer in another one (rootless
    podman's) is entered by the fork with setns, which gives the full capability set there (the
    kernel's set_cred_user_ns): so that peer must hold every capability in it itself, as a mount
    program there does, and a process in it that dropped some (a container's) is refused."""
    if peer.user_namespace == ours.user_namespace:
        held = (ours.effective, ours.permitted, ours.bounding)
    else:
        held = (all_capabilities(),) * 3
    for name, theirs, mine in zip(("effective capabilities", "permitted capabilities", "capability bounding set"),
                                  (peer.effective, peer.permitted, peer.bounding), held, strict=True):
        if mine & ~theirs:
            return f"its {name} lack {mine & ~theirs:#x}, which a daemon forked for it would hold"
    if peer.no_new_privs and not ours.no_new_privs:
        return "it runs with no_new_privs and the fork server does not"
    if peer.seccomp and not ours.seccomp:
        return "it runs under a seccomp filter and the fork server does not"
    if peer.label != ours.label:
        return f"its security label {peer.label!r} is not the fork server's {ours.label!r}"
    return None
