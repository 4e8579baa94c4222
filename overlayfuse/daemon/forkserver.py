"""``overlayfuse --fork-server``: a process that has imported the daemon once and forks one per mount.

A mount started from a fresh interpreter pays ~0.13 s for the interpreter, trio and pyfuse3 on
this project's 2-core VM before it does anything; a container start pays it once per container.
This server imports everything the daemon needs (with the collector off, then frozen, as the
command does), starts no thread and no event loop (a fork copies only the calling thread, and
entering a user namespace needs a single-threaded process), and listens on a Unix socket
(`forkclient.default_socket`: /run/overlayfuse for root, $XDG_RUNTIME_DIR/overlayfuse for anyone
else). The installed command (`forkclient`) sends its request there; per request this process
forks, and the child takes the caller's place (`become_caller`: rlimits, OOM score, user and mount
namespace, root, cwd, umask, environment, stdio, a new session) and runs the very same
`cli.main` as the in-process path, so options, errors, the foreground and detached paths and
readiness are the in-process path's own. The server reaps its children and never waits on one.

Who may use it: only a peer whose effective uid (SO_PEERCRED, as seen from the server's user
namespace) is the server's own, and which holds at least what a fork of the server would hold
and could not take from it (capabilities, bounding set, no_new_privs, seccomp, LSM label:
`linux.peers`); the socket is 0600 in a 0700 directory besides. Such a peer could run
``overlayfuse`` itself with the same rights. See the README's "Fork server" section.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import marshal
import os
import resource
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn

from ..linux.journal import configure_logging, print_error
from ..linux.libc import pthread_in_libc
from ..linux.namespaces import enter_namespaces, enter_root_and_cwd
from ..linux.peers import Privileges, lacks, peer_of, peer_privileges, privileges_of
from . import forkclient, timeline
from .notify import notify

log = logging.getLogger(__name__)

#: Connections waiting to be accepted; each is served in a fork, so a short queue is plenty.
BACKLOG = 64
#: How long a refused client's request is waited for (see `_dispatch`): it sends at once.
REFUSAL_DRAIN = 0.5
#: After a failed accept (EMFILE...): a pause, so that a lasting cause does not spin the loop.
ACCEPT_RETRY = 0.1


class ForkServerError(Exception):
    """The server cannot start (socket path taken, directory not ours...): one line for the user."""


@dataclass(frozen=True, slots=True)
class Request:
    """What a caller sent (`forkclient._request`), with its descriptors in `forkclient.FD_ORDER`."""

    argv: list[bytes]
    environ: dict[bytes, bytes]
    umask: int
    rlimits: dict[int, tuple[int, int]]
    oom_score_adj: bytes | None
    fds: dict[str, int]


def main(argv: list[str]) -> int:
    """``overlayfuse --fork-server [--socket PATH] [-d]``: serve until SIGTERM, SIGINT or SIGHUP."""
    parser = argparse.ArgumentParser(prog="overlayfuse --fork-server",
                                     description="Fork a daemon per mount, with the imports done once.")
    parser.add_argument("--socket", metavar="PATH",
                        help=f"listen here (default: /run/overlayfuse/{forkclient.SOCKET_NAME} as root, "
                             f"$XDG_RUNTIME_DIR/overlayfuse/{forkclient.SOCKET_NAME} otherwise)")
    parser.add_argument("-d", "--debug", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    configure_logging("overlayfuse", logging.DEBUG if args.debug else logging.INFO)
    path = args.socket or forkclient.default_socket(os.environ)
    if path is None:
        print_error("overlayfuse", "--fork-server: $XDG_RUNTIME_DIR is not set: give --socket PATH")
        return 2
    if not os.path.isabs(path):
        print_error("overlayfuse", f"--fork-server: --socket {path}: give an absolute path (clients find it by it)")
        return 2
    _import_daemon()
    try:
        listener = listen(path, default=args.socket is None)
    except ForkServerError as exc:
        print_error("overlayfuse", f"--fork-server: {exc}")
        return 1
    log.info("fork server listening on %s", path)
    notify("READY=1", f"STATUS=forking daemons for {path}", f"MAINPID={os.getpid()}")
    try:
        serve(listener.sock)
    finally:
        listener.close()
    return 0


def _import_daemon() -> None:
    """Everything a mount imports, now, once: the children inherit it. Also what the daemon
    imports only on some paths (syslog for a detached daemon, difflib for a typo), since a child
    may be chrooted where this venv is not. Then the imports' objects are frozen, out of the
    collector's sight (the children enable the collector, as the command does after its imports)."""
    with pthread_in_libc():
        from . import mount  # noqa: F401  (trio, pyfuse3, the overlay tree)
    import difflib  # noqa: F401
    import logging.handlers  # noqa: F401

    _warm_up()
    gc.freeze()
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("the fork server must be single-threaded, and an import started a thread")


