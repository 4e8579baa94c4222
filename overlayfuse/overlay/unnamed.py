"""Unnamed files made ahead: the new inode a copy-up or a create builds in, ready before it is asked for.

Every copy-up of a regular file and every new regular file starts as an unnamed file (O_TMPFILE)
in the staging dir (`copyup.Workspace.open_unnamed`). Making one is an inode allocation in the
upper filesystem, the step of a metadata copy-up whose cost depends most on that filesystem: a few
µs on tmpfs, hundreds on ext4 without a journal (this VM's) right after files were deleted there,
where the allocator steps over every recently deleted inode of the group (fs/ext4/ialloc.c,
``recently_deleted``). ``chown -R``, ``tar x`` and ``cp -r`` ask for one per file, one request
after another, while the second CPU idles: a thread of its own makes a few ahead, so the request
takes one that is ready (docs/performance.md, "Unnamed files made ahead").

The rules:
- nothing is made before a burst of takes: the thread starts at the START_AFTER-th take less than
  IDLE_SECONDS after the one before. A mount that never writes holds none, and a container start's
  few copy-ups (or a chown of two files) pay neither a thread start nor files made for nothing;
- nothing is made ahead while making one is fast: only where the recent makes (the takers' own,
  and the thread's) took SLOW_MAKE_US on average or more. A thread making files costs the takers a
  few µs each (the GIL, wake-ups; docs/performance.md): on tmpfs, where a make takes 2 µs, a
  metadata copy-up took 40 µs with the thread against 22 without, and on this VM's ext4 with
  nothing deleted lately (45 µs a make) 56-59 µs against 53; after a mass deletion (200-300 µs a
  make) the thread saves most of that;
- at most AHEAD are held: a take that leaves half or fewer asks the thread for a round, which
  makes files until AHEAD are held;
- IDLE_SECONDS after the last take, the files held are closed (an unnamed file's inode is freed at
  its last close) and the thread ends, so a quiet mount holds no inode and no descriptor for them;
- none are made where the filesystem is low on inodes (`_has_room`): held files must not make
  another object's creation fail with ENOSPC. A file the thread could not make is made by the
  caller, which then gets the error the filesystem gives it;
- a forked child never uses its parent's files (they would be one file in two processes).

A made-ahead file is what ``open(staging, O_TMPFILE | O_WRONLY, 0o600)`` makes: mode 0600, owned by
the daemon, with the times of its making. Its taker sets owner, mode and times as it would on a
file it made itself (a new file sets its times to now: `copyup.Workspace.open_unnamed`); only its
birth time (statx's btime) is older than the request, by as long as it waited to be taken.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque

from .workers import env_us

log = logging.getLogger(__name__)

#: Files held at most; the thread makes more when a take leaves AHEAD // 2 or fewer.
AHEAD = 16

#: Seconds after the last take before the files held are closed and the thread ends; takes closer
#: together than this are one burst.
IDLE_SECONDS = 0.5

#: The take of a burst that starts the thread (the ones before it make their own files).
START_AFTER = 8

#: Free inodes below which no file is made ahead (where the filesystem counts inodes at all).
MIN_FREE_INODES = 4096

#: The average make, in µs, from which files are made ahead; ``OVERLAYFUSE_AHEAD_SLOW_US`` overrides
#: it (0: always, for tests and benches' A/B runs; a large value: never).
SLOW_MAKE_US = 100
SLOW_ENV = "OVERLAYFUSE_AHEAD_SLOW_US"

#: The most `SLOW_ENV` may say (a second: never, in practice).
MAX_SLOW_MAKE_US = 1_000_000

_FLAGS = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC


def make(staging: str) -> int:
    """A new unnamed regular file in STAGING, mode 0600, open for writing only."""
    return os.open(staging, _FLAGS, 0o600)


class UnnamedFiles:
    """Unnamed files in one staging dir, made ahead by a thread of their own (see the module doc).

    `new` is called from worker threads, several at once; `close` at unmount."""

    __slots__ = ("__weakref__", "_ahead", "_asked", "_burst", "_closed", "_idle", "_last_take", "_lock",
                 "_make_ns", "_ready", "_slow_ns", "_staging", "_start_after", "_thread", "_wake")

    def __init__(self, staging: str, ahead: int = AHEAD, idle_seconds: float = IDLE_SECONDS,
                 start_after: int = START_AFTER, slow_make_us: int | None = None) -> None:
        """SLOW_MAKE_US: from the environment (`SLOW_ENV`) or `SLOW_MAKE_US` when None."""
        self._staging = staging
        self._ahead = ahead
        self._idle = idle_seconds
        self._start_after = start_after
        if slow_make_us is None:
            slow_make_us = env_us(SLOW_ENV, SLOW_MAKE_US, MAX_SLOW_MAKE_US)
        self._slow_ns = slow_make_us * 1000
        self._make_ns = 0  # recent makes' average (`_average_in`)
        self._burst = 0  # takes in the current burst
        self._ready: deque[int] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._last_take = 0.0
        self._asked = False  # a take asked for a round of making (the thread clears it as it starts one)
        self._closed = False
        _pools.add(self)

    def new(self) -> tuple[int, bool]:
        """A new unnamed file, open for writing only, now the caller's to close, and whether it was
        made ahead (then its times are those of its making, not of this call)."""
        fd = self.take()
        if fd is not None:
            return fd, True
        start = time.perf_counter_ns()
        fd = make(self._staging)
        self._made(time.perf_counter_ns() - start)
        return fd, False

    def take(self) -> int | None:
        """A file made ahead, open for writing only, now the caller's to close; None when none is
        ready (`new` then makes one)."""
        with self._lock:
            if self._closed:
                return None
            fd = self._ready.popleft() if self._ready else None
            now = time.monotonic()
            self._burst = self._burst + 1 if now - self._last_take < self._idle else 1
            self._last_take = now
            if (len(self._ready) <= self._ahead // 2 and self._burst >= self._start_after
                    and self._make_ns >= self._slow_ns):
                self._asked = True
                if self._thread is None:
                    self._thread = threading.Thread(target=self._fill, name="overlayfuse-unnamed", daemon=True)
                    self._thread.start()
                else:
                    self._wake.notify()
        return fd

    def _made(self, ns: int) -> None:
        """A make took NS: into the recent makes' average."""
        with self._lock:
            self._average_in(ns)

    def _average_in(self, ns: int) -> None:
        """NS into the recent makes' average, each new make weighing a quarter (the lock held)."""
        self._make_ns = (self._make_ns * 3 + ns) // 4

    def _take_all(self) -> list[int]:
        """Every file held, now the caller's to close (the lock held)."""
        fds = list(self._ready)
        self._ready.clear()
        return fds

    def held(self) -> int:
        """How many files are ready now (for tests)."""
        with self._lock:
            return len(self._ready)

    def close(self) -> None:
        """Close every file held and stop the thread; later takes give None."""
        with self._lock:
            self._closed = True
            fds = self._take_all()
            self._wake.notify()
        _close_all(fds)

    def _fill(self) -> None:
        """The thread: make files until AHEAD are held, then wait until a take asks again; end when
        idle. A round that cannot make one (low on inodes, an error) ends there, until the next ask."""
        while self._wanted():
            if not _has_room(self._staging):
                log.debug("no unnamed files made ahead in %s: the filesystem is low on inodes", self._staging)
                continue
            while True:
                start = time.perf_counter_ns()
                try:
                    fd = make(self._staging)
                except OSError as exc:
                    log.debug("no unnamed files made ahead in %s: %s", self._staging, exc)
                    break
                with self._lock:
                    self._average_in(time.perf_counter_ns() - start)
                    if self._closed:
                        os.close(fd)
                        return
                    self._ready.append(fd)
                    if len(self._ready) >= self._ahead:
                        break

    def _wanted(self) -> bool:
        """Wait until a take asks for more files (True: a round starts), or until IDLE_SECONDS passed
        since the last take or the pool closed (False: the files held are closed, and the thread
        ends)."""
        with self._lock:
            while not self._closed:
                if self._asked:
                    self._asked = False
                    return True
                left = self._last_take + self._idle - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            fds = self._take_all()
            self._thread = None
        _close_all(fds)
        return False

    def _forget_in_child(self) -> None:
        """In a forked child: the parent's files and thread are not this process's to use."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        fds = self._take_all()
        self._thread = None
        self._closed = True
        _close_all(fds)


def _has_room(staging: str) -> bool:
    """Whether STAGING's filesystem has inodes to spare for files made ahead (one that does not
    count them, as btrfs, reports no total)."""
    try:
        st = os.statvfs(staging)
    except OSError:
        return False
    return st.f_files == 0 or st.f_favail >= MIN_FREE_INODES


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


_pools: weakref.WeakSet[UnnamedFiles] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
