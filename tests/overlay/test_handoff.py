"""Unit tier: the worker handoff (pyfuse3 patch 0006's ``Handoff``, used by `overlay.workers.Workers`).

A worker that finished a job waits for the next on the handoff; the event loop, when it has nothing
else to do, hands a job to such a worker and spins a bounded time for its result. What the handlers
rely on does not change: each result or exception reaches the task that asked, and a job that takes
longer than the loop's window still delivers its result (through trio). Mechanism only: speed is
scripts/bench's business.
"""

from __future__ import annotations

import errno
import gc
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from overlayfuse.daemon import binding
from overlayfuse.overlay import workers as workers_module
from overlayfuse.overlay.workers import HandoffTimes, HopStats, Workers
from tests.support.gatefs import FILE_NAME, gate_fs, wait_held

pytestmark = pytest.mark.skipif(not binding.detect().handoff,
                                reason="pyfuse3 without patch 0006 (stock): no worker handoff")

#: A guard against a hang, never a speed assertion.
HANG_GUARD = 30.0

#: Windows long enough that, on a loaded 2-CPU machine, a quick job is handed rather than parked.
WIDE = HandoffTimes(spin_us=2000, wait_us=2000)  # 2 ms each: the most MAX_SPIN_US allows


def _pool(tmp_path: os.PathLike[str], times: HandoffTimes = WIDE) -> Workers:
    return Workers(2, HopStats(os.path.join(tmp_path, "hops.txt")), handoff=binding.new_handoff(),
                   times=times)


def test_handoff_object() -> None:
    """The protocol itself: nothing is posted without a waiting worker; a waiting worker gets the
    job and the loop its result; a loop that stopped waiting is told apart, and the next post works."""
    handoff = pyfuse3.Handoff()
    assert handoff.post_and_wait("nobody", 1000) is None
    assert handoff.wait_job(1000) is None  # nothing posted within 1 µs
    seen: list[object] = []
    go_on = threading.Event()

    def worker() -> None:
        job = handoff.wait_job(int(HANG_GUARD * 1e9))
        seen.append(job)
        seen.append(handoff.finish(f"result of {job}", int(HANG_GUARD * 1e9)))  # waits for job 2
        go_on.wait(HANG_GUARD)  # job 2 runs "long": the loop stops waiting for it
        seen.append(handoff.finish("late", 0))

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        deadline = time.monotonic() + HANG_GUARD
        while (posted := handoff.post_and_wait("job 1", int(HANG_GUARD * 1e9))) is None:
            assert time.monotonic() < deadline, "the worker never waited for a job"
            time.sleep(0.001)
        assert posted == (True, "result of job 1")
        assert handoff.post_and_wait("job 2", 1_000_000) == (False, None)  # 1 ms, then parked
        assert handoff.post_and_wait("job 3", 1000) is None  # job 2 is not finished: nothing posted
    finally:
        go_on.set()
        thread.join(HANG_GUARD)
    assert seen == ["job 1", (True, "job 2"), (False, None)]
    assert handoff.post_and_wait("job 4", 1000) is None  # free again, but no worker waits


async def test_hops_are_handed_and_results_come_back(tmp_path: os.PathLike[str]) -> None:
    pool = _pool(tmp_path)
    with trio.fail_after(HANG_GUARD):
        assert [await pool.run(lambda n: n * 2, n) for n in range(50)] == [n * 2 for n in range(50)]
        with pytest.raises(FileNotFoundError) as caught:
            await pool.run(os.lstat, "/proc/self/fd/no-such-fd")
    assert caught.value.errno == errno.ENOENT
    assert pool.stats is not None
    # The first hop starts a thread through the queue; after it, the thread waits on the handoff.
    assert pool.stats.routes["queued"] >= 1
    assert pool.stats.routes["handed"] >= 25, pool.stats.routes


class _FirstSuspension:
    """Await CORO, recording whether it ever suspended (gave trio control)."""

    def __init__(self, coro: Any) -> None:
        self.coro = coro
        self.suspended = False

    def __await__(self) -> Any:
        value: Any = None
        while True:
            try:
                trap = self.coro.send(value)
            except StopIteration as done:
                return done.value
            self.suspended = True
            value = yield trap


