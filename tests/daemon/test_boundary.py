"""The errno boundary (`daemon.fs`), driven without a mount: handlers on a real tree of plain dirs.

ESTALE answers exactly a number the kernel should not have used (an unknown inode or handle); any
other error that is not an OSError is a bug, and must show as EIO with a traceback in the log,
never as a quiet ESTALE. The `overlay` packages must not need pyfuse3 at all.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pyfuse3
import pytest

from overlayfuse.daemon import binding
from overlayfuse.daemon.fs import OverlayOperations, _boundary
from overlayfuse.daemon.handles import HandleTable, UnknownHandle
from overlayfuse.overlay.inodes import ROOT_INODE, UnknownInode
from overlayfuse.overlay.workers import Workers
from tests.support.overlaytree import open_tree
from tests.support.trees import File, make_tree

pytestmark = pytest.mark.timeout(60)

CTX = pyfuse3.RequestContext()  # uid 0, gid 0


class _Raiser:
    """A stand-in handler owner: each handler raises what the test gives it."""

    workers = Workers()  # `_boundary` asks the owner's workers whether hops are being counted

    @_boundary
    async def handler(self, exc: BaseException) -> None:
        raise exc


@pytest.mark.parametrize(("raised", "answered"), [
    (UnknownInode("inode 99"), errno.ESTALE),
    (UnknownHandle("file handle 7"), errno.ESTALE),
    (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT),
    (KeyError("a bug of ours"), errno.EIO),
    (IndexError("a bug of ours"), errno.EIO),
])
async def test_boundary_maps_errors(raised: BaseException, answered: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="overlayfuse.daemon.fs")
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await _Raiser().handler(raised)  # type: ignore[arg-type]
    assert excinfo.value.errno == answered
    traceback_logged = any(r.exc_info for r in caplog.records)
    assert traceback_logged == (answered == errno.EIO), caplog.text


def test_handle_table() -> None:
    table: HandleTable[str] = HandleTable("file handle")
    table[1] = "one"
    assert table[1] == "one" and len(table) == 1
    with pytest.raises(UnknownHandle, match="file handle 2"):
        table[2]
    assert table.pop(1) == "one" and len(table) == 0
    with pytest.raises(UnknownHandle):
        table.pop(1)
    with pytest.raises(UnknownHandle):
        del table[1]


@pytest.fixture
def operations(tmp_path: Path) -> OverlayOperations:
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    make_tree(lower, File("etc/hosts", b"127.0.0.1 localhost\n"))
    upper.mkdir()
    return OverlayOperations(open_tree([lower], upper, work), read_only=False)


async def test_unknown_numbers_answer_estale(operations: OverlayOperations) -> None:
    for call in (lambda: operations.getattr(424242, CTX), lambda: operations.read(17, 0, 10),
                 lambda: operations.release(17), lambda: operations.readdir(17, 0, None)):  # type: ignore[arg-type]
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await call()
        assert excinfo.value.errno == errno.ESTALE


async def test_create_contract_mknod_and_symlink(operations: OverlayOperations, tmp_path: Path) -> None:
    """`_create`'s keywords reach the tree: a fifo with its mode, a symlink with its target."""
    etc = await operations.lookup(ROOT_INODE, b"etc", CTX)
    fifo = await operations.mknod(etc.st_ino, b"pipe", stat.S_IFIFO | 0o640, 0, CTX)
    link = await operations.symlink(etc.st_ino, b"link", b"hosts", CTX)
    upper = tmp_path / "upper" / "etc"
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_ISFIFO(os.lstat(upper / "pipe").st_mode)
    assert stat.S_IMODE(os.lstat(upper / "pipe").st_mode) == 0o640
    assert stat.S_ISLNK(link.st_mode) and os.readlink(upper / "link") == "hosts"
    assert (tmp_path / "lower" / "etc").exists() and not (tmp_path / "lower" / "etc" / "pipe").exists()


