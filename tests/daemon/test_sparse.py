"""Sparse files through the mount, against the kernel's overlay as the oracle.

Holes seen (SEEK_DATA and SEEK_HOLE, pyfuse3 patch 0010): as they are, lower, written through the
mount, copied up by metacopy (a chown) or in full (an open for writing), through read-only and
writable opens alike, so `cp`, `tar --sparse` and `rsync -S` keep them. Space allocated and holes
made (fallocate(2), patch 0011): `fallocate -l`, `-n` (keep the size), `-p` (punch) and `-z`
(zero a range), on new and copied-up files. Both need the binding scripts/setup builds; on another
these tests are skipped, and in CI that is a failure of the set-up, not a skip (a stock pyfuse3
answers ENOSYS: the kernel then treats every file as data, and fails fallocate with EOPNOTSUPP).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from overlayfuse.daemon import binding
from tests.conftest import skip_or_fail
from tests.support.mounts import FuseMount, kernel_overlay

pytestmark = pytest.mark.mount

Mounter = Callable[..., FuseMount]

MIB = 1 << 20
SIZE = 10 * MIB
DATA_AT = 5 * MIB  # one 64 KiB run of data, holes before and after it
DATA_LEN = 64 << 10
OFFSETS = (0, 4096, DATA_AT - 1, DATA_AT, DATA_AT + 100, DATA_AT + DATA_LEN, 9 * MIB, SIZE - 1, SIZE, SIZE + MIB)


#: One fallocate(1) run; this only guards against a hang.
TIMEOUT = 60


@pytest.fixture(autouse=True)
def _sparse_binding() -> None:
    found = binding.detect()
    if not (found.lseek and found.fallocate):
        skip_or_fail("the binding has no lseek or fallocate: scripts/setup builds pyfuse3 with patches/pyfuse3")


def _make_sparse(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.ftruncate(fd, SIZE)
        os.pwrite(fd, b"x" * DATA_LEN, DATA_AT)
    finally:
        os.close(fd)


def _seeks(path: Path, flags: int = os.O_RDONLY) -> list[int | str]:
    """SEEK_DATA, then SEEK_HOLE, from each of OFFSETS: the offset found, or the errno's name."""
    found: list[int | str] = []
    fd = os.open(path, flags | os.O_NOFOLLOW)
    try:
        for offset in OFFSETS:
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                try:
                    found.append(os.lseek(fd, offset, whence))
                except OSError as exc:
                    found.append(errno.errorcode[exc.errno])
    finally:
        os.close(fd)
    return found


def _play(mnt: Path) -> dict[str, list[int | str]]:
    """The same steps on a mount: each file's seeks, read-only and (in upper) writable."""
    _make_sparse(mnt / "new")
    os.chown(mnt / "chowned", 7, 8, follow_symlinks=False)  # a metacopy copy-up: data below
    os.close(os.open(mnt / "opened", os.O_WRONLY | os.O_NOFOLLOW))  # a full copy-up
    seen = {name: _seeks(mnt / name) for name in ("lower", "new", "chowned", "opened")}
    for name in ("new", "chowned", "opened"):  # a writable open too (the metacopy's data comes up)
        seen[f"{name}, O_RDWR"] = _seeks(mnt / name, os.O_RDWR)
    return seen


def test_holes_show_through_the_mount_as_through_the_kernels(fuse_mount: Mounter, tmp_path: Path) -> None:
    """Where the holes are is the real file's: the lower file, one written through the mount, a
    metacopy file's data below, all as the kernel's overlay shows them; a file copied up whole
    has the holes its copy has (the kernel copies in 1 MiB chunks, overlayfuse the data runs
    alone, so the two copies differ), both with holes."""
    lower = tmp_path / "lower"
    lower.mkdir()
    for name in ("lower", "chowned", "opened"):
        _make_sparse(lower / name)
    if _seeks(lower / "lower")[:2] != [DATA_AT, 0]:
        skip_or_fail(f"{tmp_path} keeps no holes: the oracle would show none")
    dirs = {name: tmp_path / name for name in ("kupper", "kwork", "fupper", "fwork")}
    for d in dirs.values():
        d.mkdir()
    with kernel_overlay(tmp_path / "kernel", [lower], dirs["kupper"], dirs["kwork"], "metacopy=on") as kernel:
        expected = _play(kernel)
    ours = _play(fuse_mount(tmp_path / "fuse", [lower], dirs["fupper"], dirs["fwork"]).mnt)
    for name in ("lower", "new", "chowned", "new, O_RDWR"):
        assert (name, ours[name]) == (name, expected[name])
    for name in ("opened", "opened, O_RDWR", "chowned, O_RDWR"):
        copy = _seeks(dirs["fupper"] / name.split(",")[0])
        assert (name, ours[name]) == (name, copy)
        assert ours[name][:2] == expected[name][:2] == [DATA_AT, 0]  # copied with the hole before the data


def _fallocate(path: Path, *args: str) -> None:
    done = subprocess.run(["fallocate", *args, str(path)], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"fallocate {' '.join(args)} {path}: {done.stderr.strip()}"


def _allocate_and_punch(mnt: Path) -> dict[str, tuple[int, str, int, int | str]]:
    """fallocate(1) on a mount: a new file allocated, a lower file given space beyond its size (a
    copy-up), a range punched out of a file written through the mount and one zeroed. Each file's
    size, data, allocated bytes (at least: copies differ) and its first hole from 4 KiB on."""
    _fallocate(mnt / "allocated", "-l", str(MIB))
    _fallocate(mnt / "kept", "-n", "-l", str(2 * MIB))  # a lower file of 10,000 bytes
    for name in ("punched", "zeroed"):
        (mnt / name).write_bytes(b"a" * (256 << 10))
    _fallocate(mnt / "punched", "-p", "-o", "4096", "-l", str(128 << 10))
    _fallocate(mnt / "zeroed", "-z", "-o", "4096", "-l", str(128 << 10))
    seen = {}
    for name in ("allocated", "kept", "punched", "zeroed"):
        st = os.lstat(mnt / name)
        hole = _seeks(mnt / name)[3]  # SEEK_HOLE from 4096
        seen[name] = (st.st_size, hashlib.sha256((mnt / name).read_bytes()).hexdigest(),
                      min(st.st_blocks * 512, 2 * MIB), hole)
    return seen


def test_fallocate_as_through_the_kernels(fuse_mount: Mounter, tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "kept").write_bytes(b"x" * 10000)
    dirs = {name: tmp_path / name for name in ("kupper", "kwork", "fupper", "fwork")}
    for d in dirs.values():
        d.mkdir()
    with kernel_overlay(tmp_path / "kernel", [lower], dirs["kupper"], dirs["kwork"]) as kernel:
        expected = _allocate_and_punch(kernel)
    ours = _allocate_and_punch(fuse_mount(tmp_path / "fuse", [lower], dirs["fupper"], dirs["fwork"]).mnt)
    assert ours == expected
    assert expected["allocated"][2] == MIB and expected["kept"][:3:2] == (10000, 2 * MIB)
    assert expected["punched"][3] == 4096  # the oracle punched a hole there
    assert (lower / "kept").stat().st_size == 10000 and (dirs["fupper"] / "kept").stat().st_size == 10000
