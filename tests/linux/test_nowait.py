"""`nowait`: the calls the event loop tries before it hands work to a thread.

Each must do the work when the caches hold what it needs, say "would block" (None) when they do not,
and otherwise fail exactly as the plain call would. Emptying the caches needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayfuse.linux import nowait
from tests.support.mounts import drop_caches


def _uncached_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "deep" / "dir" / "file"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    drop_caches()
    return path


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_SYS_CACHESTAT = 451  # the same number on every architecture (Linux 6.5)
# A handle of our own, not `syscalls.LIBC`: `nowait` fixes the argument types of that one's
# `syscall` for openat2, and cachestat's differ.
_libc = ctypes.CDLL(None, use_errno=True)


def _cached_pages(fd: int) -> int:
    """How many pages of the file at FD the page cache holds, asked with cachestat(2), which
    unlike a read never starts readahead: the tests' ground truth about the cache."""
    stat = _Cachestat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_CachestatRange(0, 0)), ctypes.byref(stat), 0) != 0:
        raise OSError(ctypes.get_errno(), "cachestat")
    return int(stat.nr_cache)


def _evict(fd: int) -> None:
    """Drop every cached page of the file at FD, and check that they are gone: right after
    `drop_caches` a few were sometimes still cached (1-6 probes in 20 on this VM)."""
    deadline = time.monotonic() + 10
    while True:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if _cached_pages(fd) == 0:
            return
        assert time.monotonic() < deadline, "the page cache kept the file's pages"
        time.sleep(0.01)


@contextlib.contextmanager
def _opened(path: Path, *, uncached: bool = True) -> Iterator[tuple[int, int]]:
    """PATH opened read-only: its fd and the st_dev `read_cached` wants; closed afterwards.
    UNCACHED: none of its data cached. (`_uncached_file` cannot evict the pages itself: opening the
    file caches the dentries that the open_cached tests need uncached.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        if uncached:
            _evict(fd)
        yield fd, os.fstat(fd).st_dev
    finally:
        os.close(fd)


def test_open_cached_opens_a_cached_path(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"data")
    fd = nowait.open_cached(str(path), os.O_RDONLY | os.O_CLOEXEC)
    assert fd is not None
    try:
        assert os.read(fd, 10) == b"data"
    finally:
        os.close(fd)


def test_open_cached_will_not_read_directories_from_disk(tmp_path: Path) -> None:
    path = _uncached_file(tmp_path, b"data")
    assert nowait.open_cached(str(path), os.O_RDONLY) is None
    os.stat(path)  # now every step is cached
    fd = nowait.open_cached(str(path), os.O_RDONLY)
    assert fd is not None
    os.close(fd)


def test_open_cached_fails_like_open(tmp_path: Path) -> None:
    assert not (tmp_path / "missing").exists()  # the miss is cached now: a negative dentry
    with pytest.raises(FileNotFoundError):
        nowait.open_cached(str(tmp_path / "missing"), os.O_RDONLY)
    (tmp_path / "link").symlink_to("target")
    with pytest.raises(OSError) as caught:
        nowait.open_cached(str(tmp_path / "link"), os.O_RDONLY | os.O_NOFOLLOW)
    assert caught.value.errno == errno.ELOOP


def test_open_cached_leaves_what_it_cannot_do_to_open(tmp_path: Path) -> None:
    # openat2 refuses flags open(2) ignores, such as the kernel's internal exec bit; and it never
    # creates or truncates without waiting.
    path = tmp_path / "file"
    path.write_bytes(b"data")
    assert nowait.open_cached(str(path), os.O_RDONLY | 0x20) is None
    assert nowait.open_cached(str(path), os.O_WRONLY | os.O_TRUNC) is None
    assert nowait.open_cached(str(tmp_path / "new"), os.O_WRONLY | os.O_CREAT) is None
    assert not (tmp_path / "new").exists() and path.read_bytes() == b"data"


def test_read_cached_reads_only_from_the_page_cache(tmp_path: Path) -> None:
    data = os.urandom(256 * 1024)
    with _opened(_uncached_file(tmp_path, data)) as (fd, dev):
        # A miss starts the kernel's readahead and is then looked up again: if the disk answered in
        # between (a preempted test, a host-cached disk), the data comes back after all, and it must
        # be the right data. The miss is what is tested, so it is tried until one is seen.
        for _ in range(20):
            got = nowait.read_cached(fd, 4096, 128 * 1024, dev)
            if got is None:
                break
            assert bytes(got) == data[128 * 1024:][:4096]
            _evict(fd)
        else:
            pytest.fail("read_cached never said 'would block' for pages that were not cached")
        assert os.pread(fd, len(data), 0) == data  # now it is all cached
        assert bytes(nowait.read_cached(fd, 4096, 128 * 1024, dev) or b"") == data[128 * 1024:][:4096]
        # At the end of the file a short read is the whole answer, not "would block".
        assert bytes(nowait.read_cached(fd, 8192, len(data) - 100, dev) or b"") == data[-100:]
        past_end = nowait.read_cached(fd, 8192, len(data) + 10, dev)
        assert past_end is not None and bytes(past_end) == b""


def test_prefetch_brings_the_head_of_a_file_into_the_page_cache(tmp_path: Path) -> None:
    data = os.urandom(64 * 1024)
    with _opened(_uncached_file(tmp_path, data)) as (fd, dev):
        # Read with read_cached only once cachestat shows every page in the cache (some perhaps
        # still being read): a miss before that would start readahead of its own.
        nowait.prefetch(fd, len(data))
        deadline = time.monotonic() + 10
        while _cached_pages(fd) < len(data) // os.sysconf("SC_PAGESIZE"):
            assert time.monotonic() < deadline, "prefetch never brought the pages in"
            time.sleep(0.001)
        while (got := nowait.read_cached(fd, len(data), 0, dev)) is None:
            assert time.monotonic() < deadline, "the prefetched data never arrived"
            time.sleep(0.001)
        assert bytes(got) == data


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of our own: it has no RWF_NOWAIT reads."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)


def test_a_filesystem_that_refuses_is_not_asked_again_and_others_still_are(
    tmp_path: Path, tmpfs: Path
) -> None:
    (tmpfs / "file").write_bytes(b"in memory")
    (tmp_path / "file").write_bytes(b"on disk")
    with (
        _opened(tmpfs / "file", uncached=False) as (in_memory, tmpfs_dev),
        _opened(tmp_path / "file", uncached=False) as (on_disk, disk_dev),
    ):
        assert nowait.read_cached(in_memory, 100, 0, tmpfs_dev) is None
        assert tmpfs_dev in nowait._read_refused
        assert bytes(nowait.read_cached(on_disk, 100, 0, disk_dev) or b"") == b"on disk"
