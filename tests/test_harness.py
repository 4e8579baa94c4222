"""The comparison harness checked against itself: kernel overlayfs versus kernel overlayfs.

If two kernel mounts of identical trees did not compare equal, every overlayfuse
failure would be suspect; if a perturbed tree compared equal, every pass would be.
These tests need no daemon.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import mounts, procfs
from tests.support.compare import assert_same_errnos, assert_same_view, getdents, take_snapshot
from tests.support.mounts import kernel_overlay
from tests.support.rich_tree import RICH_PROBES, LayerSet, build_layer_set, rich_layers
from tests.support.trees import (
    CharDev,
    Dir,
    Entry,
    File,
    OciWhiteout,
    Opaque,
    Sparse,
    Whiteout,
    kernel_equivalent,
    make_tree,
)

pytestmark = pytest.mark.kernel


def _mount_both(tmp_path: Path) -> tuple[LayerSet, LayerSet]:
    layers = rich_layers()
    return (build_layer_set(tmp_path / "a", layers, kernel=True),
            build_layer_set(tmp_path / "b", layers, kernel=True))


def test_kernel_equals_kernel_and_perturbation_is_seen(tmp_path: Path) -> None:
    a, b = _mount_both(tmp_path)
    with kernel_overlay(a.mnt, a.lowers, a.upper, a.work), \
            kernel_overlay(b.mnt, b.lowers, b.upper, b.work):
        view_a, _ = assert_same_view(a.mnt, b.mnt, ours_is_kernel=True)
        assert_same_errnos(a.mnt, b.mnt, RICH_PROBES)
        assert len(view_a.entries) > 2900
        os.chmod(b.lowers[0] / "recreated/new_child", 0o600)  # l1, visible
        os.setxattr(b.lowers[2] / "merged/l3_only", "user.extra", b"1")
        os.utime(b.lowers[1] / "merged/l2_only", ns=(0, 0))
        with pytest.raises(AssertionError) as failure:
            assert_same_view(view_a, take_snapshot(b.mnt), ours_is_kernel=True)
        message = str(failure.value)
        assert "'recreated/new_child': mode kernel=100644 ours=100600" in message
        assert "'merged/l3_only': xattrs" in message
        assert "'merged/l2_only': mtime_ns" in message


def test_getdents_keeps_dot_entries(tmp_path: Path) -> None:
    make_tree(tmp_path / "t", File("a"))
    names = sorted(e.name for e in getdents(str(tmp_path / "t")))
    assert names == [".", "..", "a"]


def test_kernel_equivalent_forms(tmp_path: Path) -> None:
    """OCI and user forms become the kernel's; the built trees look as documented."""
    entries: list[Entry] = [OciWhiteout("d/x"), Opaque("o", "oci"), Opaque("u", "user")]
    assert kernel_equivalent(entries) == [Whiteout("d/x"), Opaque("o"), Opaque("u")]
    root = make_tree(tmp_path / "oci", *entries)
    assert (root / "d/.wh.x").read_bytes() == b""
    assert (root / "o/.wh..wh..opq").exists()
    assert os.getxattr(root / "u", "user.overlay.opaque") == b"y"
    kroot = make_tree(tmp_path / "kernel", *kernel_equivalent(entries), CharDev("dev", 1, 3))
    assert os.lstat(kroot / "d/x").st_rdev == 0
    assert os.getxattr(kroot / "o", "trusted.overlay.opaque") == b"y"
    assert os.stat(kroot / "dev").st_rdev == os.makedev(1, 3)


@pytest.mark.parametrize("entry", [
    File("link/f", b"x"), File("dirlink/f", b"x"), File("link", b"x", mode=0o600),
    Dir("dirlink", mode=0o700), Opaque("dirlink"), Opaque("dirlink", "oci"),
    Sparse("link", 1 << 20), OciWhiteout("dirlink/x"),
], ids=repr)
def test_make_tree_never_goes_through_a_symlink(tmp_path: Path, entry: Entry) -> None:
    """make_tree refuses to write, chown or chmod through a symlink it meets (a parent or the
    entry itself): the symlinks aim at a canary file and dir in this test's own tmp dir."""
    canary_dir = tmp_path / "canary-dir"
    canary_dir.mkdir(mode=0o755)
    canary = tmp_path / "canary"
    canary.write_bytes(b"canary")
    os.chmod(canary, 0o644)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(canary, root / "link")
    os.symlink(canary_dir, root / "dirlink")
    before = [(os.lstat(p).st_mode, os.lstat(p).st_uid) for p in (canary, canary_dir)]
    with pytest.raises(OSError):
        make_tree(root, entry)
    assert canary.read_bytes() == b"canary"
    assert os.listdir(canary_dir) == []
    assert [(os.lstat(p).st_mode, os.lstat(p).st_uid) for p in (canary, canary_dir)] == before
    assert "trusted.overlay.opaque" not in os.listxattr(canary_dir)


def test_mountinfo_reader_is_the_tests_own() -> None:
    """tests.support.procfs reads /proc/self/mountinfo itself (octal escapes included), so the leak
    checks do not ask overlayfuse.linux.mounttable, the module under test, what is mounted."""
    line = (b"36 35 98:0 /mnt1 /a\\040dir\\134x rw,noatime master:1 - fuse.overlayfuse "
            b"over\\011lay rw,user_id=0\n")
    [entry] = procfs.parse_mountinfo(line)
    assert (entry.mountpoint, entry.fstype, entry.source, entry.options, entry.mount_options,
            entry.dev) == ("/a dir\\x", "fuse.overlayfuse", "over\tlay", "rw,user_id=0",
                           "rw,noatime", "98:0")
    with pytest.raises(ValueError, match="unreadable mountinfo line"):
        procfs.parse_mountinfo(b"36 35 98:0 / /x rw\n")
    assert any(m.mountpoint == "/" for m in procfs.mounts())
    assert mounts.mounts is procfs.mounts


#: A `sleep` in a mount namespace of its own starts in well under a second; this bounds a hang.
HOLDER_TIMEOUT = 10.0


@pytest.mark.mount
def test_teardown_ends_a_daemon_another_namespace_pins(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """A mount namespace made while the mount exists keeps a copy of it (mounts here do not
    propagate), so the unmount leaves the FUSE connection up and the daemon serving: the
    teardown's "daemon ignored the unmount" under other engineers' podman runs. The teardown
    finds the pinning namespace and ends the connection; the daemon exits."""
    import subprocess
    import time

    lower = make_tree(tmp_path / "lower", File("hello", b"hello\n"))
    mnt = tmp_path / "mnt"
    holder: subprocess.Popen[bytes] | None = None
    try:
        with mounts.overlayfuse(mnt, [lower]):
            pids = mounts.daemon_pids(mnt)
            dev = mounts.mount_at(mnt).dev  # type: ignore[union-attr]
            holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "60"],
                                      stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + HOLDER_TIMEOUT
            while not procfs.namespaces_holding(dev):
                assert time.monotonic() < deadline, "the holder's namespace never showed the mount"
                time.sleep(0.02)
        # The teardown (leaving the block) raised nothing: the daemon is gone, the mount too.
        assert pids and not any(procfs.process_alive(pid) for pid in pids)
        assert not mounts.is_mounted(mnt)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(timeout=HOLDER_TIMEOUT)
