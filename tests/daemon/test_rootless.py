"""Rootless containers, for real: podman run by an unprivileged user with overlayfuse as
containers-storage's mount program, against the same runs with fuse-overlayfs; and upper dirs
written by either tool as an unprivileged user, read by the other.

Each podman run (default ID mapping, then ``--uidmap 0:1:5000 --gidmap 0:1:5000``, where
containers-storage passes ``uidmapping=``/``gidmapping=``) does in the container: ``id -u``; write,
read and delete a file of the image; ``stat`` of an image file and of a new file; ``chown 1:1`` of
the new file; the root line of /proc/mounts. Both tools must print the same (the mount line names
each tool), and their upper dirs must hold the same objects with the same owners on disk.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.support.imagebuild import missing_tools
from tests.support.mounts import overlayfuse_binary
from tests.support.rootless import SUBID_START, TAG, Podman, RootlessUser, busybox_layout, snapshot
from tests.support.trees import has_data

TOOLS = ("podman", "runc", "newuidmap", "newgidmap", "busybox", "setfacl", "fuse-overlayfs", "setpriv", "umoci")

SCRIPT = "; ".join([
    "id -u",
    "cat /etc/data.txt",
    "echo more >> /etc/data.txt",
    "cat /etc/data.txt",
    "rm /etc/data.txt",
    "test -e /etc/data.txt || echo deleted",
    "stat -c 'image %u:%g %a' /etc/passwd",
    "echo new > /tmp/new",
    "stat -c 'new %u:%g %a' /tmp/new",
    "chown 1:1 /tmp/new",
    "stat -c 'chowned %u:%g' /tmp/new",
    "grep ' / ' /proc/mounts",
])  # fmt: skip

EXPECTED = [
    "0",
    "image-data",
    "image-data",
    "more",
    "deleted",
    "image 0:0 644",
    "new 0:0 644",
    "chowned 1:1",
]

#: The first test pays for the module's fixtures: eight podman commands, two images stored.
pytestmark = pytest.mark.timeout(600)

MAPPINGS = {"default": [], "uidmap": ["--uidmap", "0:1:5000", "--gidmap", "0:1:5000"]}


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (to create the unprivileged user)"
    for name in TOOLS:
        if shutil.which(name) is None:
            return f"{name} is not installed (scripts/setup installs it)"
    if not os.path.exists("/dev/fuse") or os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        return "/dev/fuse is not open to every user (scripts/setup makes it mode 0666)"
    return missing_tools()


@pytest.fixture(scope="module")
def rootless() -> Iterator[RootlessUser]:
    reason = _missing()
    if reason:
        skip_or_fail(reason)
    ours = overlayfuse_binary()
    if ours is None:
        skip_or_fail("overlayfuse is not installed in the venv")
    assert ours is not None
    user = RootlessUser.create([ours])
    try:
        yield user
    finally:
        user.close()


@pytest.fixture(scope="module")
def layout(rootless: RootlessUser) -> Path:
    return busybox_layout(rootless.mkdir("image"))


def _run_container(podman: Podman, layout: Path, name: str, mapping: list[str]) -> tuple[list[str], dict]:
    """Run SCRIPT in a container; return its output lines and a snapshot of its upper dir."""
    run = podman("run", "--name", name, *mapping, f"oci:{layout}:{TAG}", "sh", "-c", SCRIPT, check=False)
    try:
        assert run.returncode == 0, f"podman run with {podman.program} {mapping}: {run.stderr}"
        upper = podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name).stdout.strip()
        tree = snapshot(Path(upper))
    finally:
        podman("rm", "--force", name, check=False)
    return run.stdout.splitlines(), tree


@pytest.fixture(scope="module")
def runs(rootless: RootlessUser, layout: Path) -> Iterator[dict[tuple[str, str], tuple[list[str], dict]]]:
    """Every (tool, mapping) run's output and upper snapshot, each tool with storage of its own."""
    ours = str(overlayfuse_binary())
    peers = {"overlayfuse": Podman.configure(rootless, "ours", ours),
             "fuse-overlayfs": Podman.configure(rootless, "peer", shutil.which("fuse-overlayfs") or "")}  # fmt: skip
    results = {}
    try:
        for tool_name, podman in peers.items():
            for mapping_name, mapping in MAPPINGS.items():
                results[(tool_name, mapping_name)] = _run_container(
                    podman, layout, f"c-{mapping_name}", mapping
                )
        yield results
    finally:
        for podman in peers.values():
            podman.reset()


