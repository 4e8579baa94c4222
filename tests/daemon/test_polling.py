"""``-o poll_us=``: the request loop polls /dev/fuse before it sleeps (pyfuse3 patch 0005).

What is tested is the mechanism, not its speed (scripts/bench measures that): with a window the
daemon's request thread calls sched_yield between reads of an empty /dev/fuse; with poll_us=0 it
never does; a one-CPU affinity turns it off; bad values are refused before anything is mounted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from overlayfuse.daemon import binding, polling
from overlayfuse.daemon.options import UsageError, parse_args
from tests.support.mounts import FuseMount, mount_syscalls

TIMEOUT = 30.0

Mounter = Callable[..., FuseMount]


def test_option_is_parsed_and_checked() -> None:
    assert parse_args(["-o", "lowerdir=/l", "/m"]).poll_us is None
    assert parse_args(["-o", "lowerdir=/l,poll_us=0", "/m"]).poll_us == 0
    assert parse_args(["-o", "lowerdir=/l,poll_us=75", "/m"]).poll_us == 75
    for bad in ("-1", "x", "", "10001", "1.5"):
        with pytest.raises(UsageError, match="poll_us="):
            parse_args(["-o", f"lowerdir=/l,poll_us={bad}", "/m"])


def test_window_from_option_environment_or_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv(polling.POLL_ENV, raising=False)
    assert polling.poll_us(None) == polling.DEFAULT_POLL_US
    assert polling.poll_us(0) == 0
    monkeypatch.setenv(polling.POLL_ENV, "7")
    assert polling.poll_us(None) == 7
    assert polling.poll_us(30) == 30  # the option wins over the environment
    monkeypatch.setenv(polling.POLL_ENV, "lots")
    assert polling.poll_us(None) == polling.DEFAULT_POLL_US


def test_never_polls_on_one_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    assert polling.poll_us(None) == 0
    assert polling.poll_us(500) == 0


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (tmp_path / name for name in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "f").write_text("f\n")
    return lower, upper, work, mnt



def _missing_xattrs(mnt: Path) -> None:
    """Requests no cache of the kernel's answers, each followed by a pause longer than a window of
    a few ms would last under strace."""
    for _ in range(20):
        try:
            os.getxattr(mnt / "f", "user.none", follow_symlinks=False)
        except OSError:
            pass
    time.sleep(0.2)


@pytest.mark.mount
@pytest.mark.skipif(not binding.detect().poll, reason="pyfuse3 without patch 0005 (stock): no request polling")
@pytest.mark.parametrize(("option", "polls"), [("poll_us=0", False), ("poll_us=2000", True)])
def test_request_loop_polls_only_with_a_window(
    fuse_mount: Mounter, layers: tuple[Path, Path, Path, Path], tmp_path: Path, option: str, polls: bool
) -> None:
    lower, upper, work, mnt = layers
    fuse_mount(mnt, [lower], upper, work, (option,))
    count = mount_syscalls(mnt, ("sched_yield",), lambda: _missing_xattrs(mnt), tmp_path / "strace.out")
    assert (count > 0) is polls, f"{count} sched_yield calls with {option}"
    assert (mnt / "f").read_text() == "f\n"
