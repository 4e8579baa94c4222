"""What is mounted where, and clearing away FUSE mounts whose daemon died.

A FUSE daemon killed with SIGKILL leaves its mount behind: every access to it fails with ENOTCONN
("Transport endpoint is not connected"). Mounting again on top would work but leave the dead mount
underneath, to reappear at the next unmount; so the daemon detaches dead FUSE mounts at its
mountpoint before it mounts (``umount -l``, as fusermount3 -uz would).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from dataclasses import dataclass

from . import syscalls

log = logging.getLogger(__name__)

#: How many dead mounts stacked on one mountpoint we clear before giving up.
MAX_STACKED = 16


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    fstype: str
    source: str
    options: str
    """Superblock options (after " - "), e.g. "rw,user_id=0,allow_other"."""
    mount_options: str
    """Per-mount options, e.g. "ro,nosuid"."""
    dev: str
    """"major:minor", which names a FUSE mount's connection in /sys/fs/fuse/connections."""


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash (any byte, really) as \\ooo octal."""
    raw = field.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def read_mounts() -> list[MountEntry]:
    """Every mount, in mount order (reading the table never touches a mounted filesystem)."""
    entries = []
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table.read().decode("utf-8", "surrogateescape").splitlines():
            before, _, after = line.partition(" - ")
            fields = before.split(" ")
            fstype, source, options = [*after.split(" "), "", "", ""][:3]
            entries.append(
                MountEntry(_unescape(fields[4]), fstype, _unescape(source), options, fields[5], fields[2])
            )
    return entries


def mounts_at(path: str) -> list[MountEntry]:
    """Every mount on PATH, bottom first (the last one is what PATH shows)."""
    target = os.path.abspath(path)
    return [entry for entry in read_mounts() if entry.mountpoint == target]


def is_dead_fuse_mount(path: str) -> bool:
    """A FUSE mount whose daemon is gone answers ENOTCONN (ECONNABORTED once the connection is aborted)."""
    entries = mounts_at(path)
    if not entries or not entries[-1].fstype.startswith("fuse"):
        return False
    try:
        os.statvfs(path)  # never cached by the kernel, unlike stat: it must reach the daemon
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def detach_dead_mounts(path: str) -> int:
    """Lazily unmount dead FUSE mounts stacked on PATH; returns how many were cleared."""
    cleared = 0
    while cleared < MAX_STACKED and is_dead_fuse_mount(path):
        _detach(path)
        cleared += 1
        log.warning("%s: detached a FUSE mount whose daemon had died", path)
    return cleared


def _detach(path: str) -> None:
    try:
        syscalls.umount2(path, syscalls.MNT_DETACH)
        return
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise
    # Not root: fusermount3 is setuid root and may detach our own FUSE mounts.
    subprocess.run(["fusermount3", "-u", "-z", path], check=True, capture_output=True, timeout=30)


def command_line(pid: int) -> list[str] | None:
    """The arguments PID was started with (from /proc), or None if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [os.fsdecode(arg) for arg in f.read().split(b"\0") if arg]
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    """Whether PID runs: it exists and is not a zombie (a daemon killed but not yet reaped is gone
    for every purpose here: its mount is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