async def test_create_without_excl_opens_a_name_made_since_the_lookup(
    operations: OverlayOperations, tmp_path: Path
) -> None:
    """CREATE reaches the daemon when the kernel's lookup found the name missing; another request
    may have made it meanwhile (scripts/stress saw EEXIST for O_CREAT|O_TRUNC). Without O_EXCL that
    is an open of what is there now, as open(2) does; with O_EXCL, and for a directory, it fails."""
    etc = await operations.lookup(ROOT_INODE, b"etc", CTX)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    info, attrs = await operations.create(etc.st_ino, b"hosts", 0o600, flags, CTX)  # a lower file
    assert attrs.st_size == 0 and stat.S_IMODE(attrs.st_mode) != 0o600  # truncated, mode kept
    assert await operations.write(info.fh, 0, b"new\n") == 4
    await operations.release(info.fh)
    assert (tmp_path / "upper" / "etc" / "hosts").read_bytes() == b"new\n"
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await operations.create(etc.st_ino, b"hosts", 0o600, flags | os.O_EXCL, CTX)
    assert excinfo.value.errno == errno.EEXIST
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await operations.create(ROOT_INODE, b"etc", 0o600, flags, CTX)
    assert excinfo.value.errno == errno.EISDIR
    # Each failed create handed the kernel nothing: only the lookups it was answered are counted.
    await operations.forget([(etc.st_ino, 1)])
    await operations.forget([(attrs.st_ino, 1)])
    assert operations.tree.find_node(etc.st_ino) is None and operations.tree.find_node(attrs.st_ino) is None


def test_overlay_and_linux_need_no_pyfuse3() -> None:
    """The union semantics load without pyfuse3 (the node table used it for one constant)."""
    code = ("import sys, overlayfuse.overlay.merged, overlayfuse.overlay.upper, overlayfuse.linux.nowait; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyfuse3', '_pyfuse3')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    assert ROOT_INODE == pyfuse3.ROOT_INODE


async def test_a_missing_xattr_is_remembered_until_one_is_set(operations: OverlayOperations, tmp_path: Path) -> None:
    """getxattr answers a name it found missing without the disk (the per-request path), and
    never after a setxattr of it, through a copy-up or on an upper object."""
    etc = await operations.lookup(ROOT_INODE, b"etc", CTX)
    hosts = await operations.lookup(etc.st_ino, b"hosts", CTX)
    for ino in (hosts.st_ino, hosts.st_ino, ROOT_INODE, ROOT_INODE):
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await operations.getxattr(ino, b"user.probe", CTX)
        assert excinfo.value.errno == pyfuse3.ENOATTR
    assert len(operations._absent) == 2
    # The cache is asked before the name's checks: a name those refuse is never in it.
    for _ in range(2):
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await operations.getxattr(hosts.st_ino, b"trusted.overlay.origin", CTX)
        assert excinfo.value.errno == pyfuse3.ENOATTR
    assert len(operations._absent) == 2
    await operations.setxattr(hosts.st_ino, b"user.probe", b"lower, copied up", CTX)
    assert await operations.getxattr(hosts.st_ino, b"user.probe", CTX) == b"lower, copied up"
    await operations.setxattr(ROOT_INODE, b"user.probe", b"upper", CTX)
    assert await operations.getxattr(ROOT_INODE, b"user.probe", CTX) == b"upper"
    await operations.removexattr(ROOT_INODE, b"user.probe", CTX)
    with pytest.raises(pyfuse3.FUSEError):
        await operations.getxattr(ROOT_INODE, b"user.probe", CTX)
    # set behind the daemon's back, on the upper dir (unsupported): the remembered answer stands
    os.setxattr(tmp_path / "upper", "user.probe", b"behind")
    with pytest.raises(pyfuse3.FUSEError):
        await operations.getxattr(ROOT_INODE, b"user.probe", CTX)


async def test_fsyncdir_through_a_handle(operations: OverlayOperations) -> None:
    """On a stock binding FSYNCDIR names the directory by its opendir handle: one in upper (the
    root) is fsynced, one only below (etc) has nothing to write; both answer. (The no-handle case,
    and that a sync is made, are checked on a mount: test_compat_options.)"""
    operations.binding = binding.STOCK
    etc = await operations.lookup(ROOT_INODE, b"etc", CTX)
    for ino in (ROOT_INODE, etc.st_ino):
        handle = await operations.opendir(ino, CTX)
        assert await operations.fsyncdir(handle, False) is None
        await operations.releasedir(handle)
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await operations.fsyncdir(424242, False)
    assert excinfo.value.errno == errno.ESTALE
