"""FUSE passthrough: the kernel reads and writes files whose data is in the upper dir itself.

Judged by what reached the daemon (its `-d` log, as the request tests) and by what every open
reads: the kernel fails an open with EIO where an inode's opens mix passthrough and cached mode
or name two backing ids (fs/fuse/iomode.c), so the mixes are played out here. Needs the binding's
passthrough (pyfuse3 built against libfuse 3.17 by scripts/setup); on another binding these tests
are skipped, and in CI that is a failure of the set-up, not a skip.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from overlayfuse.daemon import binding, pagecache
from tests.conftest import skip_or_fail
from tests.support.mounts import kernel_overlay, run_isolated
from tests.support.requestlog import debug_daemon, request_counts, requests
from tests.support.servicetools import faultfs
from tests.support.trees import File, make_tree

pytestmark = pytest.mark.mount

CHUNK = 8192


@pytest.fixture(autouse=True)
def _passthrough_binding() -> None:
    if not binding.detect().passthrough:
        skip_or_fail("the binding has no passthrough: scripts/setup builds pyfuse3 against libfuse 3.17")


def _create_append_read(mnt: str) -> tuple[bytes, bytes]:
    """A new file written in three chunks, a lower file appended to (a copy-up), both read back."""
    fd = os.open(f"{mnt}/new", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    for i in range(3):
        os.write(fd, bytes([65 + i]) * CHUNK)
    os.close(fd)
    with open(f"{mnt}/lower", "ab") as f:
        f.write(b"appended")
    with open(f"{mnt}/new", "rb") as new, open(f"{mnt}/lower", "rb") as lower:
        return new.read(), lower.read()


def _read_lower_twice(mnt: str) -> bytes:
    """A lower file read through two opens one after the other: each a cached open."""
    with open(f"{mnt}/big", "rb") as f:
        f.read()
    with open(f"{mnt}/big", "rb") as f:
        return f.read()


def test_lower_files_of_a_writable_mount_are_read_through_the_daemon(tmp_path: Path) -> None:
    """A read-only open of a lower file must read the upper copy once another open copies it
    up, which a backing file bound at open could not: so lower data is never passed through. (A
    file this big is read by READs; a small one is handed to the kernel's cache at its open, see
    test_requests.)"""
    data = os.urandom(pagecache.STORE_MAX + 1)
    lower = make_tree(tmp_path / "lower", File("big", data))
    with debug_daemon(tmp_path, lower) as (mnt, log):
        assert run_isolated(_read_lower_twice, str(mnt)) == data
        counts = request_counts(log)
    assert counts["read"] >= 1, counts


@pytest.mark.parametrize("option", ["", "passthrough=off"])
def test_reads_and_writes_of_upper_files_never_reach_the_daemon(tmp_path: Path, option: str) -> None:
    lower = make_tree(tmp_path / "lower", File("lower", b"from below\n"))
    with debug_daemon(tmp_path, lower, options=option) as (mnt, log):
        new, appended = run_isolated(_create_append_read, str(mnt))
        counts = request_counts(log)
    assert new == b"A" * CHUNK + b"B" * CHUNK + b"C" * CHUNK
    assert appended == b"from below\nappended"
    assert (tmp_path / "upper/new").read_bytes() == new
    assert (tmp_path / "upper/lower").read_bytes() == appended
    if option:
        assert counts["write"] >= 4 and counts["read"] >= 1, counts
    else:
        assert counts["write"] == counts["read"] == 0, counts
        assert "FUSE passthrough: on" in log.read_text()


def _read_twice(path: str) -> tuple[bytes, bytes]:
    """PATH read through two opens at once, then mapped (passthrough serves mmap too)."""
    import mmap

    with open(path, "rb") as first, open(path, "rb") as second:
        data = first.read()
        with mmap.mmap(second.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            return data, mapped[:]


def test_a_read_only_mount_passes_every_file_through(tmp_path: Path) -> None:
    """Nothing is ever copied up there, so lower files stay put while they are open."""
    lower = make_tree(tmp_path / "lower", File("big", os.urandom(3 * 1024 * 1024)))
    with debug_daemon(tmp_path, lower, writable=False) as (mnt, log):
        first, mapped = run_isolated(_read_twice, str(mnt / "big"))
        counts = request_counts(log)
    assert first == mapped == (lower / "big").read_bytes()
    assert counts["open"] == 2 and counts["read"] == 0, counts


def _read_errno(path: str) -> int:
    try:
        with open(path, "rb") as f:
            f.read()
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_a_failing_disk_under_a_passed_through_file_fails_the_read(tmp_path: Path) -> None:
    """The kernel reads the file itself, so the error comes from the layer's disk to the reader
    unchanged, and the daemon, which never sees the read, logs nothing about it."""
    with faultfs(tmp_path / "control", tmp_path / "faulty") as lower, \
            debug_daemon(tmp_path, lower, writable=False) as (mnt, log):
        assert run_isolated(_read_errno, str(mnt / "ok")) == 0
        assert run_isolated(_read_errno, str(mnt / "broken")) == errno.EIO
        counts = request_counts(log)
    assert counts["read"] == 0, counts


def _mixed_opens(mnt: str) -> list[bytes]:
    """Opens of one file in every order the kernel's io modes care about; what each read saw."""
    seen = []
    path = f"{mnt}/f"
    reader = os.open(path, os.O_RDONLY)  # a lower file: cached
    seen.append(os.pread(reader, 100, 0))
    writer = os.open(path, os.O_WRONLY | os.O_APPEND)  # copies up while the reader is open: cached too
    os.write(writer, b"+1")
    seen.append(os.pread(reader, 100, 0))  # the read-only fd follows the copy-up
    os.close(writer)
    os.close(reader)
    first = os.open(path, os.O_RDWR | os.O_APPEND)  # upper data, nothing open: passed through
    second = os.open(path, os.O_RDONLY)  # another open while one is passed through: the same id
    os.write(first, b"+2")
    seen.append(os.pread(second, 100, 0))
    os.close(first)
    third = os.open(path, os.O_RDWR | os.O_APPEND)  # the id still held by the second open
    os.write(third, b"+3")
    os.close(second)
    os.close(third)
    with open(path, "rb") as again:  # every open gone: a new id
        seen.append(again.read())
    return seen


