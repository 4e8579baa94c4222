"""``overlay.impure`` as the kernel writes and reads it, with kernel overlayfs as the oracle.

The kernel marks an upper directory impure ("y") when it gains a child that carries an origin: a
copy-up into it, or a copied-up object renamed into it from another directory. A kernel mounted
later on that upper dir reads the mark in readdir: only in an impure directory does it look up
the origin of each upper entry, so that an entry's d_ino is the number its st_ino shows (the lower
object's, all layers being on one filesystem). Without the mark, ``ls -i`` and ``find -inum`` see
the upper file's own number for a copied-up file, and ``stat`` the lower one's.

- The same changes made by the kernel and by overlayfuse over one lower dir mark the same upper
  dirs impure.
- Our upper dir, mounted afterwards by the kernel (``redirect_dir=on,metacopy=on,index=on``),
  lists every entry with the d_ino its st_ino shows, as the kernel's own upper does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.mounts import kernel_overlay, overlayfuse
from tests.support.trees import Dir, File, make_tree
from tests.support.writes import Step, apply_steps, mount_dirs

pytestmark = [pytest.mark.kernel, pytest.mark.mount]

OPTS = "redirect_dir=on,metacopy=on,index=on"
IMPURE = "trusted.overlay.impure"

STEPS: list[Step] = [
    ("chown", "owned", 1000, 1000),  # a metacopy copy-up, in the root
    ("chmod", "dir/child", 0o600),  # a metacopy copy-up, in a copied-up directory
    ("write", "dir/written", 0, b"W"),  # a full copy-up beside it
    ("mkdir", "fresh"),  # a directory only in upper
    ("rename", "dir/moving", "fresh/moving"),  # a copied-up file renamed into it
    ("mkdir", "untouched"),  # a directory only in upper that gets only a new file
    ("create", "untouched/new", b"n"),
]
DIRS = ("", "dir", "fresh", "untouched")


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "lower", File("owned", b"o\n" * 100), Dir("dir"), File("dir/child", b"c\n"),
                     File("dir/written", b"w\n"), File("dir/moving", b"m\n"), File("dir/stays", b"s\n"))


def _impure(upper: Path) -> dict[str, bytes | None]:
    marks: dict[str, bytes | None] = {}
    for path in DIRS:
        try:
            marks[path] = os.getxattr(upper / path, IMPURE, follow_symlinks=False)
        except OSError:
            marks[path] = None
    return marks


def _numbers(mnt: Path) -> dict[str, tuple[int, int]]:
    """Every entry of DIRS: (its d_ino from readdir, its st_ino from lstat), never followed."""
    seen: dict[str, tuple[int, int]] = {}
    for path in DIRS:
        with os.scandir(mnt / path) as it:
            for entry in it:
                seen[f"{path}/{entry.name}"] = (entry.inode(), entry.stat(follow_symlinks=False).st_ino)
    return seen


def test_impure_marks_are_the_kernels(tmp_path: Path, overlayfuse_bin: Path, lower: Path) -> None:
    kernel, ours = mount_dirs(tmp_path, "kernel"), mount_dirs(tmp_path, "ours")
    with kernel_overlay(kernel.mnt, [lower], kernel.upper, kernel.work, OPTS):
        apply_steps(kernel.mnt, STEPS)
    with overlayfuse(ours.mnt, [lower], ours.upper, ours.work, OPTS.split(",")):
        apply_steps(ours.mnt, STEPS)
    oracle = _impure(kernel.upper)
    assert oracle == {"": b"y", "dir": b"y", "fresh": b"y", "untouched": None}  # what the kernel does
    assert _impure(ours.upper) == oracle


def test_kernel_readdir_numbers_on_our_upper(tmp_path: Path, overlayfuse_bin: Path, lower: Path) -> None:
    """``ls -i`` against ``stat``: on our upper, mounted by the kernel, each entry's d_ino is its
    st_ino, as on the kernel's own upper (where a copied-up file shows its lower number in both)."""
    kernel, ours = mount_dirs(tmp_path, "kernel"), mount_dirs(tmp_path, "ours")
    with kernel_overlay(kernel.mnt, [lower], kernel.upper, kernel.work, OPTS):
        apply_steps(kernel.mnt, STEPS)
        oracle = _numbers(kernel.mnt)
    assert all(d_ino == st_ino for d_ino, st_ino in oracle.values()), oracle
    lower_ino = os.lstat(lower / "owned").st_ino
    assert oracle["/owned"] == (lower_ino, lower_ino)  # the copied-up file keeps its lower number
    with overlayfuse(ours.mnt, [lower], ours.upper, ours.work, OPTS.split(",")):
        apply_steps(ours.mnt, STEPS)
    with kernel_overlay(ours.mnt, [lower], ours.upper, ours.work, OPTS):
        mine = _numbers(ours.mnt)
    mismatched = {path: numbers for path, numbers in mine.items() if numbers[0] != numbers[1]}
    assert not mismatched, f"d_ino != st_ino under the kernel: {mismatched}"
    copied = ("/owned", "dir/child", "dir/written", "fresh/moving")
    assert {p: mine[p] for p in copied} == {p: oracle[p] for p in copied}
