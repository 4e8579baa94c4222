"""Concurrency of the daemon, observed from outside through real reads.

pyfuse3 runs every handler on one trio thread, so a handler that does blocking I/O
inline stalls every other request, and a daemon that handles one read at a time makes
concurrent readers take turns at the granularity of whole operations.  These tests look
for both failures without measuring speed or comparing timestamps: readers that loop until
killed, a gate filesystem that holds a read, and one generous "did it answer at all" bound
per chunk.

Readers run as child processes, never as threads of pytest: a process stuck in a FUSE
request can be SIGKILLed, a thread cannot.  Big files are made with fallocate: allocated
(not sparse) but never written, so the suite does not spend seconds writing 1.5 GiB;
their reads cost the daemon CPU and copying, which is where serialisation would show.
A lower read that truly blocks is provided by `tests.support.gatefs` instead.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.gatefs import FILE_NAME, gate_fs, wait_held
from tests.support.mounts import drop_caches, overlayfuse, run, run_isolated
from tests.support.trees import File, make_tree

pytestmark = pytest.mark.mount

MiB = 1 << 20
CHUNK = MiB
PAIR_SIZE = 64 * MiB  # per reader, read over and over
PAIR_PROGRESS = 256 * MiB  # each reader gets this far (four passes) while the other reads
BIG_SIZE = 1024 * MiB  # only read until the stat is done, then the reader is killed
PROGRESS_BEFORE_STAT = 16 * MiB  # the read is well under way, far from finished
ANSWER_TIMEOUT = 20.0  # "it answered at all": a bound on a hang, not a speed requirement

# A reader: reads CHUNK at a time (checking that every byte is the expected one: zero for
# fallocated files) and prints "<bytes so far>" after each chunk; with `loop`, it starts over
# at the end of the file and goes on until killed, so "it is still reading" never depends on
# how fast the machine is.
READER = """
import os, sys
path, chunk, byte, loop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "loop"
fd = os.open(path, os.O_RDONLY)
total = 0
while True:
    data = os.read(fd, chunk)
    if not data:
        if loop:
            os.lseek(fd, 0, os.SEEK_SET)
            continue
        break
    if data.count(byte) != len(data):
        sys.exit(f"read a byte other than {byte}")
    total += len(data)
    print(total, flush=True)
"""


def _allocate(path: Path, size: int) -> Path:
    proc = run(["fallocate", "-l", str(size), path], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return path


def _start_reader(path: Path, byte: int = 0, *, loop: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", READER, str(path), str(CHUNK), str(byte), "loop" if loop else "once"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> list[int]:
    """Wait for a reader (killing it on timeout); its running totals."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")
    return [int(n) for n in out.decode().split()]


def test_two_big_reads_progress_together(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """Two readers of two big lower files both make progress while the other runs.

    Both read their file over and over until killed, so neither ever finishes first: each
    must reach PAIR_PROGRESS while the other is still reading.  A daemon that favoured one
    open file, or finished one reader's work before looking at the other's, starves the
    second, which then never gets there (ANSWER_TIMEOUT per chunk bounds that hang).  No
    speeds or timestamps are compared.
    """
    lower = tmp_path / "lower"
    lower.mkdir()
    for name in ("a", "b"):
        _allocate(lower / name, PAIR_SIZE)
    try:
        with overlayfuse(tmp_path / "mnt", [lower]) as fuse:
            drop_caches()  # nothing of either file may come from the page cache
            readers = [_start_reader(fuse.mnt / name, loop=True) for name in ("a", "b")]
            try:
                queues = [_lines(r) for r in readers]
                for q in queues:
                    _wait_progress(q, PAIR_PROGRESS)
                running = [r.poll() is None for r in readers]
            finally:
                for r in readers:
                    r.kill()
                    r.wait()
    finally:
        for name in ("a", "b"):
            (lower / name).unlink()
    assert running == [True, True], "a reader ended: the loop readers only end when killed"


def _lines(proc: subprocess.Popen[bytes]) -> queue.Queue[int | None]:
    """Feed a reader's progress lines into a queue from a thread (pipe reads never hang on FUSE)."""
    lines: queue.Queue[int | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(int(line))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_progress(lines: queue.Queue[int | None], at_least: int) -> int:
    """Wait until the reader has read `at_least` bytes; each chunk must come within
    ANSWER_TIMEOUT (a bound on a hang, not a speed)."""
    while True:
        try:
            item = lines.get(timeout=ANSWER_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no chunk read within {ANSWER_TIMEOUT}s") from None
        assert item is not None, "the reader ended early"
        if item >= at_least:
            return item


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
            reader = _start_reader(fuse.mnt / "big", loop=True)
            try:
                lines = _lines(reader)
                read_before = _wait_progress(lines, PROGRESS_BEFORE_STAT)
                proc = run(["stat", "-c", "%s", fuse.mnt / "elsewhere/small"],
                           timeout=ANSWER_TIMEOUT)
                # The reader keeps going after the stat: it was reading all along.
                _wait_progress(lines, read_before + CHUNK)
            finally:
                reader.kill()
                reader.wait()
    finally:
        (lower / "big").unlink()
    assert proc.returncode == 0 and proc.stdout.strip() == b"5", proc.stderr
    assert read_before >= PROGRESS_BEFORE_STAT


# --- a lower read that blocks ----------------------------------------------------------


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


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
            wait_held(control, ANSWER_TIMEOUT)  # the daemon is inside gatefs now
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
        assert lines[-1] == 1 << 20
