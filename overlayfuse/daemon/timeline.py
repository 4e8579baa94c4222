"""Start-up timestamps, step by step, for finding where a daemon's start goes.

``overlayfuse`` is on the path of every container start, so how long it takes from exec to the
first answered read matters, and a total alone does not say which step to cut. With
``OVERLAYFUSE_STARTUP_TRACE=FILE`` in its environment the command notes each step (options parsed,
daemon imported, kernel mount made, event loop started, INIT handshake, readiness, the first
LOOKUP, GETATTR, OPEN and READ) with its ``CLOCK_MONOTONIC`` time, which is the same clock in every
process, so a caller that noted the time before exec can subtract (``scripts/bench --startup-steps``
does). Without the variable `mark` is one global lookup and a return.

Marks are kept in memory and appended to FILE only by `flush`, which the command calls off the
event loop (before the loop starts, from a worker thread, and after the loop ends): the loop never
waits on the trace file. Each line is ``MONOTONIC_NS PID STEP``; one ``os.write`` per flush on an
``O_APPEND`` file, so the detached parent's and the daemon's lines do not interleave mid-line.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

#: The environment variable naming the trace file; unset (the normal case) means no tracing at all.
ENV = "OVERLAYFUSE_STARTUP_TRACE"

_path = os.environ.get(ENV) or None
_marks: list[tuple[int, int, str]] = []


def reread() -> None:
    """Read the variable again, forgetting any mark: the fork server's child took its caller's
    environment, and what the server noted is not the caller's start."""
    global _path
    _path = os.environ.get(ENV) or None
    _marks.clear()


def enabled() -> bool:
    """Whether this process traces its start (cheap: read once, at import)."""
    return _path is not None


def mark(step: str) -> None:
    """Note that STEP happened now (in memory; see `flush`)."""
    if _path is not None:
        _marks.append((time.monotonic_ns(), os.getpid(), step))


def flush() -> None:
    """Append the marks noted so far to the trace file and forget them. Never raises: a trace
    that cannot be written must not take a mount down (it is logged at debug level)."""
    if _path is None or not _marks:
        return
    text = "".join(f"{ns} {pid} {step}\n" for ns, pid, step in _marks)
    _marks.clear()
    try:
        fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.debug("cannot write the start-up trace %s: %s", _path, exc)
