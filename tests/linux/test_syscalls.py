"""`linux.syscalls` and `linux.sockets`: the raw bindings, on real files and real sockets."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from overlayfuse.linux import syscalls
from overlayfuse.linux.sockets import is_abstract, sockaddr
from overlayfuse.linux.syscalls import rename_exchange, rename_noreplace, rename_whiteout
from tests.support.trees import File, make_tree


def test_rename_noreplace(tmp_path: Path) -> None:
    make_tree(tmp_path, File("a", b"a"), File("b", b"b"))
    with pytest.raises(FileExistsError) as excinfo:
        rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert excinfo.value.errno == errno.EEXIST
    assert (tmp_path / "a").read_bytes() == b"a" and (tmp_path / "b").read_bytes() == b"b"
    rename_noreplace(str(tmp_path / "a"), str(tmp_path / "c"))
    assert not (tmp_path / "a").exists() and (tmp_path / "c").read_bytes() == b"a"
    with pytest.raises(FileNotFoundError):
        rename_noreplace(str(tmp_path / "a"), str(tmp_path / "d"))


def test_rename_exchange_swaps_a_dir_and_a_file(tmp_path: Path) -> None:
    make_tree(tmp_path, File("d/inside", b"in dir"), File("f", b"file"))
    rename_exchange(str(tmp_path / "d"), str(tmp_path / "f"))
    assert (tmp_path / "f" / "inside").read_bytes() == b"in dir"
    assert (tmp_path / "d").read_bytes() == b"file"
    with pytest.raises(FileNotFoundError):
        rename_exchange(str(tmp_path / "d"), str(tmp_path / "missing"))


def test_rename_whiteout_leaves_a_whiteout_device(tmp_path: Path) -> None:
    make_tree(tmp_path, File("a", b"a"))
    rename_whiteout(str(tmp_path / "a"), str(tmp_path / "b"))
    st = os.lstat(tmp_path / "a")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (tmp_path / "b").read_bytes() == b"a"


def test_renameat2_error_names_both_paths(tmp_path: Path) -> None:
    with pytest.raises(OSError) as excinfo:
        syscalls.renameat2(str(tmp_path / "x"), str(tmp_path / "y"), 0xFFFF)  # flags no kernel knows
    assert excinfo.value.errno == errno.EINVAL
    assert excinfo.value.filename == str(tmp_path / "x") and excinfo.value.filename2 == str(tmp_path / "y")


def test_start_writeback_is_only_a_head_start(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        syscalls.start_writeback(fd, 0, 8192)
        syscalls.start_writeback(-1, 0, 8192)  # a failure is logged, never raised: fsync does the work
    finally:
        os.close(fd)


def test_syncfs(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syscalls.syncfs(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as excinfo:
        syscalls.syncfs(-1)
    assert excinfo.value.errno == errno.EBADF


def test_umount2_of_a_plain_dir_says_einval(tmp_path: Path) -> None:
    """Not a mount point: EINVAL as root (EPERM unprivileged), with the path in the error."""
    with pytest.raises(OSError) as excinfo:
        syscalls.umount2(str(tmp_path), syscalls.MNT_DETACH)
    assert excinfo.value.errno in (errno.EINVAL, errno.EPERM) and excinfo.value.filename == str(tmp_path)


@pytest.mark.parametrize(("name", "address"), [
    ("@overlayfuse/x", b"\0overlayfuse/x"),
    ("/run/x.sock", "/run/x.sock"),
    ("@", b"\0"),
])
def test_sockaddr(name: str, address: str | bytes) -> None:
    assert sockaddr(name) == address and is_abstract(name) == isinstance(address, bytes)


def test_abstract_address_reaches_its_listener(tmp_path: Path) -> None:
    name = f"@overlayfuse-test/{os.getpid()}/{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        listener.bind(sockaddr(name))
        listener.settimeout(10)
        sender.sendto(b"hello", sockaddr(name))
        assert listener.recv(16) == b"hello"
    assert os.listdir(tmp_path) == []  # abstract: no file anywhere
