"""``overlay.origin`` in the kernel's bytes, with kernel overlayfs as the oracle.

- The same copy-ups (a metacopy chmod, a full copy for writing, a chmod'd directory, a directory
  moved by redirect) made by the kernel and by overlayfuse over one lower dir leave byte-equal
  ``trusted.overlay.origin`` xattrs in the two upper dirs.
- An upper dir written by overlayfuse, mounted afterwards by the kernel with
  ``redirect_dir=on,metacopy=on,index=on``, shows the copied-up objects with the st_ino the kernel
  gives the objects it copied up itself (the lower object's: all layers are on one filesystem).
  Without the origin the kernel shows a fully copied-up file with the upper file's own number.
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
ORIGIN = "trusted.overlay.origin"

STEPS: list[Step] = [
    ("chmod", "meta", 0o600),  # metadata only
    ("write", "full", 0, b"W"),  # data and all
    ("chmod", "dir", 0o700),  # a directory
    ("rename", "moved", "dir/elsewhere"),  # a directory moved by redirect
]
#: Upper path -> the lower path it was copied up from.
COPIED = {"meta": "meta", "full": "full", "dir": "dir", "dir/elsewhere": "moved"}
#: Merged paths whose st_ino the kernel takes from the lower object (copied-up objects and a
#: child of the moved directory, still below).
NUMBERED = {**COPIED, "dir/elsewhere/inside": "moved/inside", "dir/child": "dir/child"}


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "lower", File("meta", b"metadata only\n" * 300), File("full", b"whole\n"),
                     Dir("dir"), File("dir/child", b"child\n"), Dir("moved"), File("moved/inside", b"in\n"))


def _numbers(mnt: Path) -> dict[str, int]:
    return {path: os.lstat(mnt / path).st_ino for path in NUMBERED}


def test_origin_bytes_are_the_kernels(tmp_path: Path, overlayfuse_bin: Path, lower: Path) -> None:
    kernel, ours = mount_dirs(tmp_path, "kernel"), mount_dirs(tmp_path, "ours")
    with kernel_overlay(kernel.mnt, [lower], kernel.upper, kernel.work, OPTS):
        apply_steps(kernel.mnt, STEPS)
    with overlayfuse(ours.mnt, [lower], ours.upper, ours.work, OPTS.split(",")):
        apply_steps(ours.mnt, STEPS)
    for path in COPIED:
        theirs = os.getxattr(kernel.upper / path, ORIGIN, follow_symlinks=False)
        mine = os.getxattr(ours.upper / path, ORIGIN, follow_symlinks=False)
        assert len(theirs) > 21 and theirs[1] == 0xFB, f"{path}: the kernel wrote {theirs!r}"
        assert mine == theirs, f"{path}: kernel {theirs.hex()} ours {mine.hex()}"


def test_kernel_keeps_lower_numbers_on_our_upper(tmp_path: Path, overlayfuse_bin: Path, lower: Path) -> None:
    kernel, ours = mount_dirs(tmp_path, "kernel"), mount_dirs(tmp_path, "ours")
    with kernel_overlay(kernel.mnt, [lower], kernel.upper, kernel.work, OPTS):
        apply_steps(kernel.mnt, STEPS)
        oracle = _numbers(kernel.mnt)
    lower_numbers = {path: os.lstat(lower / source).st_ino for path, source in NUMBERED.items()}
    assert oracle == lower_numbers  # the kernel's own copy-ups keep the lower numbers
    with overlayfuse(ours.mnt, [lower], ours.upper, ours.work, OPTS.split(",")):
        apply_steps(ours.mnt, STEPS)
    with kernel_overlay(ours.mnt, [lower], ours.upper, ours.work, OPTS):
        assert _numbers(ours.mnt) == oracle
        assert (ours.mnt / "full").read_bytes() == b"Whole\n"
        assert (ours.mnt / "meta").read_bytes() == b"metadata only\n" * 300
        assert sorted(os.listdir(ours.mnt / "dir")) == ["child", "elsewhere"]
        assert (ours.mnt / "dir/elsewhere/inside").read_bytes() == b"in\n"