def test_mixed_opens_of_one_file_never_fail(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", File("f", b"base"))
    with debug_daemon(tmp_path, lower) as (mnt, log):
        seen = run_isolated(_mixed_opens, str(mnt))
        writes = [args for op, args in requests(log) if op == "write"]
    assert seen == [b"base", b"base+1", b"base+1+2", b"base+1+2+3"]
    assert len(writes) == 1, writes  # only "+1", written while the lower file's reader was cached


def _cached_after_passthrough(mnt: str) -> bytes:
    """A lower file read (its pages cached), rewritten through a passthrough open, made set-id
    (which is never passed through), then read through a cached open. Its old mtime is put back:
    a new one would make the kernel drop the pages for that reason alone (auto_inval_data)."""
    path = f"{mnt}/s"
    with open(path, "rb") as f:
        f.read()
    before = os.stat(path)
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"B" * CHUNK, 0)
    os.close(fd)
    os.chmod(path, 0o4755)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with open(path, "rb") as f:
        return f.read()


def test_a_cached_open_after_passthrough_writes_reads_them(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", File("s", b"A" * CHUNK))
    with debug_daemon(tmp_path, lower) as (mnt, log):
        data = run_isolated(_cached_after_passthrough, str(mnt))
        counts = request_counts(log)
    assert data == b"B" * CHUNK
    assert counts["write"] == 0 and counts["read"] >= 1, counts  # the set-id file's read reached it


def test_a_mount_with_a_control_socket_is_never_passed_through(tmp_path: Path) -> None:
    """A freeze for `overlayctl commit` must hold writes back, and a passthrough write never asks."""
    lower = make_tree(tmp_path / "lower", File("lower", b"from below\n"))
    control = f"@overlayfuse-test-{os.getpid()}-{tmp_path.name}"
    with debug_daemon(tmp_path, lower, options=f"control={control}") as (mnt, log):
        run_isolated(_create_append_read, str(mnt))
        counts = request_counts(log)
    assert counts["write"] >= 4, counts


def test_an_upper_dir_on_overlayfs_gets_no_passthrough(tmp_path: Path) -> None:
    """The kernel refuses backing files on a stacked filesystem (this mount stays stackable):
    passthrough goes off for the mount, once, with the reason, and every write still works."""
    lower = make_tree(tmp_path / "lower", File("lower", b"from below\n"))
    for name in ("klower", "kupper", "kwork"):
        (tmp_path / name).mkdir()
    kernel = tmp_path / "kernel"
    with kernel_overlay(kernel, [tmp_path / "klower"], tmp_path / "kupper", tmp_path / "kwork"), \
            debug_daemon(tmp_path, lower, upper_in=kernel) as (mnt, log):
        new, appended = run_isolated(_create_append_read, str(mnt))
        text = log.read_text()
        counts = request_counts(log)
    assert new == b"A" * CHUNK + b"B" * CHUNK + b"C" * CHUNK and appended == b"from below\nappended"
    assert text.count("FUSE passthrough off for this mount") == 1, text
    assert "on a stacked filesystem" in text
    assert counts["write"] >= 3, counts
