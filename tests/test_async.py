"""Concurrency of the daemon, observed from outside through real reads.

pyfuse3 runs every handler on one trio thread, so a handler that does blocking I/O
inline stalls every other request, and a daemon that handles one read at a time makes
concurrent readers take turns at the granularity of whole operations.  These tests look
for both failures without measuring speed: timestamps are compared only with each
other (which reader finished a chunk first), and the one hard time limit is a generous
"did it answer at all" bound.

Readers run as child processes, never as threads of pytest: a process stuck in a FUSE
request can be SIGKILLed, a thread cannot.  Big files are made with fallocate: allocated
(not sparse) but never written, so the suite does not spend seconds writing 1.5 GiB;
their reads cost the daemon CPU and copying, which is where serialisation would show.
A lower read that truly blocks is provided by `tests.gatefs` instead.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gatefs import FILE_NAME
from tests.gatefs import FSTYPE as GATE_FSTYPE
from tests.mounts import (
    DAEMON_EXIT_TIMEOUT,
    MOUNT_TIMEOUT,
    REPO_ROOT,
    drop_caches,
    mount_at,
    overlayfuse,
    run,
    run_isolated,
    wait_pids_gone,
)
from tests.trees import File, make_tree

pytestmark = pytest.mark.mount

MiB = 1 << 20
CHUNK = MiB
PAIR_SIZE = 256 * MiB  # per reader: ~256 chunks each, plenty to see who waits for whom
BIG_SIZE = 1024 * MiB  # only read until the stat is done, then the reader is killed
PROGRESS_BEFORE_STAT = 16 * MiB  # the read is well under way, far from finished
ANSWER_TIMEOUT = 20.0  # "it answered at all": a bound on a hang, not a speed requirement
START_DELAY_NS = 300_000_000  # lets both readers start their clocks before reading

# A reader: waits for a common start instant, reads CHUNK at a time (checking that every
# byte is the expected one: zero for fallocated files), prints
# "<monotonic_ns> <bytes so far>" after each chunk.  CLOCK_MONOTONIC is system-wide,
# so lines of two readers can be merged into one timeline.
READER = """
import os, sys, time
path, start_at, chunk, byte = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_RDONLY)
while time.monotonic_ns() < start_at:
    time.sleep(0.001)
total = 0
while True:
    data = os.read(fd, chunk)
    if not data:
        break
    if data.count(byte) != len(data):
        sys.exit(f"read a byte other than {byte}")
    total += len(data)
    print(time.monotonic_ns(), total, flush=True)
"""


def _allocate(path: Path, size: int) -> Path:
    proc = run(["fallocate", "-l", str(size), path], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return path


def _start_reader(path: Path, start_at: int = 0, byte: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", READER, str(path), str(start_at), str(CHUNK), str(byte)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> list[tuple[int, int]]:
    """Wait for a reader (killing it on timeout); its (timestamp, total) lines."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")
    return [(int(t), int(n)) for t, n in (line.split() for line in out.decode().splitlines())]


def _switches(a: list[int], b: list[int]) -> int:
    """How often the merged timeline of chunk completions changes from one reader to the other."""
    labels = [label for _, label in sorted([(t, 0) for t in a] + [(t, 1) for t in b])]
    return sum(1 for x, y in itertools.pairwise(labels) if x != y)


