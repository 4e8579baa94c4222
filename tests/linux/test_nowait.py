"""`nowait`: the calls the event loop tries before it hands work to a thread.

Each must do the work when the caches hold what it needs, say "would block" (None) when they do not,
and otherwise fail exactly as the plain call would. Emptying the caches needs root.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[int, int]]:
    """PATH opened read-only, none of its data cached: its fd and the st_dev `read_cached` wants;
    closed afterwards.

    Its pages are dropped again through the fd: right after `drop_caches` a few of them were
    sometimes still cached (1-6 probes in 20 on this VM, none half a second later), which failed
    these tests' "nothing cached yet" step. `_uncached_file` cannot do this itself: opening the
    file caches the dentries that the open_cached tests need uncached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
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
        assert nowait.read_cached(fd, 4096, 128 * 1024, dev) is None
        assert os.pread(fd, len(data), 0) == data  # now it is all cached
        assert bytes(nowait.read_cached(fd, 4096, 128 * 1024, dev) or b"") == data[128 * 1024:][:4096]
        # At the end of the file a short read is the whole answer, not "would block".
        assert bytes(nowait.read_cached(fd, 8192, len(data) - 100, dev) or b"") == data[-100:]
        past_end = nowait.read_cached(fd, 8192, len(data) + 10, dev)
        assert past_end is not None and bytes(past_end) == b""


def test_prefetch_brings_the_head_of_a_file_into_the_page_cache(tmp_path: Path) -> None:
    data = os.urandom(64 * 1024)
    with _opened(_uncached_file(tmp_path, data)) as (fd, dev):
        assert nowait.read_cached(fd, len(data), 0, dev) is None
        nowait.prefetch(fd, len(data))
        deadline = time.monotonic() + 10
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
    with _opened(tmpfs / "file") as (in_memory, tmpfs_dev), _opened(tmp_path / "file") as (on_disk, disk_dev):
        assert nowait.read_cached(in_memory, 100, 0, tmpfs_dev) is None
        assert tmpfs_dev in nowait._read_refused
        assert bytes(nowait.read_cached(on_disk, 100, 0, disk_dev) or b"") == b"on disk"
