"""Worker threads for blocking calls: one pool per mount, shared by the merged tree and the handlers.

The trio thread must never wait on the disk, so copy-ups, listings, opens that miss the cache,
reads, writes and fsyncs run in worker threads. One limiter per mount bounds how many run at once,
whoever asks (the tree or the FUSE handlers): enough to keep a disk queue busy and let several
readers progress, few enough to bound memory (each holds at most one read's buffer).

Each trip to a thread and back (a "hop") costs far more than the syscall it usually carries, so a
request should make at most one: the blocking steps of one request are one function, run once.
`HopStats` (``OVERLAYFUSE_HOP_STATS=FILE``) counts hops per request type and times them against
the work they carry, to show where a request makes more than one and what each costs.
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import outcome
import trio

log = logging.getLogger(__name__)

#: Worker threads of one mount: enough to keep a disk queue busy and let several readers progress
#: at once, few enough to bound memory (each holds at most one read).
IO_THREADS = 16

#: A file to write the hop table to when the daemon stops (a debugging aid; off by default, and
#: then it costs one ``is None`` test per hop and per request).
HOP_STATS_ENV = "OVERLAYFUSE_HOP_STATS"

T = TypeVar("T")

#: The request the current trio task is serving (set by the FUSE boundary when hops are counted).
current_request: contextvars.ContextVar[str] = contextvars.ContextVar("overlayfuse_request", default="(none)")


@dataclass(slots=True)
class HopTimes:
    """The hops of one kind (request type and function): how many, and their time in nanoseconds."""

    hops: int = 0
    wall_ns: int = 0
    """From the task's handing off to its resuming on the event loop."""
    work_ns: int = 0
    """The function itself, in the worker thread: the rest of ``wall_ns`` is the hop's cost."""


@dataclass(slots=True)
class HopStats:
    """Hops per request type, for finding requests that make more than one (see the module doc)."""

    path: str
    requests: Counter[str] = field(default_factory=Counter)
    hops: dict[tuple[str, str], HopTimes] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> HopStats | None:
        path = os.environ.get(HOP_STATS_ENV, "")
        return cls(path) if path else None

    def request(self, name: str) -> None:
        """A request NAME starts in the current task: its hops are counted under NAME."""
        self.requests[name] += 1
        current_request.set(name)

    def hop(self, func: Callable[..., Any], wall_ns: int, work_ns: int) -> None:
        key = (current_request.get(), getattr(func, "__qualname__", repr(func)))
        times = self.hops.get(key)
        if times is None:
            times = self.hops[key] = HopTimes()
        times.hops += 1
        times.wall_ns += wall_ns
        times.work_ns += work_ns

    def table(self) -> str:
        """One line per (request, function): requests, hops per request, µs per hop and per work."""
        lines = [f"{'request':<12} {'function':<40} {'requests':>8} {'hops':>8} {'hops/req':>8} "
                 f"{'µs/hop':>8} {'µs work':>8}"]
        by_request: Counter[str] = Counter()
        for (request, func), times in sorted(self.hops.items()):
            by_request[request] += times.hops
            n = self.requests.get(request, 0)
            lines.append(
                f"{request:<12} {func[-40:]:<40} {n:>8} {times.hops:>8} {times.hops / max(n, 1):>8.2f} "
                f"{times.wall_ns / times.hops / 1000:>8.1f} {times.work_ns / times.hops / 1000:>8.1f}"
            )
        lines.append("")
        lines.append(f"{'request':<12} {'requests':>8} {'hops':>8} {'hops/req':>8}")
        for request, n in self.requests.most_common():
            lines.append(f"{request:<12} {n:>8} {by_request[request]:>8} {by_request[request] / n:>8.2f}")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        try:
            with open(self.path, "w", encoding="utf-8") as out:
                out.write(self.table())
        except OSError as exc:
            log.warning("%s=%s: cannot write the hop table: %s", HOP_STATS_ENV, self.path, exc)


