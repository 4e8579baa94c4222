"""Mounting a layer stack by command and taking it down again: the part the bench and the stress
tool (scripts/stresstest) share.

Both start a mount command (kernel `mount -t overlay`, fuse-overlayfs, overlayfuse detached or in
the foreground) in its own session with its output in a log file, wait until mountinfo shows the
mount and it answers a `stat`, and unmount clean first, then lazily. Every command that may touch
the mount runs in its own session and is killed as a whole on timeout, so a hung mount costs a
timeout, not the run.

It lives in benchmarks/ because that is the importable, type-checked package at the top of the
repository (scripts/bench runs it with the repository on PYTHONPATH, and scripts/stress adds the
repository too); scripts/ is no package, and putting it on the bench's path would hand its walk
child every script there. It imports nothing else from benchmarks/, so the stress tool loads no
part of the bench. Errors stay the callers' own (BenchError, StressError): these functions say
what went wrong and the caller raises.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from overlayfuse.linux.mounttable import read_mounts

#: Clean first; then lazy, which detaches the mount even while something holds it (the daemon
#: then exits when the last user lets go).
FUSE_UNMOUNTS: tuple[tuple[str, ...], ...] = (("fusermount3", "-u"), ("fusermount3", "-u", "-z"), ("umount", "-l"))
KERNEL_UNMOUNTS: tuple[tuple[str, ...], ...] = (("umount",), ("umount", "-l"))


def run(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    """Run a command that may touch the mount: in its own session, killed as a whole on timeout
    (then TimeoutExpired is raised); no check of the exit status."""
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
    """The type of the topmost mount at MNT, None when nothing is mounted there."""
    found = [m.fstype for m in read_mounts() if m.mountpoint == str(mnt)]
    return found[-1] if found else None


def overlay_options(lowers: Sequence[Path], upper: Path, work: Path) -> str:
    """`lowerdir=A:B,upperdir=U,workdir=W`, leftmost lower on top, `:` and `,` in paths escaped the
    way the kernel, fuse-overlayfs and overlayfuse all read them."""
    def escape(path: Path) -> str:
        return str(path).replace(":", r"\:").replace(",", r"\,")

    return f"lowerdir={':'.join(escape(p) for p in lowers)},upperdir={escape(upper)},workdir={escape(work)}"


def spawn(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start CMD in its own session (a Ctrl-C on the terminal reaches us, not it, so we unmount in
    order; killing its group kills all of it), its output going to LOG: a detached daemon may keep
    stderr open, and a pipe would then never reach EOF. ENV: more environment for it."""
    with open(log, "wb") as out:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env=None if env is None else os.environ | env)


def wait_mounted(mnt: Path, fstype: str, proc: subprocess.Popen[bytes], timeout: float, *,
                 foreground: bool, poll: float) -> str | None:
    """Wait until MNT is mounted as FSTYPE and answers a `stat`; None then, else what went wrong.

    PROC is the mount command: in the FOREGROUND it is the daemon itself, whose exit is a
    failure; detached, it exits 0 once the daemon serves the mount, and any other exit is one.
    """
    deadline = time.monotonic() + timeout
    while (found := fstype_at(mnt)) != fstype:
        ended = proc.poll()
        if ended is not None and (foreground or ended != 0):
            return f"exited {ended}; mount type {found}"
        if time.monotonic() > deadline:
            return f"not mounted as {fstype} within {timeout:.0f} s; mount type {found}"
        time.sleep(poll)
    try:
        answer = run(["stat", "-c", "%i", str(mnt)], timeout)
    except subprocess.TimeoutExpired:
        return f"{mnt} is mounted but does not answer a stat within {timeout:.0f} s"
    if answer.returncode != 0:
        return f"{mnt} is mounted but its stat failed: {answer.stderr.decode(errors='replace').strip()}"
    return None


def unmount(mnt: Path, commands: Sequence[Sequence[str]], timeout: float) -> bool:
    """Try COMMANDS (each given MNT) in turn until nothing is mounted at MNT; whether that is so.
    Each command is bounded by TIMEOUT; one that fails or hangs is passed over for the next."""
    for cmd in commands:
        if fstype_at(mnt) is None:
            break
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            run([*cmd, str(mnt)], timeout)
    return fstype_at(mnt) is None


def status_kib(pid: int | None, key: str) -> int | None:
    """A size field (VmRSS, VmHWM) of /proc/PID/status in KiB; None when there is no such process."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def log_text(log: Path) -> str:
    """What a daemon wrote to LOG so far ("" when there is no log)."""
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")
    return ""
