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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from overlayfuse.linux.mounttable import read_mounts

from .errors import StressError, say
from .settings import COMMAND_TIMEOUT, DAEMON_EXIT_TIMEOUT, FUSE_FSTYPE, MOUNT_TIMEOUT, UNMOUNT_TIMEOUT


def run(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    """Run a command that may touch the mount: in its own session, killed as a whole on timeout."""
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def fstype_at(mnt: Path) -> str | None:
    found = [m.fstype for m in read_mounts() if m.mountpoint == str(mnt)]
    return found[-1] if found else None


def _escape(path: Path) -> str:
    return str(path).replace(":", r"\:").replace(",", r"\,")


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

    def rss_kib(self, key: str = "VmRSS") -> int | None:
        if not self.alive():
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

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
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""


def start(binary: Path, lowers: Sequence[Path], upper: Path, work: Path, mnt: Path,
          log: Path) -> Daemon:
    """Mount and wait until the mount answers a stat; a daemon that never does is killed."""
    opts = (f"lowerdir={':'.join(_escape(p) for p in lowers)},upperdir={_escape(upper)},"
            f"workdir={_escape(work)}")
    cmd = [str(binary), "-f", "-o", opts, str(mnt)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    daemon = Daemon(proc, mnt, log)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while fstype_at(mnt) != FUSE_FSTYPE:
        if not daemon.alive() or time.monotonic() > deadline:
            stop(daemon)
            raise StressError(f"mount failed: {shlex.join(cmd)} (exit {proc.poll()}): "
                              f"{daemon.log_text()[-400:].strip()}")
        time.sleep(0.05)
    try:
        answer = run(["stat", "-c", "%i", str(mnt)], MOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        answer = None
    if answer is None or answer.returncode != 0:
        stop(daemon)
        raise StressError(f"{mnt} is mounted but does not answer a stat")
    return daemon


def stop(daemon: Daemon) -> None:
    """Unmount (clean, then lazy), let the daemon exit, SIGKILL it if it will not."""
    for cmd in (["fusermount3", "-u", str(daemon.mnt)], ["fusermount3", "-u", "-z", str(daemon.mnt)],
                ["umount", "-l", str(daemon.mnt)]):
        if fstype_at(daemon.mnt) is None:
            break
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            run(cmd, UNMOUNT_TIMEOUT)
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
