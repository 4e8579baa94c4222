"""``overlayctl commit`` with real mounts and real tools, and the freeze that makes it consistent.

Round trip: an imported image (made by umoci) is mounted, changed and committed; the new image,
mounted read-only, must show what the container's mount shows; exported, it must be a layout that
skopeo inspects and umoci unpacks to the same tree. The freeze: writes wait while a client holds
it, reads do not; a killed client thaws the mount; and a commit taken while a writer keeps going
holds one state the mount showed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from overlayfuse.containers.lifecycle import control_address
from overlayfuse.daemon import control
from overlayfuse.images.store import Store
from tests.support.compare import Snapshot, assert_same_view
from tests.support.containerctl import Ctl, change_container, comparable, sh
from tests.support.imagebuild import Images, skopeo_inspect, tool, unpack_rootfs
from tests.support.mounts import REPO_ROOT, blocked_in_daemon

pytestmark = pytest.mark.mount

AUTHOR = "Tess Ter <tess@example.org>"


def mountpoint(tmp_path: Path, name: str = "mnt") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def image_config(root: Path, image_id: str) -> dict[str, Any]:
    return json.loads((root / "blobs" / "sha256" / image_id.split(":", 1)[1]).read_bytes())


def test_commit_round_trip(ctl: Ctl, images: Images, store_root: Path, tmp_path: Path) -> None:
    mnt, check = mountpoint(tmp_path), mountpoint(tmp_path, "mnt-check")
    ctl.ok("mount", "test/full", mnt, "--name", "builder")
    change_container(mnt)
    image_id = ctl.ok("commit", "builder", "test/committed:v1", "-m", "add things", "-a", AUTHOR).strip()
    assert image_id.startswith("sha256:")

    parent = image_config(store_root, json.loads(ctl.ok("image", "inspect", "test/full"))[0]["Id"])
    config = image_config(store_root, image_id)
    assert config["rootfs"]["diff_ids"][:-1] == parent["rootfs"]["diff_ids"]
    assert len(config["rootfs"]["diff_ids"]) == len(parent["rootfs"]["diff_ids"]) + 1
    assert config["history"][:-1] == parent["history"]
    last = config["history"][-1]
    assert last == {"created": config["created"], "created_by": "overlayctl commit", "comment": "add things",
                    "author": AUTHOR}
    assert config["author"] == AUTHOR
    assert config["config"] == parent["config"]  # env, cmd, entrypoint... carried over

    # Mountable at once: the new image, read-only, shows what the container's mount shows.
    ctl.ok("mount", "test/committed:v1", check, "--ro", "--name", "checker")
    assert_same_view(mnt, check)

    # Exported, it is a layout that skopeo and umoci accept, and it unpacks to the same tree.
    export = tmp_path / "export"
    ctl.ok("image", "export", "test/committed:v1", export)
    inspected = skopeo_inspect(f"oci:{export}:v1")
    record = json.loads((store_root / "images" / f"{image_id[7:]}.json").read_text())
    manifest = image_config(store_root, record["manifest"])
    assert inspected["Layers"] == [layer["digest"] for layer in manifest["layers"]]
    assert len(inspected["Layers"]) == len(config["rootfs"]["diff_ids"])
    assert json.loads(tool("skopeo", "inspect", "--config", f"oci:{export}:v1")) == config
    rootfs = unpack_rootfs(export, "v1", tmp_path / "bundle")
    assert_same_view(comparable(rootfs), comparable(mnt))


def test_commit_after_a_directory_rename_and_a_chmod(ctl: Ctl, store_root: Path, tmp_path: Path) -> None:
    """A container's mount writes no redirects and no metacopy files (a layer tar cannot point into
    lower layers): a renamed lower directory and a chmod'ed lower file commit like any change."""
    mnt, check = mountpoint(tmp_path), mountpoint(tmp_path, "mnt-check")
    ctl.ok("mount", "test/full", mnt, "--name", "mover")
    sh(f"cd {mnt} && mv usr/lib usr/lib.old && chmod 600 etc/hosts")
    ctl.ok("commit", "mover", "test/moved")
    ctl.ok("mount", "test/moved", check, "--ro", "--name", "mover-check")
    assert_same_view(mnt, check)


def test_commit_of_a_stopped_container_and_retag(ctl: Ctl, store_root: Path, tmp_path: Path) -> None:
    mnt = mountpoint(tmp_path)
    ctl.ok("mount", "test/full", mnt, "--name", "resting")
    sh(f"echo one > {mnt}/etc/one")
    ctl.ok("umount", "resting")
    first = ctl.ok("commit", "resting", "test/resting").strip()
    second = ctl.ok("commit", "resting", "test/resting", "-m", "second").strip()
    assert second != first
    tags: dict[str, set[str]] = {}
    for row in json.loads(ctl.ok("image", "ls", "--json")):
        tagged = row["Tag"] not in (None, "", "<none>")
        tags.setdefault(row["ID"], set()).update({f"{row['Repository']}:{row['Tag']}"} if tagged else set())
    assert tags[second] == {"test/resting:latest"} and tags.get(first, set()) == set()  # the tag moved
    ctl.ok("mount", "test/resting", mnt, "--ro", "--name", "resting-check")
    assert (mnt / "etc/one").read_text() == "one\n"
    assert "author" not in image_config(store_root, second)  # nobody claimed this layer


