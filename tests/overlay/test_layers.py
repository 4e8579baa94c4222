"""Unit tier: resolution through the layer stack on plain directories, no mount.

These pin the kernel's lookup rules where they are cheapest to read; the mount tests compare the
whole behaviour with kernel overlayfs itself.
"""

from __future__ import annotations

import errno
import gc
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from overlayfuse.overlay import layers, whiteout
from overlayfuse.overlay.layers import LayerStack, Resolved

from ..support.trees import CharDev, Dir, File, OciWhiteout, Opaque, Symlink, Whiteout, make_tree


def _stack(tmp_path: Path, *layer_entries: list) -> LayerStack:
    """Build layers top first; the first is used as the upper dir."""
    roots = []
    for i, entries in enumerate(layer_entries):
        roots.append(str(make_tree(tmp_path / f"layer{i}", *entries)))
    return LayerStack.from_dirs(roots[1:], roots[0])


def _resolve(stack: LayerStack, path: str) -> Resolved | None:
    current = stack.resolve_root()
    for name in path.split("/"):
        found = layers.lookup(current.branches, name)
        if found is None:
            return None
        current = found
    return current


def _names(stack: LayerStack, path: str = "") -> list[str]:
    resolved = _resolve(stack, path) if path else stack.resolve_root()
    assert resolved is not None
    return sorted(name for name, _ in layers.list_dir(resolved.branches))


def test_first_match_wins_top_down(tmp_path: Path) -> None:
    stack = _stack(tmp_path, [File("f", b"upper")], [File("f", b"middle")], [File("f", b"lower")])
    found = _resolve(stack, "f")
    assert found is not None and found.layer.index == 0
    assert Path(found.path).read_bytes() == b"upper"


def test_directories_merge_names_from_every_layer(tmp_path: Path) -> None:
    stack = _stack(tmp_path, [File("d/a")], [File("d/b")], [File("d/c"), File("d/a", b"hidden")])
    assert _names(stack, "d") == ["a", "b", "c"]
    d = _resolve(stack, "d")
    assert d is not None and d.is_merged and len(d.branches) == 3


def test_non_directory_hides_directory_below(tmp_path: Path) -> None:
    stack = _stack(tmp_path, [File("x", b"file")], [File("x/inside")])
    found = _resolve(stack, "x")
    assert found is not None and not found.is_dir and found.branches == ()
    assert _resolve(stack, "x/inside") is None


def test_file_below_directory_ends_the_merge(tmp_path: Path) -> None:
    """A dir over a file over a dir: the bottom dir does not show through (kernel stops at the file)."""
    stack = _stack(tmp_path, [File("d/top")], [File("d", b"file")], [File("d/bottom")])
    assert _names(stack, "d") == ["top"]


@pytest.mark.parametrize("whiteout", [Whiteout("gone"), OciWhiteout("gone")], ids=["chardev", "oci"])
def test_whiteout_hides_lower_entry(tmp_path: Path, whiteout: Whiteout | OciWhiteout) -> None:
    stack = _stack(tmp_path, [whiteout], [File("gone"), File("kept")])
    assert _resolve(stack, "gone") is None
    assert _names(stack) == ["kept"]


@pytest.mark.parametrize("form", ["trusted", "user", "oci"])
def test_opaque_directory_hides_lower_contents(tmp_path: Path, form: str) -> None:
    stack = _stack(tmp_path, [File("d/new"), Opaque("d", form)], [File("d/old")])
    assert _names(stack, "d") == ["new"]
    d = _resolve(stack, "d")
    assert d is not None and not d.is_merged


def test_opaque_stops_only_below_itself(tmp_path: Path) -> None:
    """An opaque dir in the middle layer still merges with the layer above it."""
    stack = _stack(tmp_path, [File("d/a")], [File("d/b"), Opaque("d")], [File("d/c")])
    assert _names(stack, "d") == ["a", "b"]


def test_oci_whiteout_beside_directory_means_replaced(tmp_path: Path) -> None:
    stack = _stack(tmp_path, [File("d/new"), OciWhiteout("d")], [File("d/old")])
    assert _names(stack, "d") == ["new"]


def test_markers_never_visible(tmp_path: Path) -> None:
    stack = _stack(tmp_path, [OciWhiteout("w"), Whiteout("k"), Opaque("d", "oci"), File("d/f")], [])
    assert _names(stack) == ["d"]
    assert _names(stack, "d") == ["f"]
    assert _resolve(stack, ".wh.w") is None
    assert _resolve(stack, "d/.wh..wh..opq") is None


def test_device_other_than_0_0_is_not_a_whiteout(tmp_path: Path) -> None:
    stack = _stack(tmp_path, [CharDev("null", 1, 3)], [File("null")])
    found = _resolve(stack, "null")
    assert found is not None and found.stat.st_rdev != 0


def test_symlink_is_not_followed(tmp_path: Path) -> None:
    stack = _stack(tmp_path, [Symlink("link", "/etc")], [Dir("link")])
    found = _resolve(stack, "link")
    assert found is not None and not found.is_dir


