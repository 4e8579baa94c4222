"""The upper dir is kernel overlayfs's format, both ways.

- An upper dir written by overlayfuse, mounted afterwards by ``mount -t overlay`` (same lowers,
  upper and workdir), shows exactly what overlayfuse showed before it was unmounted.
- An upper dir written through a kernel mount, mounted afterwards by overlayfuse (same lowers,
  upper and workdir), shows exactly what the kernel showed.

Both compare one upper dir read by two implementations, so nothing needs normalising: mtimes,
modes, owners, xattrs, listings and hardlink groups must all be equal: the hardlink index is the
kernel's format too, so a lower name whose file was copied up through another name shows the copy
under either reader.  Each scenario is a list of
steps (see `tests.support.writes.run_steps`) applied to `standard_layers`; scenarios are kept
apart so a failure names the on-disk feature (whiteouts, opaque dirs, redirects, hardlinks).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.compare import assert_same_view, take_snapshot
from tests.support.mounts import kernel_overlay, run_isolated
from tests.support.rich_tree import LayerSet, build_layer_set
from tests.support.writes import KERNEL_OPTS, F, MiB, Step, mount_ours, run_steps, standard_layers

#: Both sides write and read with every on-disk feature on: redirects for directory renames and
#: metacopy files for metadata changes (the kernel refuses metacopy files without metacopy=on).
OPTS = KERNEL_OPTS + ",metacopy=on"

pytestmark = [pytest.mark.kernel, pytest.mark.mount]

SCENARIOS: dict[str, list[Step]] = {
    # copy-up of data and metadata, new objects of each type, whiteouts of files
    "copy-up-and-create": [
        ("write", F, 3, b"XYZ"), ("chmod", "d/sub/g", 0o600), ("chown", "target", 7, 8),
        ("setxattr", "merged/l2file", "user.added", b"1"), ("truncate", "full/f1", 0),
        ("write", "big/sparse", 5 * MiB, b"sparse"),
        ("create", "newfile", b"new\n", 0o640), ("mkdir", "newdir", 0o750),
        ("create", "newdir/inner", b"inner\n"), ("symlink", "newlink", "newfile"),
        ("mkfifo", "merged/fifo", 0o600),
        ("unlink", "merged/l1file"), ("unlink", "upperfile"),
    ],
    # whiteouts of dirs, a dir emptied and removed, dirs made again over whiteouts (opaque)
    "whiteouts-and-opaque": [
        ("rmdir", "emptied"), ("rmdir", "emptydir"),
        ("unlink", "rd/x"), ("unlink", "rd/y/z"), ("rmdir", "rd/y"), ("rmdir", "rd"),
        ("mkdir", "rd"), ("create", "rd/again", b"again\n"),
        ("mkdir", "wasdir"), ("create", "was", b"was\n"),
        ("unlink", "full/f1"), ("unlink", "full/f2"), ("rmdir", "full"),
    ],
    # renamed lower dirs (redirects), renamed lower files, a dir renamed over an empty one
    "renames": [
        ("rename", "rd", "moved"), ("rename", "d/sub", "merged/sub2"), ("mkdir", "rd"),
        ("rename", "target", "merged/target"), ("rename", "full", "emptydir"),
        ("rename", "merged/l1file", "moved/y/l1file"),
    ],
    # lower files moved as metacopy files with redirects: in place then elsewhere (the absolute
    # redirect names the lower place, not the name between), a big sparse one, one chmod'ed first,
    # one written after its move (its data comes in), two swapped, moves into and inside a moved dir;
    # a lower file linked (an absolute redirect, which its moved link keeps)
    "file-moves": [
        ("rename", "full/f2", "full/f2-moved"), ("rename", "full/f2-moved", "d/f2-far"),
        ("rename", "big/sparse", "sparse-moved"), ("chmod", "gone/g", 0o600), ("rename", "gone/g", "g-moved"),
        ("rename", "full/f1", "f1-moved"), ("write", "f1-moved", 0, b"W"),
        ("rename_exchange", "target", "d/sub/g"), ("rename", "rd", "rd2"), ("rename", "rd2/x", "rd2/y/x2"),
        ("rename", "merged/l1file", "rd2/l1file"), ("rename", F, "rd2/y/f"),
        ("link", "merged/l2file", "l2-link"), ("rename", "l2-link", "d/l2-link-moved"),
    ],
    # copy-up of one name of a hardlinked lower file, and a new link to a lower file
    "hardlinks": [
        ("write", "hl/a", 0, b"ONE"), ("link", F, "merged/f-link"),
        ("write", "merged/f-link", 0, b"TWO"),
    ],
}


def _build(root: Path) -> LayerSet:
    return build_layer_set(root, standard_layers(), kernel=True)


def _apply(mnt: Path, steps: list[Step]) -> None:
    outcomes = run_isolated(run_steps, str(mnt), steps)
    bad = [(s, o) for s, o in zip(steps, outcomes, strict=True) if o[0] != "ok"]
    assert not bad, f"scenario steps failed on {mnt}: {bad}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kernel_reads_our_upper(tmp_path: Path, overlayfuse_bin: Path, scenario: str) -> None:
    ls = _build(tmp_path)
    assert ls.upper is not None and ls.work is not None
    with mount_ours(ls, OPTS):
        _apply(ls.mnt, SCENARIOS[scenario])
        ours = take_snapshot(ls.mnt)
    # The same workdir, as a remount would use: the kernel keeps its hardlink index there.
    with kernel_overlay(ls.mnt, ls.lowers, ls.upper, ls.work, OPTS):
        kernel = take_snapshot(ls.mnt)
        assert_same_view(kernel, ours)
        # mounted again, not just readable: a change through the kernel still works
        _apply(ls.mnt, [("write", "merged/l2file", 0, b"k"), ("create", "kernel-was-here", b"")])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_we_read_kernel_upper(tmp_path: Path, overlayfuse_bin: Path, scenario: str) -> None:
    ls = _build(tmp_path)
    assert ls.upper is not None and ls.work is not None
    with kernel_overlay(ls.mnt, ls.lowers, ls.upper, ls.work, OPTS):
        _apply(ls.mnt, SCENARIOS[scenario])
        kernel = take_snapshot(ls.mnt)
    with mount_ours(ls, OPTS):
        ours = take_snapshot(ls.mnt)
        assert_same_view(kernel, ours)
        _apply(ls.mnt, [("write", "merged/l2file", 0, b"o"), ("create", "ours-was-here", b"")])


def test_kernel_reads_upper_after_both(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """Kernel changes, then ours, then the kernel again: the upper stays readable by both."""
    ls = _build(tmp_path)
    assert ls.upper is not None and ls.work is not None
    with kernel_overlay(ls.mnt, ls.lowers, ls.upper, ls.work, OPTS):
        _apply(ls.mnt, SCENARIOS["renames"])
    with mount_ours(ls, OPTS):
        _apply(ls.mnt, [("write", "hl/a", 0, b"X"), ("chmod", "merged/l2file", 0o600),
                        ("write", "merged/target", 0, b"T"), ("write", "moved/x", 1, b"X"),
                        ("create", "newfile", b"new\n", 0o640), ("mkdir", "newdir", 0o750),
                        ("unlink", "moved/y/z"), ("unlink", "moved/y/l1file"),
                        ("rmdir", "moved/y"),
                        ("rename", "merged/sub2", "sub3")])
        ours = take_snapshot(ls.mnt)
    with kernel_overlay(ls.mnt, ls.lowers, ls.upper, ls.work, OPTS):
        kernel = take_snapshot(ls.mnt)
        assert_same_view(kernel, ours)
    assert not os.listdir(ls.work / "work"), "staging left behind"


def _file_markers(upper: Path, rel: str) -> tuple[bool, bytes | None, bool]:
    """What an upper file records of a lower one: metacopy, its redirect, whether it holds data."""
    path = upper / rel
    names = os.listxattr(path, follow_symlinks=False)
    redirect = os.getxattr(path, "trusted.overlay.redirect") if "trusted.overlay.redirect" in names else None
    return "trusted.overlay.metacopy" in names, redirect, os.lstat(path).st_blocks > 8


def test_moved_lower_files_are_written_as_the_kernel_writes_them(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """A lower file renamed or linked is a metacopy file with the kernel's redirect, its data left
    below (a big sparse one included); one written after its move holds its data (its redirect stays)."""
    moved = ["d/f2-far", "sparse-moved", "g-moved", "f1-moved", "target", "d/sub/g", "rd2/y/x2",
             "rd2/l1file", "rd2/y/f", "merged/l2file", "d/l2-link-moved"]
    markers = {}
    for side in ("kernel", "ours"):
        ls = build_layer_set(tmp_path / side, standard_layers(), kernel=True)
        assert ls.upper is not None and ls.work is not None
        with kernel_overlay(ls.mnt, ls.lowers, ls.upper, ls.work, OPTS) if side == "kernel" else mount_ours(ls, OPTS):
            _apply(ls.mnt, SCENARIOS["file-moves"])
        markers[side] = {rel: _file_markers(ls.upper, rel) for rel in moved}
    assert markers["ours"] == markers["kernel"]
    assert markers["ours"]["d/f2-far"] == (True, b"/full/f2", False)
    assert markers["ours"]["sparse-moved"] == (True, b"/big/sparse", False)
    assert markers["ours"]["d/l2-link-moved"] == (True, b"/merged/l2file", False)  # one inode, two names
    assert markers["ours"]["f1-moved"] == (False, b"/full/f1", True)  # its redirect stays, as the kernel leaves it
