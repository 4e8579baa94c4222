"""`images.remove`: trees of any depth and any modes go, iteratively, and nothing a symlink in
them points at is touched (every link in these trees aims at a canary in the test's tmp dir)."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from pathlib import Path

import pytest

from overlayfuse.images.remove import remove_at, remove_tree

CANARY = b"canary: must stay as it is\n"
#: Deeper than Python's recursion limit and than PATH_MAX allows a path to name at once.
DEEP = 20_000
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def _canary(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_bytes(CANARY)
    return outside


def _assert_canary(outside: Path) -> None:
    assert os.listdir(outside) == ["canary"]
    assert (outside / "canary").read_bytes() == CANARY
    assert stat.S_IMODE(os.lstat(outside / "canary").st_mode) == 0o644
    assert stat.S_IMODE(os.lstat(outside).st_mode) == 0o755


def _make_chain(top: Path, depth: int, leaf: str = "f") -> None:
    """A chain of DEPTH dirs named d under TOP, made through fds (no path is that long)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)


def test_a_chain_deeper_than_the_recursion_limit_is_removed(tmp_path: Path) -> None:
    _make_chain(tmp_path / "deep", DEEP)
    remove_tree(tmp_path / "deep")
    assert os.listdir(tmp_path) == []


def test_wide_and_odd_trees_are_removed_and_symlinks_never_followed(tmp_path: Path) -> None:
    outside = _canary(tmp_path)
    top = tmp_path / "tree"
    top.mkdir()
    for i in range(300):
        (top / f"sub{i}").mkdir()
        (top / f"sub{i}" / "f").write_bytes(b"x")
    (top / "link-to-dir").symlink_to(outside)
    (top / "link-to-file").symlink_to(outside / "canary")
    os.mkfifo(top / "fifo")
    (top / "ro").mkdir()
    (top / "ro" / "f").write_bytes(b"x")
    (top / "ro" / "inner").mkdir()
    os.chmod(top / "ro" / "inner", 0)
    os.chmod(top / "ro", 0o500)
    remove_tree(top)
    assert os.listdir(tmp_path) == ["outside"]
    _assert_canary(outside)


def test_a_symlink_given_as_the_tree_is_removed_not_followed(tmp_path: Path) -> None:
    outside = _canary(tmp_path)
    (tmp_path / "link").symlink_to(outside)
    remove_tree(tmp_path / "link")
    remove_tree(tmp_path / "missing")  # nothing there: fine
    assert os.listdir(tmp_path) == ["outside"]
    _assert_canary(outside)


def test_remove_at_takes_a_name_in_a_directory_fd(tmp_path: Path) -> None:
    _make_chain(tmp_path / "deep", 50)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_at(fd, "deep")
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []


def _set_immutable(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("l", flags | _FS_IMMUTABLE_FL))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def test_immutable_entries_are_removed_when_we_may(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root may set or clear the immutable flag")
    top = tmp_path / "tree"
    (top / "d").mkdir(parents=True)
    (top / "d" / "f").write_bytes(b"x")
    (top / "g").write_bytes(b"x")
    if not (_set_immutable(top / "d" / "f") and _set_immutable(top / "d") and _set_immutable(top / "g")):
        pytest.skip(f"the filesystem of {tmp_path} has no immutable flag")
    remove_tree(top)
    assert os.listdir(tmp_path) == []
