"""Unit tier: inode numbers (the xino scheme) and lookup counting, on real files, no mount."""

from __future__ import annotations

import os
from pathlib import Path

from overlayfuse import layers
from overlayfuse.inodes import ALLOCATED_FSID, FSID_SHIFT, ROOT_INODE, InodeTable
from overlayfuse.layers import LayerStack

from .trees import Dir, File, HardLink, make_tree


def _table(tmp_path: Path) -> tuple[LayerStack, InodeTable]:
    upper = make_tree(tmp_path / "upper", File("u"), Dir("d"))
    lower = make_tree(tmp_path / "lower", File("a", b"x"), HardLink("b", "a"), Dir("d"), File("d/f"))
    stack = LayerStack.from_dirs([str(lower)], str(upper))
    return stack, InodeTable(stack.resolve_root(), [os.lstat(str(upper)).st_dev])


def _remember(stack: LayerStack, table: InodeTable, name: str):  # type: ignore[no-untyped-def]
    resolved = layers.lookup(stack.resolve_root().branches, name)
    assert resolved is not None
    return table.remember(name, resolved, ROOT_INODE)


def test_numbers_come_from_the_real_inode(tmp_path: Path) -> None:
    stack, table = _table(tmp_path)
    node = _remember(stack, table, "a")
    assert node.ino == os.lstat(tmp_path / "lower" / "a").st_ino  # same filesystem: fsid 0


def test_hardlinks_share_one_node(tmp_path: Path) -> None:
    stack, table = _table(tmp_path)
    a, b = _remember(stack, table, "a"), _remember(stack, table, "b")
    assert a is b and a.names == {"a", "b"} and a.lookups == 2


def test_numbers_are_stable_across_forget(tmp_path: Path) -> None:
    stack, table = _table(tmp_path)
    first = _remember(stack, table, "d").ino
    table.forget(first, 1)
    assert first not in table
    assert _remember(stack, table, "d").ino == first


def test_root_is_never_forgotten(tmp_path: Path) -> None:
    _, table = _table(tmp_path)
    table.forget(ROOT_INODE, 5)
    assert ROOT_INODE in table


def test_new_filesystem_gets_its_own_fsid(tmp_path: Path) -> None:
    stack, table = _table(tmp_path)
    resolved = layers.lookup(stack.resolve_root().branches, "u")
    assert resolved is not None
    foreign = os.stat_result((resolved.stat.st_mode, 42, 0xDEAD, 1, 0, 0, 0, 0, 0, 0))
    moved = layers.Resolved(resolved.layer, resolved.path, foreign, ())
    assert table.number_for("u", moved) == (1 << FSID_SHIFT) | 42


def test_two_directories_on_one_real_directory_get_distinct_numbers(tmp_path: Path) -> None:
    """Overlapping layers can back two merged dirs with one real dir: they must not share a node."""
    stack, table = _table(tmp_path)
    d = layers.lookup(stack.resolve_root().branches, "d")
    assert d is not None
    first = table.remember("d", d, ROOT_INODE)
    second = table.remember("elsewhere/d", d, ROOT_INODE)
    assert first.ino != second.ino
    assert second.ino >> FSID_SHIFT == ALLOCATED_FSID
