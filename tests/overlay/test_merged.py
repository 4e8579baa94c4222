"""Unit tier: the merged tree (`overlay.merged`) driven call by call on plain directories, no mount.

Each test builds lower layers with the declarative builders, opens the tree the daemon would serve
(`tests.support.overlaytree`), makes a change through `MergedTree` and reads the result straight
off the upper dir: which objects, whiteouts and opaque markers a change leaves there is the
upper-dir format kernel overlayfs reads (the mount tests compare the kernel's view of the same).
Runs as root, the kernel's own whiteout form (a 0:0 character device) being the expected one.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from overlayfuse.linux.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE
from overlayfuse.overlay import merged
from overlayfuse.overlay.features import CopyUpFeatures
from overlayfuse.overlay.inodes import ROOT_INODE, UnknownInode
from overlayfuse.overlay.merged import MergedTree
from overlayfuse.overlay.metachange import MetadataChange
from overlayfuse.overlay.whiteout import TRUSTED_OPAQUE
from tests.support.overlaytree import ROOT, open_tree
from tests.support.trees import Dir, File, HardLink, Opaque, Symlink, Whiteout, has_data, make_tree

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """Two lower layers (l1 the top one), an empty upper dir and a work dir."""
    l1, l2, upper, work = (tmp_path / n for n in ("l1", "l2", "upper", "work"))
    make_tree(l2, File("etc/hosts", b"lower hosts\n"), File("etc/passwd", b"root\n"),
              File("etc/old", b"old"), Dir("empty"), File("full/f1", b"1"), File("opq/under", b"hidden"),
              File("hl/a", b"linked"), HardLink("hl/b", "hl/a"), File("gone", b"whited out"))
    make_tree(l1, File("etc/hosts", b"top hosts\n"), Whiteout("etc/old"), Opaque("opq"),
              File("opq/over", b"shown"), Symlink("etc/link", "hosts"), Whiteout("gone"))
    upper.mkdir()
    return l1, l2, upper, work


@pytest.fixture
def tree(dirs: tuple[Path, Path, Path, Path]) -> MergedTree:
    l1, l2, upper, work = dirs
    return open_tree([l1, l2], upper, work)


def _upper(dirs: tuple[Path, Path, Path, Path]) -> Path:
    return dirs[2]


def _is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


REDIRECT = "trusted.overlay.redirect"
METACOPY = "trusted.overlay.metacopy"


def _redirect(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, REDIRECT, follow_symlinks=False)
    except OSError as exc:
        assert exc.errno == errno.ENODATA
        return None


async def _names(tree: MergedTree, ino: int) -> list[str]:
    _, entries = await tree.list_dir(ino)
    return sorted(name for name, _ in entries)


def _ino(tree: MergedTree, path: str) -> int:
    ino = ROOT_INODE
    for part in path.split("/"):
        ino = tree.lookup(ino, part).ino
    return ino


async def test_lookup_follows_the_layers(tree: MergedTree) -> None:
    etc = _ino(tree, "etc")
    hosts = tree.lookup(etc, "hosts")
    assert hosts.resolved.layer.index == 1 and Path(hosts.resolved.path).read_bytes() == b"top hosts\n"
    assert tree.lookup(etc, "passwd").resolved.layer.index == 2  # only in the bottom layer
    with pytest.raises(FileNotFoundError):
        tree.lookup(etc, "old")  # whited out in l1
    with pytest.raises(FileNotFoundError):
        tree.lookup(_ino(tree, "opq"), "under")  # below an opaque dir
    assert await _names(tree, ROOT_INODE) == ["empty", "etc", "full", "hl", "opq"]
    assert await _names(tree, etc) == ["hosts", "link", "passwd"]
    assert await _names(tree, _ino(tree, "opq")) == ["over"]


async def test_a_listed_entry_is_known_until_the_kernel_forgets_it(tree: MergedTree) -> None:
    """The FUSE layer's only ways into the node table: an accepted readdirplus entry counts as a
    lookup (`remember_listed`), and `forget` pays references back and says when the node is gone."""
    etc = _ino(tree, "etc")
    _, entries = await tree.list_dir(etc)
    passwd = dict(entries)["passwd"]
    number = tree.number_for(passwd)
    assert tree.find_node(number) is None
    tree.remember_listed(tree.node(etc), "passwd", passwd, number)
    tree.remember_listed(tree.node(etc), "passwd", passwd, number)  # listed twice: two references
    assert tree.node(number).name == "passwd" and tree.node(number).parent == etc
    assert tree.lookup(etc, "passwd").ino == number  # a lookup meets the same node: a third
    assert not tree.forget(number, 2)
    assert tree.forget(number, 1)
    assert tree.find_node(number) is None
    with pytest.raises(UnknownInode):
        tree.node(number)
    assert not tree.forget(ROOT_INODE, 1)  # the root is never let go


async def test_kept_listings_are_bounded(dirs: tuple[Path, Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a stock pyfuse3 every readdir reaches the daemon and listings are kept for the next one:
    no more than KEPT_LISTINGS of them, the least recently used going first."""
    monkeypatch.setattr(merged, "KEPT_LISTINGS", 2)
    l1, l2, upper, work = dirs
    tree = open_tree([l1, l2], upper, work)
    etc, full, hl = (_ino(tree, name) for name in ("etc", "full", "hl"))
    for ino in (etc, full, etc, hl):
        await tree.list_dir(ino)
    assert tree.node(full).listing is None  # least recently used: dropped
    assert tree.node(etc).listing is not None and tree.node(hl).listing is not None
    assert await _names(tree, full) == ["f1"]  # read again when asked
    assert tree.node(etc).listing is None


