"""Mounting kernel overlayfs and overlayfuse for tests, with teardown that cannot be skipped.

Everything that can block on a mount runs with a timeout: commands through
`subprocess.run(timeout=...)`, and Python-level walks of a mount through `run_isolated`,
which does the work in a child process that is killed on timeout.  A FUSE daemon that
hangs therefore fails one test instead of freezing the suite (a thread stuck in a FUSE
request cannot be interrupted from Python, but a child process can be SIGKILLed).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

# The tests' own /proc readers, not overlayfuse.linux.mounttable: see tests/support/procfs.py.
from tests.support.procfs import (
    MountEntry,
    command_line,
    mounts,
    namespaces_holding,
    other_pids,
    process_alive,
    thread_waits,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Generous, because the suite runs on two busy cores; the values only bound a hang.
MOUNT_TIMEOUT = 30.0  # detached overlayfuse must be mounted and answering by then
UNMOUNT_TIMEOUT = 10.0  # per unmount command
DAEMON_EXIT_TIMEOUT = 10.0  # after unmount, the daemon process must be gone by then
#: After an unmount, how long before the teardown looks for other mount namespaces holding a copy
#: of the mount (a daemon not gone by then is usually pinned by one; see procfs.namespaces_holding).
PINNED_CHECK_AFTER = 1.0
ISOLATED_TIMEOUT = 90.0  # one full walk of the rich tree takes a few seconds

FUSE_FSTYPE = "fuse.overlayfuse"

T = TypeVar("T")


class MountError(RuntimeError):
    """A mount did not come up; the message carries the command and its stderr."""


# --- finding things --------------------------------------------------------------------


def overlayfuse_binary() -> Path | None:
    """The console script of the interpreter's venv, else whatever `overlayfuse` is on PATH."""
    candidate = Path(sys.executable).parent / "overlayfuse"
    if candidate.exists():
        return candidate
    found = shutil.which("overlayfuse")
    return Path(found) if found else None


def overlayctl_binary() -> Path | None:
    candidate = Path(sys.executable).parent / "overlayctl"
    if candidate.exists():
        return candidate
    found = shutil.which("overlayctl")
    return Path(found) if found else None


SYSTEM_BINARY = Path("/usr/local/bin/overlayfuse")  # what mount(8)'s helper finds on PATH


def system_binary_problem() -> str | None:
    """Why SYSTEM_BINARY cannot stand for the code under test (None when it can): scripts/setup makes
    it, but leaves one pointing at another checkout alone."""
    if not SYSTEM_BINARY.exists():
        return f"{SYSTEM_BINARY} missing (scripts/setup creates it)"
    ours = overlayfuse_binary()
    if ours is not None and os.path.realpath(SYSTEM_BINARY) != os.path.realpath(ours):
        return (f"{SYSTEM_BINARY} is another checkout's ({os.path.realpath(SYSTEM_BINARY)}): "
                "OVERLAYFUSE_LINKS=here ./scripts/setup points it here")
    return None


def mount_at(mnt: Path) -> MountEntry | None:
    """The topmost mount at `mnt`, or None."""
    found = [m for m in mounts() if m.mountpoint == str(mnt)]
    return found[-1] if found else None


def is_mounted(mnt: Path) -> bool:
    return mount_at(mnt) is not None


def daemon_pids(mnt: Path) -> list[int]:
    """Pids of overlayfuse processes whose command line names `mnt` as an argument.

    Reads /proc directly, like `pgrep -f` but matching the mountpoint as a whole argument,
    so a daemon for `/x/mnt` is not confused with one for `/x/mnt2`.
    """
    pids = []
    for pid in other_pids():
        argv = command_line(pid)
        if argv is not None and str(mnt) in argv and any("overlayfuse" in a for a in argv[:3]):
            pids.append(pid)
    return pids


def unnamed_files_held(pids: Sequence[int], directory: Path | str) -> int:
    """How many unnamed (O_TMPFILE) files made in DIRECTORY the processes PIDS hold open: /proc
    shows such a file as ``DIRECTORY/#INODE (deleted)``. A copy-up under way is one, in the staging
    dir."""
    held = 0
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                link = os.readlink(os.path.join(fd_dir, fd))
            except FileNotFoundError:  # closed meanwhile
                continue
            held += link.startswith(f"{directory}/#") and link.endswith(" (deleted)")
    return held