def test_listing_and_lookup_agree(tmp_path: Path) -> None:
    """list_dir runs the same rules from listings that lookup runs with syscalls."""
    stack = _stack(
        tmp_path,
        [File("a"), OciWhiteout("b"), Dir("c"), Whiteout("e")],
        [File("b"), File("c", b"file under dir"), Dir("d"), File("d/x"), File("e")],
        [Dir("c"), File("c/deep"), File("f")],
    )
    root = stack.resolve_root()
    listed = {name: r for name, r in layers.list_dir(root.branches)}
    assert sorted(listed) == ["a", "c", "d", "f"]
    for name, resolved in listed.items():
        looked_up = layers.lookup(root.branches, name)
        assert looked_up is not None
        assert _shape(looked_up) == _shape(resolved)


def test_listing_a_lower_directory_alone_agrees_with_lookup(tmp_path: Path) -> None:
    """A lower directory with nothing merged into it has a shorter listing path (`list_dir`): it
    must hide and show exactly what the full merge does, whiteouts of every form included."""
    stack = _stack(
        tmp_path,
        [],
        [
            File("d/f"), File("d/empty", b""), Dir("d/sub"), File("d/sub/x"), Symlink("d/link", "/etc"),
            CharDev("d/null", 1, 3), Whiteout("d/gone"), OciWhiteout("d/hidden"), File("d/xw", b""),
            File("d/xw-full", b"data"),
        ],
    )
    layer1 = tmp_path / "layer1"
    os.setxattr(layer1 / "d", "trusted.overlay.opaque", b"x")  # xattr whiteouts inside (not opaque)
    os.setxattr(layer1 / "d/xw", "trusted.overlay.whiteout", b"")
    os.setxattr(layer1 / "d/xw-full", "trusted.overlay.whiteout", b"")  # not empty: not a whiteout
    d = _resolve(stack, "d")
    assert d is not None and len(d.branches) == 1 and not d.branches[0].layer.writable
    listed = dict(layers.list_dir(d.branches))
    assert sorted(listed) == ["empty", "f", "link", "null", "sub", "xw-full"]
    for name, resolved in listed.items():
        looked_up = layers.lookup(d.branches, name)
        assert looked_up is not None
        assert _shape(looked_up) == _shape(resolved)
    for hidden in ("gone", "hidden", "xw"):
        assert layers.lookup(d.branches, hidden) is None


def test_listing_lower_directories_merged_agrees_with_lookup(tmp_path: Path) -> None:
    """The same for a directory merged from two lower layers and no upper one: whichever branch
    from the top has a name, or a whiteout of it, decides."""
    stack = _stack(
        tmp_path,
        [],
        [
            File("d/top"), Whiteout("d/dev-gone"), OciWhiteout("d/oci-gone"), File("d/xw", b""),
            File("d/file-over-dir"), Dir("d/dir-over-file"), Dir("d/both"), File("d/both/up"),
            File("d/shadows", b"top"),
        ],
        [
            File("d/below"), File("d/dev-gone"), File("d/oci-gone"), File("d/xw"), Dir("d/file-over-dir"),
            File("d/file-over-dir/x"), File("d/dir-over-file"), Dir("d/both"), File("d/both/down"),
            File("d/shadows", b"below"), Dir("d/only-below"),
        ],
    )
    layer1 = tmp_path / "layer1"
    os.setxattr(layer1 / "d", "trusted.overlay.opaque", b"x")  # xattr whiteouts inside (not opaque)
    os.setxattr(layer1 / "d/xw", "trusted.overlay.whiteout", b"")
    d = _resolve(stack, "d")
    assert d is not None and len(d.branches) == 2 and not any(b.layer.writable for b in d.branches)
    listed = dict(layers.list_dir(d.branches))
    assert sorted(listed) == ["below", "both", "dir-over-file", "file-over-dir", "only-below", "shadows", "top"]
    for name, resolved in listed.items():
        looked_up = layers.lookup(d.branches, name)
        assert looked_up is not None
        assert _shape(looked_up) == _shape(resolved)
    assert Path(listed["shadows"].path).read_bytes() == b"top"
    assert listed["both"].is_merged
    for hidden in ("dev-gone", "oci-gone", "xw"):
        assert layers.lookup(d.branches, hidden) is None


def test_long_name_reports_enametoolong(tmp_path: Path) -> None:
    stack = _stack(tmp_path, [File("a")], [File("b")])
    with pytest.raises(OSError) as excinfo:
        layers.lookup(stack.resolve_root().branches, "n" * 300)
    assert excinfo.value.errno == errno.ENAMETOOLONG


def test_name_too_long_for_its_whiteout_is_still_found(tmp_path: Path) -> None:
    """A 255-byte name cannot have a ".wh." twin; probing for one must not fail the lookup."""
    name = "n" * 255
    stack = _stack(tmp_path, [], [File(name, b"x")])
    found = _resolve(stack, name)
    assert found is not None and Path(found.path).read_bytes() == b"x"


