"""The overlayfuse daemon under test: mounted in the foreground as our child, probed, torn down.

Run with -f, the daemon is our own child: its pid is known without searching /proc, and its
death shows in poll().  It runs in its own session, so a Ctrl-C on the terminal reaches us, not
it, and we unmount in order.  Its probes (open fds, RSS) read /proc, never the mount.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.mounting import (
    FUSE_UNMOUNTS,
    fstype_at,
    log_text,
    overlay_options,
    run,
    spawn,
    status_kib,
    unmount,
    wait_mounted,
)
from overlayfuse.linux.mounttable import read_mounts

from .errors import StressError, say
from .settings import COMMAND_TIMEOUT, DAEMON_EXIT_TIMEOUT, FUSE_FSTYPE, MOUNT_TIMEOUT, UNMOUNT_TIMEOUT


@dataclass(slots=True)
class Daemon:
    proc: subprocess.Popen[bytes]
    mnt: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def open_fds(self) -> int | None:
        if not self.alive():  # a zombie lists no fds: not the same as none open
            return None
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None

    def fd_targets(self) -> dict[int, str]:
        """What each open fd points at (its /proc link), for naming what a leak holds."""
        found: dict[int, str] = {}
        with contextlib.suppress(OSError):
            for name in os.listdir(f"/proc/{self.pid}/fd"):
                with contextlib.suppress(OSError):
                    found[int(name)] = os.readlink(f"/proc/{self.pid}/fd/{name}")
        return found

    def rss_kib(self, key: str = "VmRSS") -> int | None:
        return status_kib(self.pid, key) if self.alive() else None

    def abort(self) -> None:
        """Free the processes stuck in requests that the daemon has read but never answers
        (SIGKILL cannot): abort the FUSE connection through fusectl when it is mounted, else
        SIGKILL the daemon, whose closing /dev/fuse fails every waiting request."""
        found = [m.dev for m in read_mounts() if m.mountpoint == str(self.mnt)]
        if found:
            abort = Path(f"/sys/fs/fuse/connections/{found[-1].split(':')[1]}/abort")
            with contextlib.suppress(OSError):
                abort.write_text("1\n")
                return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def log_text(self) -> str:
        return log_text(self.log)


def start(binary: Path, lowers: Sequence[Path], upper: Path, work: Path, mnt: Path,
          log: Path) -> Daemon:
    """Mount and wait until the mount answers a stat; a daemon that never does is killed."""
    cmd = [str(binary), "-f", "-o", overlay_options(lowers, upper, work), str(mnt)]
    daemon = Daemon(spawn(cmd, log), mnt, log)
    problem = wait_mounted(mnt, FUSE_FSTYPE, daemon.proc, MOUNT_TIMEOUT, foreground=True, poll=0.05)
    if problem is not None:
        stop(daemon)
        raise StressError(f"mount failed: {shlex.join(cmd)}: {problem}: {daemon.log_text()[-400:].strip()}")
    return daemon


def stop(daemon: Daemon) -> None:
    """Unmount (clean, then lazy), let the daemon exit, SIGKILL it if it will not."""
    unmount(daemon.mnt, FUSE_UNMOUNTS, UNMOUNT_TIMEOUT)
    try:
        daemon.proc.wait(timeout=DAEMON_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        say(f"warning: daemon {daemon.pid} ignored the unmount: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(timeout=DAEMON_EXIT_TIMEOUT)
    if fstype_at(daemon.mnt) is not None:
        raise StressError(f"{daemon.mnt} is still mounted after a lazy unmount")


def forget_all(timeout: float = COMMAND_TIMEOUT) -> None:
    """Drop the kernel's unused dentries and inodes (all filesystems), so it sends FORGET for
    every inode no one holds and the daemon may close what it kept for them."""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], timeout)
