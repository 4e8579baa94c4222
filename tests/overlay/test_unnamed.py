"""Unnamed files made ahead (`overlayfuse.overlay.unnamed`): made only in a burst of takes, ready for
the next takes, closed when idle or closed, never made where inodes run low, never shared with a child.

No mounts: the pool works on a plain staging dir (tmp_path, or a tmpfs with few inodes).
"""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayfuse.linux.syscalls import link_open_file
from overlayfuse.overlay import unnamed
from overlayfuse.overlay.copyup import Workspace
from overlayfuse.overlay.unnamed import UnnamedFiles
from tests.support.mounts import unnamed_files_held

AHEAD = 6


def _wait_for(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _filler_threads() -> int:
    return sum(t.name == "overlayfuse-unnamed" for t in threading.enumerate())


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    d = tmp_path / "staging"
    d.mkdir()
    return d


@pytest.fixture
def pool(staging: Path) -> Iterator[UnnamedFiles]:
    files = UnnamedFiles(str(staging), ahead=AHEAD, idle_seconds=30, start_after=1, slow_make_us=0)
    try:
        yield files
    finally:
        files.close()


def test_nothing_is_made_before_a_burst_of_takes(staging: Path) -> None:
    _wait_for(lambda: _filler_threads() == 0)  # earlier tests' pools, closed or idle, are gone
    pool = UnnamedFiles(str(staging), ahead=AHEAD, idle_seconds=0.5, start_after=3, slow_make_us=0)
    try:
        time.sleep(0.1)
        assert pool.held() == 0 and unnamed_files_held([os.getpid()], staging) == 0
        for _ in range(2):
            assert pool.take() is None, "nothing made before the burst: the caller makes its own"
            time.sleep(0.6)  # takes farther apart than idle_seconds: never a burst
        time.sleep(0.1)
        assert pool.held() == 0 and _filler_threads() == 0, "files made for takes far apart"
        for _ in range(3):
            assert pool.take() is None
        _wait_for(lambda: pool.held() == AHEAD)  # the third take close together started it
        assert unnamed_files_held([os.getpid()], staging) == AHEAD
    finally:
        pool.close()


def test_a_taken_file_is_a_new_unnamed_file_the_caller_can_name(pool: UnnamedFiles, staging: Path,
                                                                tmp_path: Path) -> None:
    pool.take()
    _wait_for(lambda: pool.held() == AHEAD)
    fd = pool.take()
    assert fd is not None
    try:
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_nlink, st.st_size, st.st_uid) == (0, 0, os.geteuid())
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        os.write(fd, b"data")
        link_open_file(fd, str(tmp_path / "named"))
    finally:
        os.close(fd)
    assert (tmp_path / "named").read_bytes() == b"data"
    time.sleep(0.1)
    assert pool.held() == AHEAD - 1, "more than half left: the thread was not woken"
    more = [pool.take() for _ in range(AHEAD - 1 - AHEAD // 2)]
    for other in more:
        assert other is not None
        os.close(other)
    _wait_for(lambda: pool.held() == AHEAD)  # half or fewer left: woken, it makes them again


def test_takes_faster_than_the_thread_fall_back_to_none(pool: UnnamedFiles) -> None:
    pool.take()
    _wait_for(lambda: pool.held() == AHEAD)
    taken = []
    for _ in range(AHEAD * 20):
        fd = pool.take()
        if fd is None:
            break
        taken.append(fd)
    for fd in taken:
        os.close(fd)
    assert len(set(taken)) == len(taken), "a file was handed out twice"


def test_idle_files_are_closed_and_the_thread_ends(staging: Path) -> None:
    pool = UnnamedFiles(str(staging), ahead=AHEAD, idle_seconds=0.3, start_after=1, slow_make_us=0)
    try:
        _wait_for(lambda: _filler_threads() == 0)  # earlier tests' pools, closed or idle, are gone
        pool.take()
        _wait_for(lambda: pool.held() == AHEAD)
        assert _filler_threads() == 1
        _wait_for(lambda: pool.held() == 0 and _filler_threads() == 0)
        assert unnamed_files_held([os.getpid()], staging) == 0
        assert pool.take() is None  # a later burst starts it again
        _wait_for(lambda: pool.held() == AHEAD)
    finally:
        pool.close()


def test_an_idle_pool_makes_no_more_before_closing_its_files(staging: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """At the end of a burst the thread closes what it holds; it does not first make up for the
    takes since its last round (files nobody would take)."""
    made = []
    make = unnamed.make
    monkeypatch.setattr(unnamed, "make", lambda where: made.append(1) or make(where))
    pool = UnnamedFiles(str(staging), ahead=AHEAD, idle_seconds=0.3, start_after=1, slow_make_us=0)
    try:
        pool.take()
        _wait_for(lambda: pool.held() == AHEAD)
        fd = pool.take()  # more than half left: no refill asked for
        assert fd is not None
        os.close(fd)
        _wait_for(lambda: pool.held() == 0)
        time.sleep(0.1)
        assert len(made) == AHEAD, f"{len(made) - AHEAD} made after the burst"
    finally:
        pool.close()


def test_close_releases_every_file_and_later_takes_get_none(pool: UnnamedFiles, staging: Path) -> None:
    pool.take()
    _wait_for(lambda: pool.held() == AHEAD)
    pool.close()
    assert pool.held() == 0 and unnamed_files_held([os.getpid()], staging) == 0
    assert pool.take() is None
    time.sleep(0.1)
    assert pool.held() == 0


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with 200 inodes (fewer than `unnamed.MIN_FREE_INODES`), unmounted in teardown."""
    where = tmp_path / "few"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nr_inodes=200,size=4m", "tmpfs", str(where)],
                   check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def test_none_are_made_where_inodes_run_low(few_inodes: Path) -> None:
    pool = UnnamedFiles(str(few_inodes), ahead=AHEAD, idle_seconds=30, start_after=1, slow_make_us=0)
    try:
        assert os.statvfs(few_inodes).f_favail < unnamed.MIN_FREE_INODES
        assert pool.take() is None
        time.sleep(0.3)
        assert pool.held() == 0, "files made ahead on a filesystem low on inodes"
        assert unnamed_files_held([os.getpid()], few_inodes) == 0
    finally:
        pool.close()


def test_a_forked_child_never_uses_its_parents_files(pool: UnnamedFiles) -> None:
    pool.take()
    _wait_for(lambda: pool.held() == AHEAD)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what its pool gives, and leave
        try:
            os.close(read)
            os.write(write, b"none" if pool.take() is None and pool.held() == 0 else b"some")
        finally:
            os._exit(0)
    os.close(write)
    try:
        answer = os.read(read, 16)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert answer == b"none"
    assert pool.held() == AHEAD, "the parent's files went with the child"


def test_nothing_is_made_ahead_while_making_one_is_fast(staging: Path) -> None:
    pool = UnnamedFiles(str(staging), ahead=AHEAD, idle_seconds=30, start_after=1, slow_make_us=1_000_000)
    try:
        made = [pool.new() for _ in range(3 * AHEAD)]
        for fd, _ in made:
            os.close(fd)
        assert not any(ahead for _, ahead in made)
        time.sleep(0.1)
        assert pool.held() == 0, "files made ahead although every make was fast"
    finally:
        pool.close()


def test_slow_makes_are_made_ahead(staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes slower than the threshold (here slowed to 300 µs each): from the burst's third take
    on, the thread keeps files ready, and `new` hands them out."""
    make = unnamed.make

    def slow_make(where: str) -> int:
        time.sleep(0.0003)
        return make(where)

    monkeypatch.setattr(unnamed, "make", slow_make)
    pool = UnnamedFiles(str(staging), ahead=AHEAD, idle_seconds=30, start_after=3, slow_make_us=100)
    try:
        first = [pool.new() for _ in range(3)]
        assert not any(ahead for _, ahead in first)
        _wait_for(lambda: pool.held() == AHEAD)
        fd, ahead = pool.new()
        assert ahead
        for other, _ in [*first, (fd, ahead)]:
            os.close(other)
    finally:
        pool.close()


def _made_ahead_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    monkeypatch.setenv(unnamed.SLOW_ENV, "0")  # made ahead however fast this filesystem makes them
    (tmp_path / "upper").mkdir()
    (tmp_path / "workdir").mkdir()
    ws = Workspace.prepare(str(tmp_path / "upper"), str(tmp_path / "workdir"))
    assert ws.ahead is not None, "the test's filesystem makes O_TMPFILE files: prepare should make a pool"
    for _ in range(unnamed.START_AFTER):  # a burst: starts the pool
        os.close(ws.open_unnamed())
    _wait_for(lambda: ws.ahead is not None and ws.ahead.held() >= unnamed.AHEAD)
    return ws


def test_a_new_file_made_ahead_gets_the_times_of_its_creation(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A file made ahead was made before the request: a new file's times are set to now, as a file
    made at the request has them (a copy-up sets its source's itself)."""
    ws = _made_ahead_workspace(tmp_path, monkeypatch)
    try:
        time.sleep(0.3)  # within the burst (`unnamed.IDLE_SECONDS`), and longer than the slack below
        before = time.time_ns()
        fd = ws.open_unnamed(new=True)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        slack = 50_000_000  # the filesystem's clock is coarse (jiffies)
        for name in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            assert getattr(st, name) >= before - slack, f"{name} is the file's making, not its creation"
    finally:
        ws.close()


def test_a_new_file_opened_for_appending_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = _made_ahead_workspace(tmp_path, monkeypatch)
    try:
        fd = ws.open_unnamed(os.O_WRONLY | os.O_APPEND, new=True)
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            assert flags & os.O_APPEND and flags & os.O_ACCMODE == os.O_WRONLY
            os.pwrite(fd, b"ab", 0)
            os.pwrite(fd, b"cd", 0)  # O_APPEND: the offset is ignored
            assert os.fstat(fd).st_size == 4
        finally:
            os.close(fd)
    finally:
        ws.close()