def wait_pids_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait for processes to exit; return those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if process_alive(p)]
        if alive:
            time.sleep(0.05)
    return alive


# --- isolation -------------------------------------------------------------------------

_CHILD_BOOTSTRAP = """
import importlib, pickle, sys
sys.path.insert(0, sys.argv[1])
module, name, args, kwargs = pickle.load(sys.stdin.buffer)
func = getattr(importlib.import_module(module), name)
try:
    outcome = ("ok", func(*args, **kwargs))
except BaseException as exc:
    outcome = ("err", exc)
sys.stdout.buffer.write(pickle.dumps(outcome))
"""


def run_isolated(func: Callable[..., T], *args: Any, timeout: float = ISOLATED_TIMEOUT,
                 **kwargs: Any) -> T:
    """Call module-level `func(*args)` in a child process and return its result.

    The child is SIGKILLed after `timeout`: a process waiting on a FUSE request dies on
    SIGKILL, whereas a thread of this process would stay stuck and hang pytest.
    Exceptions raised by `func` are re-raised here.
    """
    importlib.import_module(func.__module__)  # fail early on a non-importable function
    payload = pickle.dumps((func.__module__, func.__qualname__, args, kwargs))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_BOOTSTRAP, str(REPO_ROOT)],
            input=payload, capture_output=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(
            f"{func.__qualname__}{args!r} took more than {timeout}s: is a mount hung?"
        ) from exc
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(
            f"child for {func.__qualname__} died ({proc.returncode}): "
            f"{proc.stderr.decode(errors='replace')}"
        )
    status, value = pickle.loads(proc.stdout)
    if status == "err":
        raise value
    return cast(T, value)


def run(cmd: Sequence[str | os.PathLike[str]], timeout: float = 60.0,
        **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """subprocess.run with captured output, no check, and a mandatory timeout."""
    return subprocess.run(
        [os.fspath(c) for c in cmd], capture_output=True, timeout=timeout, check=False, **kwargs
    )


def drop_caches() -> None:
    """Empty the page, dentry and inode caches (root only).

    Afterwards reads of a FUSE file reach the daemon again, and the kernel has sent
    FORGET for the inodes it dropped, so lookups start from scratch.
    """
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# --- options ---------------------------------------------------------------------------


def escape_option_path(path: Path | str) -> str:
    """Escape `:` and `,` the way both overlayfs and overlayfuse expect in -o values."""
    return str(path).replace(":", r"\:").replace(",", r"\,")


def overlay_options(lowers: Sequence[Path], upper: Path | None = None,
                    work: Path | None = None) -> str:
    """`lowerdir=A:B[,upperdir=U,workdir=W]` with the leftmost lower on top."""
    opts = ["lowerdir=" + ":".join(escape_option_path(p) for p in lowers)]
    if upper is not None:
        opts.append(f"upperdir={escape_option_path(upper)}")
    if work is not None:
        opts.append(f"workdir={escape_option_path(work)}")
    return ",".join(opts)


# --- kernel overlayfs ------------------------------------------------------------------


@contextlib.contextmanager
def kernel_overlay(mnt: Path, lowers: Sequence[Path], upper: Path | None = None,
                   work: Path | None = None, extra: str = "") -> Iterator[Path]:
    """Mount kernel overlayfs at `mnt` for the duration of the block, always unmounting."""
    mnt.mkdir(parents=True, exist_ok=True)
    opts = overlay_options(lowers, upper, work) + (f",{extra}" if extra else "")
    proc = run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], timeout=MOUNT_TIMEOUT)
    if proc.returncode != 0:
        raise MountError(f"mount -t overlay -o {opts} {mnt}: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        unmount_kernel(mnt)


def unmount_kernel(mnt: Path) -> None:
    """umount, falling back to a lazy unmount; raise if something is still mounted."""
    for cmd in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        if not is_mounted(mnt):
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            run(cmd, timeout=UNMOUNT_TIMEOUT)
    if is_mounted(mnt):
        raise MountError(f"{mnt} is still mounted after umount -l")


# --- overlayfuse -----------------------------------------------------------------------


@dataclass(slots=True)
class FuseMount:
    """A live overlayfuse mount and what is needed to tear it down and judge it."""

    mnt: Path
    log: Path  # the daemon's stderr, kept in a file: a pipe would keep run() waiting

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def overlayfuse_cmd(mnt: Path, *opts: str, foreground: bool = False,
                    source: str | None = None) -> list[str]:
    binary = overlayfuse_binary()
    if binary is None:
        raise MountError("no overlayfuse binary (is the venv set up?)")
    cmd = [str(binary)]
    if foreground:
        cmd.append("-f")
    for opt in opts:
        cmd += ["-o", opt]
    if source is not None:
        cmd.append(source)
    cmd.append(str(mnt))
    return cmd


@contextlib.contextmanager
def overlayfuse(mnt: Path, lowers: Sequence[Path], upper: Path | None = None,
                work: Path | None = None, extra: Sequence[str] = (),
                log: Path | None = None) -> Iterator[FuseMount]:
    """Mount overlayfuse (detached mode) at `mnt`; always unmount and reap the daemon.

    On a clean exit from the block the daemon's stderr must not contain a traceback:
    an exception that the daemon swallowed into a log line is still a bug.
    """
    mnt.mkdir(parents=True, exist_ok=True)
    log = log or mnt.with_name(mnt.name + ".log")
    fuse = FuseMount(mnt, log)
    cmd = overlayfuse_cmd(mnt, overlay_options(lowers, upper, work), *extra)
    try:
        with open(log, "wb") as err:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                  timeout=MOUNT_TIMEOUT, check=False)
        info = mount_at(mnt)
        if proc.returncode != 0 or info is None or info.fstype != FUSE_FSTYPE:
            raise MountError(
                f"{' '.join(cmd)} exited {proc.returncode}, mount={info}: {fuse.log_text()}"
            )
    except BaseException as exc:
        _teardown_keeping(exc, mnt)
        raise
    try:
        yield fuse
    except BaseException as exc:
        _teardown_keeping(exc, mnt)
        raise
    teardown_overlayfuse(mnt)
    assert "Traceback" not in fuse.log_text(), f"daemon logged a traceback:\n{fuse.log_text()}"


