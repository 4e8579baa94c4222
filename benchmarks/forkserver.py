"""The ``overlayfuse-fs`` target: overlayfuse with its fork server running (issue 20).

A mount through the fork server skips the interpreter's start and the daemon's imports; the
target is opt-in (``--targets ...,overlayfuse-fs``) and measured beside the cold one in the same
run. The bench starts one server for the whole run, on a socket of its own under a short /run
dir (never the default path, which another engineer's overlayfuse would find), and points each
mount command and each podman at it with ``OVERLAYFUSE_FORK_SERVER``; the cold ``overlayfuse``
target gets ``OVERLAYFUSE_FORK_SERVER=off``, so a server someone else runs never makes it warm.
The server is stopped and its directory removed at the end, on failure too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BenchError
from .mounting import log_text, spawn
from .settings import MOUNT_TIMEOUT, VENV_BIN

TARGET = "overlayfuse-fs"
ENV = "OVERLAYFUSE_FORK_SERVER"
#: The server needs ~0.2 s to import the daemon; this bounds a server that never listens.
START_TIMEOUT = MOUNT_TIMEOUT
STOP_TIMEOUT = 10.0


def environment(target: str, socket_path: str | None) -> dict[str, str]:
    """What TARGET's mount command (or podman) needs in its environment."""
    if target == TARGET:
        if socket_path is None:
            raise BenchError(f"{TARGET}: no fork server is running")
        return {ENV: socket_path}
    if target == "overlayfuse":
        return {ENV: "off"}
    return {}


@dataclass(frozen=True, slots=True)
class ForkServer:
    socket: str
    log: Path

    def forks(self) -> int:
        """How many daemons it forked so far (it runs with -d, which logs each): the report's
        proof that the overlayfuse-fs target's mounts went through it."""
        return log_text(self.log).count("forked daemon process")


@contextlib.contextmanager
def running(targets: Sequence[str]) -> Iterator[ForkServer | None]:
    """A fork server for the run, if TARGET is among TARGETS (else None)."""
    if TARGET not in targets:
        yield None
        return
    base = Path(tempfile.mkdtemp(prefix="ofb-fs-", dir="/run" if os.path.isdir("/run") else None))
    path = str(base / "fork-server.sock")
    proc = spawn([str(VENV_BIN / "overlayfuse"), "--fork-server", "--socket", path, "-d"], base / "server.log")
    try:
        _wait_listening(path, proc, base / "server.log")
        yield ForkServer(path, base / "server.log")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def _wait_listening(path: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(path)
                return  # the server forks a child for this probe; it gives up when we close
            except OSError:
                pass
        if proc.poll() is not None:
            raise BenchError(f"the fork server exited {proc.returncode}: {log_text(log)[-300:].strip()}")
        if time.monotonic() > deadline:
            raise BenchError(f"the fork server did not listen on {path} within {START_TIMEOUT:.0f} s")
        time.sleep(0.05)
