"""``scripts/bench --startup-steps``: where a mount's start goes, step by step, from exec to the
first answered read (root: it mounts).

Each run starts ``overlayfuse`` (detached, as podman and mount(8) start it) on a small two-layer
stack with ``OVERLAYFUSE_STARTUP_TRACE`` set (see `overlayfuse.daemon.timeline`), polls a file
under the mountpoint as the ``mount-to-first-read`` row does, then unmounts and waits for the
daemon to exit and flush its marks. Every mark is ``CLOCK_MONOTONIC``, the clock this process read
just before the exec, so each step is reported as milliseconds since the exec: the median over the
runs, and the median gap from the step before. The load average is printed with the table:
every Python start is slower on a loaded 2-core VM.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from .errors import BenchError
from .mounting import FUSE_UNMOUNTS, overlay_options, spawn, unmount
from .mounts import wait_first_read
from .settings import MOUNT_TIMEOUT, UNMOUNT_TIMEOUT, VENV_BIN

#: After the unmount, the daemon exits within milliseconds; this only bounds a hang.
DAEMON_EXIT_TIMEOUT = 15.0
TRACE_ENV = "OVERLAYFUSE_STARTUP_TRACE"
FIRST_READ_PATH = "d/f"

#: Steps the harness itself notes (not the daemon).
EXEC = "exec (harness: before spawning overlayfuse)"
READ_DONE = "first read answered (harness)"
COMMAND_DONE = "mount command exited (harness: a thread waiting on it)"


def _stack(root: Path) -> tuple[list[Path], Path, Path, Path]:
    """Two lower layers (the file to read in the top one), an upper, a work dir and a mountpoint."""
    top, bottom, upper, work, mnt = (root / n for n in ("l1", "l2", "upper", "work", "mnt"))
    for d in (top / "d", bottom / "d", upper, work, mnt):
        d.mkdir(parents=True)
    (top / FIRST_READ_PATH).write_bytes(b"x" * 4096)
    (bottom / "d" / "g").write_bytes(b"y")
    return [top, bottom], upper, work, mnt


def _wait_exit(pid: int) -> None:
    deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise BenchError(f"overlayfuse daemon {pid} did not exit within {DAEMON_EXIT_TIMEOUT:.0f} s of the unmount")


def one_run(root: Path, n: int) -> dict[str, float]:
    """One mount: {step: ms since exec}."""
    base = root / f"run{n}"
    lowers, upper, work, mnt = _stack(base)
    trace = base / "trace"
    cmd = [str(VENV_BIN / "overlayfuse"), "-o", overlay_options(lowers, upper, work), str(mnt)]
    os.environ[TRACE_ENV] = str(trace)
    try:
        start = time.monotonic_ns()
        proc = spawn(cmd, base / "log")
    finally:
        del os.environ[TRACE_ENV]
    exited: list[int] = []

    def wait_exit() -> None:  # on a thread: the exit is timed while the main thread polls the read
        proc.wait()
        exited.append(time.monotonic_ns())

    waiter = threading.Thread(target=wait_exit, daemon=True)
    waiter.start()
    try:
        read_ns = wait_first_read(mnt / FIRST_READ_PATH, proc)
        if read_ns is None:
            raise BenchError(f"overlayfuse exited {proc.returncode} before {mnt / FIRST_READ_PATH} read")
        waiter.join(timeout=MOUNT_TIMEOUT)
        if not exited:
            raise BenchError(f"overlayfuse did not exit within {MOUNT_TIMEOUT:.0f} s of its mount answering")
        if proc.returncode != 0:
            raise BenchError(f"overlayfuse exited {proc.returncode}: {(base / 'log').read_text()[-300:]}")
    finally:
        unmounted = unmount(mnt, FUSE_UNMOUNTS, UNMOUNT_TIMEOUT)
    if not unmounted:
        raise BenchError(f"{mnt} is still mounted")
    steps: dict[str, float] = {EXEC: 0.0}
    daemon_pid = None
    for line in trace.read_text().splitlines():
        ns, pid, step = line.split(" ", 2)
        if step == "forked: daemon process running":
            daemon_pid = int(pid)
        steps.setdefault(step, (int(ns) - start) / 1e6)
    if daemon_pid is not None:
        _wait_exit(daemon_pid)
    steps[READ_DONE] = (read_ns - start) / 1e6
    steps[COMMAND_DONE] = (exited[0] - start) / 1e6
    return steps


def _rank(runs: list[dict[str, float]], step: str) -> float:
    """STEP's median position among the steps of each run that reached it: the order steps come
    in, robust to the few runs where two close steps swap (a median of times is not)."""
    return statistics.median(sorted(r, key=r.__getitem__).index(step) for r in runs if step in r)


def render(runs: list[dict[str, float]]) -> str:
    """The table: each step (in the order they usually come) with its median ms since exec and
    the median of its gap from the step before it within each run."""
    names = sorted({s for r in runs for s in r},
                   key=lambda s: (_rank(runs, s), statistics.median(r[s] for r in runs if s in r)))
    lines = ["  since exec   step   step (median ms over the runs that reached it)"]
    before = None
    for name in names:
        at = statistics.median(r[name] for r in runs if name in r)
        gaps = [r[name] - r[before] for r in runs if name in r and before in r] if before else [at]
        lines.append(f"  {at:9.1f} {statistics.median(gaps):7.1f}   {name}")
        before = name
    return "\n".join(lines)


def main(runs: int) -> int:
    if os.geteuid() != 0:
        raise BenchError("--startup-steps mounts: needs root")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="overlayfuse-steps-") as tmp:
        one_run(Path(tmp), 0)  # warms the page cache and the bytecode; not counted
        results = [one_run(Path(tmp), n) for n in range(1, runs + 1)]
    print(f"overlayfuse start-up, step by step: median of {runs} runs "
          f"(load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at the end)")
    print(render(results))
    return 0
