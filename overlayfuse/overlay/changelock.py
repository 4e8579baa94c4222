"""The lock that lets one change of the merged tree run at a time (`MergedTree`), without a trip
through trio's scheduler when nobody else holds it.

``trio.Lock`` checkpoints on every acquire, contended or not (a yield to the scheduler, which polls
epoll before running the next batch), and tracks its owner for deadlock reports. Every change
request (create, setattr, unlink, rename, a copy-up) takes this lock once, and in the request loop
of the patched binding (pyfuse3 patch 0003) a handler's first suspension hands the reading of
/dev/fuse over to another task: an uncontended acquire that yields makes a request that would not
otherwise wait pay that handover too. Here an uncontended acquire is two attribute reads and a
write. A contended one parks in a ``trio.lowlevel.ParkingLot``, first come first served, and the
release hands the lock straight to the task it wakes, as ``trio.Lock`` does, so a newcomer cannot
take it in between. A waiter cancelled while parked leaves the queue and never owns the lock; a
waiter already woken owns it (trio cannot cancel a task once it is rescheduled).
"""

from __future__ import annotations

from types import TracebackType

import trio


class ChangeLock:
    """A FIFO async lock with no checkpoint on its uncontended path. Not reentrant."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        if self._held or self._lot:
            await self._lot.park()  # returns owning the lock: `__aexit__` handed it over
        else:
            self._held = True

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lot:
            self._lot.unpark(count=1)  # the next waiter owns it now: `_held` stays True
        else:
            self._held = False


__all__ = ["ChangeLock"]
