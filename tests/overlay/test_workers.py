"""Unit tier: the mount's worker threads (`overlay.workers.Workers`), with real threads and trio.

What the handlers rely on: a call's result or exception comes back to the task that asked; a
cancelled task still waits for its call to finish (a syscall cannot be stopped halfway); never more
than the pool's threads run at once; idle threads end, so a process that made many pools (the test
suite) does not keep their threads.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import trio

from overlayfuse.overlay import workers as workers_module
from overlayfuse.overlay.workers import HopStats, Workers

#: A guard against a hang, never a speed assertion.
HANG_GUARD = 30.0


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "overlayfuse-worker"]


async def test_result_and_exception_come_back() -> None:
    pool = Workers(2)
    assert await pool.run(os.getpid) == os.getpid()
    assert await pool.run(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(FileNotFoundError) as caught:
        await pool.run(os.lstat, "/proc/self/fd/no-such-fd")
    assert caught.value.errno == errno.ENOENT


async def test_at_most_max_threads_run_at_once() -> None:
    pool = Workers(3)
    guard = threading.Lock()
    running = peak = 0
    release = threading.Event()

    def busy() -> None:
        nonlocal running, peak
        with guard:
            running += 1
            peak = max(peak, running)
        release.wait(HANG_GUARD)
        with guard:
            running -= 1

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(pool.run, busy)
            while True:  # wait until the pool is full, then let everything finish
                with guard:
                    if running == 3:
                        break
                await trio.sleep(0.01)
            await trio.sleep(0.05)  # time for a fourth to start, were the bound broken
            release.set()
    assert peak == 3


async def test_cancelled_task_waits_for_its_call() -> None:
    pool = Workers(1)
    started, finished = threading.Event(), threading.Event()
    proceed = threading.Event()

    def slow() -> str:
        started.set()
        proceed.wait(HANG_GUARD)
        finished.set()
        return "done"

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            results: list[str] = []
            scope = trio.CancelScope()

            async def ask() -> None:
                with scope:
                    results.append(await pool.run(slow))

            nursery.start_soon(ask)
            while not started.is_set():
                await trio.sleep(0.01)
            scope.cancel()
            await trio.sleep(0.05)
            assert not finished.is_set()  # still running: the nursery is still waiting for it
            proceed.set()
    assert finished.is_set()
    assert results == ["done"]  # the call that started finished, and its task got the result


async def test_idle_threads_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers_module, "IDLE_SECONDS", 0.05)
    before = len(_pool_threads())
    pool = Workers(4)
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(pool.run, time.sleep, 0.05)
    assert len(_pool_threads()) > before
    with trio.fail_after(HANG_GUARD):
        while len(_pool_threads()) > before:
            await trio.sleep(0.02)
    assert await pool.run(os.getpid) == os.getpid()  # and a pool whose threads ended starts anew


async def test_standby_threads_wait_from_the_start_and_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount's first hop finds a thread waiting (no clone on a request's path), and the pool
    never shrinks below it, however long it idles."""
    monkeypatch.setattr(workers_module, "IDLE_SECONDS", 0.05)
    before = {t.ident for t in _pool_threads()}

    def new_threads() -> list[threading.Thread]:
        return [t for t in _pool_threads() if t.ident not in before]

    pool = Workers(4, standby=1)
    assert len(new_threads()) == 1  # before any work
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(pool.run, time.sleep, 0.05)
    assert len(new_threads()) > 1
    with trio.fail_after(HANG_GUARD):
        while len(new_threads()) > 1:  # the others end after IDLE_SECONDS
            await trio.sleep(0.02)
    await trio.sleep(0.2)  # four idle periods more
    (kept,) = new_threads()
    assert await pool.run(threading.get_ident) == kept.ident


async def test_hop_stats_count_per_request(tmp_path: os.PathLike[str]) -> None:
    stats = HopStats(os.path.join(tmp_path, "hops.txt"))
    pool = Workers(2, stats)
    stats.request("create")
    await pool.run(os.getpid)
    stats.request("write")
    await pool.run(os.getpid)
    await pool.run(os.getcwd)
    assert stats.requests == {"create": 1, "write": 1}
    assert {key: t.hops for key, t in stats.hops.items()} == {
        ("create", "getpid"): 1, ("write", "getpid"): 1, ("write", "getcwd"): 1,
    }
    stats.write()
    with open(stats.path, encoding="utf-8") as table:
        lines = table.read().splitlines()
    assert any(line.split()[:4] == ["write", "1", "2", "2.00"] for line in lines)
