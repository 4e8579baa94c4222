"""Running the workers against a mounted daemon, sampling the daemon while they run.

The parent only forks, waits on pipes and reads /proc: it never touches the mount, so a daemon
that hangs a worker cannot hang the run.  A worker that has not reported HANG_GRACE seconds
after the deadline is reported as hung and SIGKILLed.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import cast

from .daemon import Daemon, forget_all
from .errors import say
from .settings import FD_SETTLE_TIMEOUT, FD_SLACK, HANG_GRACE, KINDS, SAMPLE_INTERVAL
from .tally import Tally
from .workers import run_worker

FORGET_EVERY = 5.0  # while the fd count settles, drop the kernel's caches again this often
WORKER_EXIT_TIMEOUT = 5.0  # for all workers together to die of SIGKILL, before aborting


@dataclass(slots=True)
class Probe:
    """The daemon's open fds and RSS (KiB) at some moment; None once it is gone."""

    fds: int | None
    rss_kib: int | None


@dataclass(slots=True)
class RunResult:
    tallies: dict[str, Tally] = field(default_factory=dict)
    hung: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    daemon_died_after: float | None = None  # seconds into the run
    aborted: bool = False  # we aborted the connection (or killed the daemon) to free workers
    start: Probe = field(default_factory=lambda: Probe(None, None))
    peak: Probe = field(default_factory=lambda: Probe(None, None))
    workers_done: Probe = field(default_factory=lambda: Probe(None, None))
    end: Probe = field(default_factory=lambda: Probe(None, None))
    seconds_run: float = 0.0
    grown: list[str] = field(default_factory=list)
    """What the fds open at the end and not at the start point at (when there are more)."""


def probe(daemon: Daemon | None) -> Probe:
    if daemon is None:  # kernel overlayfs: nothing to probe
        return Probe(None, None)
    return Probe(daemon.open_fds(), daemon.rss_kib())


def _raise_peak(peak: Probe, now: Probe) -> None:
    if now.fds is not None and (peak.fds is None or now.fds > peak.fds):
        peak.fds = now.fds
    if now.rss_kib is not None and (peak.rss_kib is None or now.rss_kib > peak.rss_kib):
        peak.rss_kib = now.rss_kib


def settled_probe(daemon: Daemon | None, baseline: int | None) -> Probe:
    """The daemon's fds once the kernel has forgotten every unused inode: drop the caches, then
    wait (up to FD_SETTLE_TIMEOUT) for the count to reach the baseline plus slack."""
    if daemon is None:
        return Probe(None, None)
    deadline = time.monotonic() + FD_SETTLE_TIMEOUT
    next_forget = 0.0
    while True:
        if time.monotonic() >= next_forget:
            forget_all()
            next_forget = time.monotonic() + FORGET_EVERY
            time.sleep(0.2)
        now = probe(daemon)
        if (now.fds is None or baseline is None or now.fds <= baseline + FD_SLACK
                or time.monotonic() > deadline):
            return now
        time.sleep(0.25)


def _stop_workers(procs: list[BaseProcess], daemon: Daemon | None) -> bool:
    """SIGKILL every worker still there and reap it.  A worker in a FUSE request the daemon has
    read cannot die until it is answered: then the connection is aborted, which fails them all."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    deadline = time.monotonic() + WORKER_EXIT_TIMEOUT
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [proc for proc in procs if proc.is_alive()]
    if stuck and daemon is not None:
        say(f"{len(stuck)} worker(s) stuck in the daemon after SIGKILL: aborting its connection")
        daemon.abort()
        for proc in stuck:
            proc.join(timeout=WORKER_EXIT_TIMEOUT)
    for proc in procs:
        if proc.is_alive():
            say(f"warning: worker {proc.name} (pid {proc.pid}) survived SIGKILL")
    return bool(stuck)


def run(mnt: Path, daemon: Daemon | None, seconds: float, seed: int,
        per_kind: int) -> RunResult:
    """Run the workers on `mnt`; `daemon` is None for kernel overlayfs."""
    out = RunResult()
    out.start = settled_probe(daemon, None)
    at_start = daemon.fd_targets() if daemon is not None else {}
    out.peak = Probe(out.start.fds, out.start.rss_kib)
    ctx = multiprocessing.get_context("fork")
    workers: dict[Connection, tuple[str, BaseProcess]] = {}
    out.tallies = {kind: Tally() for kind in KINDS}
    started = time.monotonic()
    try:
        for kind in KINDS:
            for index in range(per_kind):
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=run_worker, name=f"{kind}#{index}",
                                   args=(kind, index, str(mnt), seconds, seed, send),
                                   daemon=True)
                workers[receive] = (f"{kind}#{index}", proc)
                proc.start()
                send.close()
        give_up = time.monotonic() + seconds + HANG_GRACE
        pending = dict(workers)
        while pending and time.monotonic() < give_up:
            for ready in wait(list(pending), timeout=SAMPLE_INTERVAL):
                conn = cast(Connection, ready)
                name, _ = pending.pop(conn)
                try:
                    result = conn.recv()
                except (EOFError, OSError):
                    out.crashed.append(f"{name}: exited without a report")
                    continue
                if "crash" in result:
                    out.crashed.append(f"{name}: {result['crash']}")
                out.tallies[result["kind"]].merge(result["tally"])
            _raise_peak(out.peak, probe(daemon))
            if daemon is not None and out.daemon_died_after is None and not daemon.alive():
                out.daemon_died_after = round(time.monotonic() - started, 1)
        out.hung = sorted(name for name, _ in pending.values())
    finally:
        out.aborted = _stop_workers([p for _, p in workers.values() if p.pid is not None],
                                    daemon)
        for conn in workers:
            conn.close()
    out.seconds_run = round(time.monotonic() - started, 1)
    if (daemon is not None and out.daemon_died_after is None and not out.aborted
            and not daemon.alive()):
        out.daemon_died_after = out.seconds_run
    out.workers_done = probe(daemon)
    _raise_peak(out.peak, out.workers_done)
    # After a hang the workers never closed their fds, and after an abort the daemon is done:
    # there is nothing to settle.
    out.end = (out.workers_done if out.hung or out.aborted
               else settled_probe(daemon, out.start.fds))
    if daemon is not None and out.end.fds is not None and out.start.fds is not None \
            and out.end.fds > out.start.fds:
        out.grown = sorted(target for fd, target in daemon.fd_targets().items()
                           if at_start.get(fd) != target)
    return out
