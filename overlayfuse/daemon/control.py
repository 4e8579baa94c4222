"""The daemon's control socket: freeze and thaw the mount, so that a commit sees one moment of it.

``overlayctl commit`` of a running container reads the container's upper dir directly. For what it
captures to be what the mount showed, no change may land while it reads. So the daemon (started
with ``-o control=ADDRESS``) listens on a Unix stream socket, and a client speaks lines:

    client: freeze      daemon: frozen     (no change is admitted now; those in flight have finished)
    client: thaw        daemon: thawed
    client: ping        daemon: pong

The freeze lasts as long as the client's connection: when it sends ``thaw``, closes, or dies (even
by ``kill -9``: the kernel closes its socket), the daemon thaws. So a killed ``overlayctl commit``
can never leave a mount frozen. Several clients may hold a freeze at once; the mount thaws when the
last one lets go.

The freeze is a gate (`FreezeGate`) that every change request passes (fs.py marks them): namespace
changes, writes, setattr, xattr changes, and opens that copy up or truncate. Reads, lookups and
listings never pass it, so the mount stays readable while frozen. A change that arrives during a
freeze waits in the daemon (its caller blocks in the syscall) and proceeds at the thaw.

Two limits come from outside the daemon. The kernel holds a directory's lock while a create, unlink
or rename in it waits for us, so a lookup the kernel has not cached, or a listing, *of that same
directory* waits too (cached lookups, reads and other directories do not); and each waiting change
holds one of the daemon's request tasks (`daemon.MAX_REQUEST_TASKS`). A freeze lasts as long as
writing the upper dir's tar takes, so both are brief.

An ADDRESS that starts with ``@`` is in the abstract namespace: no file, no 108-byte path limit
worth worrying about for long store paths, gone when the daemon exits. Anyone may connect to an
abstract socket, so the daemon answers only root and its own user (SO_PEERCRED).

This module is the protocol on both sides: the trio server for the daemon, and `frozen`, a plain
blocking client for ``overlayctl``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Iterator
from types import TracebackType

import trio

from ..linux.sockets import is_abstract, sockaddr

log = logging.getLogger(__name__)

#: Longest command line a client may send; anything longer is not a client of ours.
MAX_LINE = 64
#: How long a client waits for "frozen": changes in flight must finish first (a big copy-up can take
#: a while), but a daemon that never answers must not hang overlayctl for ever.
FREEZE_TIMEOUT = 120.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(Exception):
    """The control socket could not be reached or answered wrongly: one line for the user."""


# -- the gate -------------------------------------------------------------------------------------


class FreezeGate:
    """Admits changes unless frozen; `freeze` returns once every admitted change has finished.

    Enter it around a whole request (``async with gate:``), never around part of one from inside
    another: a request that already holds a place and waits for a second would wait for the thaw
    while the freeze waits for it.
    """

    def __init__(self) -> None:
        self._freezers = 0
        self._in_flight = 0
        self._thawed = trio.Event()
        self._thawed.set()
        self._idle: trio.Event | None = None  # made only by a freeze that waits for changes in flight

    @property
    def frozen(self) -> bool:
        return self._freezers > 0

    async def __aenter__(self) -> None:
        while self._freezers:
            await self._thawed.wait()
        # No checkpoint between the test above and this count: trio cannot switch tasks here.
        self._in_flight += 1

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def freeze(self) -> None:
        """Stop admitting changes and wait for those in flight. Pair every call with `thaw`."""
        self._freezers += 1
        if self._freezers == 1:
            self._thawed = trio.Event()
        try:
            if self._in_flight:
                if self._idle is None:
                    self._idle = trio.Event()
                await self._idle.wait()
        except BaseException:
            self.thaw()
            raise

    def thaw(self) -> None:
        self._freezers -= 1
        if self._freezers == 0:
            self._thawed.set()


# -- the daemon's side ----------------------------------------------------------------------------


def bind(address: str) -> socket.socket:
    """A listening socket at ADDRESS, made before the mount so that a clash fails the mount early.

    A socket file left by a dead daemon is replaced; a live one (someone answers) is an error.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if not is_abstract(address) and os.path.exists(address):
            if _answers(address):
                raise OSError(errno.EADDRINUSE, "another daemon serves this control socket", address)
            os.unlink(address)
        sock.bind(sockaddr(address))
        if not is_abstract(address):
            os.chmod(address, 0o600)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