def test_two_big_reads_progress_together(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """Two readers of two big lower files both make progress while the other runs.

    Asserted: by the time the first reader finishes, the other has read at least a
    quarter of its file, and their chunk completions alternate many times.  A daemon
    that ran one whole read() to completion before looking at the next request, or
    favoured one open file, fails; a fair one passes at any speed.
    """
    lower = tmp_path / "lower"
    lower.mkdir()
    for name in ("a", "b"):
        _allocate(lower / name, PAIR_SIZE)
    try:
        with overlayfuse(tmp_path / "mnt", [lower]) as fuse:
            drop_caches()  # nothing of either file may come from the page cache
            start_at = time.monotonic_ns() + START_DELAY_NS
            readers = [_start_reader(fuse.mnt / name, start_at) for name in ("a", "b")]
            try:
                a, b = (_finish(r, timeout=100) for r in readers)
            finally:
                for r in readers:
                    if r.poll() is None:
                        r.kill()
                        r.wait()
    finally:
        for name in ("a", "b"):
            (lower / name).unlink()
    assert a[-1][1] == b[-1][1] == PAIR_SIZE
    first_done = min(a[-1][0], b[-1][0])
    progress = [sum(1 for t, _ in r if t <= first_done) / len(r) for r in (a, b)]
    assert min(progress) >= 0.25, f"fraction read when the first reader finished: {progress}"
    assert _switches([t for t, _ in a], [t for t, _ in b]) >= 8


def _lines(proc: subprocess.Popen[bytes]) -> queue.Queue[tuple[int, int] | None]:
    """Feed a reader's progress lines into a queue from a thread (pipe reads never hang on FUSE)."""
    lines: queue.Queue[tuple[int, int] | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            t, n = line.split()
            lines.put((int(t), int(n)))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_progress(lines: queue.Queue[tuple[int, int] | None], at_least: int) -> int:
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while True:
        item = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert item is not None, "the reader ended early"
        if item[1] >= at_least:
            return item[1]


def test_stat_answers_during_big_read(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """A stat of a never-looked-up file returns while a 1 GiB read is under way.

    The reader is killed as soon as the stat has returned, so the test reads only a
    fraction of the gigabyte; "before the read finished" is then shown by the reader
    still running when the stat came back.
    """
    lower = make_tree(tmp_path / "lower", File("elsewhere/small", b"small"))
    _allocate(lower / "big", BIG_SIZE)
    try:
        with overlayfuse(tmp_path / "mnt", [lower]) as fuse:
            drop_caches()
            reader = _start_reader(fuse.mnt / "big")
            try:
                lines = _lines(reader)
                read_before = _wait_progress(lines, PROGRESS_BEFORE_STAT)
                proc = run(["stat", "-c", "%s", fuse.mnt / "elsewhere/small"],
                           timeout=ANSWER_TIMEOUT)
                still_reading = reader.poll() is None
            finally:
                reader.kill()
                reader.wait()
    finally:
        (lower / "big").unlink()
    assert proc.returncode == 0 and proc.stdout.strip() == b"5", proc.stderr
    assert still_reading, "the whole GiB was read before the stat returned"
    assert PROGRESS_BEFORE_STAT <= read_before < BIG_SIZE


# --- a lower read that blocks ----------------------------------------------------------


@contextlib.contextmanager
def gate_fs(control: Path, mnt: Path) -> Iterator[Path]:
    """Mount tests.gatefs; on exit release every waiting read, unmount, reap the process."""
    control.mkdir()
    mnt.mkdir()
    log = control / "gatefs.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.gatefs", str(control), str(mnt)],
                                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while (info := mount_at(mnt)) is None or info.fstype != GATE_FSTYPE:
            assert proc.poll() is None, f"gatefs died: {log.read_text()}"
            assert time.monotonic() < deadline, "gatefs did not mount"
            time.sleep(0.05)
        yield mnt
    finally:
        (control / "release").touch()
        for cmd in (["fusermount3", "-u", str(mnt)], ["fusermount3", "-u", "-z", str(mnt)]):
            if mount_at(mnt) is None:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                run(cmd, timeout=10)
        if wait_pids_gone([proc.pid], DAEMON_EXIT_TIMEOUT):
            proc.kill()
        proc.wait(timeout=DAEMON_EXIT_TIMEOUT)
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_blocked_lower_read_does_not_stall_the_mount(tmp_path: Path,
                                                     overlayfuse_bin: Path) -> None:
    """While one read is stuck inside a lower filesystem, other requests are answered.

    The bottom layer is gatefs: reading its file blocks until the test releases it.  A
    daemon that does lower-layer I/O on its event loop would stop answering everything
    here, and the stat/read/readdir below would time out.
    """
    control = tmp_path / "control"
    top = make_tree(tmp_path / "top", File("other", b"other data"), File("dir/stat_me"))
    with gate_fs(control, tmp_path / "gate") as gate, \
            overlayfuse(tmp_path / "mnt", [top, gate]) as fuse:
        reader = _start_reader(fuse.mnt / FILE_NAME.decode(), byte=ord("g"))
        try:
            _wait_for(control / "waiting", ANSWER_TIMEOUT)  # the daemon is inside gatefs now
            assert run_isolated(os.lstat, str(fuse.mnt / "dir/stat_me"),
                                timeout=ANSWER_TIMEOUT).st_size == 0
            assert run_isolated(read_file, str(fuse.mnt / "other"),
                                timeout=ANSWER_TIMEOUT) == b"other data"
            assert sorted(run_isolated(os.listdir, str(fuse.mnt), timeout=ANSWER_TIMEOUT)) == [
                "dir", "gated", "other"]
            assert reader.poll() is None, "the gated read ended before it was released"
        finally:
            (control / "release").touch()
        lines = _finish(reader, timeout=ANSWER_TIMEOUT)
        assert lines[-1][1] == 1 << 20