def test_commit_bad_input(ctl: Ctl, store_root: Path, tmp_path: Path) -> None:
    mnt = mountpoint(tmp_path)
    ctl.ok("mount", "test/full", mnt, "--name", "careful")
    before = ctl.ok("image", "ls", "--json")
    blobs = sorted(os.listdir(store_root / "blobs" / "sha256"))
    assert "invalid reference" in ctl.fails("commit", "careful", "Not/Valid:ref!")
    assert "invalid reference" in ctl.fails("commit", "careful", "x@sha256:00")
    assert "no such container: ghost" in ctl.fails("commit", "ghost", "test/ghost")
    assert ctl.ok("image", "ls", "--json") == before
    assert sorted(os.listdir(store_root / "blobs" / "sha256")) == blobs
    assert os.listdir(store_root / "tmp") == []


# -- the freeze -------------------------------------------------------------------------------------


def _writer(path: Path) -> subprocess.Popen[bytes]:
    """A process appending one line to PATH through the mount (it waits while the mount is frozen)."""
    return subprocess.Popen(["sh", "-c", f"echo written >> {path}"], stdin=subprocess.DEVNULL)


def _finishes(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _read(*cmd: str | Path, timeout: float = 10.0) -> bytes:
    """Run a reading command; fail (without waiting on it: it may be stuck on the mount) if it hangs."""
    proc = subprocess.Popen([os.fspath(c) for c in cmd], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # not waited for: it ends when the mount thaws
        raise AssertionError(f"{cmd} waited on the frozen mount") from None
    assert proc.returncode == 0, f"{cmd} failed"
    return out


FREEZER = """
import sys, time
from overlayfuse.daemon import control
with control.frozen(sys.argv[1]):
    print("frozen", flush=True)
    time.sleep(600)
"""


def test_freeze_holds_writes_not_reads_and_dies_with_its_client(ctl: Ctl, store_root: Path, tmp_path: Path) -> None:
    mnt = mountpoint(tmp_path)
    ctl.ok("mount", "test/full", mnt, "--name", "icy")
    address = control_address(Store(store_root), "icy")
    assert control.ping(address)

    with control.frozen(address):
        # A change to a file and a new name: both wait.
        # Blocked means: each sleeps in the kernel waiting for the daemon's answer (wchan).
        changer = _writer(mnt / "etc/empty")
        assert blocked_in_daemon(changer), "a write went through a frozen mount"
        creator = _writer(mnt / "tmp/while-frozen")
        assert blocked_in_daemon(creator), "a create went through a frozen mount"
        # Reads, lookups and listings go on, of the file being changed too. (Not a listing of tmp/,
        # nor a first lookup in it: the kernel holds a directory's lock while a create in it waits.)
        assert _read("cat", mnt / "etc/hosts") == b"127.0.0.1 localhost\n"
        assert _read("cat", mnt / "etc/empty") == b""
        assert b"hosts" in _read("ls", mnt / "etc")
        _read("stat", mnt / "usr/bin/su")
        _read("find", mnt / "opt", mnt / "var")
    assert _finishes(changer, 10.0) and changer.returncode == 0
    assert _finishes(creator, 10.0) and creator.returncode == 0
    assert (mnt / "etc/empty").read_text() == (mnt / "tmp/while-frozen").read_text() == "written\n"

    # A freezer killed with SIGKILL never said "thaw": its connection closing is enough.
    freezer = subprocess.Popen(
        [sys.executable, "-c", FREEZER, address], stdout=subprocess.PIPE, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    writer = None
    try:
        assert freezer.stdout is not None and freezer.stdout.readline() == b"frozen\n"
        writer = _writer(mnt / "tmp/after-kill")
        assert blocked_in_daemon(writer), "a write went through a frozen mount"
        freezer.send_signal(signal.SIGKILL)
        assert _finishes(writer, 10.0) and writer.returncode == 0, "the mount stayed frozen after its freezer died"
    finally:
        freezer.kill()
        freezer.wait()
        if writer is not None and writer.poll() is None:
            writer.kill()
    assert (mnt / "tmp/after-kill").read_text() == "written\n"
    assert ctl.state("icy")["state"] == "running"


#: Writes round after round: each round writes its number into every file, in order, one
#: open/pwrite/close each, so at any moment the mount shows files[:k] at round n and files[k:] at
#: round n-1. Prints each finished round.
ROUNDS_WRITER = """
import os, sys
names = sys.argv[2:]
n = 0
while True:
    n += 1
    for name in names:
        fd = os.open(os.path.join(sys.argv[1], name), os.O_WRONLY | os.O_CREAT, 0o644)
        os.pwrite(fd, b"%08d\\n" % n, 0)
        os.close(fd)
    print(n, flush=True)
"""


def test_commit_while_writing_holds_one_state_of_the_mount(ctl: Ctl, store_root: Path, tmp_path: Path) -> None:
    mnt = mountpoint(tmp_path)
    ctl.ok("mount", "test/full", mnt, "--name", "busy-writer")
    work = mnt / "srv/work"
    # A big file between the two halves of the rounds (names sort a*, b_big, c*), so a commit that
    # did not freeze would read the c* files long after the a* files, rounds later.
    sh(f"mkdir {work} && head -c 24M /dev/urandom > {work}/b_big")
    names = [f"a{i:02d}" for i in range(40)] + [f"c{i:02d}" for i in range(40)]
    writer = subprocess.Popen(
        [sys.executable, "-c", ROUNDS_WRITER, str(work), *names], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert writer.stdout is not None
        for _ in range(3):
            finished_before = int(writer.stdout.readline())  # it is writing
        image_id = ctl.ok("commit", "busy-writer", "test/snapshot").strip()
        # The writer goes on after the commit (a mount left frozen would block this readline;
        # the test's timeout bounds that).
        writer.stdout.readline()
    finally:
        writer.kill()
        writer.wait()

    diff_id = image_config(store_root, image_id)["rootfs"]["diff_ids"][-1]
    layer = store_root / "layers" / diff_id.split(":", 1)[1] / "diff" / "srv" / "work"
    values = [int((layer / name).read_bytes()) for name in names]
    assert max(values) - min(values) <= 1, f"rounds {min(values)}..{max(values)} in one commit: {values}"
    assert values == sorted(values, reverse=True), f"not a state the mount showed: {values}"
    # Every round that had finished before the commit started is in it: not an older state.
    assert min(values) >= finished_before, f"round {finished_before} finished, committed {values}"
    assert (layer / "b_big").stat().st_size == 24 << 20


@pytest.mark.parametrize("then", ["", "rm data/third", "rm data/second", "mkdir -p opt/x && ln data/third opt/x/t"])
def test_commit_of_a_hardlinked_file_changed_through_one_name(ctl: Ctl, tmp_path: Path, then: str) -> None:
    """The mount shows every name of a hardlinked lower file changed through one of them (the link
    index, like the kernel's index=on), even once that name is gone; the commit must show the same."""
    mnt, check = mountpoint(tmp_path), mountpoint(tmp_path, "mnt-check")
    ctl.ok("mount", "test/full", mnt, "--name", "linker")
    sh(f"cd {mnt} && echo appended >> data/second && {then or 'true'}")
    assert (mnt / "data/original").read_bytes() == b"linked content\nappended\n"
    ctl.ok("commit", "linker", "test/linked")
    ctl.ok("mount", "test/linked", check, "--ro", "--name", "linked-check")
    shown, committed = _linked_blocks_aside(comparable(mnt)), _linked_blocks_aside(comparable(check))
    assert_same_view(shown, committed)


def _linked_blocks_aside(snap: Snapshot) -> Snapshot:
    """SNAP without the st_blocks of the hardlinked files: their upper copy carries the kernel's
    index xattrs (``overlay.origin``, ``overlay.nlink``), which ext4 may keep in an xattr block
    that st_blocks counts (the kernel shows the same); the committed file carries neither."""
    entries = {path: replace(info, blocks=None) if path.startswith(("data/", "opt/x/")) and info.kind == "file"
               else info for path, info in snap.entries.items()}  # fmt: skip
    return replace(snap, entries=entries)


def test_freeze_gate_waits_for_changes_in_flight_and_holds_new_ones() -> None:
    """The gate under the control socket, alone: a freeze returns once the changes in flight have
    finished; a change arriving meanwhile waits until the last of several freezers thaws."""
    gate = control.FreezeGate()
    events: list[str] = []

    async def change(name: str, release: trio.Event) -> None:
        async with gate:
            events.append(f"{name} in")
            await release.wait()
        events.append(f"{name} out")

    async def freezer() -> None:
        await gate.freeze()
        events.append("frozen")

    async def main() -> None:
        release_a, release_b = trio.Event(), trio.Event()
        release_b.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(change, "a", release_a)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(freezer)
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["a in"] and gate.frozen  # the freeze waits for a
            nursery.start_soon(change, "b", release_b)
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["a in"]  # b is held back
            release_a.set()
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["a in", "a out", "frozen"]
            await gate.freeze()  # a second freezer, nothing in flight: at once
            gate.thaw()
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["a in", "a out", "frozen"]  # still frozen by the first
            gate.thaw()
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["a in", "a out", "frozen", "b in", "b out"] and not gate.frozen

    trio.run(main)
