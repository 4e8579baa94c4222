"""The daemon off the documented path (issue 21): each mistake a newcomer makes, as the exact command,
and the one line (or the refusal) it must get.

Non-root mounts run as ``nobody`` (runuser) on dirs it owns in a directory of this test's own, made
under /tmp because pytest's base temp dir is root's alone (0700).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlayfuse.daemon import binding, mount
from tests.conftest import skip_or_fail
from tests.support.mounts import (
    MOUNT_TIMEOUT,
    UNMOUNT_TIMEOUT,
    is_mounted,
    mount_at,
    overlayfuse_binary,
    overlayfuse_cmd,
    run,
    run_isolated,
    teardown_overlayfuse,
)
from tests.support.trees import File, make_tree

REPO = Path(__file__).resolve().parents[2]
UNPRIVILEGED = "nobody"


@dataclass(frozen=True, slots=True)
class Dirs:
    lower: Path
    upper: Path
    work: Path
    mnt: Path

    def options(self, *, workdir: Path | None = None) -> list[str]:
        return ["-o", f"lowerdir={self.lower},upperdir={self.upper},workdir={workdir or self.work}"]


def _error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The one line a failing overlayfuse prints, checked to be one line."""
    assert proc.returncode != 0, proc.stderr
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlayfuse: error: "), proc.stderr.decode()
    return lines[0].removeprefix("overlayfuse: error: ")


@contextlib.contextmanager
def _torn_down(*mnts: Path) -> Iterator[None]:
    try:
        yield
    finally:
        for mnt in mnts:
            if is_mounted(mnt):
                teardown_overlayfuse(mnt)


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    d = Dirs(tmp_path / "lower", tmp_path / "upper", tmp_path / "work", tmp_path / "mnt")
    make_tree(d.lower, File("etc/motd", b"lower\n"))
    for path in (d.upper, d.work, d.mnt):
        path.mkdir()
    return d


