"""What the kernel may cache for us, and that what it caches stays true.

With the patched pyfuse3 (patches/pyfuse3, built by scripts/setup) the daemon answers opendir with
ENOSYS, the kernel caches directory listings and symlink targets itself, and a warm walk reaches
the daemon not at all. These tests count the requests in a `-d` daemon's log (no timing: that is
scripts/bench's job) and check the cached listings against `lstat` after the changes the kernel
does not see through the directory itself. `OVERLAYFUSE_BINDING=stock` runs the same daemon as on a
stock pyfuse3, where every listing must still be right.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlayfuse.daemon import binding
from tests.conftest import skip_or_fail
from tests.support.compare import getdents
from tests.support.mounts import run_isolated
from tests.support.requestlog import debug_daemon, request_counts, requests
from tests.support.trees import Dir, File, Symlink, make_tree

pytestmark = pytest.mark.mount


def _patched() -> None:
    """These tests are about the patched binding: the one scripts/setup installs, and CI's."""
    found = binding.detect()
    if not (found.readdir_inode and found.symlink_cache and found.inline_loop):
        if os.environ.get("OVERLAYFUSE_STOCK_PYFUSE3") == "1":  # test_stock_binding's run
            pytest.skip("stock pyfuse3, on purpose")
        skip_or_fail(f"pyfuse3 is not the patched build scripts/setup makes: {binding.detect().describe()}")


def _walk(root: str) -> list[str]:
    """Every path under ROOT, listing each directory and lstat-ing each entry (never following)."""
    seen = []
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            os.lstat(path)
            seen.append(os.path.relpath(path, root))
    return sorted(seen)


def _readlinks(path: str, times: int) -> list[str]:
    return [os.readlink(path) for _ in range(times)]


def _tree(root: Path) -> Path:
    entries: list[File | Dir | Symlink] = []
    for d in range(6):
        entries += [File(f"d{d}/f{i}", b"x") for i in range(10)]
        entries.append(Dir(f"d{d}/sub"))
    entries.append(Symlink("link", "d0/f0"))
    return make_tree(root, *entries)


def test_a_warm_walk_and_a_readlink_reach_the_daemon_once(tmp_path: Path) -> None:
    _patched()
    with debug_daemon(tmp_path, _tree(tmp_path / "lower")) as (mnt, log):
        first = run_isolated(_walk, str(mnt))
        start = log.stat().st_size
        assert run_isolated(_walk, str(mnt)) == first
        warm = request_counts(log, start)
        assert run_isolated(_readlinks, str(mnt / "link"), 3) == ["d0/f0"] * 3
        all_ops = request_counts(log)
    assert len(first) == 6 * 12 + 1
    # The kernel keeps the listings: no opendir at all (ENOSYS once), and no readdir when warm.
    assert warm["readdir"] == 0 and warm["opendir"] == 0 and warm["releasedir"] == 0, warm
    assert all_ops["opendir"] == 1, all_ops
    # The target is read once (the first walk's is_dir() follows the link), then cached.
    assert all_ops["readlink"] == 1, all_ops


def test_stock_binding_lists_through_the_daemon_every_time(tmp_path: Path) -> None:
    with debug_daemon(tmp_path, _tree(tmp_path / "lower"), stock=True) as (mnt, log):
        first = run_isolated(_walk, str(mnt))
        start = log.stat().st_size
        assert run_isolated(_walk, str(mnt)) == first
        (mnt / "d1" / "new").write_bytes(b"n")
        os.unlink(mnt / "d2" / "f3")
        after = run_isolated(_walk, str(mnt))
        warm = request_counts(log, start)
    assert warm["opendir"] >= 14 and warm["readdir"] >= 14, warm
    assert set(after) == (set(first) | {"d1/new"}) - {"d2/f3"}


def _listing(path: str) -> dict[str, int]:
    return {entry.name: entry.d_ino for entry in getdents(path)}


def _move_and_list(src: str, dst: str) -> tuple[dict[str, int], dict[str, int], int, int]:
    before = _listing(src)
    os.rename(src, dst)
    return before, _listing(dst), os.lstat(os.path.dirname(dst)).st_ino, os.lstat(dst).st_ino


@pytest.mark.parametrize("made_in_mount", [False, True], ids=["lower-dir", "upper-dir"])
def test_a_cached_listing_of_a_moved_directory_shows_its_new_parent(tmp_path: Path, made_in_mount: bool) -> None:
    _patched()
    lower = make_tree(tmp_path / "lower", Dir("a"), Dir("b"), *([] if made_in_mount else [File("a/sub/f", b"x")]))
    with debug_daemon(tmp_path, lower) as (mnt, log):
        if made_in_mount:  # no lower content: the rename moves it without copying anything up
            (mnt / "a" / "sub").mkdir()
            (mnt / "a" / "sub" / "f").write_bytes(b"x")
        before, after, new_parent, moved = run_isolated(_move_and_list, str(mnt / "a" / "sub"), str(mnt / "b" / "sub"))
        a_ino = run_isolated(os.lstat, str(mnt / "a")).st_ino
        start = log.stat().st_size
        again = run_isolated(_listing, str(mnt / "b" / "sub"))
        relisted = request_counts(log, start)["readdir"]
    assert before[".."] == a_ino
    # The kernel saw the rename through a and b, not through sub: the daemon told it.
    assert after[".."] == new_parent != a_ino
    assert after["."] == moved and after["f"] == before["f"]
    assert again == after
    # and the kernel caches the new listing (unless memory pressure made it forget the directory)
    assert relisted <= 2


def _acl_probes(path: str, times: int) -> list[str]:
    """What `ls -l` does per file for ACLs: ask for system.posix_acl_access (ENODATA: none)."""
    answers = []
    for _ in range(times):
        try:
            os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
            answers.append("acl")
        except OSError as exc:
            answers.append(os.strerror(exc.errno))
    return answers


def test_the_kernel_remembers_that_a_file_has_no_acl(tmp_path: Path) -> None:
    # With POSIX ACL support on (as the kernel's overlay has it), the kernel caches each inode's
    # ACLs, a missing one included: a repeated `ls -l` no longer asks the daemon per file.
    lower = make_tree(tmp_path / "lower", File("f", b"x"))
    with debug_daemon(tmp_path, lower, stock=True) as (mnt, log):
        start = log.stat().st_size
        answers = run_isolated(_acl_probes, str(mnt / "f"), 3)
        asked = [args for op, args in requests(log, start) if op == "getxattr"]
    assert answers == [os.strerror(61)] * 3  # ENODATA
    assert len(asked) == 1, asked