def _teardown_keeping(exc: BaseException, mnt: Path) -> None:
    """Tear down while `exc` propagates: a teardown failure becomes a note on it.

    The test's own failure is the interesting one; the teardown problem is still shown.
    """
    try:
        teardown_overlayfuse(mnt)
    except Exception as teardown_error:
        exc.add_note(f"teardown of {mnt} also failed: {teardown_error!r}")


def teardown_overlayfuse(mnt: Path) -> None:
    """Unmount (clean, then lazy), wait for the daemon to exit, SIGKILL it if it won't.

    Raises MountError if the mount or a daemon process survives all of that.
    """
    pids = daemon_pids(mnt)
    entry = mount_at(mnt)
    busy_with: list[str] = []  # who kept a clean unmount from working, if anyone did
    for cmd in (["fusermount3", "-u", str(mnt)], ["fusermount3", "-u", "-z", str(mnt)],
                ["umount", "-l", str(mnt)]):
        if not is_mounted(mnt):
            break
        if cmd[1:] == ["-u", "-z"]:
            busy_with = holders(mnt)
        with contextlib.suppress(subprocess.TimeoutExpired):
            run(cmd, timeout=UNMOUNT_TIMEOUT)
    leftover = wait_pids_gone(pids, PINNED_CHECK_AFTER)
    pinned = namespaces_holding(entry.dev) if leftover and entry is not None and not is_mounted(mnt) else []
    if pinned:
        # Another mount namespace holds a copy of the mount (see `namespaces_holding`): not the
        # daemon's doing, and it would serve that copy until the namespace ends. Ask it to stop
        # (SIGTERM: its own clean exit; /sys/fs/fuse/connections, where a connection could be
        # aborted, is not mounted on these machines).
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    leftover = wait_pids_gone(leftover, DAEMON_EXIT_TIMEOUT)
    waiting = {pid: thread_waits(pid) for pid in leftover}
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_pids_gone(leftover, DAEMON_EXIT_TIMEOUT)
    if is_mounted(mnt):
        with contextlib.suppress(subprocess.TimeoutExpired):
            run(["umount", "-l", mnt], timeout=UNMOUNT_TIMEOUT)
    if is_mounted(mnt):
        raise MountError(f"{mnt} is still mounted after teardown")
    if leftover:
        raise MountError(f"overlayfuse daemon(s) {leftover} for {mnt} ignored the unmount; "
                         f"its threads were in {waiting}; the mount was held by {busy_with}; "
                         f"other mount namespaces holding it: {pinned}")


