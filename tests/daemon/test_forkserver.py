"""The fork server (``overlayfuse --fork-server``), for real: mounts through it, its refusals, the
fallback to an in-process mount, and a rootless server serving a client in a user namespace.

Each test starts its own server on a socket in its own directory (never the default path, which
other tests' ``overlayfuse`` commands would find) and points the command at it with
``OVERLAYFUSE_FORK_SERVER``. Every server is stopped, and every process it forked is gone, when
the test ends, pass or fail: the processes are found by the socket's path, which is on their
command line (a fork keeps the server's).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.support.mounts import (
    DAEMON_EXIT_TIMEOUT,
    MOUNT_TIMEOUT,
    daemon_pids,
    is_mounted,
    mount_at,
    overlayfuse_binary,
    run_isolated,
    teardown_overlayfuse,
    wait_pids_gone,
)
from tests.support.procfs import command_line, other_pids
from tests.support.trees import File, make_tree

pytestmark = pytest.mark.mount

ENV = "OVERLAYFUSE_FORK_SERVER"
#: The server imports trio, pyfuse3 and the daemon (~0.2 s; seconds on a loaded machine).
START_TIMEOUT = 60.0
#: setpriv's arguments that make a command run as nobody, with no supplementary groups.
NOBODY = ("--reuid=nobody", "--regid=nogroup", "--clear-groups")


@dataclass(frozen=True, slots=True)
class Server:
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def forked(self) -> int:
        """How many requests it forked a child for (with -d it logs each)."""
        return self.log_text().count("forked daemon process")

    def processes(self) -> list[int]:
        """The server and every process forked from it (their command line names the socket)."""
        found = []
        for pid in other_pids():
            argv = command_line(pid)
            if argv and "--fork-server" in argv and str(self.socket) in argv:
                found.append(pid)
        return found


def _stop(server: Server) -> None:
    """The server stopped (SIGTERM, then SIGKILL), then any daemon it forked that is still there
    (a test that failed before unmounting): SIGTERM, then SIGKILL."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=DAEMON_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    left = server.processes()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        left = wait_pids_gone(left, DAEMON_EXIT_TIMEOUT)


@pytest.fixture
def start_server() -> Iterator[Callable[..., Server]]:
    """Start a fork server on SOCKET (as USER with setpriv, if given); all stopped at the end."""
    started: list[Server] = []

    def start(sock: Path, *, as_nobody: bool = False) -> Server:
        binary = overlayfuse_binary()
        assert binary is not None
        log = sock.parent.with_name(f"{sock.parent.name}-server-{len(started)}.log")
        cmd = [str(binary), "--fork-server", "--socket", str(sock), "-d"]
        if as_nobody:
            cmd = ["setpriv", *NOBODY, *cmd]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        server = Server(sock, log, proc)
        started.append(server)
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on" not in server.log_text():
            assert proc.poll() is None, f"the fork server exited {proc.returncode}: {server.log_text()}"
            assert time.monotonic() < deadline, f"the fork server did not listen: {server.log_text()}"
            time.sleep(0.05)
        return server

    try:
        yield start
    finally:
        for server in started:
            _stop(server)


@dataclass(frozen=True, slots=True)
class Dirs:
    lower: Path
    mnt: Path
    sock: Path


def _dirs(base: Path) -> Dirs:
    lower = make_tree(base / "lower", File("hello", b"hello\n"))
    (base / "mnt").mkdir()
    return Dirs(lower, base / "mnt", base / "srv" / "fork-server.sock")


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    return _dirs(tmp_path)


@pytest.fixture
def nobody_dirs() -> Iterator[Dirs]:
    """The same, in a directory nobody owns (pytest's tmp dirs are root's, mode 0700)."""
    if shutil.which("setpriv") is None:
        skip_or_fail("setpriv is not installed (util-linux)")
    base = Path(tempfile.mkdtemp(prefix="overlayfuse-fs-test-"))
    try:
        made = _dirs(base)
        user = pwd.getpwnam("nobody")
        for path in (base, made.lower, made.lower / "hello", made.mnt):
            os.chown(path, user.pw_uid, user.pw_gid)
        base.chmod(0o755)
        yield made
    finally:
        if not is_mounted(base / "mnt"):
            shutil.rmtree(base, ignore_errors=True)


