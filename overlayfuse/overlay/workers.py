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
from typing import Any, Protocol, TypeVar, cast

import outcome
import trio

log = logging.getLogger(__name__)

#: Worker threads of one mount: enough to keep a disk queue busy and let several readers progress
#: at once, few enough to bound memory (each holds at most one read).
IO_THREADS = 16

#: A file to write the hop table to when the daemon stops (a debugging aid; off by default, and
#: then it costs one ``is None`` test per hop and per request).
HOP_STATS_ENV = "OVERLAYFUSE_HOP_STATS"

#: How long, in µs, the event loop spins for the result of a job it handed to a waiting worker
#: (`HandoffTimes`); ``OVERLAYFUSE_HOP_SPIN_US`` overrides it, 0 turns the handoff off.
DEFAULT_SPIN_US = 100

#: The same where the loop's wait also ends when a request waits (pyfuse3 patch 0009): then a
#: long window holds no request back, and covers a create's or a small copy-up's work.
DEFAULT_WATCHED_SPIN_US = 1000

#: How long, in µs, a worker that finished a job waits on the handoff for the next
#: (``OVERLAYFUSE_HOP_WAIT_US`` overrides it).
DEFAULT_WAIT_US = 500

SPIN_ENV = "OVERLAYFUSE_HOP_SPIN_US"
WAIT_ENV = "OVERLAYFUSE_HOP_WAIT_US"

#: The most either window may be: the loop runs nothing else while it spins, and a waiting worker
#: holds a CPU.
MAX_SPIN_US = 2000

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
    routes: Counter[str] = field(default_factory=Counter)
    """How hops went: ``handed`` (result taken while the loop spun), ``parked`` (handed, but the
    loop stopped spinning), ``queued`` (no worker was waiting, or no handoff)."""
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
        if self.routes:
            lines.append("")
            lines.append("hops " + ", ".join(f"{route} {n}" for route, n in self.routes.most_common()))
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        try:
            with open(self.path, "w", encoding="utf-8") as out:
                out.write(self.table())
        except OSError as exc:
            log.warning("%s=%s: cannot write the hop table: %s", HOP_STATS_ENV, self.path, exc)


@dataclass(frozen=True, slots=True)
class HandoffTimes:
    """The windows of the worker handoff (pyfuse3's `Handoff`, see `Workers`), in µs; 0: off.

    The defaults come from the measurements in docs/performance.md ("The worker handoff"): a
    write's syscalls take 13-27 µs, so the loop's window covers them with room; consecutive hops of
    a client writing files are tens of µs to a few hundred apart (a reply, the client, a GETXATTR),
    so the worker's window covers most of those gaps. A job that takes longer than the loop's window
    (a create's staging and rename) parks and costs what a hop cost before, plus the window.
    """

    spin_us: int
    wait_us: int
    watch: bool = False
    """The loop's wait also ends as soon as a request waits on the FUSE device (patch 0009)."""

    @classmethod
    def choose(cls, poll_us: int, *, watch: bool = False) -> HandoffTimes:
        """The windows from the environment, else the defaults; off when POLL_US is 0 (polling
        off, or one CPU only, where a spinning thread takes the CPU from the one it waits for).
        WATCH: the binding's handoff can watch for requests (a longer loop window by default)."""
        if poll_us <= 0:
            return cls(0, 0)
        spin = env_us(SPIN_ENV, DEFAULT_WATCHED_SPIN_US if watch else DEFAULT_SPIN_US, MAX_SPIN_US)
        return cls(spin, env_us(WAIT_ENV, DEFAULT_WAIT_US, MAX_SPIN_US), watch)

    @property
    def on(self) -> bool:
        return self.spin_us > 0 and self.wait_us > 0