def _answers(address: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(sockaddr(address))
        except OSError:
            return False
    return True


async def serve(sock: socket.socket, address: str, gate: FreezeGate) -> None:
    """Accept clients on SOCK until cancelled; each one's freeze ends with its connection."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    log.info("control socket at %s", address)
    try:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_client, stream, gate)
    finally:
        with contextlib.suppress(OSError):
            await listener.aclose()
        if not is_abstract(address):
            with contextlib.suppress(OSError):
                os.unlink(address)


def _peer_allowed(stream: trio.SocketStream) -> bool:
    raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _ = _UCRED.unpack(raw)
    if uid in (0, os.geteuid()):
        return True
    log.warning("control socket: refused pid %d (uid %d)", pid, uid)
    return False


async def _serve_client(stream: trio.SocketStream, gate: FreezeGate) -> None:
    holding = False
    try:
        async with stream:
            if not _peer_allowed(stream):
                await stream.send_all(b"error not allowed\n")
                return
            buffer = b""
            while True:
                data = await stream.receive_some(MAX_LINE)
                if not data:
                    return  # closed or died: the finally below thaws
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    command = line.strip().decode(errors="replace")
                    if command == "freeze":
                        if not holding:
                            await gate.freeze()
                            holding = True
                            log.info("frozen for a client of the control socket")
                        await stream.send_all(b"frozen\n")
                    elif command == "thaw":
                        if holding:
                            gate.thaw()
                            holding = False
                            log.info("thawed")
                        await stream.send_all(b"thawed\n")
                    elif command == "ping":
                        await stream.send_all(b"pong\n")
                    else:
                        await stream.send_all(b"error unknown command\n")
                if len(buffer) > MAX_LINE:
                    await stream.send_all(b"error line too long\n")
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("control client went away: %s", exc)
    finally:
        if holding:
            gate.thaw()
            log.info("thawed: the freezing client disconnected")


# -- the client's side (plain blocking code, for overlayctl) --------------------------------------


def _request(sock: socket.socket, command: str, expect: str, address: str) -> None:
    sock.sendall(command.encode() + b"\n")
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = sock.recv(MAX_LINE)
        if not chunk:
            raise ControlError(f"control socket {address}: the daemon closed the connection on {command!r}")
        answer += chunk
    text = answer.decode(errors="replace").strip()
    if text != expect:
        raise ControlError(f"control socket {address}: {command!r} answered {text!r}")


@contextlib.contextmanager
def frozen(address: str, timeout: float = FREEZE_TIMEOUT) -> Iterator[None]:
    """Hold the mount served at ADDRESS frozen for the duration of the block."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr(address))
            _request(sock, "freeze", "frozen", address)
        except TimeoutError:
            raise ControlError(f"control socket {address}: the mount did not freeze within {timeout:.0f} s") from None
        except OSError as exc:
            raise ControlError(f"control socket {address}: {exc.strerror or exc}") from None
        yield
        # Closing alone would thaw too; asking first means the thaw is done when we return.
        with contextlib.suppress(OSError, ControlError):
            _request(sock, "thaw", "thawed", address)
    finally:
        sock.close()


def ping(address: str, timeout: float = 5.0) -> bool:
    """Whether a daemon answers at ADDRESS."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr(address))
            _request(sock, "ping", "pong", address)
        except (OSError, ControlError):
            return False
    return True
