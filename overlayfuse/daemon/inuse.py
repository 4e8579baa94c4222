"""One writable mount per upper and work dir, as the kernel's overlayfs ``inuse`` flag enforces.

Two daemons writing one upper dir would each trust its own view of it (listings, the hardlink
index, staged copy-ups that the second one's start-up clears from ``WORKDIR/work``), so the second
mount is refused. The claim is an ``flock`` held for the daemon's life: it goes with the process,
however it ends, so a killed daemon never leaves a stale lock. The workdir's lock lives in
``WORKDIR/overlayfuse.lock`` and says which mount holds it; the upper dir is locked as a directory
(nothing may be written into it but the mount's own changes), and its holder is found in
``/proc/locks``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass

from ..linux.mounttable import command_line, mounts_at

log = logging.getLogger(__name__)

LOCK_NAME = "overlayfuse.lock"


class InUseError(Exception):
    """The upper or work dir is claimed by another live mount; the message names it."""


@dataclass(frozen=True, slots=True)
class Claim:
    """The locks a writable mount holds while it lives (never closed: they go with the process)."""

    workdir_fd: int
    upperdir_fd: int


def claim(upperdir: str, workdir: str, mountpoint: str) -> Claim:
    """Lock WORKDIR and UPPERDIR for the mount on MOUNTPOINT; raises InUseError (or OSError)."""
    lock_path = os.path.join(workdir, LOCK_NAME)
    work_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if not _try_lock(work_fd) and not _wait_lock(work_fd, _holder_unmounted(lock_path)):
            raise InUseError(f"workdir {workdir} is in use by {_holder_text(lock_path)}{_ADVICE}")
        upper_fd = os.open(upperdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        os.close(work_fd)
        raise
    if not _try_lock(upper_fd) and not _wait_lock(upper_fd, UPPER_GRACE):
        holder = _upper_holder(upper_fd)
        os.close(upper_fd)
        os.close(work_fd)
        raise InUseError(f"upperdir {upperdir} is in use by {holder}{_ADVICE}")
    os.ftruncate(work_fd, 0)
    os.pwrite(work_fd, f"{os.getpid()} {mountpoint}\n".encode(), 0)
    log.debug("claimed %s and %s for %s", upperdir, workdir, mountpoint)
    return Claim(work_fd, upper_fd)


_ADVICE = ": unmount that first, or give this mount an upperdir and workdir of its own"

#: A daemon whose mount is gone (``umount M`` returned) exits within milliseconds, but its lock goes
#: only with it: ``umount M && overlayfuse ... M`` must not fail on that. Generous for a busy machine.
HOLDER_EXIT_TIMEOUT = 5.0
#: The same wait for an upper dir's holder, whose mount we cannot look up; short, as a real
#: conflict on the upper dir alone (another workdir) is rare and this delays its error.
UPPER_GRACE = 1.0
_POLL = 0.02


def _holder_unmounted(lock_path: str) -> float:
    """How long to wait for the workdir's holder: HOLDER_EXIT_TIMEOUT if its mount is gone, else 0."""
    try:
        with open(lock_path, encoding="utf-8", errors="replace") as f:
            _, _, mountpoint = f.read().strip().partition(" ")
    except OSError:
        return 0.0
    mounted = mountpoint and any(e.fstype.startswith("fuse") for e in mounts_at(mountpoint))
    return 0.0 if mounted else HOLDER_EXIT_TIMEOUT


def _wait_lock(fd: int, timeout: float) -> bool:
    """Try to lock FD until TIMEOUT seconds have passed (a holder on its way out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(_POLL)
        if _try_lock(fd):
            return True
    return False


def holder(workdir: str) -> str | None:
    """Which live mount holds WORKDIR ("the mount on M (pid P)"), or None when it is free.

    For checks made before mounting (``overlayctl check``); `claim` is what decides."""
    lock_path = os.path.join(workdir, LOCK_NAME)
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no mount ever claimed it (or we cannot tell)
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            return None
        return _holder_text(lock_path)
    finally:
        os.close(fd)


def _try_lock(fd: int, kind: int = fcntl.LOCK_EX) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _holder_text(lock_path: str) -> str:
    try:
        with open(lock_path, encoding="utf-8", errors="replace") as f:
            pid, _, mountpoint = f.read().strip().partition(" ")
    except OSError:
        return "another mount"
    if not pid.isdigit() or not mountpoint:
        return "another mount (starting)"
    return f"the mount on {mountpoint} (pid {pid})"


def _upper_holder(fd: int) -> str:
    """The process that holds the flock on FD's directory, from /proc/locks."""
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return "another mount"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted and fields[4].isdigit():
            return _process_holder(int(fields[4]))
    return "another mount"


def _process_holder(pid: int) -> str:
    """The mount PID serves, from the workdir lock it holds open (else its command line)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        targets = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
    except OSError:
        targets = []
    for target in targets:
        if os.path.basename(target) == LOCK_NAME:
            return _holder_text(target)
    argv = command_line(pid)
    return f"the mount on {argv[-1]} (pid {pid})" if argv else f"another mount (pid {pid})"