@pytest.mark.parametrize("mapping", sorted(MAPPINGS))
def test_podman_run_in_a_container(runs: dict, mapping: str) -> None:
    lines, _ = runs[("overlayfuse", mapping)]
    assert lines[:-1] == EXPECTED
    source, target, fstype = lines[-1].split()[:3]
    assert (source, target, fstype) == ("overlayfuse", "/", "fuse.overlayfuse")


@pytest.mark.parametrize("mapping", sorted(MAPPINGS))
def test_podman_same_as_fuse_overlayfs(runs: dict, mapping: str) -> None:
    ours, ours_upper = runs[("overlayfuse", mapping)]
    peer, peer_upper = runs[("fuse-overlayfs", mapping)]
    assert peer[:-1] == EXPECTED  # the reference itself behaves as expected on this machine
    assert peer[-1].split()[:3] == ["fuse-overlayfs", "/", "fuse.fuse-overlayfs"]
    assert ours[:-1] == peer[:-1]
    assert ours_upper == peer_upper


@pytest.mark.parametrize("mapping", sorted(MAPPINGS))
def test_podman_upper_ownership_on_disk(runs: dict, rootless: RootlessUser, mapping: str) -> None:
    """The container's uid 1 is the first subordinate id in both mappings: the new file, chowned to
    1:1 inside, belongs to it on disk; the deleted image file is a whiteout."""
    _, upper = runs[("overlayfuse", mapping)]
    assert upper["tmp/new"] == ("f", SUBID_START, SUBID_START, 0o644)
    assert upper["etc/data.txt"] == ("whiteout", 0, 0, 0)


# -- an upper written by one tool, read by the other ----------------------------------------------

CHANGES = "; ".join([
    "rm {m}/a",
    "rm -r {m}/d",
    "mkdir {m}/d",
    "echo z > {m}/d/z",
    "rm {m}/e/y",
    "echo new > {m}/c",
    "mkdir {m}/n",
    "echo deep > {m}/n/f",
    "echo more >> {m}/b",
])  # fmt: skip


