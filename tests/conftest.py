"""Shared fixtures: preconditions (root, kernel overlayfs, the daemon) and mount teardown.

Tests marked `kernel` need root and `mount -t overlay`.  On a developer machine without
them they are skipped; in CI (`CI` set and not empty) a missing precondition is an error, because a
skipped oracle would let every comparison pass silently.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.mounts import (
    FuseMount,
    MountError,
    kernel_overlay,
    mounts,
    overlayfuse,
    overlayfuse_binary,
    teardown_overlayfuse,
    unmount_kernel,
)


def in_ci() -> bool:
    """Any non-empty CI counts (GitHub sets "true", others "1" or "yes"): a CI that named
    itself differently must not quietly get the local, skipping behaviour."""
    return bool(os.environ.get("CI"))


def skip_or_fail(reason: str) -> None:
    """Skip locally; fail in CI, where every precondition is supposed to hold."""
    if in_ci():
        pytest.fail(f"precondition missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _kernel_overlay_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not Path("/dev/fuse").exists():
        return "needs /dev/fuse"
    with open("/proc/filesystems") as f:
        if "overlay" in f.read():
            return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["modprobe", "overlay"], capture_output=True, timeout=30, check=False)
    with open("/proc/filesystems") as f:
        return None if "overlay" in f.read() else "kernel has no overlay filesystem"


def _fuse_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    return None if Path("/dev/fuse").exists() else "needs /dev/fuse"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", type=float, metavar="SECONDS", default=None,
        help="run the differential test against the kernel for SECONDS, with a fresh random seed",
    )


def pytest_configure(config: pytest.Config) -> None:
    # A fork server someone runs on this machine (README: "Fork server") must not change what the
    # suite tests: every `overlayfuse` command mounts in its own process unless a test (the fork
    # server's own) names a server.
    os.environ["OVERLAYFUSE_FORK_SERVER"] = "off"
    # Before collection, so test_differential.py's budget (read at import) sees it.
    seconds = config.getoption("--long")
    if seconds:
        os.environ["OVERLAYFUSE_DIFF_SECONDS"] = str(seconds)
        os.environ.setdefault("OVERLAYFUSE_DIFF_SEED", "random")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None:
        missing = _kernel_overlay_missing()
        if missing:
            skip_or_fail(missing)
    if item.get_closest_marker("mount") is not None:
        missing = _fuse_missing()
        if missing:
            skip_or_fail(missing)


@pytest.fixture(scope="session")
def overlayfuse_bin() -> Path:
    """The daemon's executable; tests that mount overlayfuse take this fixture."""
    binary = overlayfuse_binary()
    if binary is None:
        skip_or_fail("overlayfuse is not installed in this venv nor on PATH")
    assert binary is not None
    return binary


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the session, nothing may stay mounted under this session's temp dir.

    Each mount is torn down by its own fixture; this is the net under that net, so a
    bug in one teardown neither leaks a mount nor lets pytest's temp-dir cleanup later
    recurse into a live mount.  Only this session's directory is touched: another test
    run may be going on in parallel.
    """
    yield
    base = str(tmp_path_factory.getbasetemp()) + "/"
    leaked = [m for m in mounts() if m.mountpoint.startswith(base)]
    for m in reversed(leaked):  # deepest (latest) first
        with contextlib.suppress(MountError, subprocess.SubprocessError):
            if m.fstype.startswith("fuse"):
                teardown_overlayfuse(Path(m.mountpoint))
            else:
                unmount_kernel(Path(m.mountpoint))
    assert not leaked, f"mounts leaked by tests: {[m.mountpoint for m in leaked]}"


MountFactory = Callable[..., Path]


@pytest.fixture
def kernel_mount() -> Iterator[MountFactory]:
    """Factory: `kernel_mount(mnt, lowers, upper=None, work=None)`; unmounted at teardown."""
    with contextlib.ExitStack() as stack:
        def mount(mnt: Path, lowers: list[Path], upper: Path | None = None,
                  work: Path | None = None, extra: str = "") -> Path:
            return stack.enter_context(kernel_overlay(mnt, lowers, upper, work, extra))
        yield mount


@pytest.fixture
def fuse_mount(overlayfuse_bin: Path) -> Iterator[Callable[..., FuseMount]]:
    """Factory: `fuse_mount(mnt, lowers, upper=None, work=None, extra=())`; torn down after."""
    with contextlib.ExitStack() as stack:
        def mount(mnt: Path, lowers: list[Path], upper: Path | None = None,
                  work: Path | None = None, extra: Any = ()) -> FuseMount:
            return stack.enter_context(overlayfuse(mnt, lowers, upper, work, extra))
        yield mount