def holders(mnt: Path) -> list[str]:
    """Processes whose working directory, root or an open descriptor is inside `mnt`: why a
    clean unmount fails with EBUSY (a lazy one then leaves the daemon serving them)."""
    inside = str(mnt)
    found = []
    for pid in other_pids():
        links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
        with contextlib.suppress(OSError):
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == inside or target.startswith(inside + "/"):
                argv = command_line(pid) or []
                found.append(f"{pid} {' '.join(argv)[:80]!r} {link.rsplit('/', 1)[-1]}={target}")
    return found


def wait_mounted(mnt: Path, proc: subprocess.Popen[bytes] | None = None,
                 timeout: float = MOUNT_TIMEOUT) -> None:
    """Wait until `mnt` is an overlayfuse mount that answers a stat.

    Used for foreground daemons: readiness is the mount appearing in mountinfo, then a
    stat (in a child, so a daemon that never answers costs a timeout, not the suite).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = mount_at(mnt)
        if info is not None and info.fstype == FUSE_FSTYPE:
            run_isolated(os.stat, str(mnt), timeout=max(1.0, deadline - time.monotonic()))
            return
        if proc is not None and proc.poll() is not None:
            raise MountError(f"daemon exited with {proc.returncode} before mounting")
        time.sleep(0.05)
    raise MountError(f"{mnt} not mounted after {timeout}s")


# --- a caller blocked in a FUSE request ---------------------------------------------------

BLOCKED_TIMEOUT = 30.0  # bounds a hang only: a blocked request shows up at once
#: The kernel function a task sleeps in while its FUSE request waits for the daemon's answer.
FUSE_WAIT = "request_wait_answer"


def waits_on_fuse(pid: int) -> bool:
    """Whether a thread of `pid` sleeps waiting for a FUSE daemon's answer (its wchan)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for task in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if Path(f"/proc/{pid}/task/{task}/wchan").read_text().strip() == FUSE_WAIT:
                return True
    return False


def blocked_in_daemon(proc: subprocess.Popen[Any], timeout: float = BLOCKED_TIMEOUT) -> bool:
    """Wait until `proc` has ended (False) or sleeps in a FUSE request the daemon has not
    answered (True): "it is blocked in the daemon", as the kernel sees it, no timing guess."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if waits_on_fuse(proc.pid):
            return proc.poll() is None
        assert time.monotonic() < deadline, f"{proc.args!r} neither ended nor blocked on FUSE"
        time.sleep(0.01)
    return False


#: strace must attach, and the traced action end, within this (a guard against a hang).
STRACE_TIMEOUT = 60.0


def syscalls_during(pid: int, names: Sequence[str], action: Callable[[], None], out: Path) -> int:
    """How many calls of the syscalls NAMES daemon PID (all its threads) makes while ACTION runs,
    counted by strace, whose output goes to OUT."""
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=" + ",".join(names), "-o", str(out), "-p", str(pid)],
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + STRACE_TIMEOUT
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # strace attaches to each thread after creating its output
        action()
    finally:
        tracer.terminate()
        tracer.wait(timeout=STRACE_TIMEOUT)
    return sum(1 for line in out.read_text().splitlines() if any(f"{name}(" in line for name in names))


def mount_syscalls(mnt: Path, names: Sequence[str], action: Callable[[], None], out: Path) -> int:
    """`syscalls_during` of the daemon that serves MNT (there must be exactly one)."""
    pids = daemon_pids(mnt)
    assert len(pids) == 1, pids
    return syscalls_during(pids[0], names, action, out)
