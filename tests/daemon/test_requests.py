"""What the kernel asks the daemon: the requests behind common work, counted in the debug log.

The speed of a FUSE filesystem in Python is mostly the number of requests it has to answer. These
tests pin the levers that cut them (bigger reads, no FLUSH on close), by running a `-d` daemon and
reading which requests reached it. Timing is the benchmark's business (scripts/bench), not theirs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlayfuse.daemon import readahead
from tests.support.mounts import drop_caches, run_isolated
from tests.support.requestlog import debug_daemon, request_counts, requests
from tests.support.trees import File, make_tree

pytestmark = pytest.mark.mount

MIB = 1 << 20


def _read_all(path: str) -> int:
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            total += len(chunk)
    return total


def _read_each(paths: list[str]) -> int:
    return sum(_read_all(path) for path in paths)


def test_sequential_read_comes_in_1mib_requests(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", File("big", os.urandom(8 * MIB)))
    with debug_daemon(tmp_path, lower) as (mnt, log):
        st_dev = run_isolated(os.stat, str(mnt)).st_dev
        with open(readahead.bdi_setting(st_dev)) as setting:
            assert int(setting.read()) == readahead.READ_AHEAD_KB
        drop_caches()
        start = log.stat().st_size
        assert run_isolated(_read_all, str(mnt / "big")) == 8 * MIB
        sizes = [int(args.split(", ")[2]) for op, args in requests(log, start) if op == "read"]
    # The kernel's default window would have sent 64 reads of 128 KiB.
    assert sum(sizes) >= 8 * MIB
    assert len(sizes) <= 10, sizes
    assert max(sizes) == MIB


def test_close_sends_no_flush_after_the_first(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", *(File(f"f{i}", b"x") for i in range(20)))

    with debug_daemon(tmp_path, lower) as (mnt, log):
        assert run_isolated(_read_each, [str(mnt / f"f{i}") for i in range(20)]) == 20
        counts = request_counts(log)
    assert counts["open"] == 20 and counts["release"] == 20
    # The first FLUSH is answered ENOSYS, and the kernel stops sending them.
    assert counts["flush"] <= 1, counts


def _probe_missing(paths: list[str]) -> list[bool]:
    return [os.path.lexists(path) for path in paths]


def test_a_missing_name_is_asked_for_once(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", File("d/present", b"x"))
    with debug_daemon(tmp_path, lower) as (mnt, log):
        missing = [str(mnt / "d" / "missing")] * 5 + [str(mnt / "nothing")] * 5
        assert run_isolated(_probe_missing, missing) == [False] * 10
        lookups = [args for op, args in requests(log)
                   if op == "lookup" and ("missing" in args or "nothing" in args)]
        assert len(lookups) == 2, lookups
        # The kernel drops the remembered miss when the name is made through the mount.
        (mnt / "d" / "missing").write_bytes(b"now here")
        os.mkdir(mnt / "nothing")
        assert run_isolated(_probe_missing, missing) == [True] * 10
        assert (mnt / "d" / "missing").read_bytes() == b"now here"