def _redirect(path: Path, value: str) -> None:
    os.setxattr(path, "trusted.overlay.redirect", value.encode())


def test_relative_redirect_finds_renamed_directory_contents(tmp_path: Path) -> None:
    """What the kernel (redirect_dir=on) writes for `mv old new` in one directory."""
    stack = _stack(tmp_path, [Dir("new"), Whiteout("old")], [File("old/inside")])
    _redirect(tmp_path / "layer0" / "new", "old")
    assert _names(stack) == ["new"]
    assert _names(stack, "new") == ["inside"]


def test_absolute_redirect_reaches_layers_without_the_new_parent(tmp_path: Path) -> None:
    """`mv a/old b/new`: the lower layer has no b/, the redirect is an absolute path."""
    stack = _stack(tmp_path, [Dir("b/new"), Whiteout("a/old")], [], [File("a/old/inside")])
    _redirect(tmp_path / "layer0" / "b" / "new", "/a/old")
    assert _names(stack, "b/new") == ["inside"]
    new = _resolve(stack, "b/new")
    assert new is not None and [b.layer.index for b in new.branches] == [0, 2]


def test_absolute_redirect_continues_in_the_stack_s_own_layer_roots(tmp_path: Path) -> None:
    """Resolving through an absolute redirect opens no layer root again: the branches it finds hang
    from the roots the stack holds, so a mount holding many such directories holds no descriptor
    per directory and layer for the roots (it did: each resolution opened every lower root)."""
    stack = _stack(tmp_path, [Dir("b/new"), Whiteout("a/old")], [Dir("a/old")], [File("a/old/inside")])
    _redirect(tmp_path / "layer0" / "b" / "new", "/a/old")
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # no collection closes an earlier test's descriptors while this one counts
    try:
        before = len(os.listdir("/proc/self/fd"))
        found = [_resolve(stack, "b/new") for _ in range(20)]
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        if was_enabled:
            gc.enable()
    for new in found:
        assert new is not None and [b.layer.index for b in new.branches] == [0, 1, 2]
        for branch in new.branches[1:]:
            root = branch
            while root.parent is not None:
                root = root.parent
            assert root is stack.roots[branch.layer.index]


def _shape(resolved: Resolved) -> tuple[object, ...]:
    """What a resolution says, without the descriptors that hold it (branches compare by identity)."""
    return (resolved.layer, resolved.name, (resolved.stat.st_dev, resolved.stat.st_ino),
            [(b.layer, b.dev, b.ino, b.markers) for b in resolved.branches])


_MARKED_DIRS = {
    "opaque, trusted": {"trusted.overlay.opaque": b"y"},
    "opaque, user": {"user.overlay.opaque": b"y"},
    "xattr whiteouts": {"trusted.overlay.opaque": b"x"},
    "redirect": {"trusted.overlay.redirect": b"/a/old"},
    "opaque file": {},
    "none": {},
}


@pytest.mark.parametrize("case", list(_MARKED_DIRS))
def test_markers_read_through_a_descriptor_are_the_path_s(tmp_path: Path, case: str) -> None:
    """Lookups and listings read a directory's markers through a descriptor of it; every form
    reads as it does by path (which the unit and mount tests above pin against the kernel)."""
    directory = tmp_path / "parent" / "d"
    directory.mkdir(parents=True)
    for name, value in _MARKED_DIRS[case].items():
        os.setxattr(directory, name, value)
    if case == "opaque file":
        (directory / whiteout.OCI_OPAQUE_MARKER).touch()
    parent = os.open(tmp_path / "parent", os.O_PATH | os.O_DIRECTORY)
    try:
        through_fd = whiteout.read_dir_markers_at(parent, "d")
    finally:
        os.close(parent)
    assert through_fd == whiteout.read_dir_markers(str(directory))
    assert (through_fd == whiteout.NO_MARKERS) == (case == "none")


def test_markers_of_a_directory_its_reader_may_not_list(tmp_path: Path) -> None:
    """A directory the daemon may search but not read (a rootless daemon, an owner it cannot map)
    cannot be opened for its markers: they are read by path then, which needs search permission only."""
    directory = tmp_path / "parent" / "d"
    directory.mkdir(parents=True)
    (directory / whiteout.OCI_OPAQUE_MARKER).touch()
    for path in (directory, directory.parent):
        path.chmod(0o711)
    parent = os.open(tmp_path / "parent", os.O_PATH | os.O_DIRECTORY)  # the tmp dir is closed to nobody
    try:
        could_open, markers = _as_nobody(lambda: (_can_open(parent, "d"), whiteout.read_dir_markers_at(parent, "d")))
    finally:
        os.close(parent)
    assert not could_open  # so the path answered
    assert markers.opaque


def _can_open(dir_fd: int, name: str) -> bool:
    try:
        os.close(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd))
    except PermissionError:
        return False
    return True


def _as_nobody(func: Callable[[], Any]) -> Any:
    """FUNC's result, run in a child that dropped root for nobody (65534)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, whatever happens
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, pickle.dumps(func()))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and out, "the child as nobody failed"
    return pickle.loads(out)