async def test_a_handed_hop_does_not_suspend(tmp_path: os.PathLike[str]) -> None:
    """A hop whose result the loop took while spinning returns without a checkpoint: the request
    goes on as if it had made the call itself (in the binding's request loop, a suspension would
    hand /dev/fuse over to another task). A parked or queued hop suspends, as it must; and a run
    of handed hops yields every HANDED_BURST of them, so a request that hops many times lets the
    other tasks run."""
    pool = _pool(tmp_path)
    assert pool.stats is not None
    handed_without_suspending = run = longest = 0
    with trio.fail_after(HANG_GUARD):
        await pool.run(os.getpid)  # a thread now waits on the handoff
        for _ in range(200):
            handed = pool.stats.routes["handed"]
            call = _FirstSuspension(pool.run(os.getpid))
            assert await call == os.getpid()
            if pool.stats.routes["handed"] == handed:
                assert call.suspended  # parked or queued: it waited
                run = 0
            elif call.suspended:
                run = 0  # the burst's yield
            else:
                handed_without_suspending += 1
                run += 1
                longest = max(longest, run)
    assert handed_without_suspending >= 100, pool.stats.routes
    assert longest < workers_module.HANDED_BURST, longest


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


async def test_a_job_longer_than_the_window_parks_and_still_answers(tmp_path: os.PathLike[str]) -> None:
    # The worker waits long after each job, so that even a loaded machine finds it waiting.
    pool = _pool(tmp_path, HandoffTimes(spin_us=10, wait_us=200_000))
    with trio.fail_after(HANG_GUARD):
        await pool.run(os.getpid)  # a thread now waits on the handoff
        for _ in range(5):
            assert await pool.run(_sleep, 0.02) == "slept"
            await pool.run(os.getpid)
    assert pool.stats is not None
    assert pool.stats.routes["parked"] >= 3, pool.stats.routes


async def test_not_handed_while_another_hop_is_out(tmp_path: os.PathLike[str]) -> None:
    """The loop spins only when it has nothing else to do: with a hop out, others are queued."""
    pool = _pool(tmp_path)
    release = threading.Event()
    with trio.fail_after(HANG_GUARD):
        await pool.run(os.getpid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run, release.wait, HANG_GUARD)
            await trio.sleep(0.05)  # the blocker is out
            assert pool.stats is not None
            before = pool.stats.routes.copy()
            assert [await pool.run(lambda n: n + 1, n) for n in range(5)] == [1, 2, 3, 4, 5]
            after = pool.stats.routes.copy()
            release.set()
    assert after["handed"] == before["handed"] and after["parked"] == before["parked"]
    assert after["queued"] == before["queued"] + 5


class _Held:
    """Stands for what a job's frame holds (a directory's descriptor, closed when freed)."""


def _fail_holding(held: _Held, seconds: float) -> None:
    time.sleep(seconds)
    raise OSError(errno.ENOTEMPTY, "Directory not empty", repr(held))


#: A worker waits this long for the next job: the one after a failed job is surely handed to it.
LONG_WAIT = HandoffTimes(spin_us=2000, wait_us=200_000)


@pytest.mark.parametrize(("route", "times", "seconds"), [
    ("handed", LONG_WAIT, 0.0),
    ("parked", HandoffTimes(spin_us=10, wait_us=200_000), 0.02),
    ("queued", HandoffTimes(0, 0), 0.0),
])
async def test_a_failed_job_leaves_no_cycle(tmp_path: os.PathLike[str], route: str, times: HandoffTimes,
                                            seconds: float) -> None:
    """Once the caller has handled a job's error, what the job's frames held is freed by reference
    counting, not left in a cycle for the collector: a daemon idle after a burst of failed removals
    kept their directory descriptors open (scripts/stress saw its fds grow by 34)."""
    pool = _pool(tmp_path, times)
    was_enabled = gc.isenabled()
    gc.disable()  # only reference counting may free it
    try:
        with trio.fail_after(HANG_GUARD):
            await pool.run(os.getpid)  # a thread now waits on the handoff (if there is one)
            # Which route a job takes depends on timing (with both CPUs busy elsewhere a handed job
            # often parks instead): go on until five failed jobs took ROUTE, checking every one,
            # and require that ROUTE was taken at all.
            assert pool.stats is not None
            hits = 0
            for _ in range(50):
                if hits == 5:
                    break
                held = _Held()
                freed = weakref.ref(held)
                # A worker that delivered a parked result goes back onto the handoff right after:
                # let it, or the next job may find none waiting and take the queue instead.
                await trio.sleep(0.005)
                before = pool.stats.routes[route]
                try:
                    await pool.run(_fail_holding, held, seconds)
                except OSError as exc:
                    assert exc.errno == errno.ENOTEMPTY
                hits += pool.stats.routes[route] > before
                del held
                # The worker holds a job's outcome until it has its next job (at most its window):
                # give it one. And trio's runner holds what it resumed us with until the next step.
                await pool.run(os.getpid)
                await trio.lowlevel.checkpoint()
                assert freed() is None, f"a job's frame outlived its handled error ({pool.stats.routes})"
    finally:
        if was_enabled:
            gc.enable()
    assert hits >= 1, f"no failed job went {route}: {pool.stats.routes}"