def _lower(root: Path, user: RootlessUser) -> Path:
    """The user's own lower layer (the kernel checks permissions on the mount as on any other)."""
    lower = root / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "e").mkdir()
    (lower / "a").write_text("a\n")
    (lower / "b").write_text("b\n")
    (lower / "d" / "x").write_text("x\n")
    (lower / "e" / "y").write_text("y\n")
    (lower / "e" / "kept").write_text("kept\n")
    for path in [lower, *lower.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.chown(path, user.uid, user.gid)
    return lower


def _mount_cmd(program: str, lower: Path, upper: Path, work: Path, mnt: Path) -> list[str]:
    return [program, "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(mnt)]


def _as_user_on_overlayfuse(user: RootlessUser, dirs: tuple[Path, Path, Path, Path], *scripts: str) -> str:
    """Mount overlayfuse as USER on DIRS (lower, upper, work, mountpoint), run each shell script of
    SCRIPTS there as USER, unmount (also on failure); the last script's output."""
    user.run(*_mount_cmd(str(overlayfuse_binary()), *dirs))
    try:
        return [user.run("sh", "-c", script).stdout for script in scripts][-1]
    finally:
        user.run("fusermount3", "-u", str(dirs[3]), check=False)


LISTING = "find {m} -mindepth 1 | sort; cat {m}/b {m}/c {m}/d/z {m}/n/f"


@pytest.mark.parametrize("writer", ["fuse-overlayfs", "overlayfuse"])
def test_unprivileged_upper_reads_the_same_through_the_other_tool(rootless: RootlessUser, writer: str) -> None:
    programs = {"overlayfuse": str(overlayfuse_binary()), "fuse-overlayfs": shutil.which("fuse-overlayfs") or ""}
    reader = next(name for name in programs if name != writer)
    root = rootless.mkdir("cross", writer)
    lower = _lower(root, rootless)
    upper, work, mnt = (rootless.mkdir("cross", writer, name) for name in ("upper", "work", "m"))
    rootless.run(*_mount_cmd(programs[writer], lower, upper, work, mnt))
    try:
        rootless.run("sh", "-c", CHANGES.format(m=mnt))
        written = rootless.run("sh", "-c", LISTING.format(m=mnt)).stdout
    finally:
        rootless.run("fusermount3", "-u", str(mnt), check=False)
    assert "deleted" not in written
    expected = sorted(f"{mnt}/{p}" for p in ("b", "c", "d", "d/z", "e", "e/kept", "n", "n/f"))
    assert written.splitlines()[:len(expected)] == expected
    assert written.splitlines()[len(expected):] == ["b", "more", "new", "z", "deep"]
    rootless.run(*_mount_cmd(programs[reader], lower, upper, work, mnt))
    try:
        read = rootless.run("sh", "-c", LISTING.format(m=mnt)).stdout
    finally:
        rootless.run("fusermount3", "-u", str(mnt), check=False)
    assert read == written


def test_unprivileged_hardlink_index_lives_where_the_user_can_write(rootless: RootlessUser) -> None:
    """The index entry and its link count (``user.overlay.nlink``: ``trusted.`` is not the user's)
    sit in the workdir, in the kernel's userxattr format; a copied-up hardlinked file keeps its names together."""
    root = rootless.mkdir("index")
    lower = _lower(root, rootless)
    os.link(lower / "b", lower / "b-too")
    upper, work, mnt = (rootless.mkdir("index", name) for name in ("upper", "work", "m"))
    rootless.run(*_mount_cmd(str(overlayfuse_binary()), lower, upper, work, mnt))
    try:
        rootless.run("sh", "-c", f"echo more >> {mnt}/b")
        shown = rootless.run("sh", "-c", f"cat {mnt}/b-too; stat -c %h {mnt}/b {mnt}/b-too").stdout
    finally:
        rootless.run("fusermount3", "-u", str(mnt), check=False)
    assert shown.splitlines() == ["b", "more", "2", "2"]
    entries = list((work / "index").iterdir())
    assert len(entries) == 1 and entries[0].stat().st_uid == rootless.uid
    assert os.getxattr(entries[0], "user.overlay.nlink") == b"U+0"  # the kernel's userxattr form
    assert os.getxattr(entries[0], "user.overlay.origin").hex() == entries[0].name


def test_podman_with_force_mask_keeps_owners_in_xattrs(rootless: RootlessUser, layout: Path) -> None:
    """storage.conf's force_mask: containers-storage then passes xattr_permissions=2, and the upper
    keeps the container's owners and modes in user.fuseoverlayfs.override_stat, the files themselves
    being the user's. (fuse-overlayfs 1.10 shows a new 0644 file as 0755 there: not compared.)"""
    podman = Podman.configure(rootless, "force-mask", str(overlayfuse_binary()))
    conf = podman.root / "config" / "containers" / "storage.conf"
    conf.write_text(conf.read_text() + 'force_mask = "0700"\n')
    try:
        run = podman("run", "--name", "masked", f"oci:{layout}:{TAG}", "sh", "-c", SCRIPT, check=False)
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[:-1] == EXPECTED
        upper = Path(podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", "masked").stdout.strip())
        new = upper / "tmp" / "new"
        assert os.getxattr(new, "user.fuseoverlayfs.override_stat", follow_symlinks=False) == b"1:1:644"
        assert (os.lstat(new).st_uid, os.lstat(new).st_gid) == (rootless.uid, rootless.gid)
    finally:
        podman.reset()


def test_unprivileged_redirect_and_metacopy_use_user_xattrs(rootless: RootlessUser) -> None:
    """An unprivileged daemon cannot write ``trusted.*``: a chmod of a lower file leaves a metacopy
    file marked ``user.overlay.metacopy`` (no data in upper), a moved lower dir a
    ``user.overlay.redirect`` (its children stay below), both with ``user.overlay.origin``; mounted
    again, the upper reads the same. (No kernel oracle: the kernel refuses ``userxattr`` with
    ``redirect_dir=on`` or ``metacopy=on``, "conflicting options", 6.18.)"""
    root = rootless.mkdir("userxattr")
    lower = _lower(root, rootless)
    upper, work, mnt = (rootless.mkdir("userxattr", name) for name in ("upper", "work", "m"))
    changes = f"chmod 600 {mnt}/a; mv {mnt}/e {mnt}/d/moved"
    shown = f"stat -c '%n %a' {mnt}/a; cat {mnt}/a; ls {mnt} {mnt}/d/moved; cat {mnt}/d/moved/kept"
    written = _as_user_on_overlayfuse(rootless, (lower, upper, work, mnt), changes, shown)
    assert written.splitlines() == [f"{mnt}/a 600", "a", f"{mnt}:", "a", "b", "d", "", f"{mnt}/d/moved:",
                                    "kept", "y", "kept"]
    a, moved = upper / "a", upper / "d" / "moved"
    assert os.getxattr(a, "user.overlay.metacopy") == b"" and not has_data(a)
    assert os.getxattr(moved, "user.overlay.redirect") == b"/e" and os.listdir(moved) == []
    for path in (a, moved, upper / "d"):
        names = os.listxattr(path)
        assert "user.overlay.origin" in names and not [n for n in names if n.startswith("trusted.")], path
    assert _as_user_on_overlayfuse(rootless, (lower, upper, work, mnt), shown) == written


def test_unprivileged_changes_to_read_only_lower_objects(rootless: RootlessUser) -> None:
    """An unprivileged daemon owns the copies it makes, but a ``user.*`` xattr needs write permission
    on the object and a 0444 file or 0555 directory gives its owner none: its markers still go on
    (the owner's write bit is set for the one call), as fuse-overlayfs's do. A read-only lower file
    is chmod'ed, touched, moved and linked; a read-only lower directory is renamed in place (to
    another parent no user may move it: its ``..`` would change); mounted again, all reads the same."""
    root = rootless.mkdir("readonly")
    lower = _lower(root, rootless)
    (lower / "ro").write_text("ro\n")
    (lower / "rodir").mkdir()
    (lower / "rodir" / "f").write_text("f\n")
    for path, mode in ((lower / "ro", 0o444), (lower / "rodir" / "f", 0o444), (lower / "rodir", 0o555)):
        os.chown(path, rootless.uid, rootless.gid)
        path.chmod(mode)
    upper, work, mnt = (rootless.mkdir("readonly", name) for name in ("upper", "work", "m"))
    changes = (f"chmod 0440 {mnt}/ro && touch -d 2020-01-01 {mnt}/ro && mv {mnt}/ro {mnt}/d/ro2 && "
               f"ln {mnt}/d/ro2 {mnt}/ro-link && mv {mnt}/rodir {mnt}/rodir2 && "
               f"! mv {mnt}/rodir2 {mnt}/d/rodir3 2>/dev/null")
    shown = (f"stat -c '%n %a %h %Y' {mnt}/d/ro2 {mnt}/ro-link {mnt}/rodir2; "
             f"cat {mnt}/d/ro2 {mnt}/ro-link {mnt}/rodir2/f; ls {mnt}")
    written = _as_user_on_overlayfuse(rootless, (lower, upper, work, mnt), changes, shown)
    assert written.splitlines() == [
        f"{mnt}/d/ro2 440 2 1577836800", f"{mnt}/ro-link 440 2 1577836800", f"{mnt}/rodir2 555 1 "
        f"{int((lower / 'rodir').stat().st_mtime)}", "ro", "ro", "f", "a", "b", "d", "e", "ro-link", "rodir2"]
    ro2 = upper / "d" / "ro2"
    assert os.getxattr(ro2, "user.overlay.metacopy") == b"" and not has_data(ro2)
    assert os.getxattr(ro2, "user.overlay.redirect") == b"/ro" and (ro2.stat().st_mode & 0o777) == 0o440
    assert os.getxattr(upper / "rodir2", "user.overlay.redirect") == b"rodir"
    assert (upper / "rodir2").stat().st_mode & 0o777 == 0o555 and os.listdir(upper / "rodir2") == []
    assert _as_user_on_overlayfuse(rootless, (lower, upper, work, mnt), shown) == written
