"""Small lower files handed to the kernel's page cache at their open (daemon/pagecache.py).

Judged by what reaches the daemon (its `-d` log), never by timing, and by what readers see: the
kernel's overlay as the oracle for readers opened before changes is in test_semantics.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayfuse.daemon import pagecache
from tests.support.gatefs import FILE_NAME, gate_fs, wait_held
from tests.support.mounts import drop_caches, mount_at, overlayfuse, run_isolated
from tests.support.requestlog import debug_daemon, request_counts, requests
from tests.support.trees import File, make_tree

pytestmark = pytest.mark.mount

#: How long the concurrent readers may take before they count as hung (they take well under a second).
READERS_TIMEOUT = 60.0


def _contents(paths: list[str]) -> list[bytes]:
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def test_small_lower_files_are_read_without_read_requests(tmp_path: Path) -> None:
    """At its open, a small lower file is handed to the kernel's cache (daemon/pagecache.py):
    reading it sends no READ, whether the host's cache held its data or a worker read it from the
    disk for the open. A bigger file is read by READs."""
    small = {f"s{i}": os.urandom(3000 + 1000 * i) for i in range(10)}
    big = os.urandom(pagecache.STORE_MAX + 1)
    lower = make_tree(tmp_path / "lower", *(File(name, data) for name, data in small.items()), File("big", big))
    small_paths = sorted(small)
    with debug_daemon(tmp_path, lower) as (mnt, log):
        paths = [str(mnt / name) for name in small_paths]
        assert run_isolated(_contents, paths) == [small[name] for name in small_paths]
        assert request_counts(log)["read"] == 0
        start = log.stat().st_size
        assert run_isolated(_contents, [str(mnt / "big")]) == [big]
        assert any(op == "read" for op, _ in requests(log, start))
    (tmp_path / "cold").mkdir()
    with debug_daemon(tmp_path / "cold", lower) as (mnt, log):
        drop_caches()
        paths = [str(mnt / name) for name in small_paths]
        assert run_isolated(_contents_then_stat, paths) == [small[name] for name in small_paths]
        assert request_counts(log)["read"] == 0
        # A READ's reply makes the kernel drop the file's atime: the fstat after it (tar's, after
        # each file) would be a GETATTR. With no READ there is none (the root's, of the walk to
        # the mount after the caches were dropped, is not the files').
        assert _files_getattrs(log) == 0
        start = log.stat().st_size
        assert run_isolated(_contents_then_stat, [str(mnt / "big")]) == [big]
        assert "read" in {op for op, _ in requests(log, start)} and _files_getattrs(log, start) == 1


def _files_getattrs(log: Path, since: int = 0) -> int:
    """GETATTRs of inodes other than the root in LOG after byte SINCE."""
    return sum(1 for op, args in requests(log, since) if op == "getattr" and args != "1")


def _contents_then_stat(paths: list[str]) -> list[bytes]:
    """Each file's contents, each file fstat'ed after it was read, as tar does."""
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(f.read())
            os.fstat(f.fileno())
    return out


_READERS = """
import os, random, sys, threading
root, names, threads = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
failed = []
def read_all(seed):
    order = names[:]
    random.Random(seed).shuffle(order)
    try:
        for name in order:
            with open(os.path.join(root, name), "rb") as f:
                f.read()
    except OSError as exc:
        failed.append(exc)
workers = [threading.Thread(target=read_all, args=(i,)) for i in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
sys.exit(f"reads failed: {failed[:3]}" if failed else 0)
"""


def test_readers_of_the_same_uncached_files_at_once_never_hang(tmp_path: Path) -> None:
    """A store locks each page it fills, and the kernel keeps the pages it reads ahead locked until
    their READ is answered: a store from the event loop while another open of the file waits for
    a READ would wait for a READ only that loop can answer. So a file is stored only while no
    other open of it exists. Eight threads read the same files, in different orders, after their
    caches were dropped (the store of a file another thread is reading hung the daemon in the
    first round of each of two tries, before that rule)."""
    names = [f"f{i}" for i in range(60)]
    lower = make_tree(tmp_path / "lower", *(File(name, os.urandom(100_000)) for name in names))
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with overlayfuse(tmp_path / "mnt", [lower], upper, work) as fuse:
        for _ in range(2):
            drop_caches()  # the kernel forgets the inodes too: stored again at their next open
            with _aborted_if_hung(fuse.mnt, tmp_path / "fusectl") as readers:
                readers.append(subprocess.Popen([sys.executable, "-c", _READERS, str(fuse.mnt), ",".join(names), "8"],
                                                stderr=subprocess.PIPE))
        seen = run_isolated(_contents, [str(fuse.mnt / name) for name in names])
    assert seen == [(lower / name).read_bytes() for name in names]


@contextlib.contextmanager
def _aborted_if_hung(mnt: Path, fusectl: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Wait for the readers the block starts; if they are not done in READERS_TIMEOUT, abort the
    mount's FUSE connection (through a fusectl mounted at FUSECTL), so that every request waiting
    on it fails and nothing stays hung, and fail the test."""
    readers: list[subprocess.Popen[bytes]] = []
    yield readers
    for proc in readers:
        try:
            _, err = proc.communicate(timeout=READERS_TIMEOUT)
        except subprocess.TimeoutExpired:
            _abort_connection(mnt, fusectl)
            proc.communicate()
            pytest.fail(f"readers of {mnt} hung for {READERS_TIMEOUT} s: the connection was aborted")
        assert proc.returncode == 0, err.decode(errors="replace")


def _abort_connection(mnt: Path, fusectl: Path) -> None:
    entry = mount_at(mnt)
    assert entry is not None
    minor = entry.dev.split(":")[1]
    fusectl.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "fusectl", "none", str(fusectl)], check=True, timeout=30)
    try:
        (fusectl / minor / "abort").write_text("1")
    finally:
        subprocess.run(["umount", str(fusectl)], check=False, timeout=30)


def test_a_file_copied_up_while_its_open_reads_ahead_is_not_stored(tmp_path: Path) -> None:
    """A small lower file opened to read, its data not in the host's cache, is read by a worker at
    the open and stored when the read is done. A truncate(2) meanwhile sends no OPEN (the count of
    opens stays one) but copies the file up and cuts it, and another gives it its length back: the
    lower data read ahead is no longer the file's, and stored it would be what the open reads. The
    lower layer is tests.support.gatefs, whose file cannot be read until the test says so, so the
    truncate lands while the open's read waits, every time."""
    control = tmp_path / "control"
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    size = pagecache.STORE_MAX // 2
    with gate_fs(control, tmp_path / "gate", size=size) as gate, \
            overlayfuse(tmp_path / "mnt", [gate], upper, work) as fuse:
        path = fuse.mnt / FILE_NAME.decode()
        opened: list[int] = []
        opener = threading.Thread(target=lambda: opened.append(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)))
        opener.start()
        try:
            wait_held(control, READERS_TIMEOUT)  # the open's read ahead waits at the gate
            os.truncate(path, 0)  # no data is left of the lower file's...
            os.truncate(path, size)  # ...and its old length again: zeros, which a store would hide
        finally:
            (control / "release").touch()
            opener.join(READERS_TIMEOUT)
        assert not opener.is_alive() and len(opened) == 1
        try:
            assert os.pread(opened[0], size, 0) == bytes(size)
        finally:
            os.close(opened[0])
        assert path.read_bytes() == bytes(size)