@dataclass(frozen=True, slots=True)
class Listener:
    """The listening socket and the file it is bound to (its inode: to remove only our own)."""

    sock: socket.socket
    path: str
    inode: int

    def close(self) -> None:
        """Close, and remove the socket file if it is still ours (not one a later server put there)."""
        self.sock.close()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self.inode:
                os.unlink(self.path)


def _warm_up() -> None:
    """Run once, here, what every mount runs first and that is slow only the first time in a
    process: the option parser (argparse's parser, its message lookups, the regular expressions),
    and an event loop's start (trio's run machinery). Neither leaves a thread, a descriptor or a
    handler behind (checked after, with the thread count)."""
    import trio

    from .options import parse_args

    parse_args(["-o", "lowerdir=/l1:/l2,upperdir=/u,workdir=/w,volatile", "/m"])
    trio.run(trio.sleep, 0)


def listen(path: str, *, default: bool) -> Listener:
    """A listening SOCK_SEQPACKET socket at PATH, mode 0600. Its directory is made 0700 if missing;
    the default directory must be ours and is kept 0700. A stale socket (nobody answering) is
    replaced; a live one is another server's: an error."""
    directory = os.path.dirname(path)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ForkServerError(f"{directory} is not a directory")
    if default:
        if st.st_uid != os.geteuid():
            raise ForkServerError(f"{directory} belongs to uid {st.st_uid}, not to us ({os.geteuid()})")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(directory, 0o700)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # born 0600: no moment when another user could connect
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ForkServerError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    sock.listen(BACKLOG)
    return Listener(sock, path, os.lstat(path).st_ino)


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ForkServerError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left by a server that died
            return
        except OSError as exc:
            raise ForkServerError(f"{path}: {exc.strerror or exc}") from None
    raise ForkServerError(f"another fork server is listening on {path}")


class _Stop(Exception):
    pass


