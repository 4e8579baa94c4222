"""Mounting the three targets on fresh upper/work dirs, finding their daemons, tearing down."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from overlayfuse.linux.mounttable import command_line, process_alive, read_mounts

from .errors import BenchError, say
from .forkserver import environment
from .mounting import (
    FUSE_UNMOUNTS,
    KERNEL_UNMOUNTS,
    fstype_at,
    log_text,
    overlay_options,
    spawn,
    status_kib,
    unmount,
    wait_mounted,
)
from .processes import run
from .settings import (
    DAEMON_EXIT_TIMEOUT,
    FIRST_READ,
    FIRST_READ_POLL,
    FSTYPES,
    MOUNT_TIMEOUT,
    SYNC_TIMEOUT,
    UNMOUNT_TIMEOUT,
    VENV_BIN,
)


def mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    return [m.mountpoint for m in read_mounts() if m.mountpoint.startswith(prefix) or m.mountpoint == str(root)]


def daemon_pid(target: str, mnt: Path) -> int | None:
    """The FUSE daemon serving `mnt`: its command line names `mnt` as a whole argument."""
    name = "overlayfuse" if target == "overlayfuse" else "fuse-overlayfs"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        argv = command_line(int(entry))
        if argv is not None and str(mnt) in argv and any(os.path.basename(a) == name for a in argv[:3]):
            return int(entry)
    return None


@dataclass(slots=True)
class Mount:
    target: str
    mnt: Path
    upper: Path
    work: Path
    log: Path
    pid: int | None = None
    mount_s: float = 0.0
    first_read_s: float | None = None  # from starting the mount command to a file read through it

    def log_text(self) -> str:
        return log_text(self.log)

    def rss_kib(self) -> int | None:
        return status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int | None:
        return status_kib(self.pid, "VmHWM")


def target_options(target: str, base: str, kernel_opts: str = "", overlayfuse_opts: str = "") -> str:
    """The -o string for TARGET: BASE (the layers), plus KERNEL_OPTS for the kernel and
    OVERLAYFUSE_OPTS for overlayfuse (with or without its fork server); fuse-overlayfs takes neither
    (it has no redirect_dir or metacopy, and never syncs a copy-up)."""
    extra = kernel_opts if target == "kernel" else "" if target == "fuse-overlayfs" else overlayfuse_opts
    return f"{base},{extra}" if extra else base


class Mounter:
    """Mounts targets on fresh upper/work dirs and tears them down, whatever happens."""

    def __init__(self, root: Path, lowers: Sequence[Path], fork_socket: str | None = None,
                 overlayfuse_options: str = "") -> None:
        self.root = root
        self.fork_socket = fork_socket  # the overlayfuse-fs target's server (benchmarks/forkserver.py)
        self.lowers = list(lowers)
        self.overlayfuse_options = overlayfuse_options
        """Extra -o options for overlayfuse alone (``--overlayfuse-options``)."""
        self.live: list[Mount] = []
        self.serial = 0
        self.tracebacks: list[str] = []

    def command(self, target: str, opts: str, mnt: Path) -> list[str]:
        if target == "kernel":
            return ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)]
        if target == "fuse-overlayfs":
            return ["fuse-overlayfs", "-o", opts, str(mnt)]
        extra = f",{self.overlayfuse_options}" if self.overlayfuse_options else ""
        return [str(VENV_BIN / "overlayfuse"), "-o", opts + extra, str(mnt)]

    @contextlib.contextmanager
    def mounted(self, target: str, first_read: bool = False, kernel_opts: str = "",
                lowers: Sequence[Path] | None = None, overlayfuse_opts: str = "") -> Iterator[Mount]:
        """TARGET mounted on fresh upper and work dirs; with FIRST_READ, time how long it takes from
        starting the mount command until a file reads through the mount (``m.first_read_s``).
        KERNEL_OPTS, OVERLAYFUSE_OPTS: more options for the kernel's mount, for overlayfuse's (see
        `target_options`). LOWERS: other lower layers than the bench stack's (top first)."""
        self.serial += 1
        base = self.root / f"{self.serial:04d}-{target}"
        m = Mount(target, base / "mnt", base / "upper", base / "work", base / "daemon.log")
        for d in (m.mnt, m.upper, m.work):
            d.mkdir(parents=True)
        opts = target_options(target, overlay_options(self.lowers if lowers is None else lowers, m.upper, m.work),
                              kernel_opts, overlayfuse_opts)
        self.live.append(m)
        try:
            start = time.perf_counter()
            self._mount(m, opts, first_read)
            m.mount_s = time.perf_counter() - start
            if target != "kernel":  # a fork server's daemon has the server's command line: not found
                m.pid = daemon_pid(target, m.mnt)
            yield m
        finally:
            self.unmount(m)
            if "Traceback" in m.log_text():
                self.tracebacks.append(f"{target}: {m.log_text()[-2000:]}")
                say(f"warning: the {target} daemon logged a traceback:\n{m.log_text()[-2000:]}")
            run(["rm", "-rf", "--one-file-system", str(base)], SYNC_TIMEOUT, check=False)

    def _mount(self, m: Mount, opts: str, first_read: bool = False) -> None:
        cmd = self.command(m.target, opts, m.mnt)
        start_ns = time.monotonic_ns()
        proc = spawn(cmd, m.log, env=environment(m.target, self.fork_socket))
        try:
            if first_read:
                read_ns = wait_first_read(m.mnt / FIRST_READ, proc)
                m.first_read_s = None if read_ns is None else (read_ns - start_ns) / 1e9
            proc.wait(timeout=MOUNT_TIMEOUT)
        except (subprocess.TimeoutExpired, BenchError) as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, BenchError):
                raise
        problem = wait_mounted(m.mnt, FSTYPES[m.target], proc, MOUNT_TIMEOUT, foreground=False, poll=0.02)
        if problem is not None:
            raise BenchError(f"mount failed: {shlex.join(cmd)}: {problem} ({m.log_text()[-300:].strip()})")

    def unmount(self, m: Mount) -> None:
        unmount(m.mnt, KERNEL_UNMOUNTS if m.target == "kernel" else FUSE_UNMOUNTS, UNMOUNT_TIMEOUT)
        if m.pid is not None:
            deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
            while process_alive(m.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if process_alive(m.pid):
                say(f"warning: {m.target} daemon {m.pid} ignored the unmount: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(m.pid, signal.SIGKILL)
        if m in self.live:
            self.live.remove(m)
        if fstype_at(m.mnt) is not None:
            raise BenchError(f"{m.mnt} is still mounted after a lazy unmount")

    def unmount_all(self) -> None:
        for m in reversed(list(self.live)):
            with contextlib.suppress(BenchError):
                self.unmount(m)


def wait_first_read(path: Path, proc: subprocess.Popen[bytes]) -> int | None:
    """CLOCK_MONOTONIC ns when PATH (under an empty mountpoint, so only the mount can show it) first
    reads; polled without waiting for PROC, the mount command, to exit. None if PROC failed first
    (the caller reports that). O_NOFOLLOW: the probe never follows a symlink out of the tree."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if proc.poll() not in (None, 0):
                return None
            time.sleep(FIRST_READ_POLL)
            continue
        try:
            if os.read(fd, 4096):
                return time.monotonic_ns()
        finally:
            os.close(fd)
        raise BenchError(f"{path} read empty through the mount")
    raise BenchError(f"{path} did not appear through the mount within {MOUNT_TIMEOUT:.0f} s")


def remove_tree(path: Path) -> None:
    """rm -rf that refuses a tree with mounts under it (and never crosses into another fs)."""
    if path.exists() or path.is_symlink():
        if mounts_under(path):
            raise BenchError(f"{path} has mounts under it; not removing it")
        run(["rm", "-rf", "--one-file-system", str(path)], SYNC_TIMEOUT)
