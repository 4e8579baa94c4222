"""How long the request loop polls /dev/fuse for the next request before it sleeps.

On a VM, a CPU that goes idle is expensive to wake: measured here (2-vCPU guest, cpuidle governor
haltpoll with guest_halt_poll_ns=0), a FUSE request round trip costs ~80 µs when both CPUs idle
between requests and ~18 µs when they are kept busy. Most of a request's cost is then the wake-up
of the daemon's CPU, not its work. So when the request loop finds /dev/fuse empty with nothing in
flight, it keeps reading it for up to ``poll_us`` microseconds (pyfuse3 patch 0005, yielding the
CPU between reads) before it waits on the event loop; a client's next request usually comes within
a few. The CPU that costs is bounded: at most ``poll_us`` of spinning after each request burst.

Never on a machine (or a cpuset) with one CPU: there, spinning only delays the client it waits for.
``-o poll_us=N`` sets it (0 = off); without it ``OVERLAYFUSE_POLL_US`` does (for benches); else
`DEFAULT_POLL_US`.

Worker threads do not poll their queue: that was tried (git ed0f24f) and made the write rows
slower, a Python loop taking the GIL back after every yield (README, Performance).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: The default window, in µs: see README, Performance, for the measurement that chose it.
DEFAULT_POLL_US = 50

#: The most a window may be: a longer one is no longer "a short wait for the next request".
MAX_POLL_US = 10_000

#: Overrides the default when ``-o poll_us=`` is not given (benches compare values with it).
POLL_ENV = "OVERLAYFUSE_POLL_US"


def poll_us(requested: int | None) -> int:
    """The polling window to use: REQUESTED (``-o poll_us=``), else the environment's, else the
    default; 0 where this process may run on only one CPU."""
    if requested is None:
        # Here, not at the top: option parsing imports this module for MAX_POLL_US, and must not
        # pay for trio, which the worker pool's module imports (the mount has it by now).
        from ..overlay.workers import env_us

        requested = env_us(POLL_ENV, DEFAULT_POLL_US, MAX_POLL_US)
    if requested and len(os.sched_getaffinity(0)) < 2:
        log.info("poll_us=%d ignored: this process may run on one CPU only, where polling would "
                 "take the CPU from the client it waits for", requested)
        return 0
    return requested


__all__ = ["DEFAULT_POLL_US", "MAX_POLL_US", "POLL_ENV", "poll_us"]
