"""Worker threads for blocking calls: one pool per mount, shared by the merged tree and the handlers.

The trio thread must never wait on the disk, so copy-ups, listings, opens that miss the cache,
reads, writes and fsyncs run in worker threads. One limiter per mount bounds how many run at once,
whoever asks (the tree or the FUSE handlers): enough to keep a disk queue busy and let several
readers progress, few enough to bound memory (each holds at most one read's buffer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

#: Worker threads of one mount: enough to keep a disk queue busy and let several readers progress
#: at once, few enough to bound memory (each holds at most one read).
IO_THREADS = 16

T = TypeVar("T")


class Workers:
    """The worker threads of one mount (trio's thread cache, bounded by one limiter)."""

    __slots__ = ("limiter",)

    def __init__(self, threads: int = IO_THREADS) -> None:
        self.limiter = trio.CapacityLimiter(threads)

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """FUNC(*ARGS) in a worker thread; the calling task waits, the event loop does not."""
        return await trio.to_thread.run_sync(func, *args, limiter=self.limiter)


__all__ = ["IO_THREADS", "Workers"]
