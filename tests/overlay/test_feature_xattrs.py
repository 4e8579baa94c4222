"""Unit tier: the overlay xattrs a copy-up writes, in both namespaces, on plain directories.

- ``overlay.origin`` (`overlay.origin`): every copy-up of a directory or of a file with one name
  records the lower object's file handle in the kernel's ``struct ovl_fb`` form; a hardlinked file
  gets it with its index entry, named by those bytes in hex (the kernel's). The mount tests compare the bytes
  with the kernel's own (tests/daemon/test_origin.py).
- ``user.overlay.*``: a daemon that cannot write ``trusted.*`` (rootless) writes the redirect, the
  metacopy marker and the origin in the ``user.`` namespace (the kernel's ``userxattr`` forms), and
  a tree opened again on that upper dir reads them back.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from overlayfuse.linux.syscalls import AT_FDCWD, name_to_handle_at
from overlayfuse.overlay.inodes import ROOT_INODE
from overlayfuse.overlay.merged import Caller, MergedTree
from overlayfuse.overlay.whiteout import OPAQUE_XATTRS, MarkerStyle
from tests.support.overlaytree import open_tree
from tests.support.trees import Dir, File, HardLink, has_data, make_tree

pytestmark = pytest.mark.timeout(60)

#: What an unprivileged daemon on a filesystem with user xattrs writes (devices: it may or may not).
USER_STYLE = MarkerStyle(device_whiteouts=True, opaque_xattr=OPAQUE_XATTRS[1])


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """One lower layer, an empty upper dir and a work dir."""
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    make_tree(lower, File("etc/passwd", b"root\n"), File("etc/hosts", b"hosts\n"), Dir("empty"),
              File("full/f1", b"1"), File("hl/a", b"linked"), HardLink("hl/b", "hl/a"))
    upper.mkdir()
    return lower, upper, work


def _ino(tree: MergedTree, path: str) -> int:
    ino = ROOT_INODE
    for part in path.split("/"):
        ino = tree.lookup(ino, part).ino
    return ino


def _xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        assert exc.errno == errno.ENODATA
        return None


def _handle_of(lower: Path) -> tuple[int, bytes]:
    return name_to_handle_at(AT_FDCWD, str(lower), 0)


async def _copy_ups(tree: MergedTree) -> None:
    """A metacopy (chmod), a full copy (open for writing), a directory moved by redirect, and a
    chmod of one name of a hardlinked file (copied whole, through the index)."""
    await tree.change_metadata(tree.lookup(_ino(tree, "etc"), "passwd"), lambda path: os.chmod(path, 0o600))
    await tree.copy_up(tree.lookup(_ino(tree, "etc"), "hosts"), for_open=True)
    await tree.rename(ROOT_INODE, "full", ROOT_INODE, "moved", 0)
    await tree.change_metadata(tree.lookup(_ino(tree, "hl"), "a"), lambda path: os.chmod(path, 0o600))


@pytest.mark.parametrize("namespace", ["trusted", "user"])
async def test_copy_ups_record_their_origin(dirs: tuple[Path, Path, Path], namespace: str) -> None:
    lower, upper, work = dirs
    tree = open_tree([lower], upper, work, style=USER_STYLE if namespace == "user" else None)
    await _copy_ups(tree)
    xattr = f"{namespace}.overlay.origin"
    for copied, source in {"etc/passwd": "etc/passwd", "etc/hosts": "etc/hosts", "etc": "etc",
                           "moved": "full", "hl": "hl", "hl/a": "hl/a"}.items():
        value = _xattr(upper / copied, xattr)
        assert value is not None, f"{copied}: no {xattr}"
        fid_type, fid = _handle_of(lower / source)
        # version 0, magic 0xfb, length, flags (little-endian lower), fid type, 16-byte uuid, fid
        assert value[:5] == bytes([0, 0xFB, 21 + len(fid), 0, fid_type]), copied
        assert len(value) == 21 + len(fid) and value[21:] == fid, copied
    # several names: the origin comes with the index entry, which the origin names (the kernel's)
    assert os.listdir(work / "index") == [_xattr(upper / "hl" / "a", xattr).hex()]  # type: ignore[union-attr]
    other = "user" if namespace == "trusted" else "trusted"
    assert not [n for n in os.listxattr(upper / "etc" / "passwd") if n.startswith(f"{other}.overlay.")]


async def test_user_xattr_forms_read_back(dirs: tuple[Path, Path, Path]) -> None:
    """Where ``trusted.*`` cannot be written: a redirect and a metacopy file in the ``user.overlay.``
    forms, which a tree opened again on the same upper dir follows (content, mode, listing)."""
    lower, upper, work = dirs
    tree = open_tree([lower], upper, work, style=USER_STYLE)
    await tree.rename(ROOT_INODE, "etc", _ino(tree, "empty"), "etc2", 0)
    await tree.change_metadata(tree.lookup(_ino(tree, "full"), "f1"), lambda path: os.chmod(path, 0o600))
    assert _xattr(upper / "empty" / "etc2", "user.overlay.redirect") == b"/etc"
    assert os.listdir(upper / "empty" / "etc2") == []  # its children stay below
    assert _xattr(upper / "full" / "f1", "user.overlay.metacopy") == b"" and not has_data(upper / "full" / "f1")
    for path in ("empty/etc2", "full/f1", "full"):
        assert not [n for n in os.listxattr(upper / path) if n.startswith("trusted.")], path

    again = open_tree([lower], upper, work, style=USER_STYLE)
    _, entries = await again.list_dir(_ino(again, "empty/etc2"))
    assert sorted(name for name, _ in entries) == ["hosts", "passwd"]
    _, top = await again.list_dir(ROOT_INODE)
    assert "etc" not in {name for name, _ in top}
    found = again.lookup(_ino(again, "full"), "f1").resolved
    assert found.layer.writable and found.data is not None and stat.S_IMODE(found.stat.st_mode) == 0o600
    assert Path(found.readable.path).read_bytes() == b"1"
    passwd = again.lookup(_ino(again, "empty/etc2"), "passwd").resolved
    assert Path(passwd.path).read_bytes() == b"root\n"


@pytest.mark.parametrize("namespace", ["trusted", "user"])
async def test_impure_marks_dirs_that_gain_copied_up_children(dirs: tuple[Path, Path, Path], namespace: str) -> None:
    """``overlay.impure`` = "y" on every upper dir a copy-up put a child with an origin in, and on a dir
    a copied-up file is renamed into from another dir (the kernel's ovl_set_impure); never on a
    dir that got only objects created in upper, nor in the other namespace."""
    lower, upper, work = dirs
    tree = open_tree([lower], upper, work, style=USER_STYLE if namespace == "user" else None)
    xattr = f"{namespace}.overlay.impure"
    await tree.create(ROOT_INODE, "plain", stat.S_IFDIR | 0o755, Caller(0, 0))
    await tree.create(_ino(tree, "plain"), "new", stat.S_IFREG | 0o644, Caller(0, 0))
    await tree.create(ROOT_INODE, "target", stat.S_IFDIR | 0o755, Caller(0, 0))
    assert _xattr(upper / "plain", xattr) is None and _xattr(upper / "target", xattr) is None
    await _copy_ups(tree)  # into etc, hl and (the moved dir, the copied-up etc and hl) the root
    await tree.rename(_ino(tree, "etc"), "passwd", _ino(tree, "target"), "passwd", 0)
    for marked in ("", "etc", "hl", "target"):
        assert _xattr(upper / marked, xattr) == b"y", marked or "the upper root"
    assert _xattr(upper / "plain", xattr) is None  # only a new file in it
    other = "user" if namespace == "trusted" else "trusted"
    assert _xattr(upper / "etc", f"{other}.overlay.impure") is None
