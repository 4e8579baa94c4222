"""ChangeLock: one holder at a time, first come first served, no checkpoint when uncontended."""

from __future__ import annotations

import trio

from overlayfuse.overlay.changelock import ChangeLock


def test_an_uncontended_acquire_does_not_yield() -> None:
    """What it is for: a request that takes the lock alone runs on without a trip through the
    scheduler. Driven by hand, its enter and exit finish on their first step, never suspending
    (trio.Lock's acquire would: it checkpoints)."""

    async def main() -> None:
        lock = ChangeLock()
        for step in (lock.__aenter__(), lock.__aexit__(None, None, None)):
            try:
                trap = step.send(None)
            except StopIteration:
                continue
            step.close()
            raise AssertionError(f"suspended on {trap!r}")
        assert not lock.locked()

    trio.run(main)


def test_waiters_get_the_lock_one_at_a_time_in_arrival_order() -> None:
    async def main() -> None:
        lock = ChangeLock()
        inside = 0
        order: list[int] = []

        async def worker(n: int) -> None:
            nonlocal inside
            async with lock:
                inside += 1
                assert inside == 1
                order.append(n)
                await trio.sleep(0.01)  # hold it across real waits
                inside -= 1

        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(worker, n)
                await trio.sleep(0.001)  # arrive in this order
        assert order == [0, 1, 2, 3, 4]
        assert not lock.locked()

    trio.run(main)


def test_a_release_hands_the_lock_to_the_waiter_not_to_a_newcomer() -> None:
    """Between a release and the woken waiter running, a task that asks for the lock queues
    behind that waiter (as trio.Lock: no barging)."""

    async def main() -> None:
        lock = ChangeLock()
        order: list[str] = []

        async def waiter() -> None:
            async with lock:
                order.append("waiter")

        async with trio.open_nursery() as nursery:
            async with lock:
                nursery.start_soon(waiter)
                await trio.sleep(0.01)  # the waiter parks
            # released: the waiter is woken but has not run; this task asks at once
            async with lock:
                order.append("newcomer")
        assert order == ["waiter", "newcomer"]

    trio.run(main)


def test_a_waiter_cancelled_while_parked_never_holds_it() -> None:
    async def main() -> None:
        lock = ChangeLock()
        entered: list[str] = []

        async def waiter(scope_box: list[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                scope_box.append(scope)
                async with lock:
                    entered.append("cancelled waiter")

        async with trio.open_nursery() as nursery:
            box: list[trio.CancelScope] = []
            async with lock:
                nursery.start_soon(waiter, box)
                await trio.sleep(0.01)
                box[0].cancel()
                await trio.sleep(0.01)  # it leaves the queue
            assert not lock.locked()
            async with lock:
                entered.append("next")
        assert entered == ["next"]

    trio.run(main)