async def test_many_tasks_at_once(tmp_path: os.PathLike[str]) -> None:
    pool = _pool(tmp_path, HandoffTimes(spin_us=50, wait_us=500))
    results: dict[int, int] = {}

    async def ask(n: int) -> None:
        for k in range(20):
            results[n * 100 + k] = await pool.run(lambda a, b: a * b, n, k)

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(ask, n)
    assert results == {n * 100 + k: n * k for n in range(8) for k in range(20)}


def test_windows_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(workers_module.SPIN_ENV, raising=False)
    monkeypatch.delenv(workers_module.WAIT_ENV, raising=False)
    default = HandoffTimes.choose(50)
    assert default == HandoffTimes(workers_module.DEFAULT_SPIN_US, workers_module.DEFAULT_WAIT_US)
    assert default.on
    watched = HandoffTimes.choose(50, watch=True)  # patch 0009: a long window, watching for requests
    assert watched == HandoffTimes(workers_module.DEFAULT_WATCHED_SPIN_US, workers_module.DEFAULT_WAIT_US, True)
    assert not HandoffTimes.choose(0).on  # polling off (or one CPU): no handoff either
    monkeypatch.setenv(workers_module.SPIN_ENV, "0")
    assert not HandoffTimes.choose(50).on
    monkeypatch.setenv(workers_module.SPIN_ENV, "lots")
    assert HandoffTimes.choose(50).spin_us == workers_module.DEFAULT_SPIN_US
    monkeypatch.setenv(workers_module.WAIT_ENV, "99999999")
    assert HandoffTimes.choose(50).wait_us == workers_module.MAX_SPIN_US


async def test_off_without_a_window(tmp_path: os.PathLike[str]) -> None:
    pool = Workers(2, HopStats(os.path.join(tmp_path, "hops.txt")),
                   handoff=binding.new_handoff(), times=HandoffTimes(0, 0))
    with trio.fail_after(HANG_GUARD):
        for _ in range(5):
            assert await pool.run(os.getpid) == os.getpid()
    assert pool.stats is not None
    assert pool.stats.routes == {"queued": 5}


@pytest.mark.mount
@pytest.mark.skipif(not binding.detect().handoff_watch, reason="pyfuse3 without patch 0009")
def test_a_waiting_request_ends_the_loops_wait(tmp_path: Path) -> None:
    """With watch_requests, the event loop's wait for a handed job's result ends as soon as a
    request waits on the FUSE device (patch 0009), however long its window: gatefs's read hands
    a job that waits for the test and spins for it up to a minute; a lookup from here must end
    that spin (CONTROL/parked) while the job still waits, and be answered."""
    control, mnt = tmp_path / "control", tmp_path / "mnt"
    with gate_fs(control, mnt, handoff=True):
        def read_one_page() -> None:  # one READ request, no readahead (gatefs opens with direct_io)
            fd = os.open(mnt / FILE_NAME.decode(), os.O_RDONLY)
            try:
                os.read(fd, 4096)
            finally:
                os.close(fd)

        reader = threading.Thread(target=read_one_page, daemon=True)
        reader.start()
        wait_held(control, HANG_GUARD)
        # A LOOKUP, which the spin must let through (in a thread: if it does not, the test fails
        # after HANG_GUARD, and gate_fs's teardown ends the job, and with it the spin).
        looker = threading.Thread(target=(mnt / "nothing here").exists, daemon=True)
        looker.start()
        looker.join(HANG_GUARD)
        assert not looker.is_alive(), "the event loop kept spinning with a request waiting"
        assert (control / "parked").exists()
        assert not (control / "release").exists()  # the job had not finished: the request ended it
        (control / "release").touch()
        reader.join(HANG_GUARD)
        assert not reader.is_alive()
