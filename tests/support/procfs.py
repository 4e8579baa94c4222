"""The tests' own readers of /proc: mounts, command lines, process states.

Deliberately not `overlayfuse.linux.mounttable`: the leak checks and teardowns ask these whether a
mount or a daemon is still there, so a bug in the module under test cannot hide itself (a
mountinfo parser that dropped a line would otherwise make every leak check pass).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

_OCTAL = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo (see proc(5))."""

    mountpoint: str
    fstype: str
    source: str
    options: str  # superblock options, after " - "
    mount_options: str  # per-mount options, field 6
    dev: str  # "major:minor"


def _unescape(field: bytes) -> str:
    """The kernel escapes space, tab, newline and backslash in paths as \\ooo."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(text: bytes) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        before, sep, after = line.partition(b" - ")
        fields = before.split(b" ")
        tail = after.split(b" ")
        if not sep or len(fields) < 6 or len(tail) < 3:
            raise ValueError(f"unreadable mountinfo line: {line!r}")
        entries.append(MountEntry(
            mountpoint=_unescape(fields[4]), fstype=os.fsdecode(tail[0]),
            source=_unescape(tail[1]), options=os.fsdecode(tail[2]),
            mount_options=os.fsdecode(fields[5]), dev=os.fsdecode(fields[2])))
    return entries


def mounts() -> list[MountEntry]:
    """Every mount of this process's namespace, in mount order."""
    with open("/proc/self/mountinfo", "rb") as table:
        return parse_mountinfo(table.read())


def other_pids() -> Iterator[int]:
    """Every process but this one."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            yield int(entry)


def thread_waits(pid: int) -> list[str]:
    """What each thread of PID waits in (name and kernel wait channel); empty if it is gone."""
    threads = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            task = f"/proc/{pid}/task/{tid}"
            with contextlib.suppress(OSError), open(f"{task}/comm") as comm, open(f"{task}/wchan") as wchan:
                threads.append(f"{comm.read().strip()}:{wchan.read().strip()}")
    return threads


def command_line(pid: int) -> list[str] | None:
    """PID's arguments, or None if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [os.fsdecode(arg) for arg in f.read().split(b"\0") if arg]
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    """PID exists and is not a zombie (a killed, unreaped daemon serves nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def namespaces_holding(dev: str) -> list[str]:
    """Processes in *other* mount namespaces that still have the filesystem DEV ("major:minor")
    mounted, one per namespace, as "PID (command)".

    A mount namespace made while a test's mount existed (rootless podman's pause process,
    ``catatonit -P``; any ``unshare -m``) holds a copy of it, and the mounts here are private (no
    propagation): unmounting here leaves the superblock alive there, so the FUSE connection stays
    up and the daemon, rightly, keeps serving. That is the teardown's "daemon ignored the unmount"
    with the daemon idle in epoll_wait and nothing here holding the mount."""
    try:
        ours = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return []
    seen: dict[str, str] = {}
    for pid in other_pids():
        with contextlib.suppress(OSError):
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
            if namespace == ours or namespace in seen:
                continue
            with open(f"/proc/{pid}/mountinfo", "rb") as table:
                if any(entry.dev == dev for entry in parse_mountinfo(table.read())):
                    argv = command_line(pid) or ["?"]
                    seen[namespace] = f"{pid} ({' '.join(argv)[:80]})"
    return list(seen.values())