def serve(listener: socket.socket) -> None:
    """Accept, check the peer, fork; reap children as they end (SIGCHLD). Until a stop signal."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    ours = privileges_of("self")
    signal.signal(signal.SIGCHLD, _reap)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:  # out of descriptors, a connection aborted: not the server's end
                log.warning("cannot accept a client: %s", exc.strerror or exc)
                time.sleep(ACCEPT_RETRY)
                continue
            try:
                _dispatch(listener, conn, ours)
            except OSError as exc:  # fork failed (EAGAIN, ENOMEM): the client hears EOF, mounts alone
                log.warning("cannot serve a client: %s", exc.strerror or exc)
            finally:
                conn.close()
    except _Stop as exc:
        log.info("%s: fork server stopping (mounts it started keep running)", exc)


def _reap(_signum: int, _frame: FrameType | None) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        log.debug("daemon process %d ended: status %d", pid, os.waitstatus_to_exitcode(status))


def refusal(conn: socket.socket, ours: Privileges) -> str | None:
    """Why the peer on CONN may not have a daemon forked for it; None if it may. Only our own
    user, and only a process that holds at least what a fork of ours would (`peers.lacks`)."""
    peer = peer_of(conn)
    if peer.uid != os.geteuid():
        return f"uid {peer.uid} is not the fork server's ({os.geteuid()}): it serves only its own user"
    try:
        theirs = peer_privileges(conn, peer)
    except OSError as exc:
        return f"cannot read the privileges of pid {peer.pid}: {exc.strerror or exc}"
    lacking = lacks(theirs, ours)
    return None if lacking is None else f"pid {peer.pid} holds less than a daemon forked for it would: {lacking}"


def _dispatch(listener: socket.socket, conn: socket.socket, ours: Privileges) -> None:
    reason = refusal(conn, ours)
    if reason is not None:
        log.warning("refused a client: %s", reason)
        with contextlib.suppress(OSError):
            conn.send(b"refused " + reason.encode())
            # Read (and drop, descriptors too) the request it sent: closing with it unread would
            # reset the connection, and the client would lose the reason with it.
            conn.settimeout(REFUSAL_DRAIN)
            conn.recv(forkclient.MAX_MESSAGE)
        return
    for stream in (sys.stdout, sys.stderr):  # or the child would write our buffered text again
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    pid = os.fork()
    if pid == 0:
        _child(listener, conn)
    log.debug("forked daemon process %d", pid)


def _child(listener: socket.socket, conn: socket.socket) -> NoReturn:
    """The forked child: take the request, become the caller, run the command; never returns."""
    status = 1
    try:
        listener.close()
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        status = _take_over(conn)
    except BaseException as exc:  # the caller must hear something before we end
        with contextlib.suppress(OSError):
            conn.send(f"the fork server's child failed: {type(exc).__name__}: {exc}".encode())
    os._exit(status)


def _take_over(conn: socket.socket) -> int:
    conn.settimeout(forkclient.ANSWER_TIMEOUT)
    message, fds, _, _ = socket.recv_fds(conn, forkclient.MAX_MESSAGE, len(forkclient.FD_ORDER))
    try:
        request = parse_request(message, fds)
    except ValueError as exc:
        for fd in fds:
            os.close(fd)
        conn.send(f"refused {exc}".encode())
        return 1
    pidfd = os.pidfd_open(os.getpid())
    socket.send_fds(conn, [b"pid %d" % os.getpid()], [pidfd])
    os.close(pidfd)
    if conn.recv(16) != b"go":  # the caller gave up waiting and mounts in its own process
        return 0
    conn.settimeout(None)
    try:
        become_caller(request)
    except OSError as exc:
        conn.send(f"fallback {exc}".encode())
        return 1
    # A detached mount forks its daemon: that one must not hold the caller's connection.
    os.register_at_fork(after_in_child=conn.close)
    from . import cli

    def report(status: int) -> None:
        for stream in (sys.stdout, sys.stderr):  # the caller exits on hearing: its output first
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        with contextlib.suppress(OSError):
            conn.send(b"exit %d" % status)

    try:
        status = cli.main([os.fsdecode(a) for a in request.argv[1:]], report=report)
    except SystemExit as exc:  # --help and --version end in argparse's exit, as in-process
        status = _exit_code(exc)
    report(status)
    return status


def _exit_code(exc: SystemExit) -> int:
    """The status the interpreter would exit with for EXC (a message is printed to stderr, as it would be)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def parse_request(message: bytes, fds: list[int]) -> Request:
    """The caller's request, checked for shape (the caller is our own user: this guards against
    a client of another version, not an attacker). ValueError says what is wrong."""
    if len(fds) != len(forkclient.FD_ORDER):
        raise ValueError(f"{len(fds)} descriptors, not {len(forkclient.FD_ORDER)}")
    try:
        body = marshal.loads(message)
    except (EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"unreadable request: {exc}") from None
    if not isinstance(body, dict) or body.get("protocol") != forkclient.PROTOCOL:
        raise ValueError(f"not a {forkclient.PROTOCOL} request")
    try:
        return Request(argv=list(body["argv"]), environ=dict(body["environ"]), umask=int(body["umask"]),
                       rlimits=dict(body["rlimits"]), oom_score_adj=body.get("oom_score_adj"),
                       fds=dict(zip(forkclient.FD_ORDER, fds, strict=True)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed request: {exc!r}") from None


def become_caller(request: Request) -> None:
    """Take the caller's place, in this order: its user and mount namespaces, root and cwd; then
    resource limits and OOM score, with only the privileges held there (the values are the
    caller's word: in its user namespace the server's capabilities are gone, so a limit is
    raised, or the score lowered, only as far as the caller itself could); umask, environment
    and arguments; its stdin, stdout and stderr; a session of our own. OSError if a namespace or
    directory cannot be entered (the caller then mounts in its own process); limits and score
    are copied as far as we may."""
    fds = request.fds
    enter_namespaces(fds["userns"], fds["mntns"])
    enter_root_and_cwd(fds["root"], fds["cwd"])
    _copy_limits(request.rlimits)
    if request.oom_score_adj is not None:
        _write_quietly("/proc/self/oom_score_adj", request.oom_score_adj)
    os.umask(request.umask)
    os.environ.clear()
    os.environb.update(request.environ)
    timeline.reread()
    sys.argv = [os.fsdecode(a) for a in request.argv]
    for target, name in enumerate(("stdin", "stdout", "stderr")):
        os.dup2(fds[name], target)
    for fd in fds.values():
        if fd > 2:
            os.close(fd)
    os.setsid()


def _copy_limits(limits: dict[int, tuple[int, int]]) -> None:
    for number, (soft, hard) in limits.items():
        try:
            resource.setrlimit(number, (soft, hard))
        except (OSError, ValueError) as exc:  # a hard limit above ours needs CAP_SYS_RESOURCE
            log.debug("rlimit %d: cannot copy the caller's (%d, %d): %s", number, soft, hard, exc)


def _write_quietly(path: str, value: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)
    except OSError as exc:  # lowering it needs CAP_SYS_RESOURCE
        if exc.errno not in (errno.EACCES, errno.EPERM):
            log.debug("%s: %s", path, exc)