def overlayfuse(args: Sequence[str], sock: Path | str, *,
                prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """The installed command with ARGS, told to use the server at SOCK (or ``off``)."""
    binary = overlayfuse_binary()
    assert binary is not None
    return subprocess.run([*prefix, str(binary), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=os.environ | {ENV: str(sock)}, timeout=MOUNT_TIMEOUT, check=False)


def read_file(path: str) -> bytes:
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as f:
        return f.read()


def _unmount(mnt: Path, server: Server) -> None:
    """Unmount MNT and check that the daemon the server forked for it ends."""
    served_by = [pid for pid in server.processes() if pid != server.proc.pid]
    teardown_overlayfuse(mnt)
    assert wait_pids_gone(served_by, DAEMON_EXIT_TIMEOUT) == [], "the forked daemon outlived its unmount"


def test_mount_through_the_server_reads_then_unmounts(dirs: Dirs, start_server: Callable[..., Server]) -> None:
    server = start_server(dirs.sock)
    try:
        done = overlayfuse(["-o", f"lowerdir={dirs.lower}", str(dirs.mnt)], dirs.sock)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert mount_at(dirs.mnt) is not None and mount_at(dirs.mnt).fstype == "fuse.overlayfuse"  # type: ignore[union-attr]
        assert server.forked() == 1, server.log_text()
        assert daemon_pids(dirs.mnt) == [], "a daemon of its own was started: the server was not used"
        assert run_isolated(read_file, str(dirs.mnt / "hello"), timeout=30) == b"hello\n"
    finally:
        _unmount(dirs.mnt, server)
    assert not is_mounted(dirs.mnt)
    assert server.proc.poll() is None, "the server must outlive the mounts it started"


def _status_field(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(key + ":"))


def _limit(pid: int, name: str) -> list[str]:
    with open(f"/proc/{pid}/limits") as f:
        return next(line[26:].split()[:2] for line in f if line.startswith(name))


def test_the_daemon_takes_the_callers_place(dirs: Dirs, start_server: Callable[..., Server]) -> None:
    """What the caller sent is what the forked daemon runs with: its cwd (relative paths), umask,
    an rlimit, its environment (a start-up trace file named only there), and a session of its own."""
    if shutil.which("prlimit") is None:
        skip_or_fail("prlimit is not installed (util-linux)")
    server = start_server(dirs.sock)
    trace = dirs.mnt.parent / "trace"
    binary = overlayfuse_binary()
    assert binary is not None
    try:
        done = subprocess.run(["prlimit", "--msgqueue=12345:12345", "sh", "-c", f"umask 027; exec {binary} "
                               f"-o lowerdir={dirs.lower.name} {dirs.mnt.name}"], cwd=dirs.mnt.parent,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=MOUNT_TIMEOUT,
                              env=os.environ | {ENV: str(dirs.sock), "OVERLAYFUSE_STARTUP_TRACE": str(trace)},
                              check=False)
        assert done.returncode == 0, done.stderr
        assert server.forked() == 1
        assert run_isolated(read_file, str(dirs.mnt / "hello"), timeout=30) == b"hello\n"
        daemons = [pid for pid in server.processes() if pid != server.proc.pid]
        assert len(daemons) == 1, daemons
        daemon = daemons[0]
        assert _status_field(daemon, "Umask") == "0027"
        assert _limit(daemon, "Max msgqueue size") == ["12345", "12345"]
        assert os.getsid(daemon) == daemon  # a session of its own, as a detached daemon in-process
        steps = trace.read_text()
        assert f" {daemon} kernel mount made" in steps, steps
    finally:
        _unmount(dirs.mnt, server)


def test_foreground_mount_ends_on_the_callers_signal(dirs: Dirs, start_server: Callable[..., Server]) -> None:
    """``-f``: the command waits as the in-process one does, and a SIGTERM to it (a supervisor's)
    reaches the forked daemon, which unmounts; the command then exits 0."""
    server = start_server(dirs.sock)
    binary = overlayfuse_binary()
    assert binary is not None
    proc = subprocess.Popen([str(binary), "-f", "-o", f"lowerdir={dirs.lower}", str(dirs.mnt)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=os.environ | {ENV: str(dirs.sock)}, start_new_session=True)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(dirs.mnt):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert run_isolated(read_file, str(dirs.mnt / "hello"), timeout=30) == b"hello\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=MOUNT_TIMEOUT)
        assert proc.returncode == 0, err
        assert b"SIGTERM: unmounting" in err
        assert not is_mounted(dirs.mnt)
        assert server.forked() == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _unmount(dirs.mnt, server)


BAD_ARGS: list[Callable[[Dirs], list[str]]] = [
    lambda d: [str(d.mnt)],  # no lowerdir
    lambda d: ["-o", f"lowerdir={d.lower}/nope", str(d.mnt)],
    lambda d: ["-o", f"lowerdir={d.lower},upperdir={d.lower}", str(d.mnt)],  # no workdir
    lambda d: ["-o", f"lowerdir={d.lower}", str(d.mnt / "nope")],
    lambda d: ["--no-such-flag", str(d.mnt)],
    lambda d: ["--version"],
    lambda d: ["--help"],
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=["no-lowerdir", "missing-lowerdir", "no-workdir", "missing-mountpoint",
                                                "unknown-flag", "version", "help"])
def test_the_server_answers_as_the_in_process_path(
    dirs: Dirs, start_server: Callable[..., Server], args: Callable[[Dirs], list[str]]
) -> None:
    """Same exit status, same stdout, same stderr, through the server or not; nothing mounted."""
    server = start_server(dirs.sock)
    try:
        through = overlayfuse(args(dirs), dirs.sock)
        alone = overlayfuse(args(dirs), "off")
        assert server.forked() == 1, server.log_text()
        assert (through.returncode, through.stdout, through.stderr) == (alone.returncode, alone.stdout, alone.stderr)
        if args(dirs) not in (["--version"], ["--help"]):
            assert through.returncode != 0 and through.stderr.count("\n") == 1, through.stderr
        assert not is_mounted(dirs.mnt)
    finally:
        if is_mounted(dirs.mnt):  # a failure: whichever mounted
            teardown_overlayfuse(dirs.mnt)


def test_a_server_gone_means_an_in_process_mount(dirs: Dirs, start_server: Callable[..., Server]) -> None:
    """A server killed (its socket left behind: nobody answers) or stopped (socket removed): the
    command mounts in its own process, and with -d says why."""
    server = start_server(dirs.sock)
    server.proc.kill()
    server.proc.wait()
    assert dirs.sock.exists()
    told = overlayfuse(["-d", "-o", f"lowerdir={dirs.lower}/nope", str(dirs.mnt)], dirs.sock)
    assert "DEBUG fork server: no fork server at" in told.stderr and "mounting in this process" in told.stderr
    assert told.stderr.endswith(overlayfuse(["-o", f"lowerdir={dirs.lower}/nope", str(dirs.mnt)], "off").stderr)
    server = start_server(dirs.sock)  # replaces the stale socket
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=DAEMON_EXIT_TIMEOUT)
    assert not dirs.sock.exists(), "a stopped server removes its socket"
    try:
        done = overlayfuse(["-o", f"lowerdir={dirs.lower}", str(dirs.mnt)], dirs.sock)
        assert done.returncode == 0, done.stderr
        assert daemon_pids(dirs.mnt), "no in-process daemon serves the mount"
        assert run_isolated(read_file, str(dirs.mnt / "hello"), timeout=30) == b"hello\n"
    finally:
        teardown_overlayfuse(dirs.mnt)


@pytest.mark.parametrize("socket_open", [False, True], ids=["socket-0600", "socket-opened-to-all"])
def test_another_users_client_is_refused_and_mounts_alone(
    nobody_dirs: Dirs, start_server: Callable[..., Server], socket_open: bool
) -> None:
    """nobody against root's server: the socket is 0600, so the connect fails; and if someone
    opened it to all, SO_PEERCRED refuses. Either way nobody's command goes on in its own
    process, and answers exactly as it would with no server."""
    d = nobody_dirs
    server = start_server(d.sock)
    if socket_open:
        d.sock.parent.chmod(0o755)
        d.sock.chmod(0o666)
    args = ["-o", f"lowerdir={d.lower}/nope", str(d.mnt)]
    through = overlayfuse(["-d", *args], d.sock, prefix=["setpriv", *NOBODY])
    alone = overlayfuse(["-d", *args], "off", prefix=["setpriv", *NOBODY])
    first, _, rest = through.stderr.partition("\n")
    assert "mounting in this process" in first
    assert ("refused: uid" in first) if socket_open else ("Permission denied" in first), first
    assert (through.returncode, rest) == (alone.returncode, alone.stderr)
    assert server.forked() == 0
    if socket_open:
        assert f"uid {pwd.getpwnam('nobody').pw_uid} is not the fork server's (0)" in server.log_text()
    try:  # and a real mount, made by nobody's own process (fusermount3)
        done = overlayfuse(["-o", f"lowerdir={d.lower}", str(d.mnt)], d.sock, prefix=["setpriv", *NOBODY])
        assert done.returncode == 0, done.stderr
        assert daemon_pids(d.mnt)
        assert server.forked() == 0
    finally:
        teardown_overlayfuse(d.mnt)


@pytest.mark.parametrize(("setpriv", "lacking"), [
    (["--no-new-privs"], "it runs with no_new_privs and the fork server does not"),
    (["--bounding-set=-sys_admin"], "its effective capabilities lack 0x200000"),
], ids=["no-new-privs", "no-cap-sys-admin"])
def test_a_client_with_less_privilege_is_refused(
    dirs: Dirs, start_server: Callable[..., Server], setpriv: list[str], lacking: str
) -> None:
    """Root, but with no_new_privs or without CAP_SYS_ADMIN: a daemon forked by root's server
    would hold what the client does not, so it is refused and mounts alone, with its own."""
    if shutil.which("setpriv") is None:
        skip_or_fail("setpriv is not installed (util-linux)")
    server = start_server(dirs.sock)
    args = ["-d", "-o", f"lowerdir={dirs.lower}/nope", str(dirs.mnt)]
    through = overlayfuse(args, dirs.sock, prefix=["setpriv", *setpriv])
    alone = overlayfuse(args, "off", prefix=["setpriv", *setpriv])
    first, _, rest = through.stderr.partition("\n")
    assert "refused: pid" in first and lacking in first and "mounting in this process" in first, first
    assert (through.returncode, rest) == (alone.returncode, alone.stderr)
    assert server.forked() == 0
    assert lacking in server.log_text()


def test_a_client_in_another_user_namespace_with_fewer_capabilities_is_refused(
    dirs: Dirs, start_server: Callable[..., Server]
) -> None:
    """Root's client in a user namespace of its own (``unshare --user --map-root-user``) that has
    dropped CAP_SYS_ADMIN there, as a container's process does: the forked daemon would enter that
    namespace with every capability in it, so the client is refused and mounts alone."""
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        skip_or_fail("unshare or setpriv is not installed (util-linux)")
    server = start_server(dirs.sock)
    args = ["-d", "-o", f"lowerdir={dirs.lower}/nope", str(dirs.mnt)]
    prefix = ["unshare", "--user", "--map-root-user", "setpriv", "--bounding-set=-sys_admin"]
    through = overlayfuse(args, dirs.sock, prefix=prefix)
    alone = overlayfuse(args, "off", prefix=prefix)
    first, _, rest = through.stderr.partition("\n")
    assert "refused: pid" in first and "capabilities lack 0x200000" in first, first
    assert (through.returncode, rest) == (alone.returncode, alone.stderr)
    assert server.forked() == 0


def test_under_a_service_manager_the_command_mounts_itself(dirs: Dirs, start_server: Callable[..., Server]) -> None:
    """With $NOTIFY_SOCKET (a Type=notify unit running ``overlayfuse -f``) the manager accepts
    READY=1 only from the process it started: the server is not used."""
    server = start_server(dirs.sock)
    binary = overlayfuse_binary()
    assert binary is not None
    done = subprocess.run([str(binary), "-d", "-o", f"lowerdir={dirs.lower}/nope", str(dirs.mnt)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=MOUNT_TIMEOUT,
                          env=os.environ | {ENV: str(dirs.sock), "NOTIFY_SOCKET": "@overlayfuse-test-nobody-listens"},
                          check=False)
    assert "service manager started us" in done.stderr.partition("\n")[0], done.stderr
    assert done.returncode == 1
    assert server.forked() == 0


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def test_the_socket_and_its_directory_are_the_servers_alone(dirs: Dirs, start_server: Callable[..., Server]) -> None:
    server = start_server(dirs.sock)
    st_dir, st_sock = os.lstat(dirs.sock.parent), os.lstat(dirs.sock)
    assert (st_dir.st_mode & 0o7777, st_sock.st_mode & 0o7777) == (0o700, 0o600)
    assert st_dir.st_uid == st_sock.st_uid == os.geteuid()
    assert _socket_answers(dirs.sock)
    binary = overlayfuse_binary()
    assert binary is not None
    second = subprocess.run([str(binary), "--fork-server", "--socket", str(dirs.sock)], capture_output=True,
                            text=True, timeout=START_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    assert second.returncode == 1
    assert second.stderr == f"overlayfuse: error: --fork-server: another fork server is listening on {dirs.sock}\n"
    assert server.proc.poll() is None


def test_rootless_server_mounts_in_the_clients_user_and_mount_namespace(
    nobody_dirs: Dirs, start_server: Callable[..., Server]
) -> None:
    """nobody's server; nobody's client in ``unshare --user --map-root-user --mount`` (as rootless
    podman runs its mount program): the forked daemon enters the client's namespaces, so the mount
    is in the client's mount namespace and in neither the server's nor ours; unmounted from there."""
    if shutil.which("unshare") is None:
        skip_or_fail("unshare is not installed (util-linux)")
    d = nobody_dirs
    server = start_server(d.sock, as_nobody=True)
    binary = overlayfuse_binary()
    script = (f"{binary} -o lowerdir={d.lower} {d.mnt}; echo rc=$?; cat {d.mnt}/hello; "
              f"grep -c ' {d.mnt} ' /proc/self/mountinfo; grep -c ' {d.mnt} ' /proc/{server.proc.pid}/mountinfo; "
              f"umount {d.mnt}; echo umount=$?")
    try:
        done = subprocess.run(["setpriv", *NOBODY, "unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               script], capture_output=True, text=True, env=os.environ | {ENV: str(d.sock)},
                              timeout=MOUNT_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
        assert done.stdout.split("\n") == ["rc=0", "hello", "1", "0", "umount=0", ""], (done.stdout, done.stderr)
        assert server.forked() == 1, server.log_text()
        assert not is_mounted(d.mnt)
        assert wait_pids_gone([p for p in server.processes() if p != server.proc.pid], DAEMON_EXIT_TIMEOUT) == []
    finally:
        _stop(server)


#: What the command must not import when the server takes its mount: the point of the server.
HEAVY = ("trio", "pyfuse3", "argparse", "logging", "overlayfuse.daemon.cli", "overlayfuse.daemon.options",
         "overlayfuse.overlay")


def test_the_client_imports_nothing_heavy(dirs: Dirs, start_server: Callable[..., Server]) -> None:
    """``-X importtime`` of the installed entry point mounting through the server: only what the
    interpreter's start loads, plus socket-level modules; none of the daemon's."""
    server = start_server(dirs.sock)
    binary = overlayfuse_binary()
    assert binary is not None
    python = binary.with_name("python")
    code = "import sys; from overlayfuse.commands import overlayfuse; sys.exit(overlayfuse())"
    try:
        done = subprocess.run([str(python), "-X", "importtime", "-c", code, "-o", f"lowerdir={dirs.lower}",
                               str(dirs.mnt)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=os.environ | {ENV: str(dirs.sock)}, timeout=MOUNT_TIMEOUT, check=False)
        assert done.returncode == 0, done.stderr
        assert server.forked() == 1
        imported = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                    if line.startswith("import time:")]
        after = imported[imported.index("overlayfuse.commands") + 1:]
        assert "overlayfuse.daemon.forkclient" in after
        heavy = [name for name in after if any(name == h or name.startswith(h + ".") for h in HEAVY)]
        assert heavy == [], f"the client imported {heavy}"
    finally:
        _unmount(dirs.mnt, server)