async def test_create_copies_up_the_parent_only(tree: MergedTree, dirs: tuple[Path, Path, Path, Path]) -> None:
    node, fd = await tree.create(_ino(tree, "etc"), "new", stat.S_IFREG | 0o600, ROOT, open_flags=os.O_WRONLY)
    assert fd is not None
    os.write(fd, b"written")
    os.close(fd)
    upper = _upper(dirs)
    assert sorted(os.listdir(upper)) == ["etc"] and sorted(os.listdir(upper / "etc")) == ["new"]
    assert (upper / "etc/new").read_bytes() == b"written" and node.resolved.layer.writable
    assert stat.S_IMODE(os.lstat(upper / "etc/new").st_mode) == 0o600
    assert os.lstat(upper / "etc").st_mode == os.lstat(dirs[0] / "etc").st_mode  # parent keeps its metadata
    with pytest.raises(FileExistsError):
        await tree.create(_ino(tree, "etc"), "hosts", stat.S_IFREG | 0o644, ROOT)


async def test_unlink_of_a_lower_file_leaves_a_whiteout(tree: MergedTree, dirs: tuple[Path, Path, Path, Path]) -> None:
    etc = _ino(tree, "etc")
    await tree.remove(etc, "passwd", directory=False)
    assert _is_whiteout(_upper(dirs) / "etc/passwd")
    assert (dirs[1] / "etc/passwd").read_bytes() == b"root\n"  # lower layers never change
    with pytest.raises(FileNotFoundError):
        tree.lookup(etc, "passwd")
    assert await _names(tree, etc) == ["hosts", "link"]


async def test_rmdir_needs_an_empty_merged_dir(tree: MergedTree, dirs: tuple[Path, Path, Path, Path]) -> None:
    full = _ino(tree, "full")
    with pytest.raises(OSError) as excinfo:
        await tree.remove(ROOT_INODE, "full", directory=True)
    assert excinfo.value.errno == errno.ENOTEMPTY
    await tree.remove(full, "f1", directory=False)
    await tree.remove(ROOT_INODE, "full", directory=True)
    assert _is_whiteout(_upper(dirs) / "full")
    with pytest.raises(OSError) as excinfo:
        await tree.remove(ROOT_INODE, "etc", directory=False)
    assert excinfo.value.errno == errno.EISDIR


