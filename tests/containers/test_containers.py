"""Containers with real mounts: ``overlayctl mount``, ``umount``, ``ps``, ``rm``, ``diff``.

Images are made by umoci (`tests.support.imagebuild`) and imported by ``overlayctl image import``; every
command runs as a subprocess with a timeout, and every test unmounts what it mounted (`unmount_all`),
also when it fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.compare import assert_same_view
from tests.support.containerctl import Ctl, change_container, comparable, sh
from tests.support.imagebuild import Images, unpack_rootfs
from tests.support.mounts import mount_at, mounts, overlayfuse_cmd, process_alive, run, wait_mounted, wait_pids_gone

pytestmark = pytest.mark.mount


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


#: What `change_container` looks like to ``overlayctl diff``: docker diff's form, sorted by path; a
#: replaced directory is changed, its lower entries deleted and its new ones added.
CHANGES = [
    "C /etc",
    "C /etc/hosts",
    "A /etc/new.txt",
    "D /etc/passwd",
    "C /home",
    "C /home/user",
    "D /home/user/notes",
    "C /srv",
    "C /srv/data",
    "A /srv/data/sub",
    "A /srv/data/sub/link",
    "C /usr",
    "C /usr/lib",
    "A /usr/lib/fresh.so",
    "D /usr/lib/libc.so",
    "D /usr/lib/libc.so.6",
]


def test_mount_browse_change_ps_diff(ctl: Ctl, images: Images, mnt: Path, tmp_path: Path) -> None:
    name = ctl.ok("mount", "test/full", mnt, "--name", "web").strip()
    assert name == "web"
    # The mount is live when overlayctl returns, and shows exactly what umoci unpacks.
    rootfs = unpack_rootfs(images.layout, images.full, tmp_path / "bundle")
    assert_same_view(comparable(rootfs), comparable(mnt))
    assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert not (mnt / "etc/motd").exists()  # deleted by the image's second layer

    state = ctl.state("web")
    assert state["state"] == "running" and state["mountpoint"] == str(mnt) and state["image"] == "test/full:latest"
    cmdline = Path(f"/proc/{state['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"overlayfuse.daemon.cli" in cmdline and os.fsencode(mnt) in cmdline
    assert mount_at(mnt).fstype == "fuse.overlayfuse"  # type: ignore[union-attr]

    assert ctl.ok("diff", "web") == ""
    change_container(mnt)
    assert ctl.ok("diff", "web").splitlines() == CHANGES

    # Unmount by mountpoint; the changes stay in the container and show again at the next mount.
    ctl.ok("umount", mnt)
    assert mount_at(mnt) is None
    assert wait_pids_gone([state["pid"]], 10) == []
    assert ctl.state("web")["state"] == "stopped"
    ctl.ok("mount", "web", mnt)
    assert (mnt / "etc/new.txt").read_text() == "hello\n"
    assert not (mnt / "etc/passwd").exists()
    assert ctl.ok("diff", "web").splitlines() == CHANGES


def test_read_only_mount_shows_changes_and_refuses_writes(ctl: Ctl, mnt: Path) -> None:
    ctl.ok("mount", "test/other", mnt, "--name", "ro-box")
    sh(f"echo changed > {mnt}/etc/hosts")
    ctl.ok("umount", "ro-box")
    ctl.ok("mount", "ro-box", mnt, "--ro")
    assert ctl.state("ro-box")["read_only"] is True
    assert (mnt / "etc/hosts").read_text() == "changed\n"
    proc = run(["sh", "-c", f"echo x > {mnt}/etc/hosts"], timeout=30)
    assert proc.returncode != 0 and b"Read-only file system" in proc.stderr
    assert os.statvfs(mnt).f_flag & os.ST_RDONLY


def test_dead_daemon_shows_dead_and_unmounts(ctl: Ctl, mnt: Path) -> None:
    ctl.ok("mount", "test/other", mnt, "--name", "victim")
    pid = ctl.state("victim")["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_pids_gone([pid], 10) == []
    state = ctl.state("victim")
    assert state["state"] == "dead" and state["mountpoint"] == str(mnt)
    assert [s for s in ctl.ps() if s["name"]] == [state]  # still listed without -a: mounted, if dead
    ctl.ok("umount", "victim")
    assert mount_at(mnt) is None
    assert ctl.state("victim")["state"] == "stopped"
    # And it mounts again, changes intact.
    ctl.ok("mount", "victim", mnt)
    assert ctl.state("victim")["state"] == "running"


def test_remount_after_a_dead_daemon_without_umount(ctl: Ctl, mnt: Path) -> None:
    ctl.ok("mount", "test/other", mnt, "--name", "phoenix")
    pid = ctl.state("phoenix")["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_pids_gone([pid], 10) == []
    ctl.ok("mount", "phoenix", mnt)
    assert ctl.state("phoenix")["state"] == "running"
    # Exactly one mount there: the dead one was cleared, not buried under the new one.
    stacked = [m for m in mounts() if m.mountpoint == str(mnt)]
    assert [m.fstype for m in stacked] == ["fuse.overlayfuse"], stacked


def test_bad_input_is_one_line_and_changes_nothing(ctl: Ctl, mnt: Path, tmp_path: Path) -> None:
    other = tmp_path / "mnt2"
    other.mkdir()
    ctl.ok("mount", "test/other", mnt, "--name", "busy")
    # Only this store's containers: ps also lists other overlayfuse mounts on the machine, unnamed.
    names_before = sorted(state["name"] for state in ctl.ps("-a") if state["name"])

    assert "is already in use" in ctl.fails("mount", "test/full", mnt)
    assert "already mounted on" in ctl.fails("mount", "busy", other)
    assert "no such image or container: nothere" in ctl.fails("mount", "nothere", other)
    assert "no such directory" in ctl.fails("mount", "test/full", tmp_path / "missing")
    assert "already exists" in ctl.fails("mount", "test/full", other, "--name", "busy")
    assert "invalid container name" in ctl.fails("mount", "test/full", other, "--name", "../x")
    assert "no such container: ghost" in ctl.fails("umount", "ghost")
    assert "no container is mounted on" in ctl.fails("umount", other)
    assert "no such container: ghost" in ctl.fails("rm", "ghost")
    assert "no such container: ghost" in ctl.fails("diff", "ghost")
    assert "is mounted on" in ctl.fails("rm", "busy")

    assert sorted(state["name"] for state in ctl.ps("-a") if state["name"]) == names_before
    assert mount_at(other) is None
    assert ctl.state("busy")["state"] == "running"


def test_rm_force_unmounts_and_removes(ctl: Ctl, mnt: Path, store_root: Path) -> None:
    ctl.ok("mount", "test/other", mnt, "--name", "doomed")
    pid = ctl.state("doomed")["pid"]
    ctl.ok("rm", "--force", "doomed")
    assert mount_at(mnt) is None
    assert wait_pids_gone([pid], 10) == []
    assert not (store_root / "containers" / "doomed").exists()
    assert "doomed" not in [state["name"] for state in ctl.ps("-a")]
    # The image's layers are still in use by the image: nothing of it was collected.
    ctl.ok("mount", "test/other", mnt, "--name", "again")
    assert (mnt / "etc/other-release").read_text() == "other 1\n"


def test_generated_names_and_reuse(ctl: Ctl, mnt: Path) -> None:
    name = ctl.ok("mount", "test/other", mnt).strip()
    assert name and name in [state["name"] for state in ctl.ps()]
    assert "_" in name  # docker-like: adjective_name
    ctl.ok("umount", mnt)
    # --name of an existing container of the same image reuses it.
    assert ctl.ok("mount", "test/other", mnt, "--name", name).strip() == name


def test_ps_lists_mounts_that_are_no_container(ctl: Ctl, fuse_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("x")
    by_hand = tmp_path / "byhand"
    fuse_mount(by_hand, [lower])
    listed = [state for state in ctl.ps() if state["mountpoint"] == str(by_hand)]
    assert len(listed) == 1
    assert listed[0]["name"] == "" and listed[0]["state"] == "running" and listed[0]["pid"]
    assert "no container's" in ctl.fails("umount", by_hand)
    text = ctl.ok("ps")
    assert str(by_hand) in text and "running" in text


def test_ps_state_of_a_mount_made_with_a_relative_path(ctl: Ctl, tmp_path: Path) -> None:
    """Its daemon cannot be found by command line (it runs in /), so the state comes from whether the
    mount answers: running while it does, dead once its daemon is killed."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (tmp_path / "rel").mkdir()
    mnt = tmp_path / "rel"
    daemon = subprocess.Popen(overlayfuse_cmd(Path("rel"), f"lowerdir={lower}", foreground=True), cwd=tmp_path,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_mounted(mnt, daemon)
        [listed] = [state for state in ctl.ps() if state["mountpoint"] == str(mnt)]
        assert listed["state"] == "running"
        daemon.kill()
        daemon.wait(timeout=10)
        [listed] = [state for state in ctl.ps() if state["mountpoint"] == str(mnt)]
        assert listed["state"] == "dead" and listed["pid"] is None
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
        run(["umount", "-l", str(mnt)])


def test_umount_waits_for_the_daemon(ctl: Ctl, mnt: Path) -> None:
    ctl.ok("mount", "test/other", mnt, "--name", "quick")
    pid = ctl.state("quick")["pid"]
    ctl.ok("umount", "quick")
    # When umount returns, the daemon has exited: no wait, no time window (a zombie counts as
    # gone; ctl.ok's timeout bounds a hang).
    assert not process_alive(pid), f"daemon {pid} still running after umount returned"
