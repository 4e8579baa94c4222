"""The hardlink index in the kernel's format, with kernel overlayfs as the oracle.

A lower file with three names (two in one directory, one in another) is changed through one name;
the other names must show the change afterwards, as the same inode with the same link count,
whichever implementation wrote the upper dir and whichever reads it:

- overlayfuse writes, ``mount -t overlay -o index=on,...`` reads (the same upper and work dirs);
- the kernel writes, overlayfuse reads, and a name still below, written to through overlayfuse,
  joins the same file (and the kernel agrees once more afterwards);
- copied up by each over the same lower dir, the index entry has the same name (the hex of the
  lower file's handle) and the copy the same ``overlay.origin`` and ``overlay.nlink`` bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.mounts import kernel_overlay, overlayfuse, run_isolated
from tests.support.trees import File, make_tree
from tests.support.writes import Step, apply_steps, mount_dirs

pytestmark = [pytest.mark.kernel, pytest.mark.mount]

OPTS = "redirect_dir=on,metacopy=on,index=on"
NAMES = ("d/a", "d/b", "e/c")
ORIGINAL = b"original\n" * 100


@dataclass(frozen=True, slots=True)
class Shown:
    """One merged name, as a reader sees it."""

    data: bytes
    ino: int
    nlink: int


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "lower", File("d/a", ORIGINAL), File("single", b"one name\n"))
    (root / "e").mkdir()
    os.link(root / "d/a", root / "d/b")
    os.link(root / "d/a", root / "e/c")
    return root


def _read(path: str) -> tuple[bytes, int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        return os.read(fd, 1 << 20), st.st_ino, st.st_nlink
    finally:
        os.close(fd)


def _view(mnt: Path) -> dict[str, Shown]:
    """Each name's data, st_ino and st_nlink, read in a child process (a hung mount cannot hang
    the test)."""
    return {name: Shown(*run_isolated(_read, str(mnt / name))) for name in NAMES}


def _assert_one_file(view: dict[str, Shown], data: bytes, nlink: int = 3) -> None:
    assert {shown.data for shown in view.values()} == {data}, view
    assert len({shown.ino for shown in view.values()}) == 1, view
    assert {shown.nlink for shown in view.values()} == {nlink}, view


def _index_entries(work: Path) -> list[str]:
    return sorted(os.listdir(work / "index"))


def test_kernel_reads_our_index(tmp_path: Path, overlayfuse_bin: Path, lower: Path) -> None:
    side = mount_dirs(tmp_path, "ours")
    with overlayfuse(side.mnt, [lower], side.upper, side.work, OPTS.split(",")):
        apply_steps(side.mnt, [("write", "d/a", 0, b"CHANGED")])
        ours = _view(side.mnt)
    changed = b"CHANGED" + ORIGINAL[7:]
    _assert_one_file(ours, changed)
    origin = os.getxattr(side.upper / "d/a", "trusted.overlay.origin")
    assert _index_entries(side.work) == [origin.hex()]
    with kernel_overlay(side.mnt, [lower], side.upper, side.work, OPTS):
        theirs = _view(side.mnt)
        _assert_one_file(theirs, changed)
        # and the kernel goes on from there: a write through a name still below reaches all three
        apply_steps(side.mnt, [("write", "e/c", 0, b"KERNEL!")])
        _assert_one_file(_view(side.mnt), b"KERNEL!" + ORIGINAL[7:])
    assert os.path.samefile(side.upper / "e/c", side.upper / "d/a")


def test_we_read_kernel_index(tmp_path: Path, overlayfuse_bin: Path, lower: Path) -> None:
    side = mount_dirs(tmp_path, "kernel")
    with kernel_overlay(side.mnt, [lower], side.upper, side.work, OPTS):
        apply_steps(side.mnt, [("write", "d/a", 0, b"CHANGED")])
        theirs = _view(side.mnt)
    changed = b"CHANGED" + ORIGINAL[7:]
    _assert_one_file(theirs, changed)
    assert len(_index_entries(side.work)) == 1 and not (side.upper / "d/b").exists()
    with overlayfuse(side.mnt, [lower], side.upper, side.work, OPTS.split(",")):
        _assert_one_file(_view(side.mnt), changed)
        # a name still below, copied up through overlayfuse, joins the kernel's copy
        apply_steps(side.mnt, [("write", "e/c", 0, b"OURS!!!"), ("unlink", "d/b")])
        ours = _view_of(side.mnt, ("d/a", "e/c"))
    assert os.path.samefile(side.upper / "e/c", side.upper / "d/a")
    assert {s.data for s in ours.values()} == {b"OURS!!!" + ORIGINAL[7:]} and {s.nlink for s in ours.values()} == {2}
    with kernel_overlay(side.mnt, [lower], side.upper, side.work, OPTS):
        again = _view_of(side.mnt, ("d/a", "e/c"))
        assert not (side.mnt / "d/b").exists()
    assert {s.data for s in again.values()} == {b"OURS!!!" + ORIGINAL[7:]}
    assert len({s.ino for s in again.values()}) == 1 and {s.nlink for s in again.values()} == {2}


def _view_of(mnt: Path, names: tuple[str, ...]) -> dict[str, Shown]:
    return {name: Shown(*run_isolated(_read, str(mnt / name))) for name in names}


def test_index_entry_is_the_kernels(tmp_path: Path, overlayfuse_bin: Path, lower: Path) -> None:
    """The same copy-up under each, over one lower dir: the same entry name, origin and count."""
    kernel, ours = mount_dirs(tmp_path, "kernel"), mount_dirs(tmp_path, "ours")
    steps: list[Step] = [("write", "d/a", 0, b"CHANGED"), ("write", "single", 0, b"O")]
    with kernel_overlay(kernel.mnt, [lower], kernel.upper, kernel.work, OPTS):
        apply_steps(kernel.mnt, steps)
    with overlayfuse(ours.mnt, [lower], ours.upper, ours.work, OPTS.split(",")):
        apply_steps(ours.mnt, steps)
    theirs = _index_entries(kernel.work)
    assert len(theirs) == 1 and _index_entries(ours.work) == theirs  # the file with one name: none
    for xattr in ("trusted.overlay.origin", "trusted.overlay.nlink"):
        mine = os.getxattr(ours.upper / "d/a", xattr)
        assert mine == os.getxattr(kernel.upper / "d/a", xattr), xattr
    assert os.getxattr(ours.upper / "d/a", "trusted.overlay.nlink") == b"U+1"  # 2 upper links, 3 shown


def test_we_read_kernels_metacopy_index(tmp_path: Path, overlayfuse_bin: Path, lower: Path) -> None:
    """A chmod through the kernel (metacopy=on) copies the metadata alone into its index: the other
    names show the new mode with the lower data, and a write through one of them copies the data
    in for all."""
    side = mount_dirs(tmp_path, "kernel")
    with kernel_overlay(side.mnt, [lower], side.upper, side.work, OPTS):
        apply_steps(side.mnt, [("chmod", "d/a", 0o600)])
    (entry,) = _index_entries(side.work)
    os.getxattr(side.work / "index" / entry, "trusted.overlay.metacopy")  # metadata only
    with overlayfuse(side.mnt, [lower], side.upper, side.work, OPTS.split(",")):
        _assert_one_file(_view(side.mnt), ORIGINAL)
        assert {os.lstat(side.mnt / name).st_mode & 0o777 for name in NAMES} == {0o600}
        apply_steps(side.mnt, [("write", "e/c", 0, b"FILLED!")])
        _assert_one_file(_view(side.mnt), b"FILLED!" + ORIGINAL[7:])