async def test_mkdir_over_a_whiteout_is_opaque(tree: MergedTree, dirs: tuple[Path, Path, Path, Path]) -> None:
    await tree.remove(_ino(tree, "full"), "f1", directory=False)
    await tree.remove(ROOT_INODE, "full", directory=True)
    node, _ = await tree.create(ROOT_INODE, "full", stat.S_IFDIR | 0o755, ROOT)
    made = _upper(dirs) / "full"
    assert made.is_dir() and os.getxattr(made, TRUSTED_OPAQUE) == b"y"
    assert await _names(tree, node.ino) == []  # the lower full/f1 stays hidden


async def test_rename_of_a_lower_file(tree: MergedTree, dirs: tuple[Path, Path, Path, Path]) -> None:
    """A lower file moves as the kernel's metacopy=on moves it: a metacopy file (no data) with a
    redirect to where its data stays below, absolute for another parent; a whiteout where it was."""
    etc = _ino(tree, "etc")
    await tree.rename(etc, "passwd", ROOT_INODE, "moved", 0)
    upper = _upper(dirs)
    assert _is_whiteout(upper / "etc/passwd")
    assert METACOPY in os.listxattr(upper / "moved") and _redirect(upper / "moved") == b"/etc/passwd"
    assert os.lstat(upper / "moved").st_blocks * 512 <= 8192  # no data: at most a block of xattrs
    moved = tree.lookup(ROOT_INODE, "moved")
    assert Path(moved.resolved.readable.path).read_bytes() == b"root\n"
    with pytest.raises(OSError) as excinfo:
        await tree.rename(etc, "hosts", ROOT_INODE, "moved", RENAME_NOREPLACE)
    assert excinfo.value.errno == errno.EEXIST


async def test_link_of_a_lower_file(tree: MergedTree, dirs: tuple[Path, Path, Path, Path]) -> None:
    """A lower file linked is copied up as the kernel's metacopy=on does it: a metacopy file with an
    absolute redirect to its data, which both names (one inode) read; renaming either keeps it so."""
    etc = _ino(tree, "etc")
    passwd = tree.lookup(etc, "passwd")
    linked = await tree.link(passwd.ino, ROOT_INODE, "pw-link")
    upper = _upper(dirs)
    assert os.lstat(upper / "pw-link").st_ino == os.lstat(upper / "etc/passwd").st_ino
    assert METACOPY in os.listxattr(upper / "pw-link") and _redirect(upper / "pw-link") == b"/etc/passwd"
    assert linked.ino == passwd.ino
    for parent, name in ((ROOT_INODE, "pw-link"), (etc, "passwd")):
        assert Path(tree.lookup(parent, name).resolved.readable.path).read_bytes() == b"root\n"
    await tree.rename(ROOT_INODE, "pw-link", _ino(tree, "empty"), "moved", 0)
    assert _redirect(upper / "empty/moved") == b"/etc/passwd" and METACOPY in os.listxattr(upper / "empty/moved")
    moved = tree.lookup(_ino(tree, "empty"), "moved")
    assert Path(moved.resolved.readable.path).read_bytes() == b"root\n"


async def test_exchange_of_a_file_and_a_dir(tree: MergedTree, dirs: tuple[Path, Path, Path, Path]) -> None:
    await tree.rename(_ino(tree, "etc"), "hosts", ROOT_INODE, "empty", RENAME_EXCHANGE)
    upper = _upper(dirs)
    assert (upper / "etc/hosts").is_dir() and _redirect(upper / "empty") == b"/etc/hosts"
    empty = tree.lookup(ROOT_INODE, "empty")
    assert Path(empty.resolved.readable.path).read_bytes() == b"top hosts\n"  # its data, still below
    assert await _names(tree, _ino(tree, "etc")) == ["hosts", "link", "passwd"]


