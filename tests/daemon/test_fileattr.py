"""File attribute flags through the mount (lsattr, chattr; pyfuse3 patch 0014), against the
kernel's overlay as the oracle.

The flags shown are the real file's, upper or lower, as `ovl_fileattr_get` reads them; a change
copies the object up and is made on the upper copy. The append-only and immutable flags keep what
they are for on both mounts: writing to an immutable file, or deleting it, fails with EPERM until
the flag is cleared. Needs the binding scripts/setup builds; on another these tests are skipped,
and in CI that is a failure of the set-up (a stock pyfuse3 answers ENOSYS, and lsattr fails).
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from overlayfuse.daemon import binding
from overlayfuse.linux import fileattr
from tests.conftest import skip_or_fail
from tests.support.mounts import kernel_overlay, overlayfuse
from tests.support.trees import Dir, File, make_tree

pytestmark = pytest.mark.mount

#: One lsattr or chattr run; this only guards against a hang.
TIMEOUT = 60


@pytest.fixture(autouse=True)
def _ioctl_binding() -> None:
    if not binding.detect().ioctl:
        skip_or_fail("the binding has no ioctl: scripts/setup builds pyfuse3 with patches/pyfuse3")


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(kernel overlay, overlayfuse) over one lower layer, each with its own upper dir. The lower
    layer has a plain file and directory, a file carrying a flag (noatime) and two directories
    (nodump, sync)."""
    lower = make_tree(tmp_path / "lower", File("plain", b"p"), File("noatime", b"n"), Dir("dir"), Dir("nodump"),
                      Dir("sync"))
    _chattr("+A", lower / "noatime")
    _chattr("+d", lower / "nodump")
    _chattr("+S", lower / "sync")
    with ExitStack() as stack:
        dirs = {name: tmp_path / name for name in ("kupper", "kwork", "fupper", "fwork")}
        for path in dirs.values():
            path.mkdir()
        kernel = stack.enter_context(kernel_overlay(tmp_path / "kernel", [lower], dirs["kupper"], dirs["kwork"]))
        fuse = stack.enter_context(overlayfuse(tmp_path / "fuse", [lower], dirs["fupper"], dirs["fwork"]))
        yield kernel, fuse.mnt


def _chattr(change: str, path: Path) -> None:
    subprocess.run(["chattr", change, str(path)], check=True, timeout=TIMEOUT, capture_output=True)


def _lsattr(path: Path) -> str:
    """The flags column of ``lsattr -d PATH``, or the error's message."""
    done = subprocess.run(["lsattr", "-d", str(path)], timeout=TIMEOUT, capture_output=True, text=True)
    return done.stdout.split()[0] if done.returncode == 0 else f"error: {done.stderr.strip()}"


def _fsx_xflags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        buf = bytearray(28)
        fcntl.ioctl(fd, fileattr.FSGETXATTR, buf)
    finally:
        os.close(fd)
    return int.from_bytes(buf[:4], "little")


def _both(mounts: tuple[Path, Path], name: str) -> list[str]:
    return [_lsattr(mnt / name) for mnt in mounts]


def test_flags_read_as_the_kernel_reads_them(mounts: tuple[Path, Path]) -> None:
    """Lower files and directories, the root (an upper dir), a new file: the same flags."""
    for mnt in mounts:
        (mnt / "new").write_bytes(b"x")
    for name in ("plain", "noatime", "dir", "nodump", ".", "new"):
        kernel, fuse = _both(mounts, name)
        assert fuse == kernel, name
        assert not kernel.startswith("error")
    assert "A" in _both(mounts, "noatime")[1] and "d" in _both(mounts, "nodump")[1]
    for name in ("noatime", "nodump", "new"):
        assert _fsx_xflags(mounts[1] / name) == _fsx_xflags(mounts[0] / name), name


def test_a_change_copies_up_and_shows(mounts: tuple[Path, Path]) -> None:
    """chattr of a lower file and a lower directory, and of a new file: the same flags after,
    and the lower layer untouched."""
    for mnt in mounts:
        (mnt / "new").write_bytes(b"x")
        for name in ("plain", "dir", "new"):
            _chattr("+d", mnt / name)
        _chattr("-d", mnt / "nodump")
    for name in ("plain", "dir", "new", "nodump"):
        kernel, fuse = _both(mounts, name)
        assert fuse == kernel, name
    assert "d" in _both(mounts, "plain")[1] and "d" not in _both(mounts, "nodump")[1]
    lower = mounts[0].parent / "lower"
    assert "d" not in _lsattr(lower / "plain") and "d" in _lsattr(lower / "nodump")
    assert (mounts[1].parent / "fupper" / "plain").exists()  # copied up


def test_a_copy_up_keeps_sync_and_noatime(mounts: tuple[Path, Path]) -> None:
    """A chmod copies up: the copy keeps the lower object's sync and noatime flags and no other
    (nodump goes), as the kernel's ovl_copy_fileattr copies them."""
    for mnt in mounts:
        for name in ("noatime", "nodump", "sync"):
            os.chmod(mnt / name, 0o700, follow_symlinks=False)
    for name in ("noatime", "nodump", "sync"):
        kernel, fuse = _both(mounts, name)
        assert fuse == kernel, name
    assert "A" in _both(mounts, "noatime")[1] and "S" in _both(mounts, "sync")[1]
    assert "d" not in _both(mounts, "nodump")[0]
    assert (mounts[1].parent / "fupper" / "noatime").exists()  # copied up


def test_immutable_and_append_only_hold_on_both(mounts: tuple[Path, Path]) -> None:
    """chattr +i: shown, and writing or deleting fails with EPERM on both mounts; chattr -i puts
    things back. chattr +a: a write that does not append fails, an append works."""
    for mnt in mounts:
        (mnt / "frozen").write_bytes(b"x")
        (mnt / "log").write_bytes(b"x")
        _chattr("+i", mnt / "frozen")
        _chattr("+a", mnt / "log")
    assert _both(mounts, "frozen")[0] == _both(mounts, "frozen")[1]
    assert "i" in _both(mounts, "frozen")[1] and "a" in _both(mounts, "log")[1]
    for mnt in mounts:
        for call, args in ((os.open, (mnt / "frozen", os.O_WRONLY | os.O_NOFOLLOW)),
                           (os.unlink, (mnt / "frozen",)),
                           (os.open, (mnt / "log", os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW))):
            with pytest.raises(PermissionError) as caught:
                call(*args)
            assert caught.value.errno == errno.EPERM, (mnt, args)
        fd = os.open(mnt / "log", os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            os.write(fd, b"y")
        finally:
            os.close(fd)
        _chattr("-i", mnt / "frozen")
        _chattr("-a", mnt / "log")
        os.unlink(mnt / "frozen")
        assert (mnt / "log").read_bytes() == b"xy"
    assert _both(mounts, "log")[0] == _both(mounts, "log")[1]


def test_other_ioctls_are_not_passed_on(mounts: tuple[Path, Path]) -> None:
    """An ioctl the kernel's overlay does not know: ENOTTY on both (FS_IOC_GETVERSION, which ext4
    answers: neither overlay passes it to the real file)."""
    fs_ioc_getversion = 0x80087601
    for mnt in mounts:
        fd = os.open(mnt / "plain", os.O_RDONLY | os.O_NOFOLLOW)
        try:
            with pytest.raises(OSError) as caught:
                fcntl.ioctl(fd, fs_ioc_getversion, bytearray(8))
            assert caught.value.errno == errno.ENOTTY, mnt
        finally:
            os.close(fd)
