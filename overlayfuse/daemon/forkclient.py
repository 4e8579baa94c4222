"""The ``overlayfuse`` command's first move: hand the mount to a fork server, if one listens.

A daemon in Python pays ~0.13 s for the interpreter, trio and pyfuse3 before it does anything,
and every container start starts one. A fork server (`forkserver`, ``overlayfuse --fork-server``)
has paid that once; this module is the client side, run by the installed command before it
imports anything heavy: it imports only what the interpreter has loaded already or what is built
in (os, socket, marshal, signal, resource). If the socket answers, the request goes there and
this process only waits for the exit status; if there is no server, it refuses us, or it dies
before it took the request on, `run` returns None and the command mounts in this process as it
always did (quietly; with ``-d`` it says why on stderr).

The protocol, on one SOCK_SEQPACKET connection (one message per send, no framing needed):

1. client → server: a marshal'd dict (`PROTOCOL`, argv, environ, umask, rlimits, OOM score
   adjustment) with descriptors (SCM_RIGHTS): stdin, stdout, stderr, cwd, root (O_PATH),
   the user and mount namespaces (`FD_ORDER`).
2. server → client: ``pid N`` with a pidfd of the forked child, or ``refused REASON`` (then EOF).
3. client → server: ``go``. The child does nothing with the request before it: a client that
   timed out waiting for step 2 and closed (then mounts in-process) leaves no second mount behind.
4. server → client: ``exit N`` once the command would have exited (a detached mount: once it
   answers; in the foreground: once unmounted), or ``fallback REASON`` if the child could not
   take the caller's place (e.g. could not enter its namespaces) before doing anything.

The child writes to the caller's own stderr (it has the descriptor), so the text is the
in-process path's; the exit status comes back in step 4.
"""

from __future__ import annotations

import marshal
import os
import socket
import sys

#: ``off`` turns the client off; an absolute path names the socket (default: `default_socket`).
ENV = "OVERLAYFUSE_FORK_SERVER"
PROTOCOL = "overlayfuse-fork/1"
SOCKET_NAME = "fork-server.sock"
ROOT_SOCKET_DIR = "/run/overlayfuse"
#: The descriptors a request carries, in this order.
FD_ORDER = ("stdin", "stdout", "stderr", "cwd", "root", "userns", "mntns")
#: How long the client waits for the server to fork (step 2): a live server answers in
#: milliseconds; past this it is stuck, and the command mounts in-process instead.
ANSWER_TIMEOUT = 10.0
#: The largest message either side reads at once (a request is argv plus environ: a few KiB).
MAX_MESSAGE = 1 << 20