async def test_copy_up_keeps_hardlinks_together(tree: MergedTree, dirs: tuple[Path, Path, Path, Path]) -> None:
    """Copying up one name of a lower hardlink records the copy in the index; the other name then
    shows the copy (the kernel's index=on)."""
    hl = _ino(tree, "hl")
    a = tree.lookup(hl, "a")
    await tree.change_metadata(a, lambda path: os.chmod(path, 0o600))
    b = tree.lookup(hl, "b")
    st = os.lstat(b.resolved.path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and a.ino == b.ino
    assert tree.link_count(b.resolved, st) == 2
    index = dirs[3] / "index"
    assert len(os.listdir(index)) == 1


async def test_index_entry_is_named_and_counted_as_the_kernels(
    tree: MergedTree, dirs: tuple[Path, Path, Path, Path]
) -> None:
    """The entry's name is the hex of the lower file's origin (its file handle), the copy carries
    that origin and the kernel's relative count: two upper links (entry and name) and one lower
    name left make a merged count of two, "U+0"."""
    await tree.change_metadata(tree.lookup(_ino(tree, "hl"), "a"), lambda path: os.chmod(path, 0o600))
    copy = _upper(dirs) / "hl" / "a"
    origin = os.getxattr(copy, "trusted.overlay.origin")
    assert os.listdir(dirs[3] / "index") == [origin.hex()]
    assert os.path.samefile(dirs[3] / "index" / origin.hex(), copy)
    assert os.getxattr(copy, "trusted.overlay.nlink") == b"U+0"
    await tree.remove(_ino(tree, "hl"), "b", directory=False)  # the last lower name: "U-1"
    assert os.getxattr(copy, "trusted.overlay.nlink") == b"U-1"
    assert tree.link_count(tree.lookup(_ino(tree, "hl"), "a").resolved, os.lstat(copy)) == 1


async def test_index_of_an_earlier_version_is_still_read(dirs: tuple[Path, Path, Path, Path]) -> None:
    """An upper dir written by an earlier version (index entry ``overlayfuse-index/<dev>-<ino>``,
    the lower names left in ``overlay.fuse-lower-links``) still mounts with the names together, and
    its count is kept in that format."""
    l1, l2, upper, work = dirs
    lower = os.lstat(l2 / "hl" / "a")
    make_tree(upper, File("hl/a", b"changed before"))
    legacy = work / "overlayfuse-index"
    legacy.mkdir(parents=True)
    os.link(upper / "hl" / "a", legacy / f"{lower.st_dev:x}-{lower.st_ino:x}")
    os.setxattr(upper / "hl" / "a", "trusted.overlay.fuse-lower-links", b"1")
    tree = open_tree([l1, l2], upper, work)
    a, b = tree.lookup(_ino(tree, "hl"), "a"), tree.lookup(_ino(tree, "hl"), "b")
    assert a.ino == b.ino and Path(b.resolved.path).read_bytes() == b"changed before"
    assert tree.link_count(b.resolved, os.lstat(b.resolved.path)) == 2
    await tree.change_metadata(b, lambda path: os.chmod(path, 0o600))  # b gets its upper name
    assert os.path.samefile(upper / "hl" / "b", upper / "hl" / "a")
    assert os.getxattr(upper / "hl" / "a", "trusted.overlay.fuse-lower-links") == b"0"
    assert tree.link_count(tree.lookup(_ino(tree, "hl"), "b").resolved, os.lstat(upper / "hl" / "b")) == 2
    assert os.listdir(work / "index") == []  # nothing new written in the kernel's index


async def test_read_only_tree_refuses_changes(dirs: tuple[Path, Path, Path, Path]) -> None:
    tree = open_tree([dirs[0], dirs[1]])
    assert not tree.writable
    assert tree.lookup(_ino(tree, "etc"), "hosts").resolved.layer.index == 0
    for change in (lambda: tree.create(ROOT_INODE, "x", stat.S_IFREG | 0o644, ROOT),
                   lambda: tree.remove(_ino(tree, "etc"), "hosts", directory=False)):
        with pytest.raises(OSError) as excinfo:
            await change()
        assert excinfo.value.errno == errno.EROFS
    assert os.listdir(dirs[2]) == []


async def test_dir_rename_keeps_hardlinks(dirs: tuple[Path, Path, Path, Path]) -> None:
    """With redirect_dir=off a directory with lower content is copied up whole to move (the kernel
    says EXDEV there): the two names of a lower hardlink inside it stay one file, through the index."""
    tree = open_tree([dirs[0], dirs[1]], dirs[2], dirs[3], CopyUpFeatures(redirect_dir=False))
    await tree.rename(ROOT_INODE, "hl", ROOT_INODE, "moved", 0)
    moved = _upper(dirs) / "moved"
    a, b = os.lstat(moved / "a"), os.lstat(moved / "b")
    assert a.st_ino == b.st_ino and a.st_nlink >= 2 and (moved / "b").read_bytes() == b"linked"
    assert os.getxattr(moved, TRUSTED_OPAQUE) == b"y" and _is_whiteout(_upper(dirs) / "hl")
    assert await _names(tree, _ino(tree, "moved")) == ["a", "b"]


# -- directory renames by redirect (redirect_dir=on, the default) -----------------------------------


async def test_dir_rename_in_place_writes_a_relative_redirect(
    tree: MergedTree, dirs: tuple[Path, Path, Path, Path]
) -> None:
    """Only the directory is copied up; its children stay below, and it keeps its inode number."""
    before = _ino(tree, "etc")
    await tree.rename(ROOT_INODE, "etc", ROOT_INODE, "etc2", 0)
    upper = _upper(dirs)
    assert _redirect(upper / "etc2") == b"etc" and _is_whiteout(upper / "etc")
    assert os.listdir(upper / "etc2") == []  # nothing of the lower content copied
    assert TRUSTED_OPAQUE not in os.listxattr(upper / "etc2")
    assert await _names(tree, _ino(tree, "etc2")) == ["hosts", "link", "passwd"]
    assert _ino(tree, "etc2") == before
    hosts = tree.lookup(_ino(tree, "etc2"), "hosts")
    assert Path(hosts.resolved.path).read_bytes() == b"top hosts\n"


async def test_dir_moved_to_another_parent_gets_an_absolute_redirect(
    tree: MergedTree, dirs: tuple[Path, Path, Path, Path]
) -> None:
    """Moved twice (in place, then elsewhere): the second redirect is absolute from the root and
    names the lower place, not the intermediate name."""
    await tree.rename(ROOT_INODE, "etc", ROOT_INODE, "etc2", 0)
    await tree.rename(ROOT_INODE, "etc2", _ino(tree, "empty"), "etc3", 0)
    upper = _upper(dirs)
    assert _redirect(upper / "empty" / "etc3") == b"/etc" and not (upper / "etc2").exists()
    assert os.listdir(upper / "empty" / "etc3") == []
    assert await _names(tree, _ino(tree, "empty/etc3")) == ["hosts", "link", "passwd"]
    # a child moved out of the moved dir names its lower place through the parent's redirect
    await tree.rename(ROOT_INODE, "full", _ino(tree, "empty/etc3"), "full", 0)
    await tree.rename(_ino(tree, "empty/etc3"), "full", ROOT_INODE, "full-again", 0)
    assert _redirect(upper / "full-again") == b"/full"
    assert await _names(tree, _ino(tree, "full-again")) == ["f1"]


async def test_dir_moved_back_and_removed(tree: MergedTree, dirs: tuple[Path, Path, Path, Path]) -> None:
    """Renamed away and back, with a whiteout and a new file inside; then emptied and removed."""
    hl = _ino(tree, "hl")
    await tree.rename(ROOT_INODE, "hl", ROOT_INODE, "links", 0)
    await tree.remove(_ino(tree, "links"), "a", directory=False)
    await tree.create(_ino(tree, "links"), "new", stat.S_IFREG | 0o644, ROOT)
    await tree.rename(ROOT_INODE, "links", ROOT_INODE, "hl", 0)
    upper = _upper(dirs)
    assert _redirect(upper / "hl") == b"hl" and not os.path.lexists(upper / "links")
    assert sorted(os.listdir(upper / "hl")) == ["a", "new"] and _is_whiteout(upper / "hl" / "a")
    assert await _names(tree, _ino(tree, "hl")) == ["b", "new"] and _ino(tree, "hl") == hl
    for name in ("b", "new"):
        await tree.remove(_ino(tree, "hl"), name, directory=False)
    await tree.remove(ROOT_INODE, "hl", directory=True)
    assert _is_whiteout(upper / "hl")
    assert "hl" not in await _names(tree, ROOT_INODE)


# -- metadata-only copy-up (metacopy=on, the default) ----------------------------------------------


async def test_chmod_copies_up_metadata_only(tree: MergedTree, dirs: tuple[Path, Path, Path, Path]) -> None:
    """A chmod of a lower file leaves an upper file with no data, marked metacopy; reads get the
    lower data; the first open for writing copies the data in, in place (same object, same number)."""
    node = tree.lookup(_ino(tree, "etc"), "passwd")
    before = node.ino
    await tree.change_metadata(node, lambda path: os.chmod(path, 0o600))
    copy = _upper(dirs) / "etc" / "passwd"
    st = os.lstat(copy)
    assert st.st_size == 5 and not has_data(copy) and stat.S_IMODE(st.st_mode) == 0o600
    assert os.getxattr(copy, METACOPY) == b""
    again = tree.lookup(_ino(tree, "etc"), "passwd")
    assert again.ino == before and again.resolved.layer.writable
    assert again.resolved.data is not None and Path(again.resolved.readable.path).read_bytes() == b"root\n"
    await tree.change_metadata(again, lambda path: os.chown(path, 7, 8))  # still metadata only
    assert not has_data(copy) and os.lstat(copy).st_ino == st.st_ino
    await tree.copy_up(again, for_open=True)
    assert copy.read_bytes() == b"root\n" and METACOPY not in os.listxattr(copy)
    after = os.lstat(copy)
    assert after.st_ino == st.st_ino and after.st_mtime_ns == st.st_mtime_ns
    assert after.st_uid == 7 and stat.S_IMODE(after.st_mode) == 0o600
    assert node.resolved.data is None and tree.lookup(_ino(tree, "etc"), "passwd").ino == before


async def test_chown_is_folded_into_its_metacopy_copy_up(
    tree: MergedTree, dirs: tuple[Path, Path, Path, Path]
) -> None:
    """A plain chown/chmod of a lower file creates the copy with the new owner and mode (the change
    is made, and the copy's stat is its final one: nothing to run or stat after it); a chown of a
    set-id file is made after its copy-up, where chown clears the bits, as the kernel's does."""
    passwd = tree.lookup(_ino(tree, "etc"), "passwd")
    st = await tree.change_metadata(passwd, MetadataChange(uid=7, gid=8, mode=0o640))
    copy = _upper(dirs) / "etc" / "passwd"
    assert st is not None and (st.st_ino, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        os.lstat(copy).st_ino, 7, 8, 0o640)
    assert os.lstat(copy).st_ctime_ns == st.st_ctime_ns and not has_data(copy)
    os.chmod(dirs[0] / "etc" / "hosts", 0o4755)
    hosts = tree.lookup(_ino(tree, "etc"), "hosts")
    assert await tree.change_metadata(hosts, MetadataChange(uid=7, gid=-1)) is None  # not folded
    after = os.lstat(_upper(dirs) / "etc" / "hosts")
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (7, 0, 0o755)  # setuid cleared
    timed = tree.lookup(_ino(tree, "full"), "f1")
    assert await tree.change_metadata(timed, MetadataChange(uid=7, atime_ns=1, mtime_ns=2)) is None
    assert os.lstat(_upper(dirs) / "full" / "f1").st_mtime_ns == 2


async def test_truncate_of_a_metacopy_file_copies_only_what_stays(
    tree: MergedTree, dirs: tuple[Path, Path, Path, Path]
) -> None:
    node = tree.lookup(_ino(tree, "etc"), "passwd")
    await tree.change_metadata(node, lambda path: os.utime(path, ns=(1, 2)))
    await tree.truncate(node, 2)
    copy = _upper(dirs) / "etc" / "passwd"
    assert copy.read_bytes() == b"ro" and METACOPY not in os.listxattr(copy)


async def test_hardlinked_and_empty_files_are_copied_whole(
    tree: MergedTree, dirs: tuple[Path, Path, Path, Path]
) -> None:
    """A hardlinked lower file goes through the link index whole (its names stay one file)."""
    await tree.change_metadata(tree.lookup(_ino(tree, "hl"), "a"), lambda path: os.chmod(path, 0o600))
    copy = _upper(dirs) / "hl" / "a"
    assert copy.read_bytes() == b"linked" and METACOPY not in os.listxattr(copy)


async def test_metacopy_off_copies_data(dirs: tuple[Path, Path, Path, Path]) -> None:
    tree = open_tree([dirs[0], dirs[1]], dirs[2], dirs[3], CopyUpFeatures(metacopy=False))
    await tree.change_metadata(tree.lookup(_ino(tree, "etc"), "passwd"), lambda path: os.chmod(path, 0o600))
    copy = _upper(dirs) / "etc" / "passwd"
    assert copy.read_bytes() == b"root\n" and METACOPY not in os.listxattr(copy)


async def test_metacopy_file_inside_a_dir_moved_without_redirect_gets_its_data(
    dirs: tuple[Path, Path, Path, Path]
) -> None:
    """redirect_dir=off copies the tree and makes it opaque: a metacopy file inside it must take its
    data along, or the opaque dir would hide it."""
    tree = open_tree([dirs[0], dirs[1]], dirs[2], dirs[3], CopyUpFeatures(redirect_dir=False))
    await tree.change_metadata(tree.lookup(_ino(tree, "full"), "f1"), lambda path: os.chmod(path, 0o600))
    await tree.rename(ROOT_INODE, "full", ROOT_INODE, "moved", 0)
    copy = _upper(dirs) / "moved" / "f1"
    assert copy.read_bytes() == b"1" and METACOPY not in os.listxattr(copy)
    found = tree.lookup(_ino(tree, "moved"), "f1").resolved
    assert Path(found.readable.path).read_bytes() == b"1"


# -- worker-thread hops of a metadata change ------------------------------------------------------


def _tree_counting_hops(tmp_path: Path, lower: Path) -> tuple[MergedTree, list[str]]:
    """A tree on LOWER with an empty upper dir, and the names of the functions it runs in worker
    threads, one per hop, as they run."""
    (tmp_path / "upper").mkdir()
    tree = open_tree([lower], tmp_path / "upper", tmp_path / "work")
    hops: list[str] = []
    run = tree.in_thread

    async def counted(func: Any, *args: Any) -> Any:
        hops.append(func.__name__)
        return await run(func, *args)

    tree.in_thread = counted  # type: ignore[method-assign]
    return tree, hops


async def test_a_chown_deep_in_a_lower_tree_takes_one_hop(tmp_path: Path) -> None:
    """A hop to a worker thread is most of what a chown of a lower file costs (the copy-up is a
    few cheap syscalls): the missing parents, the file's metacopy and the change itself go in one
    hop (``chown -R`` of a lower tree makes one such per directory)."""
    lower = make_tree(tmp_path / "lower", File("a/b/c/f", b"data" * 65536), File("a/b/c/g", b"more"))
    tree, hops = _tree_counting_hops(tmp_path, lower)
    node = tree.lookup(_ino(tree, "a/b/c"), "f")
    await tree.change_metadata(node, lambda path: os.chown(path, 1000, 1000))
    assert len(hops) == 1, hops
    st = os.lstat(tmp_path / "upper/a/b/c/f")
    assert (st.st_uid, st.st_gid) == (1000, 1000) and node.resolved.layer.writable
    assert METACOPY in os.listxattr(tmp_path / "upper/a/b/c/f") and st.st_size == 4 * 65536
    assert st.st_blocks * 512 <= 8192  # no data: at most a block of xattrs
    assert Path(node.resolved.readable.path).read_bytes() == b"data" * 65536  # read from below
    assert os.lstat(tmp_path / "lower/a/b/c/f").st_uid == 0
    assert tree.node(_ino(tree, "a/b/c")).resolved.layer.writable and (tmp_path / "upper/a/b/c").is_dir()
    assert tree.node(_ino(tree, "a")).resolved.layer.writable
    # the next file of that directory: one hop, for itself
    sibling = tree.lookup(_ino(tree, "a/b/c"), "g")
    await tree.change_metadata(sibling, lambda path: os.chown(path, 1000, 1000))
    assert len(hops) == 2, hops
    assert os.lstat(tmp_path / "upper/a/b/c/g").st_uid == 1000


async def test_a_chown_deep_in_a_lower_tree_without_metacopy_takes_two_hops(tmp_path: Path) -> None:
    """What is not a metacopy (here a symlink) is copied up in a hop of its own after its parents."""
    lower = make_tree(tmp_path / "lower", File("a/b/f", b"data"))
    os.symlink("f", lower / "a/b/link")
    tree, hops = _tree_counting_hops(tmp_path, lower)
    node = tree.lookup(_ino(tree, "a/b"), "link")
    # PATH is /proc/self/fd/N of the copy: following it reaches the symlink itself, never its target
    await tree.change_metadata(node, lambda path: os.chown(path, 1000, 1000))
    assert len(hops) == 2, hops
    st = os.lstat(tmp_path / "upper/a/b/link")
    assert (st.st_uid, st.st_gid) == (1000, 1000) and os.readlink(tmp_path / "upper/a/b/link") == "f"
    assert os.lstat(tmp_path / "lower/a/b/f").st_uid == 0


async def test_a_directory_rename_deep_in_a_lower_tree_takes_two_hops(tmp_path: Path) -> None:
    """``mv /opt/app /opt/app.old`` on a fresh container: the directory and its missing parents are
    copied up in one hop, and its redirect is set in the rename's own hop, just before the move;
    its content stays below. The next rename in that parent: the directory, then the move."""
    lower = make_tree(tmp_path / "lower", File("opt/app/bin/tool", b"tool"), File("opt/lib/x", b"x"))
    tree, hops = _tree_counting_hops(tmp_path, lower)
    opt = _ino(tree, "opt")
    await tree.rename(opt, "app", opt, "app.old", 0)
    assert hops == ["_copy_dirs", "_redirect_then"], hops
    upper = tmp_path / "upper"
    assert _redirect(upper / "opt/app.old") == b"app" and _is_whiteout(upper / "opt/app")
    assert os.listdir(upper / "opt/app.old") == []
    assert await _names(tree, _ino(tree, "opt/app.old")) == ["bin"]
    tool = tree.lookup(_ino(tree, "opt/app.old/bin"), "tool")
    assert Path(tool.resolved.path).read_bytes() == b"tool"
    hops.clear()
    await tree.rename(opt, "lib", ROOT_INODE, "lib", 0)
    assert hops == ["_copy_then", "_redirect_then"], hops
    assert _redirect(upper / "lib") == b"/opt/lib" and await _names(tree, _ino(tree, "lib")) == ["x"]


async def test_a_create_deep_in_a_lower_tree_takes_two_hops(tmp_path: Path) -> None:
    """The parent of a new file goes up with its own missing parents in one hop; then the create."""
    lower = make_tree(tmp_path / "lower", File("a/b/c/f", b"f"))
    tree, hops = _tree_counting_hops(tmp_path, lower)
    _node, fd = await tree.create(_ino(tree, "a/b/c"), "new", stat.S_IFREG | 0o644, ROOT)
    if fd is not None:
        os.close(fd)
    assert len(hops) == 2, hops
    assert (tmp_path / "upper/a/b/c/new").is_file() and not (tmp_path / "upper/a/b/c/f").exists()
    assert await _names(tree, _ino(tree, "a/b/c")) == ["f", "new"]


async def test_a_change_failing_after_its_copy_up_leaves_the_copy_in_place(
    tree: MergedTree, dirs: tuple[Path, Path, Path, Path]
) -> None:
    """The change runs in the copy-up's hop; when it fails the caller gets its error, and the copy
    (complete, published) is the node's object from then on, as when the two were separate."""
    link = tree.lookup(_ino(tree, "etc"), "link")

    def refused(path: str) -> None:
        os.setxattr(path, "user.x", b"1")  # user.* xattrs on a symlink: EPERM

    with pytest.raises(OSError) as excinfo:
        await tree.change_metadata(link, refused)
    assert excinfo.value.errno == errno.EPERM
    assert link.resolved.layer.writable and os.readlink(_upper(dirs) / "etc" / "link") == "hosts"