def _overlayfuse(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    binary = overlayfuse_binary()
    assert binary is not None
    return run([binary, *args], timeout=MOUNT_TIMEOUT, stdin=subprocess.DEVNULL)


# -- 1. a non-root read-write mount -------------------------------------------------------------------


@pytest.fixture
def user_dirs() -> Iterator[Dirs]:
    """lower, upper, work and mnt owned by UNPRIVILEGED, in a fresh dir only this test uses."""
    if os.geteuid() != 0:
        skip_or_fail("needs root to run commands as another user")
    try:
        user = pwd.getpwnam(UNPRIVILEGED)
    except KeyError:
        run(["useradd", "--system", "--no-create-home", UNPRIVILEGED], timeout=30)
        user = pwd.getpwnam(UNPRIVILEGED)
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        skip_or_fail("/dev/fuse is not usable by other users (scripts/setup makes it 0666, as udev does)")
    probe = run(["runuser", "-u", UNPRIVILEGED, "--", str(overlayfuse_binary()), "--version"], timeout=30)
    if probe.returncode != 0:
        skip_or_fail(f"{UNPRIVILEGED} cannot run {overlayfuse_binary()} (rerun scripts/setup): {probe.stderr!r}")
    top = Path(tempfile.mkdtemp(prefix="overlayfuse-nonroot-"))
    try:
        os.chmod(top, 0o755)
        d = Dirs(top / "lower", top / "upper", top / "work", top / "mnt")
        make_tree(d.lower, File("etc/motd", b"lower\n"))
        for path in (d.upper, d.work, d.mnt):
            path.mkdir()
        for path in (d.lower, d.lower / "etc", d.lower / "etc/motd", d.upper, d.work, d.mnt):
            os.chown(path, user.pw_uid, user.pw_gid)
        with _torn_down(d.mnt):
            yield d
    finally:
        shutil.rmtree(top)


def _as_user(*cmd: str | os.PathLike[str], timeout: float = MOUNT_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return run(["runuser", "-u", UNPRIVILEGED, "--", *map(str, cmd)], timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.mount
def test_non_root_read_write_mount(user_dirs: Dirs) -> None:
    d = user_dirs
    proc = _as_user(overlayfuse_binary(), *d.options(), d.mnt)
    assert proc.returncode == 0, proc.stderr.decode()
    assert mount_at(d.mnt) is not None
    # Copy-up and a new file, written by the user through the mount, land in the user's upper dir.
    change = _as_user("sh", "-ec", f"echo changed > {d.mnt}/etc/motd; echo new > {d.mnt}/new; rm {d.mnt}/etc/motd")
    assert change.returncode == 0, change.stderr.decode()
    assert (d.upper / "new").read_bytes() == b"new\n"
    assert os.stat(d.upper / "new").st_uid == pwd.getpwnam(UNPRIVILEGED).pw_uid
    listing = _as_user("ls", "-A", d.mnt / "etc")  # without allow_other, only the user sees the mount
    assert listing.returncode == 0 and listing.stdout == b"", listing
    assert stat_mode(d.work / "work") == 0o700
    unmount = _as_user("fusermount3", "-u", d.mnt, timeout=UNMOUNT_TIMEOUT)
    assert unmount.returncode == 0, unmount.stderr.decode()


@pytest.mark.mount
def test_non_root_mount_recovers_a_mode_0_work_dir(user_dirs: Dirs) -> None:
    """A ``work`` dir left with mode 000 (by an earlier version) no longer locks its owner out."""
    d = user_dirs
    staging = d.work / "work"
    staging.mkdir(mode=0)
    os.chown(staging, pwd.getpwnam(UNPRIVILEGED).pw_uid, -1)
    os.chmod(staging, 0)
    proc = _as_user(overlayfuse_binary(), *d.options(), d.mnt)
    assert proc.returncode == 0, proc.stderr.decode()
    assert _as_user("sh", "-ec", f"echo x > {d.mnt}/etc/motd").returncode == 0
    assert (d.upper / "etc/motd").read_bytes() == b"x\n"


def stat_mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def test_setup_prefers_an_interpreter_every_user_can_run(tmp_path: Path) -> None:
    """scripts/setup's test: an interpreter under a 0700 dir (a pyenv Python under /root) is not one
    others can run, so setup passes it over for one they can."""
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    shutil.copy2(os.path.realpath("/usr/bin/python3"), hidden / "python3")
    script = (f". {REPO}/scripts/setup; usable_by_all /usr/bin/python3 && echo system-ok; "
              f"usable_by_all {hidden}/python3 || echo hidden-refused")
    proc = run(["bash", "-c", script], timeout=60)
    assert proc.stdout.decode().split() == ["system-ok", "hidden-refused"], proc.stderr.decode()


# -- 2. one upper dir, one mount ----------------------------------------------------------------------


@pytest.mark.mount
def test_second_mount_of_one_workdir_is_refused(dirs: Dirs, tmp_path: Path) -> None:
    other = tmp_path / "mnt2"
    other.mkdir()
    with _torn_down(dirs.mnt, other):
        first = _overlayfuse(*dirs.options(), dirs.mnt)
        assert first.returncode == 0, first.stderr
        second = _overlayfuse(*dirs.options(), other)
        line = _error_line(second)
        assert line.startswith(f"workdir {dirs.work} is in use by the mount on {dirs.mnt} (pid ")
        assert line.endswith("unmount that first, or give this mount an upperdir and workdir of its own")
        assert not is_mounted(other)
        # The same again on the same mountpoint: no second daemon stacked there.
        again = _overlayfuse(*dirs.options(), dirs.mnt)
        assert _error_line(again).startswith(f"workdir {dirs.work} is in use by the mount on {dirs.mnt}")
        assert len(_mounts_on(dirs.mnt)) == 1
        # Another workdir, the same upper dir: refused too, naming the mount.
        work2 = tmp_path / "work2"
        work2.mkdir()
        shared_upper = _overlayfuse(*dirs.options(workdir=work2), other)
        assert _error_line(shared_upper).startswith(f"upperdir {dirs.upper} is in use by the mount on {dirs.mnt} (pid ")
        assert not is_mounted(other)
        teardown_overlayfuse(dirs.mnt)
        # The lock goes with the daemon: the next mount gets it.
        third = _overlayfuse(*dirs.options(), other)
        assert third.returncode == 0, third.stderr


def _mounts_on(mnt: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if line.split()[4] == str(mnt)]


@pytest.mark.mount
def test_a_killed_daemon_leaves_no_lock(dirs: Dirs) -> None:
    with _torn_down(dirs.mnt):
        assert _overlayfuse(*dirs.options(), dirs.mnt).returncode == 0
        pids = [int(line.split()[4]) for line in Path("/proc/locks").read_text().splitlines()
                if line.split()[1] == "FLOCK" and line.split()[5].endswith(f":{os.stat(dirs.upper).st_ino}")]
        assert len(pids) == 1
        os.kill(pids[0], 9)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pids[0], 0)
        # A dead mount is detached by the next start; the killed daemon's lock went with it.
        again = _overlayfuse(*dirs.options(), dirs.mnt)
        assert again.returncode == 0, again.stderr


# -- 3. failures are one line ------------------------------------------------------------------------


@pytest.mark.mount
def test_max_read_is_ignored_with_one_warning(dirs: Dirs) -> None:
    with _torn_down(dirs.mnt):
        proc = _overlayfuse("-o", f"lowerdir={dirs.lower},max_read=65536", dirs.mnt)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.decode().splitlines() == [
            "overlayfuse: WARNING option 'max_read=65536' ignored: pyfuse3 cannot pass max_read= on to the kernel"
        ]
        assert run_isolated(os.listdir, str(dirs.mnt), timeout=30) == ["etc"]


@pytest.mark.mount
def test_max_read_in_the_foreground_gives_no_traceback(dirs: Dirs) -> None:
    cmd = overlayfuse_cmd(dirs.mnt, f"lowerdir={dirs.lower},max_read=65536", foreground=True)
    with _torn_down(dirs.mnt):
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert _wait_mount(dirs.mnt, proc)
            assert run_isolated(os.listdir, str(dirs.mnt), timeout=MOUNT_TIMEOUT) == ["etc"]
        finally:
            if is_mounted(dirs.mnt):
                run(["fusermount3", "-u", dirs.mnt], timeout=UNMOUNT_TIMEOUT)
            _, err = proc.communicate(timeout=MOUNT_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode() and "ExceptionGroup" not in err.decode(), err.decode()


def _wait_mount(mnt: Path, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if mount_at(mnt) is not None:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_an_unforeseen_failure_is_one_line() -> None:
    """What used to reach the user as ``daemon failed: ExceptionGroup(...)``."""
    group = BaseExceptionGroup("Exceptions from Trio nursery",
                               [ConnectionRefusedError(111, "Connection refused", "/mnt")])
    text = mount.failure_text(group)
    assert text == ("the daemon failed: Connection refused: /mnt (run it with -d to see the log, "
                    "and report it if the cause is not yours)")
    mount_error = BaseExceptionGroup("x", [mount.MountError("/mnt was mounted but does not answer")])
    assert mount.failure_text(mount_error) == "/mnt was mounted but does not answer"


# -- 4. typos are named ------------------------------------------------------------------------------


@pytest.mark.parametrize(("opts", "message"), [
    ("lowerdir={L},upperdir={U},wrokdir={W}",
     "upperdir= given without workdir=: they are used together (is 'wrokdir' a misspelt workdir=?)"),
    ("lowerdirs={L}",
     "missing lowerdir=: at least one lower layer is required (is 'lowerdirs' a misspelt lowerdir=? lowerdirs "
     "is the config file's key; the command line takes lowerdir=TOP:...:BASE)"),
    ("lowerdir={L},uperdir={U},workdir={W}",
     "workdir= given without upperdir=: they are used together (is 'uperdir' a misspelt upperdir=?)"),
])  # fmt: skip
def test_misspelt_keys_are_named(dirs: Dirs, opts: str, message: str) -> None:
    proc = _overlayfuse("-o", opts.format(L=dirs.lower, U=dirs.upper, W=dirs.work), dirs.mnt)
    assert _error_line(proc) == message
    assert not is_mounted(dirs.mnt)


@pytest.mark.mount
def test_an_unknown_flag_still_only_warns_with_a_suggestion(dirs: Dirs) -> None:
    with _torn_down(dirs.mnt):
        proc = _overlayfuse("-o", f"lowerdir={dirs.lower},alow_other,frobnicate=1", dirs.mnt)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.decode().splitlines() == [
            "overlayfuse: WARNING unknown option 'alow_other' ignored (did you mean allow_other?)",
            "overlayfuse: WARNING unknown option 'frobnicate=1' ignored",
        ]


# -- 11. set-up and the global links -----------------------------------------------------------------


def _setup_links(link_dir: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    inherited = {k: v for k, v in os.environ.items() if k != "OVERLAYFUSE_LINKS"}  # CI sets it for the suite
    return run(["bash", "-c", f". {REPO}/scripts/setup; setup_links"], timeout=60,
               env={**inherited, "OVERLAYFUSE_LINK_DIR": str(link_dir), **env})


def test_setup_does_not_take_another_checkouts_links(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        skip_or_fail("setup makes the links as root only")
    links, other = tmp_path / "bin", tmp_path / "other-checkout"
    links.mkdir()
    other.mkdir()
    ours = REPO / ".venv/bin"
    for name in ("overlayfuse", "overlayctl"):
        (other / name).write_text("#!/bin/sh\n")
        os.symlink(other / name, links / name)
    kept = _setup_links(links)
    assert kept.returncode == 0
    assert os.readlink(links / "overlayfuse") == str(other / "overlayfuse")
    assert f"{links}/overlayfuse points at another checkout ({other}/overlayfuse): left alone" in kept.stderr.decode()

    taken = _setup_links(links, OVERLAYFUSE_LINKS="here")
    assert os.readlink(links / "overlayctl") == str(ours / "overlayctl"), taken.stderr

    # A link whose checkout was deleted is repaired, and the message says why.
    for name in ("overlayfuse", "overlayctl"):
        os.unlink(links / name)
        os.symlink(tmp_path / "gone" / name, links / name)
    repaired = _setup_links(links)
    assert os.readlink(links / "overlayfuse") == str(ours / "overlayfuse")
    assert f"(it pointed at {tmp_path}/gone/overlayfuse, which is gone)" in repaired.stdout.decode()


# -- 12. small things --------------------------------------------------------------------------------


def test_help_shows_the_usage_and_example_as_typed() -> None:
    proc = _overlayfuse("--help")
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "usage: overlayfuse [-h] [-V] [-f] [-d] [-o OPTS]... [SOURCE] MOUNTPOINT"
    assert "  overlayfuse -o lowerdir=/l/app:/l/base,upperdir=/c/upper,workdir=/c/work /mnt" in lines
    # What the usage line says: one or two paths (a third is refused, as before).
    third = _overlayfuse("-o", "lowerdir=/x", "a", "b", "c")
    assert third.returncode == 2 and _error_line(third) == "too many arguments: a b c"


@pytest.mark.mount
def test_read_only_mount_logs_no_upperdir_none(dirs: Dirs) -> None:
    log = dirs.mnt.with_name("daemon.log")
    cmd = [*overlayfuse_cmd(dirs.mnt, f"lowerdir={dirs.lower}", foreground=True)]
    with _torn_down(dirs.mnt), open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            assert _wait_mount(dirs.mnt, proc)
            run_isolated(os.stat, str(dirs.mnt), timeout=MOUNT_TIMEOUT)
        finally:
            if is_mounted(dirs.mnt):
                run(["fusermount3", "-u", dirs.mnt], timeout=UNMOUNT_TIMEOUT)
            proc.wait(MOUNT_TIMEOUT)
    text = log.read_text()
    assert f"mounted {dirs.mnt}: lowerdir={dirs.lower}, read-only" in text, text
    assert "None" not in text


@pytest.mark.mount
def test_auto_unmount_warns_exactly_when_it_drops_dev_and_suid(dirs: Dirs) -> None:
    """libfuse before 3.17 mounts through fusermount3 for auto_unmount (nosuid,nodev always); from
    3.17 it mounts itself and keeps root's dev,suid, and the warning would be wrong."""
    if os.geteuid() != 0:
        skip_or_fail("dev,suid are root's defaults")
    with _torn_down(dirs.mnt):
        proc = _overlayfuse("-o", f"lowerdir={dirs.lower},auto_unmount", dirs.mnt)
        assert proc.returncode == 0, proc.stderr
        warned = proc.stderr.decode().splitlines() == [
            "overlayfuse: WARNING auto_unmount: the mount will be nosuid,nodev (fusermount3 mounts it so): "
            "leave auto_unmount out for device nodes and setuid programs to work"
        ]
        assert warned or not proc.stderr, proc.stderr
        info = mount_at(dirs.mnt)
        assert info is not None
        dropped = {"nosuid", "nodev"} <= set(info.mount_options.split(","))
        assert warned == dropped, (proc.stderr, info.mount_options)
        if (binding.libfuse_version() or 0) >= 317:  # what scripts/setup builds
            assert not dropped, info.mount_options
