"""Unit tier: changes to the upper dir (`overlay.upper`) on plain directories, in both marker styles.

`upper` stages every change in the workdir and publishes it with one rename; these tests call it
directly and check what lands in the upper dir, in the kernel's form (0:0 device whiteouts,
``trusted.overlay.opaque``) and in the OCI form a daemon without CAP_MKNOD writes (``.wh.NAME``
files, ``user.overlay.opaque``), and that staging is left empty.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from overlayfuse.overlay.copyup import Workspace
from overlayfuse.overlay.layers import LayerStack
from overlayfuse.overlay.upper import NewObject, UpperDir
from overlayfuse.overlay.whiteout import OPAQUE_XATTRS, MarkerStyle
from tests.support.trees import Dir, File, Whiteout, make_tree

DEVICE = MarkerStyle(device_whiteouts=True, opaque_xattr=OPAQUE_XATTRS[0])
OCI = MarkerStyle(device_whiteouts=False, opaque_xattr=OPAQUE_XATTRS[1])


@pytest.fixture(params=[DEVICE, OCI], ids=["device", "oci"])
def style(request: pytest.FixtureRequest) -> MarkerStyle:
    style: MarkerStyle = request.param
    return style


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    return Workspace.prepare(str(tmp_path / "upper"), str(tmp_path / "work"))


@pytest.fixture
def upper_dir(ws: Workspace, style: MarkerStyle) -> UpperDir:
    """The upper dir in STYLE's marker forms, without an index."""
    return UpperDir(ws, style, None)


def _whited_out(parent: Path, name: str, style: MarkerStyle) -> bool:
    if style.device_whiteouts:
        st = os.lstat(parent / name)
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    return (parent / f".wh.{name}").is_file() and not os.path.lexists(parent / name)


def _staging_empty(ws: Workspace) -> bool:
    return os.listdir(ws.staging) == []


def test_create_file_returns_an_open_descriptor(ws: Workspace, style: MarkerStyle, upper_dir: UpperDir) -> None:
    st, fd = upper_dir.create(ws.upper, "f", NewObject(stat.S_IFREG | 0o640, 0, 0, open_flags=os.O_WRONLY))
    assert fd is not None
    try:
        os.write(fd, b"data")
    finally:
        os.close(fd)
    assert Path(ws.upper, "f").read_bytes() == b"data" and stat.S_IMODE(st.st_mode) == 0o640
    assert _staging_empty(ws)


def test_create_dir_over_a_whiteout_is_opaque(ws: Workspace, style: MarkerStyle, upper_dir: UpperDir) -> None:
    up = Path(ws.upper)
    upper_dir.remove(ws.upper, "d", leave_whiteout=True)  # lower layers have a d
    assert _whited_out(up, "d", style)
    upper_dir.create(ws.upper, "d", NewObject(stat.S_IFDIR | 0o755, 0, 0))
    assert (up / "d").is_dir() and os.getxattr(up / "d", style.opaque_xattr) == b"y"
    assert not (up / ".wh.d").exists() and _staging_empty(ws)


def test_create_refuses_an_existing_object(ws: Workspace, style: MarkerStyle, upper_dir: UpperDir) -> None:
    make_tree(Path(ws.upper), File("f", b"mine"))
    with pytest.raises(FileExistsError):
        upper_dir.create(ws.upper, "f", NewObject(stat.S_IFREG | 0o644, 0, 0))
    assert Path(ws.upper, "f").read_bytes() == b"mine" and _staging_empty(ws)


@pytest.mark.parametrize("leave_whiteout", [True, False])
def test_remove(ws: Workspace, style: MarkerStyle, upper_dir: UpperDir, leave_whiteout: bool) -> None:
    up = Path(ws.upper)
    make_tree(up, File("f", b"x"), Dir("d"))
    upper_dir.remove(ws.upper, "f", leave_whiteout=leave_whiteout)
    upper_dir.remove(ws.upper, "d", leave_whiteout=leave_whiteout)
    for name in ("f", "d"):
        if leave_whiteout:
            assert _whited_out(up, name, style)
        else:
            assert not os.path.lexists(up / name) and not os.path.lexists(up / f".wh.{name}")
    assert _staging_empty(ws)


def test_rename_leaves_a_whiteout_and_makes_opaque(ws: Workspace, style: MarkerStyle, upper_dir: UpperDir) -> None:
    up = Path(ws.upper)
    make_tree(up, File("d/inside", b"in"), File("f", b"file"))
    upper_dir.rename(str(up / "d"), str(up / "moved"), leave_whiteout=True, make_opaque=True)
    assert (up / "moved/inside").read_bytes() == b"in"
    assert os.getxattr(up / "moved", style.opaque_xattr) == b"y" and _whited_out(up, "d", style)
    upper_dir.rename(str(up / "f"), str(up / "g"), leave_whiteout=False, make_opaque=False)
    assert not os.path.lexists(up / "f") and (up / "g").read_bytes() == b"file"
    assert _staging_empty(ws)


def test_rename_replaces_a_dir_holding_only_markers(ws: Workspace, style: MarkerStyle, upper_dir: UpperDir) -> None:
    """An upper dir that holds only whiteouts is empty in the merged view: a dir may replace it."""
    up = Path(ws.upper)
    make_tree(up, Dir("target"), File("src/new", b"new"))
    upper_dir.remove(str(up / "target"), "old", leave_whiteout=True)
    upper_dir.rename(str(up / "src"), str(up / "target"), leave_whiteout=False, make_opaque=False)
    assert sorted(os.listdir(up / "target")) == ["new"] and not os.path.lexists(up / "src")
    assert _staging_empty(ws)


def test_exchange_marks_an_arriving_dir_opaque(ws: Workspace, style: MarkerStyle, upper_dir: UpperDir) -> None:
    up = Path(ws.upper)
    make_tree(up, Dir("a"), File("b", b"file"))
    upper_dir.exchange(str(up / "a"), str(up / "b"), opaque_at_a=False, opaque_at_b=True)
    assert (up / "a").read_bytes() == b"file" and (up / "b").is_dir()
    assert os.getxattr(up / "b", style.opaque_xattr) == b"y"


def test_whiteout_builder_matches_upper(tmp_path: Path) -> None:
    """The tests' own whiteout builder and `upper`'s device whiteout are the same object type."""
    make_tree(tmp_path / "built", Whiteout("w"))
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    ws = Workspace.prepare(str(tmp_path / "upper"), str(tmp_path / "work"))
    UpperDir(ws, DEVICE, None).remove(ws.upper, "w", leave_whiteout=True)
    built, ours = os.lstat(tmp_path / "built/w"), os.lstat(tmp_path / "upper/w")
    assert (stat.S_IFMT(built.st_mode), built.st_rdev) == (stat.S_IFMT(ours.st_mode), ours.st_rdev)


def test_upper_dir_prepare(tmp_path: Path) -> None:
    """One call makes the writable side: staging cleared of an interrupted change, the marker forms
    probed (root: the kernel's), the hardlink index opened."""
    make_tree(tmp_path, Dir("lower"), Dir("upper"), File("work/work/#leftover", b"half a copy-up"))
    stack = LayerStack.from_dirs([str(tmp_path / "lower")], str(tmp_path / "upper"))
    prepared = UpperDir.prepare(str(tmp_path / "upper"), str(tmp_path / "work"), stack.layers[0])
    assert prepared.workspace.staging == str(tmp_path / "work/work") and _staging_empty(prepared.workspace)
    assert prepared.style == DEVICE
    assert prepared.links.directory == str(tmp_path / "work/index")  # the kernel's index dir
    assert os.path.isdir(prepared.links.directory)