def default_socket(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """Root's server (in the initial user namespace) listens in /run/overlayfuse; anyone else's,
    including a "root" inside a user namespace (rootless podman's mount program), in
    $XDG_RUNTIME_DIR/overlayfuse. None when there is no such directory to look in."""
    if os.geteuid() == 0 and _initial_user_namespace():
        return f"{ROOT_SOCKET_DIR}/{SOCKET_NAME}"
    runtime = environ.get("XDG_RUNTIME_DIR")
    return f"{runtime}/overlayfuse/{SOCKET_NAME}" if runtime and runtime.startswith("/") else None


def _initial_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map", "rb") as f:
            return f.read().split() == [b"0", b"0", b"4294967295"]
    except OSError:
        return True


def socket_path(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The socket the client tries: $OVERLAYFUSE_FORK_SERVER if it is a path, none if it is
    ``off``, else `default_socket`."""
    value = environ.get(ENV, "")
    if value == "off":
        return None
    if value.startswith("/"):
        return value
    return default_socket(environ)


def run(argv: list[str]) -> int | None:
    """Mount through the fork server: the exit status the command must exit with, or None when
    there is no server to take the request (mount in this process then)."""
    path = socket_path(os.environ)
    if path is None:
        return None
    debug = _debug(argv[1:])
    if os.environ.get("NOTIFY_SOCKET"):  # the manager wants READY=1 from the process it started
        _say(debug, "a service manager started us ($NOTIFY_SOCKET): mounting in this process")
        return None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    except OSError as exc:
        _say(debug, f"no socket for the fork server ({exc.strerror}): mounting in this process")
        return None
    with sock:
        try:
            sock.connect(path)
        except OSError as exc:
            _say(debug, f"no fork server at {path} ({exc.strerror or exc}): mounting in this process")
            return None
        return _converse(sock, path, argv, debug)


def _converse(sock: socket.socket, path: str, argv: list[str], debug: bool) -> int | None:
    try:
        fds = _descriptors()
    except OSError as exc:  # no /proc here (a chroot without it): nothing to hand over
        _say(debug, f"cannot open what the fork server needs ({exc.filename}: {exc.strerror}): "
                    "mounting in this process")
        return None
    sock.settimeout(ANSWER_TIMEOUT)
    try:
        socket.send_fds(sock, [_request(argv)], fds)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server refused us at once and hung up: its reason is waiting to be read
    except OSError as exc:
        _say(debug, f"cannot send to the fork server at {path} ({exc.strerror or exc}): mounting in this process")
        return None
    finally:
        for fd in fds[3:]:
            os.close(fd)
    try:
        message, pidfds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
    except OSError as exc:  # TimeoutError too
        _say(debug, f"the fork server at {path} did not answer ({exc.strerror or exc}): mounting in this process")
        return None
    if not message.startswith(b"pid ") or not pidfds:
        reason = message.removeprefix(b"refused ").decode(errors="replace") or "it closed the connection"
        _say(debug, f"the fork server at {path} refused: {reason}; mounting in this process")
        for fd in pidfds:
            os.close(fd)
        return None
    pidfd = pidfds[0]
    try:
        sock.send(b"go")
    except OSError as exc:
        _say(debug, f"the fork server's child went away ({exc.strerror}): mounting in this process")
        os.close(pidfd)
        return None
    _forward_signals(pidfd)
    sock.settimeout(None)  # a foreground mount answers when it is unmounted: no bound here
    try:
        answer = sock.recv(MAX_MESSAGE)
    except OSError as exc:
        answer = f"connection lost: {exc.strerror or exc}".encode()
    if answer.startswith(b"exit "):
        return int(answer[5:])
    if answer.startswith(b"fallback "):
        _say(debug, f"the fork server could not take our place ({answer[9:].decode(errors='replace')}): "
                    "mounting in this process")
        return None
    what = answer.decode(errors="replace") or "it ended without saying how"
    print(f"overlayfuse: error: the fork server's daemon process {message[4:].decode()} failed: {what}",
          file=sys.stderr, flush=True)
    return 1


def _request(argv: list[str]) -> bytes:
    import resource

    umask = os.umask(0o022)
    os.umask(umask)
    limits = {}
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            number = getattr(resource, name)
            try:
                limits[number] = resource.getrlimit(number)
            except (OSError, ValueError):
                pass
    return marshal.dumps({
        "protocol": PROTOCOL,
        "argv": [os.fsencode(a) for a in argv],
        "environ": dict(os.environb),
        "umask": umask,
        "rlimits": limits,
        "oom_score_adj": _read("/proc/self/oom_score_adj"),
    })  # fmt: skip


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _descriptors() -> list[int]:
    """stdin, stdout, stderr (each, if closed here, /dev/null), then new descriptors for the cwd,
    the root and the two namespaces: the caller closes those (`FD_ORDER` gives the order). A
    closed std fd's /dev/null takes that very number (the lowest free), so it stays open for
    the in-process path too, as a daemon would make it anyway. OSError (nothing left open) if
    one cannot be opened."""
    fds = []
    try:
        for fd in (0, 1, 2):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:
                fds.append(os.open(os.devnull, os.O_RDWR))
        for path in ("/proc/self/cwd", "/proc/self/root"):
            fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        for path in ("/proc/self/ns/user", "/proc/self/ns/mnt"):  # setns takes no O_PATH descriptor
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        for fd in fds[3:]:
            os.close(fd)
        raise
    return fds


def _forward_signals(pidfd: int) -> None:
    """What would have stopped the in-process daemon (Ctrl-C on a foreground mount, a TERM from a
    supervisor) goes to the forked one, through its pidfd (immune to pid reuse and to pid
    namespaces)."""
    import signal

    def forward(signum: int, _frame: object) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except OSError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)


def _debug(args: list[str]) -> bool:
    """``-d``/``--debug``/``-o debug`` in ARGS, without the option parser (which is not loaded)."""
    if "-d" in args or "--debug" in args:
        return True
    return any(a == "-o" and i + 1 < len(args) and "debug" in args[i + 1].split(",") for i, a in enumerate(args))


def _say(debug: bool, text: str) -> None:
    if debug:
        print(f"overlayfuse: DEBUG fork server: {text}", file=sys.stderr, flush=True)
