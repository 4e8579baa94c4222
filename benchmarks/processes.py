"""Running commands: whole process groups killed on timeout or interruption, sync, drop_caches."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import BenchError, say
from .settings import SYNC_TIMEOUT


def run(cmd: Sequence[str | os.PathLike[str]], timeout: float, *, capture: bool = True,
        check: bool = True, stdin: Any = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run in its own session; on timeout or interruption kill the whole process group.
    ENV: variables added to ours for this command.

    A pipeline (`bash -c 'tar ... | wc'`) is killed as a whole, so no orphan keeps a
    mount busy.  A process stuck in a FUSE request dies on SIGKILL.
    """
    args = [os.fspath(c) for c in cmd]
    proc = subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE if capture else
                            subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env=None if env is None else os.environ | env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        kill_groups([proc])
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise BenchError(f"{shlex.join(args)} took more than {timeout:.0f} s: killed") from None
        raise
    result = subprocess.CompletedProcess(args, proc.returncode, out or b"", err or b"")
    if check and proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise BenchError(f"{shlex.join(args)} exited {proc.returncode}: {' / '.join(tail)}")
    return result


def kill_groups(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGKILL each process's whole session (started with start_new_session) and reap it."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def timed(cmd: Sequence[str | os.PathLike[str]], timeout: float, env: dict[str, str] | None = None) -> float:
    """Wall time of one command, which must succeed."""
    start = time.perf_counter()
    run(cmd, timeout, capture=False, env=env)
    return time.perf_counter() - start


def bash(script: str, *args: str | os.PathLike[str]) -> list[str]:
    """A bash -c command line with pipefail; arguments are $1, $2, ... (never interpolated)."""
    return ["bash", "-c", "set -o pipefail; " + script, "bench", *[os.fspath(a) for a in args]]


def sync(timeout: float = SYNC_TIMEOUT) -> None:
    try:
        run(["sync"], timeout)
    except BenchError as exc:
        say(f"warning: {exc}")


def drop_caches() -> None:
    sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