class Workers:
    """The worker threads of one mount: at most THREADS, started as work arrives, each ending
    after IDLE_SECONDS without any, except STANDBY threads started at once and kept for good.

    A mount keeps one on standby: starting a thread costs its first request a clone and a wait for
    the thread to run (~0.1-0.3 ms here), which the first copy-up of every fresh mount (a container
    start, `chown -R` in a build step) and the first after each idle spell would otherwise pay.

    Not `trio.to_thread.run_sync`: a hop through it spends about 100 µs of the event loop's own
    time under load (a limiter, a thread cache, a context copy, several checkpoints), and the loop
    is what every request waits for. Here the loop's part is a queue put and a reschedule
    (`scripts/bench` and the hop table in the README measure the difference). The semantics are
    trio's with ``abandon_on_cancel=False``: a call that started finishes, and its task waits for it
    even when cancelled.
    """

    __slots__ = ("_guard", "_idle", "_jobs", "_queued", "_standby", "_threads", "max_threads", "stats")

    def __init__(self, threads: int = IO_THREADS, stats: HopStats | None = None, standby: int = 0) -> None:
        self.max_threads = threads
        self.stats = stats
        self._standby = min(standby, threads)
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._guard = threading.Lock()  # the three counts below; held for a few instructions only
        self._queued = 0  # jobs put and not yet taken
        self._idle = 0  # threads waiting for a job
        self._threads = 0
        for _ in range(self._standby):
            self._threads += 1
            threading.Thread(target=self._serve, name="overlayfuse-worker", daemon=True).start()

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """FUNC(*ARGS) in a worker thread; the calling task waits, the event loop does not."""
        if self.stats is not None:
            return await self._counted(func, args)
        return await self._hop(func, args)

    async def _hop(self, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._jobs.put((func, args, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token()))
        with self._guard:
            self._queued += 1
            start = self._queued > self._idle and self._threads < self.max_threads
            if start:
                self._threads += 1
        if start:
            # Starting a thread waits for it to run (tens of µs, no disk): only while the pool grows.
            threading.Thread(target=self._serve, name="overlayfuse-worker", daemon=True).start()
        result: T = await trio.lowlevel.wait_task_rescheduled(_not_abortable)
        return result

    def _serve(self) -> None:
        """A worker thread: run jobs until none came for IDLE_SECONDS and no queued one is left
        without an idle thread to take it."""
        with self._guard:
            self._idle += 1
        while True:
            try:
                func, args, task, token = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._guard:
                    if self._queued < self._idle and self._threads > self._standby:
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            with self._guard:
                self._queued -= 1
                self._idle -= 1
            result = outcome.capture(func, *args)
            del func, args  # a write's buffer is not kept alive by an idle thread
            with self._guard:
                self._idle += 1
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the loop ended under a waiting task: nobody to answer
                log.warning("a worker thread finished after its event loop: result dropped")
            del task, result

    async def _counted(self, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        work = [0]

        def timed() -> T:
            start = time.perf_counter_ns()
            try:
                return func(*args)
            finally:
                work[0] = time.perf_counter_ns() - start

        start = time.perf_counter_ns()
        try:
            return await self._hop(timed, ())
        finally:
            assert self.stats is not None
            self.stats.hop(func, time.perf_counter_ns() - start, work[0])


#: A job for a worker thread: the call, and the task to reschedule with its outcome.
_Job = tuple[Callable[..., Any], tuple[Any, ...], trio.lowlevel.Task, trio.lowlevel.TrioToken]

#: A worker thread with nothing to do for this long ends (as trio's thread cache does).
IDLE_SECONDS = 10.0


def _not_abortable(_raise_cancel: Any) -> trio.lowlevel.Abort:
    """A blocking call cannot be stopped halfway: a cancelled task waits for it to finish."""
    return trio.lowlevel.Abort.FAILED


__all__ = ["HOP_STATS_ENV", "IDLE_SECONDS", "IO_THREADS", "HopStats", "Workers", "current_request"]
