"""Unit tier: inode numbers (the xino scheme) and lookup counting, on real files, no mount."""

from __future__ import annotations

import os
from pathlib import Path

from overlayfuse.overlay import layers
from overlayfuse.overlay.inodes import ALLOCATED_FSID, FSID_SHIFT, ROOT_INODE, InodeTable, Node
from overlayfuse.overlay.layers import Branch, LayerStack, Resolved
from overlayfuse.overlay.whiteout import NO_MARKERS

from ..support.trees import Dir, File, HardLink, make_tree


def _table(tmp_path: Path) -> tuple[LayerStack, InodeTable]:
    upper = make_tree(tmp_path / "upper", File("u"), Dir("d"))
    lower = make_tree(tmp_path / "lower", File("a", b"x"), HardLink("b", "a"), Dir("d"), File("d/f"), Dir("l"))
    stack = LayerStack.from_dirs([str(lower)], str(upper))
    return stack, InodeTable(stack.resolve_root(), [os.lstat(str(upper)).st_dev])


def _resolve(stack: LayerStack, name: str) -> Resolved:
    resolved = layers.lookup(stack.resolve_root().branches, name)
    assert resolved is not None
    return resolved


def _remember(stack: LayerStack, table: InodeTable, name: str) -> Node:
    return table.remember(ROOT_INODE, name, _resolve(stack, name))


def test_numbers_come_from_the_real_inode(tmp_path: Path) -> None:
    stack, table = _table(tmp_path)
    node = _remember(stack, table, "a")
    assert node.ino == os.lstat(tmp_path / "lower" / "a").st_ino  # same filesystem: fsid 0


def test_merged_directory_is_numbered_by_its_lowest_layer(tmp_path: Path) -> None:
    """Copy-up adds a branch on top, so the lowest one keeps the number stable across copy-up."""
    stack, table = _table(tmp_path)
    assert _remember(stack, table, "d").ino == os.lstat(tmp_path / "lower" / "d").st_ino


def test_hardlinks_share_one_node(tmp_path: Path) -> None:
    stack, table = _table(tmp_path)
    a, b = _remember(stack, table, "a"), _remember(stack, table, "b")
    assert a is b and set(a.names) == {(ROOT_INODE, "a"), (ROOT_INODE, "b")} and a.lookups == 2


def test_numbers_are_stable_across_forget(tmp_path: Path) -> None:
    stack, table = _table(tmp_path)
    first = _remember(stack, table, "d").ino
    table.forget(first, 1)
    assert first not in table
    assert _remember(stack, table, "d").ino == first


def test_copied_up_file_keeps_its_number(tmp_path: Path) -> None:
    stack, table = _table(tmp_path)
    node = _remember(stack, table, "a")
    before = node.ino
    copy = tmp_path / "upper" / "a"
    copy.write_bytes(b"x")
    st = os.lstat(copy)
    table.rebind(node, Resolved(stack.layers[0], stack.roots[0], "a", st, ()))
    table.forget(before, 1)
    assert table.number_for(_resolve(stack, "a")) == before


def test_directory_moved_without_its_lower_keeps_its_number(tmp_path: Path) -> None:
    stack, table = _table(tmp_path)
    old = _resolve(stack, "l")
    moved = tmp_path / "upper" / "moved"
    moved.mkdir()
    st = os.lstat(moved)
    root = stack.roots[0]
    branch = Branch(stack.layers[0], root, "moved", NO_MARKERS, st.st_dev, st.st_ino)
    new = Resolved(stack.layers[0], root, "moved", st, (branch,))
    number = table.number_for(old)
    table.pin(old, new)
    assert table.number_for(new) == number


def test_root_is_never_forgotten(tmp_path: Path) -> None:
    _, table = _table(tmp_path)
    table.forget(ROOT_INODE, 5)
    assert ROOT_INODE in table


def test_new_filesystem_gets_its_own_fsid(tmp_path: Path) -> None:
    stack, table = _table(tmp_path)
    resolved = _resolve(stack, "u")
    foreign = os.stat_result((resolved.stat.st_mode, 42, 0xDEAD, 1, 0, 0, 0, 0, 0, 0))
    moved = Resolved(resolved.layer, resolved.dir, resolved.name, foreign, ())
    assert table.number_for(moved) == (1 << FSID_SHIFT) | 42


def test_number_held_by_another_object_is_not_reused(tmp_path: Path) -> None:
    """Overlapping layers can give two merged objects one computed number: the second gets another."""
    stack, table = _table(tmp_path)
    held = _remember(stack, table, "u")
    d = _resolve(stack, "d")
    branch = Branch(d.layer, d.dir, d.name, NO_MARKERS, held.resolved.stat.st_dev, held.ino)
    clash = Resolved(d.layer, d.dir, d.name, d.stat, (branch,))
    number = table.number_for(clash)
    assert number != held.ino and number >> FSID_SHIFT == ALLOCATED_FSID
    assert table.number_for(clash) == number  # remembered for the life of the mount


def test_a_node_with_one_name_keeps_no_list_and_no_identity(tmp_path: Path) -> None:
    """The common node is slim (a walk of 200k files holds 200k of them): its names and identity
    are derived from (parent, name) and its resolution until something makes them differ."""
    stack, table = _table(tmp_path)
    u = _remember(stack, table, "u")
    assert u.own_names is None and u.own_identity is None
    u.detached, u.linkable = None, False  # what every re-lookup sets: still no rare state
    assert u.rare is None and u.detached is None and not u.linkable
    assert list(u.names) == [(ROOT_INODE, "u")]
    table.renamed(u, (ROOT_INODE, "u"), (ROOT_INODE, "v"))
    assert list(u.names) == [(ROOT_INODE, "v")] and (u.parent, u.name) == (ROOT_INODE, "v")
    a = _remember(stack, table, "a")
    table.retire(a)
    assert a.identity == (False, -1, a.ino)  # set apart from its resolution's
    assert a.rare is not None and not a.linkable and a.detached is None
    a.linkable = True
    assert a.linkable and a.own_identity == (False, -1, a.ino)


def test_compact_stat_keeps_every_field_the_overlay_reads(tmp_path: Path) -> None:
    path = make_tree(tmp_path / "t", File("f", b"abc")) / "f"
    os.utime(path, ns=(1_000_000_007, 2_000_000_003))
    st = os.lstat(path)
    slim = layers.compact_stat(st)
    for name in ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns",
                 "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks", "st_rdev"):
        assert getattr(slim, name) == getattr(st, name), name
    assert layers.compact_stat(slim) is slim
    resolved = _resolve(LayerStack.from_dirs([str(tmp_path / "t")], None), "f")
    assert resolved.stat.st_mtime_ns == 2_000_000_003 and resolved.stat.st_mtime is None  # kept compact
