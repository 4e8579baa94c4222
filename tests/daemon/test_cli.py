"""The `overlayfuse` command line and the daemon's life cycle, through real mounts.

Bad input must fail before anything happens: one line on stderr, a non-zero exit, no
mount, no process left behind, and nothing written into upper or work.  Good input must
mount in every way the command can be started (detached, foreground, through mount(8),
with an empty environment) and every way of ending a mount must end the daemon cleanly.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.support.mounts import (
    DAEMON_EXIT_TIMEOUT,
    MOUNT_TIMEOUT,
    SYSTEM_BINARY,
    daemon_pids,
    escape_option_path,
    is_mounted,
    mount_at,
    mounts,
    overlayctl_binary,
    overlayfuse,
    overlayfuse_cmd,
    run,
    run_isolated,
    system_binary_problem,
    teardown_overlayfuse,
    wait_mounted,
    wait_pids_gone,
)
from tests.support.trees import File, make_tree

pytestmark = pytest.mark.mount



@dataclass(frozen=True, slots=True)
class Dirs:
    """A lower with one file, empty upper and work dirs, and an empty mountpoint."""

    lower: Path
    upper: Path
    work: Path
    mnt: Path


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    lower = make_tree(tmp_path / "lower", File("hello", b"hello\n"))
    for name in ("upper", "work", "mnt"):
        (tmp_path / name).mkdir()
    return Dirs(lower, tmp_path / "upper", tmp_path / "work", tmp_path / "mnt")


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_serves_lower(mnt: Path) -> None:
    """The mount is live and shows the lower's file (read in a child: a hang is a timeout)."""
    assert run_isolated(read_file, str(mnt / "hello"), timeout=30) == b"hello\n"


@contextlib.contextmanager
def torn_down(mnt: Path) -> Iterator[None]:
    """Whatever the test did to start a daemon at `mnt`, it is unmounted and reaped after."""
    try:
        yield
    finally:
        teardown_overlayfuse(mnt)


# --- bad input -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadCase:
    """How to build one bad command line from a fresh `Dirs`."""

    name: str
    args: Callable[[Dirs], list[str]]  # everything after the binary
    setup: Callable[[Dirs, contextlib.ExitStack], None] = lambda d, stack: None
    drop_dac: bool = False  # run without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH


def _o(d: Dirs, opts: str) -> list[str]:
    return ["-o", opts, str(d.mnt)]


def _tmpfs_work(d: Dirs, stack: contextlib.ExitStack) -> None:
    """Put workdir on its own tmpfs, so it is on a different filesystem than upperdir."""
    proc = run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d.work], timeout=30)
    assert proc.returncode == 0, proc.stderr
    stack.callback(lambda: run(["umount", "-l", d.work], timeout=30))


def _unreadable_lower(d: Dirs, stack: contextlib.ExitStack) -> None:
    second = d.lower.with_name("locked")
    second.mkdir(mode=0o000)
    second.chmod(0o000)
    stack.callback(lambda: second.chmod(0o755))


def _mountpoint_is_file(d: Dirs, stack: contextlib.ExitStack) -> None:
    d.mnt.rmdir()
    d.mnt.write_bytes(b"not a dir")


def _lower_is_file(d: Dirs, stack: contextlib.ExitStack) -> None:
    (d.lower.parent / "lowerfile").write_bytes(b"a file")


