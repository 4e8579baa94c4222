"""Filesystem calls in a child process, killed on timeout, so a hung mount fails a sequence
instead of freezing the suite."""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.support.mounts import REPO_ROOT

WORKER_TIMEOUT = 30.0  # one call; the slowest is a snapshot of a few MiB on two busy cores

_WORKER_BOOTSTRAP = """
import importlib, os, pickle, struct, sys
sys.path.insert(0, sys.argv[1])
if len(sys.argv) < 3:
    os.chdir("/")  # a long-lived worker never holds a mount busy between calls
os.umask(0o022)
out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # a stray print must not corrupt the protocol
inp = sys.stdin.buffer
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    module, name, args = pickle.loads(inp.read(struct.unpack("<Q", head)[0]))
    try:
        outcome = ("ok", getattr(importlib.import_module(module), name)(*args))
    except BaseException as exc:
        outcome = ("raised", exc)
    body = pickle.dumps(outcome)
    out.write(struct.pack("<Q", len(body)) + body)
    out.flush()
"""


class WorkerHung(RuntimeError):
    """A call did not answer within WORKER_TIMEOUT: the worker was killed."""


#: The unprivileged caller of the permission and set-id operations, and how it is made.
USER_UID = USER_GID = 1000
SETPRIV = ("setpriv", f"--reuid={USER_UID}", f"--regid={USER_GID}", "--clear-groups")


class Worker:
    """A child process that runs module-level functions; SIGKILLed if a call hangs.

    A process stuck in a FUSE request dies on SIGKILL, a thread would not.  A worker without
    `cwd` is long-lived and keeps no working directory on any mount between calls (operations
    that hold descriptors are closed by the caller before an unmount).  A worker with `cwd`
    starts there (chdir as root, before `prefix` drops privileges: the unprivileged caller
    cannot traverse pytest's 0700 tmp dir) and must be closed before that mount is unmounted.
    """

    def __init__(self, prefix: tuple[str, ...] = (), cwd: str | None = None) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._prefix = prefix
        self._cwd = cwd
        self._pending: str | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            extra = [] if self._cwd is None else ["stay"]
            self._proc = subprocess.Popen(
                [*self._prefix, sys.executable, "-c", _WORKER_BOOTSTRAP, str(REPO_ROOT), *extra],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                cwd=self._cwd,
            )
        return self._proc

    def submit(self, func: Callable[..., Any], *args: Any) -> None:
        """Send a call without waiting: several workers then run at the same time."""
        assert self._pending is None, "one call at a time per worker"
        proc = self._start()
        assert proc.stdin is not None
        body = pickle.dumps((func.__module__, func.__qualname__, args))
        self._pending = f"{func.__qualname__}{args!r}"
        try:
            proc.stdin.write(struct.pack("<Q", len(body)) + body)
            proc.stdin.flush()
        except BrokenPipeError as exc:
            self._pending = None
            self.close()
            raise WorkerHung(f"{func.__qualname__}{args!r}: worker died") from exc

    def result(self, timeout: float = WORKER_TIMEOUT) -> Any:
        """The answer to the submitted call (re-raising what it raised)."""
        proc = self._proc
        what, self._pending = self._pending, None
        assert proc is not None and what is not None, "result() without submit()"
        try:
            deadline = time.monotonic() + timeout
            head = self._read(proc, 8, deadline)
            status, value = pickle.loads(self._read(proc, struct.unpack("<Q", head)[0], deadline))
        except (WorkerHung, EOFError) as exc:
            self.close()
            raise WorkerHung(f"{what}: {exc or 'no answer'}") from exc
        if status == "raised":
            raise value
        return value

    def call(self, func: Callable[..., Any], *args: Any, timeout: float = WORKER_TIMEOUT) -> Any:
        self.submit(func, *args)
        return self.result(timeout)

    @staticmethod
    def _read(proc: subprocess.Popen[bytes], size: int, deadline: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        data = b""
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise WorkerHung(f"no answer within {WORKER_TIMEOUT}s: is a mount hung?")
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise EOFError("worker died")
            data += chunk
        return data

    def close(self) -> None:
        self._pending = None
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()
            self._proc = None


@dataclass(slots=True)
class Workers:
    """One worker for each side."""

    kernel: Worker = field(default_factory=Worker)
    ours: Worker = field(default_factory=Worker)

    def close(self) -> None:
        self.kernel.close()
        self.ours.close()
