"""Mounting from fstab: ``overlayfuse /mnt/root fuse.overlayfuse lowerdir=...,upperdir=...,workdir=... 0 0``.

mount(8) hands a ``fuse.overlayfuse`` entry to fuse3's mount helper, which runs ``overlayfuse SOURCE
MOUNTPOINT -o OPTS`` (found on PATH: /usr/local/bin, made by scripts/setup). ``mount -T FILE``
reads a temporary fstab instead of /etc/fstab, so the real path is tested without touching the
machine's. fstab-only words (noauto, nofail, _netdev, x-systemd.*) must neither fail nor warn,
whether mount(8) strips them (it does) or the daemon gets them directly.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlayfuse.daemon.options import parse_args
from tests.conftest import skip_or_fail
from tests.support.mounts import (
    DAEMON_EXIT_TIMEOUT,
    MOUNT_TIMEOUT,
    daemon_pids,
    mount_at,
    overlayfuse,
    run,
    run_isolated,
    system_binary_problem,
    teardown_overlayfuse,
    wait_pids_gone,
)
from tests.support.trees import File, make_tree

FSTAB_WORDS = ["noauto", "nofail", "_netdev", "defaults", "auto", "user", "x-systemd.automount",
               "x-systemd.requires=local-fs.target", "x-systemd.device-timeout=5", "x-mount.mkdir"]


@dataclass(frozen=True, slots=True)
class Stack:
    top: Path
    base: Path
    upper: Path
    work: Path
    mnt: Path


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    # A space in a layer's path: fstab writes it as \040.
    top = make_tree(tmp_path / "top layer", File("etc/motd", b"top\n"))
    base = make_tree(tmp_path / "base", File("etc/motd", b"base\n"), File("etc/hostname", b"box\n"))
    for name in ("upper", "work", "mnt"):
        (tmp_path / name).mkdir()
    return Stack(top, base, tmp_path / "upper", tmp_path / "work", tmp_path / "mnt")


def _fstab_path(path: Path) -> str:
    return str(path).replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _require_helper() -> None:
    problem = system_binary_problem()
    if problem:
        skip_or_fail(problem)


def _unmount_and_wait(mnt: Path) -> None:
    pids = daemon_pids(mnt)
    assert pids, "cannot find the daemon mount(8) started"
    proc = run(["umount", mnt], timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert wait_pids_gone(pids, DAEMON_EXIT_TIMEOUT) == [], "the daemon outlived umount"
    assert mount_at(mnt) is None


@pytest.mark.mount
def test_mount_by_its_fstab_line(stack: Stack, tmp_path: Path, overlayfuse_bin: Path) -> None:
    _require_helper()
    options = ",".join([
        f"lowerdir={_fstab_path(stack.top)}:{_fstab_path(stack.base)}",
        f"upperdir={_fstab_path(stack.upper)}", f"workdir={_fstab_path(stack.work)}", *FSTAB_WORDS,
    ])  # fmt: skip
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\noverlayfuse {_fstab_path(stack.mnt)} fuse.overlayfuse {options} 0 0\n")
    try:
        # cwd: mount(8) takes a SOURCE that exists as a relative path for a path and canonicalizes it.
        proc = run(["mount", "-T", fstab, stack.mnt], timeout=MOUNT_TIMEOUT, cwd=tmp_path,
                   stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stderr == b"", "fstab words must not be warned about"
        info = mount_at(stack.mnt)
        assert info is not None and (info.fstype, info.source) == ("fuse.overlayfuse", "overlayfuse")
        assert "rw" in info.mount_options.split(",")
        assert run_isolated(_read, str(stack.mnt / "etc/motd"), timeout=30) == b"top\n"
        assert run_isolated(_read, str(stack.mnt / "etc/hostname"), timeout=30) == b"box\n"
        run_isolated(_write, str(stack.mnt / "etc/hostname"), b"renamed\n", timeout=30)
        assert (stack.upper / "etc/hostname").read_bytes() == b"renamed\n"
        assert (stack.base / "etc/hostname").read_bytes() == b"box\n"
        _unmount_and_wait(stack.mnt)
    finally:
        teardown_overlayfuse(stack.mnt)


@pytest.mark.mount
def test_mount_t_read_write_with_fstab_words(stack: Stack, tmp_path: Path, overlayfuse_bin: Path) -> None:
    """What systemd's fstab generator runs for such a line: ``mount -t fuse.overlayfuse ...``
    (tests/daemon/test_cli.py covers a read-only lowerdir alone)."""
    _require_helper()
    options = ",".join([f"lowerdir={stack.top}:{stack.base}", f"upperdir={stack.upper}",
                        f"workdir={stack.work}", "nofail", "x-systemd.automount", "nosuid"])
    try:
        proc = run(["mount", "-t", "fuse.overlayfuse", "overlayfuse", stack.mnt, "-o", options],
                   timeout=MOUNT_TIMEOUT, cwd=tmp_path, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()
        info = mount_at(stack.mnt)
        assert info is not None and "nosuid" in info.mount_options.split(",")
        run_isolated(os.mkdir, str(stack.mnt / "new"), timeout=30)
        assert (stack.upper / "new").is_dir()
        _unmount_and_wait(stack.mnt)
    finally:
        teardown_overlayfuse(stack.mnt)


@pytest.mark.mount
def test_daemon_given_fstab_words_directly_does_not_warn(stack: Stack, overlayfuse_bin: Path) -> None:
    with overlayfuse(stack.mnt, [stack.top, stack.base], extra=FSTAB_WORDS) as fuse:
        assert run_isolated(_read, str(stack.mnt / "etc/motd"), timeout=30) == b"top\n"
    assert "warn" not in fuse.log_text().lower(), fuse.log_text()


def test_fstab_words_parse_to_nothing() -> None:
    plain = parse_args(["-o", "lowerdir=/l", "/mnt"], euid=0)
    worded = parse_args(["-o", "lowerdir=/l," + ",".join(FSTAB_WORDS), "/mnt"], euid=0)
    assert worded.warnings == ()
    assert worded == plain