BAD_CASES = [
    BadCase("no lowerdir", lambda d: _o(d, f"upperdir={d.upper},workdir={d.work}")),
    BadCase("no options at all", lambda d: [str(d.mnt)]),
    BadCase("lowerdir does not exist",
            lambda d: _o(d, f"lowerdir={d.lower}/nope,upperdir={d.upper},workdir={d.work}")),
    BadCase("one of two lowerdirs does not exist",
            lambda d: _o(d, f"lowerdir={d.lower}:{d.lower}-nope")),
    BadCase("lowerdir is a regular file",
            lambda d: _o(d, f"lowerdir={d.lower.parent}/lowerfile,upperdir={d.upper},"
                            f"workdir={d.work}"), _lower_is_file),
    BadCase("mountpoint is a file",
            lambda d: _o(d, f"lowerdir={d.lower}"), _mountpoint_is_file),
    BadCase("mountpoint does not exist",
            lambda d: ["-o", f"lowerdir={d.lower}", str(d.mnt / "nope")]),
    BadCase("upperdir without workdir", lambda d: _o(d, f"lowerdir={d.lower},upperdir={d.upper}")),
    BadCase("workdir without upperdir", lambda d: _o(d, f"lowerdir={d.lower},workdir={d.work}")),
    BadCase("workdir on another filesystem",
            lambda d: _o(d, f"lowerdir={d.lower},upperdir={d.upper},workdir={d.work}"),
            _tmpfs_work),
    BadCase("workdir inside upperdir",
            lambda d: _o(d, f"lowerdir={d.lower},upperdir={d.upper},workdir={d.upper}/w"),
            lambda d, stack: (d.upper / "w").mkdir()),
    BadCase("unreadable lowerdir",
            lambda d: _o(d, f"lowerdir={d.lower}:{d.lower.parent}/locked,upperdir={d.upper},"
                            f"workdir={d.work}"), _unreadable_lower, drop_dac=True),
]

# Root reads a mode-000 directory anyway.  Running the daemon as `nobody` does not work
# here (the venv's interpreter lives under /root, mode 0700), so the "unprivileged user"
# is root without the two capabilities that bypass file permissions.
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search", "--"]


def _tree_state(root: Path) -> list[tuple[str, int, int]]:
    """Every path below root with its mode and mtime: "untouched" means this is unchanged."""
    state = [(".", root.stat().st_mode, root.stat().st_mtime_ns)] if root.is_dir() else []
    for path in sorted(root.rglob("*")) if root.is_dir() else ():
        st = path.lstat()
        state.append((str(path.relative_to(root)), st.st_mode, st.st_mtime_ns))
    return state


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.name for c in BAD_CASES])
def test_bad_input_fails_cleanly(case: BadCase, dirs: Dirs, overlayfuse_bin: Path) -> None:
    with contextlib.ExitStack() as stack:
        case.setup(dirs, stack)
        stack.enter_context(torn_down(dirs.mnt))  # in case the daemon mounts anyway
        before = (_tree_state(dirs.upper), _tree_state(dirs.work))
        cmd = (DROP_DAC if case.drop_dac else []) + [str(overlayfuse_bin), *case.args(dirs)]
        proc = run(cmd, timeout=MOUNT_TIMEOUT, stdin=subprocess.DEVNULL)
        stderr = proc.stderr.decode(errors="replace")

        assert proc.returncode != 0, f"exit 0 for {case.name}; stderr={stderr!r}"
        assert len(stderr.splitlines()) == 1 and stderr.strip(), f"stderr={stderr!r}"
        assert "Traceback" not in stderr
        assert proc.stdout == b""
        assert not is_mounted(dirs.mnt)
        assert not [m for m in mounts() if m.fstype.startswith("fuse")
                    and m.mountpoint.startswith(str(dirs.mnt.parent))]
        assert wait_pids_gone(daemon_pids(dirs.mnt), DAEMON_EXIT_TIMEOUT) == []
        assert run(["pgrep", "-f", str(dirs.mnt)], timeout=30).returncode == 1, "a process left"
        assert (_tree_state(dirs.upper), _tree_state(dirs.work)) == before


def test_unreadable_layer_setup_is_really_unreadable(dirs: Dirs) -> None:
    """Guards the case above: without DAC capabilities the locked dir must be unreadable."""
    with contextlib.ExitStack() as stack:
        _unreadable_lower(dirs, stack)
        proc = run([*DROP_DAC, "ls", dirs.lower.with_name("locked")], timeout=30)
        assert proc.returncode != 0 and b"Permission denied" in proc.stderr


# --- good input ------------------------------------------------------------------------


