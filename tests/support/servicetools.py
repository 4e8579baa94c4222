"""What the service tests share: a service manager's notify socket, and daemons with teardown.

`NotifyListener` is the manager's end of sd_notify: a datagram socket that records who said what.
Like systemd's, it has SO_PASSCRED on, so each message arrives with the sender's pid as the kernel
saw it: a test can check that READY=1 came from the process it started (what ``NotifyAccess=main``
requires), not from a child or a wrapper.

`daemon` starts a command that becomes a foreground overlayfuse (``overlayfuse -f`` or
``overlayctl service run``) and always unmounts and reaps it; `faultfs` mounts `tests.support.faultfs`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.mounts import (
    DAEMON_EXIT_TIMEOUT,
    MOUNT_TIMEOUT,
    REPO_ROOT,
    UNMOUNT_TIMEOUT,
    mount_at,
    run,
    teardown_overlayfuse,
)

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class Message:
    fields: tuple[str, ...]
    pid: int
    at: float  # time.monotonic() when it was received

    def has(self, field: str) -> bool:
        return field in self.fields

    def value(self, key: str) -> str | None:
        for field in self.fields:
            if field.startswith(key + "="):
                return field.split("=", 1)[1]
        return None


class NotifyListener:
    """Bound to a path (``NotifyListener(path=...)``) or an abstract name (``abstract=...``)."""

    def __init__(self, *, path: Path | None = None, abstract: str | None = None) -> None:
        assert (path is None) != (abstract is None)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if path is not None:
            self.sock.bind(str(path))
            self.address = str(path)
        else:
            assert abstract is not None
            self.sock.bind(b"\0" + abstract.encode())
            self.address = "@" + abstract
        self.messages: list[Message] = []

    def env(self) -> dict[str, str]:
        """The environment of a process that should talk to this listener."""
        return {**os.environ, "NOTIFY_SOCKET": self.address}

    def pending(self) -> list[Message]:
        """Every message queued on the socket now, without waiting: after a sender has exited,
        or once a `mark` has been received, this holds everything it sent before."""
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data, ancillary, _flags, _addr = self.sock.recvmsg(
                        4096, socket.CMSG_SPACE(_CREDENTIALS.size))
                except BlockingIOError:
                    return got
                got.append(self._record(data, ancillary))
        finally:
            self.sock.setblocking(True)

    def mark(self) -> None:
        """Queue a MARK=1 message of the test's own: a datagram socket keeps order, so whatever
        a daemon sends after this call is received after the mark, and anything received
        before it was sent before."""
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sender:
            sender.sendto(b"MARK=1", target)

    def receive(self, timeout: float) -> Message | None:
        """The next message, or None if none came within TIMEOUT seconds."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
        except TimeoutError:
            return None
        return self._record(data, ancillary)

    def _record(self, data: bytes, ancillary: list[tuple[int, int, bytes]]) -> Message:
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
        message = Message(tuple(data.decode().split("\n")), pid, time.monotonic())
        self.messages.append(message)
        return message

    def wait_for(self, field: str, timeout: float) -> Message:
        """Receive until a message has FIELD (e.g. ``READY=1``); AssertionError after TIMEOUT."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None and message.has(field):
                return message
        raise AssertionError(f"no {field} within {timeout}s; got {[m.fields for m in self.messages]}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class Daemon:
    proc: subprocess.Popen[bytes]
    mnt: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float = DAEMON_EXIT_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)


@contextlib.contextmanager
def daemon(cmd: Sequence[str | os.PathLike[str]], mnt: Path, env: dict[str, str] | None = None,
           log: Path | None = None) -> Iterator[Daemon]:
    """Start CMD (which ends up serving MNT in the foreground) with its stderr in LOG; afterwards
    MNT is unmounted and the process reaped, whatever happened."""
    log = log or mnt.with_name(mnt.name + ".log")
    with open(log, "wb") as err:
        proc = subprocess.Popen([os.fspath(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=err,
                                stderr=err, env=env, cwd="/")
    try:
        yield Daemon(proc, mnt, log)
    finally:
        try:
            teardown_overlayfuse(mnt)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=DAEMON_EXIT_TIMEOUT)


def wait_fstype(mnt: Path, fstype: str, proc: subprocess.Popen[bytes] | None = None,
                timeout: float = MOUNT_TIMEOUT) -> None:
    """Wait until MNT shows in the mount table as FSTYPE (without touching MNT itself)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = mount_at(mnt)
        if info is not None and info.fstype == fstype:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode} before {mnt} was mounted")
        time.sleep(0.02)
    raise AssertionError(f"{mnt} not mounted as {fstype} after {timeout}s")


@contextlib.contextmanager
def faultfs(control: Path, mnt: Path, hold_while_mounted: Path | None = None) -> Iterator[Path]:
    """Mount `tests.support.faultfs` on MNT (see there); always released, unmounted and reaped after."""
    control.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "tests.support.faultfs", str(control), str(mnt)]
    if hold_while_mounted is not None:
        cmd.append(str(hold_while_mounted))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_fstype(mnt, "fuse.faultfs", proc)
        yield mnt
    finally:
        (control / "release").touch()
        for command in (["fusermount3", "-u", str(mnt)], ["fusermount3", "-u", "-z", str(mnt)]):
            if mount_at(mnt) is None:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                run(command, timeout=UNMOUNT_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=DAEMON_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