def env_us(name: str, default: int, most: int) -> int:
    """A window in µs from the environment variable NAME (for benches' A/B runs), DEFAULT where it
    is unset or not a number, held within 0..MOST; shared with the request loop's polling window."""
    env = os.environ.get(name, "")
    try:
        value = int(env) if env else default
    except ValueError:
        log.warning("%s=%r is not a number of microseconds: using %d", name, env, default)
        value = default
    return max(0, min(value, most))


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

    __slots__ = ("_guard", "_handed_run", "_handoff", "_idle", "_in_flight", "_jobs", "_queued", "_spin_ns",
                 "_standby", "_threads", "_wait_ns", "_watch", "max_threads", "stats")

    def __init__(self, threads: int = IO_THREADS, stats: HopStats | None = None, standby: int = 0,
                 handoff: Handoff | None = None, times: HandoffTimes = HandoffTimes(0, 0)) -> None:
        """HANDOFF (pyfuse3's, patch 0006) with TIMES on: a worker that finished a job waits on
        HANDOFF up to ``TIMES.wait_us`` for the next, GIL released, and a job handed to it has the
        event loop spin up to ``TIMES.spin_us`` for its result (a worker polling the queue in Python
        instead was tried and lost: README, Performance)."""
        self.max_threads = threads
        self.stats = stats
        self._standby = min(standby, threads)
        self._spin_ns = times.spin_us * 1000
        self._watch = times.watch
        self._wait_ns = times.wait_us * 1000
        self._handoff = handoff if times.on else None
        self._in_flight = 0  # hops the event loop's tasks wait for (touched by the loop thread only)
        self._handed_run = 0  # handed hops since the last one that yielded (`HANDED_BURST`)
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

    def would_hand(self) -> bool:
        """Whether a hop made now could be handed to a waiting worker while the loop spins for its
        result (`_hand_or_queue`). A queued hop wakes a sleeping worker and then the loop, each a
        wake-up of an idle CPU on this kind of VM: worth it for work that must leave the loop, not
        for work a later request could do without a hop."""
        return self._handoff is not None and self._loop_idle_but(0)

    def _loop_idle_but(self, hops: int) -> bool:
        """The loop has nothing else to do but wait for HOPS hops (the caller's own, once counted):
        no other hop out, no task ready. Only then may it spin for a handed hop's result."""
        return self._in_flight == hops and trio.lowlevel.current_statistics().tasks_runnable == 0

    async def _hop(self, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._in_flight += 1
        try:
            return await self._hand_or_queue(func, args)
        finally:
            self._in_flight -= 1

    async def _hand_or_queue(self, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        handoff = self._handoff
        if handoff is not None and self._loop_idle_but(1):  # this hop is counted already
            task = trio.lowlevel.current_task()
            job = (func, args, task, trio.lowlevel.current_trio_token())
            posted = handoff.post_and_wait(job, self._spin_ns, True) if self._watch \
                else handoff.post_and_wait(job, self._spin_ns)
            if posted is not None:  # else no worker was waiting: queue it as usual
                taken, delivered = posted
                del posted
                if self.stats is not None:
                    self.stats.routes["handed" if taken else "parked"] += 1
                if taken:
                    # The result is here and the task never left the run queue: it goes on without
                    # a checkpoint. In the binding's inline request loop a handler's first suspension
                    # hands the reading of /dev/fuse to another task (a scheduler pass, a lock handed
                    # over, an epoll registration), which a hop that did not wait need not pay; the
                    # loop checkpoints itself every few requests, so other tasks still run. (Measured
                    # in docs/performance.md, "Requests that do not wait do not yield".) A request
                    # that makes many handed hops still yields every HANDED_BURST of them, so it
                    # cannot hold the loop for long whatever the binding watches.
                    self._handed_run += 1
                    if self._handed_run >= HANDED_BURST:
                        self._handed_run = 0
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    try:
                        return cast("outcome.Outcome[T]", delivered).unwrap()
                    finally:
                        # A raised error's traceback holds this frame: were the outcome (which
                        # holds the error) still in it, that would be a cycle, and everything the
                        # job's frames held (directory descriptors) would stay open until the
                        # cyclic collector next ran (scripts/stress saw the daemon's fds grow).
                        del delivered
                self._handed_run = 0  # it waits: the task yields here
                parked: T = await trio.lowlevel.wait_task_rescheduled(_not_abortable)
                return parked
        if self.stats is not None:
            self.stats.routes["queued"] += 1
        self._handed_run = 0  # it waits: the task yields here
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
            _deliver(token, task, result)
            del task, result
            if self._handoff is not None:
                # Not idle while it waits on the handoff (which it alone sees): a queued job goes to
                # another thread rather than wait for this one's window to end.
                with self._guard:
                    self._idle -= 1
                self._serve_posted(self._handoff, self._handoff.wait_job(self._wait_ns))
                with self._guard:
                    self._idle += 1

    def _serve_posted(self, handoff: Handoff, job: _Job | None) -> None:
        """Run jobs the event loop posts through HANDOFF while they come within the polling window.

        The loop spins for the result of each (`Handoff.post_and_wait`) and takes it straight from
        here; only if it stopped waiting (the job took longer than its window) does the result go
        back through trio, as a queued job's does."""
        while job is not None:
            func, args, task, token = job
            job = None
            result = outcome.capture(func, *args)
            del func, args
            taken, job = handoff.finish(result, self._wait_ns)
            if not taken:
                _deliver(token, task, result)
                del task, result
                job = handoff.wait_job(self._wait_ns)
            else:
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

class Handoff(Protocol):
    """What `Workers` needs of ``pyfuse3.Handoff`` (patch 0006): a job handed from the event loop
    to a worker that spins waiting for one, and its result handed back while the loop spins for
    it, neither side holding the GIL meanwhile (a Python spin loop takes the GIL back every turn
    and fights the other thread for it). Typed here so the overlay package needs no pyfuse3."""

    def post_and_wait(self, job: _Job, wait_ns: int, watch_requests: bool = ...) -> tuple[bool, object] | None: ...
    def wait_job(self, spin_ns: int) -> _Job | None: ...
    def finish(self, result: object, spin_ns: int) -> tuple[bool, _Job | None]: ...


#: Handed hops (which do not suspend their task) in a row before one yields to the scheduler anyway,
#: as pyfuse3's inline loop does after as many requests: a request that hops many times (a copy of
#: many small files, say) lets the other tasks run between them.
HANDED_BURST = 32

#: A worker thread with nothing to do for this long ends (as trio's thread cache does).
IDLE_SECONDS = 10.0


def _deliver(token: trio.lowlevel.TrioToken, task: trio.lowlevel.Task, result: outcome.Outcome[Any]) -> None:
    """From a worker thread: wake TASK with RESULT through its event loop."""
    try:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)
    except trio.RunFinishedError:  # the loop ended under a waiting task: nobody to answer
        log.warning("a worker thread finished after its event loop: result dropped")


def _not_abortable(_raise_cancel: Any) -> trio.lowlevel.Abort:
    """A blocking call cannot be stopped halfway: a cancelled task waits for it to finish."""
    return trio.lowlevel.Abort.FAILED


__all__ = [
    "DEFAULT_SPIN_US", "DEFAULT_WAIT_US", "HANDED_BURST", "HOP_STATS_ENV", "IDLE_SECONDS", "IO_THREADS",
    "MAX_SPIN_US", "SPIN_ENV", "WAIT_ENV", "Handoff", "HandoffTimes", "HopStats", "Workers", "current_request",
    "env_us",
]