def test_escaped_colon_and_comma(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """`\\:` and `\\,` keep a colon and a comma inside a layer path."""
    top = make_tree(tmp_path / "with:colon", File("top", b"1"))
    bottom = make_tree(tmp_path / "with,comma", File("bottom", b"2"))
    mnt = tmp_path / "mnt"
    with overlayfuse(mnt, [top, bottom]):
        assert sorted(run_isolated(os.listdir, str(mnt))) == ["bottom", "top"]
    assert escape_option_path(top).endswith(r"with\:colon")


def test_unknown_option_warns_and_mounts(dirs: Dirs, overlayfuse_bin: Path) -> None:
    with overlayfuse(dirs.mnt, [dirs.lower], extra=["frobnicate=3"]) as fuse:
        assert_serves_lower(dirs.mnt)
        assert "frobnicate" in fuse.log_text()


def test_several_dash_o(dirs: Dirs, overlayfuse_bin: Path) -> None:
    cmd = overlayfuse_cmd(dirs.mnt, f"lowerdir={dirs.lower}", f"upperdir={dirs.upper}",
                          f"workdir={dirs.work}")
    with torn_down(dirs.mnt):
        proc = run(cmd, timeout=MOUNT_TIMEOUT, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        info = mount_at(dirs.mnt)
        assert info is not None and "rw" in info.mount_options.split(",")
        assert_serves_lower(dirs.mnt)


def test_source_ignored_and_mount8_options_accepted(dirs: Dirs, overlayfuse_bin: Path) -> None:
    cmd = overlayfuse_cmd(dirs.mnt, f"rw,dev,suid,lowerdir={dirs.lower}", source="overlay")
    with torn_down(dirs.mnt):
        proc = run(cmd, timeout=MOUNT_TIMEOUT, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        assert_serves_lower(dirs.mnt)
        warnings = [line for line in proc.stderr.decode().splitlines() if "warn" in line.lower()]
        assert warnings == [], "rw, dev and suid are known options"


def test_read_only_option(dirs: Dirs, overlayfuse_bin: Path) -> None:
    with overlayfuse(dirs.mnt, [dirs.lower], dirs.upper, dirs.work, extra=["ro"]):
        info = mount_at(dirs.mnt)
        assert info is not None and "ro" in info.mount_options.split(",")
        with pytest.raises(OSError) as failure:
            run_isolated(os.mkdir, str(dirs.mnt / "new"), timeout=30)
        assert failure.value.errno == 30  # EROFS
    assert _tree_state(dirs.upper)[1:] == []


# --- ending a mount ---------------------------------------------------------------------

UNMOUNTERS = {"umount": ["umount"], "fusermount3": ["fusermount3", "-u"]}


@pytest.mark.parametrize("unmounter", sorted(UNMOUNTERS))
def test_unmount_ends_detached_daemon(unmounter: str, dirs: Dirs, overlayfuse_bin: Path) -> None:
    with overlayfuse(dirs.mnt, [dirs.lower]):
        pids = daemon_pids(dirs.mnt)
        assert pids, "cannot find the daemon's process"
        proc = run([*UNMOUNTERS[unmounter], dirs.mnt], timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert wait_pids_gone(pids, DAEMON_EXIT_TIMEOUT) == []
        assert not is_mounted(dirs.mnt)


@contextlib.contextmanager
def foreground_daemon(dirs: Dirs) -> Iterator[subprocess.Popen[bytes]]:
    """A `-f` daemon as our child, mounted and answering; always reaped afterwards."""
    cmd = overlayfuse_cmd(dirs.mnt, f"lowerdir={dirs.lower}", foreground=True)
    log = dirs.mnt.with_name("foreground.log")
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        wait_mounted(dirs.mnt, proc)
        yield proc
    finally:
        teardown_overlayfuse(dirs.mnt)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DAEMON_EXIT_TIMEOUT)
    assert "Traceback" not in log.read_text(errors="replace")


def _wait_exit(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(timeout=DAEMON_EXIT_TIMEOUT)


@pytest.mark.parametrize("unmounter", sorted(UNMOUNTERS))
def test_unmount_ends_foreground_daemon(unmounter: str, dirs: Dirs,
                                        overlayfuse_bin: Path) -> None:
    with foreground_daemon(dirs) as proc:
        assert_serves_lower(dirs.mnt)
        assert run([*UNMOUNTERS[unmounter], dirs.mnt], timeout=30).returncode == 0
        assert _wait_exit(proc) == 0
        assert not is_mounted(dirs.mnt)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_unmounts_foreground_daemon(signum: int, dirs: Dirs,
                                           overlayfuse_bin: Path) -> None:
    with foreground_daemon(dirs) as proc:
        assert_serves_lower(dirs.mnt)
        proc.send_signal(signum)
        assert _wait_exit(proc) == 0
        assert not is_mounted(dirs.mnt)


def test_restart_after_kill_clears_the_dead_mount(dirs: Dirs, overlayfuse_bin: Path) -> None:
    """kill -9 leaves a mount answering ENOTCONN; starting again detaches it and mounts afresh,
    with nothing dead left underneath to reappear after the next unmount."""
    with foreground_daemon(dirs) as proc:
        proc.kill()
        proc.wait(timeout=DAEMON_EXIT_TIMEOUT)
        with pytest.raises(OSError) as dead:
            os.statvfs(dirs.mnt)
        assert dead.value.errno == errno.ENOTCONN
        restarted = run(overlayfuse_cmd(dirs.mnt, f"lowerdir={dirs.lower}"), timeout=30)
        assert restarted.returncode == 0, restarted.stderr
        assert b"detached a FUSE mount whose daemon had died" in restarted.stderr
        assert_serves_lower(dirs.mnt)
        assert sum(1 for m in mounts() if m.mountpoint == str(dirs.mnt)) == 1
        teardown_overlayfuse(dirs.mnt)
        assert not is_mounted(dirs.mnt)


# --- other ways to start it -------------------------------------------------------------


def test_empty_environment(dirs: Dirs, overlayfuse_bin: Path) -> None:
    """Started by systemd or mount(8), the daemon may have no PATH at all."""
    problem = system_binary_problem()
    if problem:
        skip_or_fail(problem)
    binary = SYSTEM_BINARY
    with torn_down(dirs.mnt):
        proc = run(["env", "-i", binary, "-o", f"lowerdir={dirs.lower}", dirs.mnt],
                   timeout=MOUNT_TIMEOUT, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        assert_serves_lower(dirs.mnt)


def test_mount_helper(dirs: Dirs, overlayfuse_bin: Path) -> None:
    """`mount -t fuse.overlayfuse` goes through fuse3's mount.fuse, which finds us on PATH."""
    problem = system_binary_problem()
    if problem:
        skip_or_fail(problem)
    with torn_down(dirs.mnt):
        proc = run(["mount", "-t", "fuse.overlayfuse", "overlay", dirs.mnt, "-o",
                    f"lowerdir={escape_option_path(dirs.lower)}"], timeout=MOUNT_TIMEOUT,
                   stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        info = mount_at(dirs.mnt)
        assert info is not None and info.fstype == "fuse.overlayfuse"
        assert_serves_lower(dirs.mnt)
        assert run(["umount", dirs.mnt], timeout=30).returncode == 0
        assert not is_mounted(dirs.mnt)


def _expected_answer(program: str, flag: str) -> bytes:
    """What `program FLAG` must print first: its usage line, or its name and the version
    the package declares (so a --version that printed anything at all would not pass)."""
    if flag == "--version":
        return f"{program} {importlib.metadata.version('overlayfuse')}\n".encode()
    return f"usage: {program} ".encode()


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_overlayctl_answers(flag: str) -> None:
    binary = overlayctl_binary()
    if binary is None:
        skip_or_fail("overlayctl is not installed")
    assert binary is not None
    proc = run([binary, flag], timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(_expected_answer("overlayctl", flag)), proc.stdout
    if flag == "--help":  # every command is listed
        for command in (b"image", b"mount", b"umount", b"commit", b"service"):
            assert b"\n    " + command + b" " in proc.stdout, (command, proc.stdout)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_overlayfuse_answers(flag: str, overlayfuse_bin: Path) -> None:
    proc = run([overlayfuse_bin, flag], timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(_expected_answer("overlayfuse", flag)), proc.stdout
    if flag == "--help":  # the options fuse-overlayfs users look for are documented
        for option in (b"lowerdir", b"upperdir", b"workdir", b"MOUNTPOINT"):
            assert option in proc.stdout, (option, proc.stdout)
