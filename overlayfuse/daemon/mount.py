"""Mount lifecycle: mount, detach, announce readiness, serve, and unmount cleanly.

Readiness means "the mount answers", not "mount(2) returned": after the kernel mount, a worker
thread stats the mountpoint, which the event loop must serve; only then (and once the mount's
readahead window is widened, see `readahead`) is the caller told. So a
script (or mount(8)) can use the mount the moment ``overlayfuse`` returns.

Detaching forks before any thread or event loop exists. The parent waits on a pipe for one word
from the child, "ready" or an error line, and exits 0 or 1 with it; the child starts its own
session, and drops the caller's stdio so that ``$(overlayfuse ...)`` or a captured pipe does not wait
for the daemon to end.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio

from ..overlay.layers import LayerStack
from ..overlay.merged import MergedTree
from ..overlay.upper import UpperDir
from ..overlay.workers import HandoffTimes, HopStats, Workers
from . import binding, control, inuse, killpriv, owners, passthrough, polling, readahead, timeline
from .fs import OverlayOperations
from .notify import notify
from .options import MountOptions

log = logging.getLogger(__name__)

#: pyfuse3 starts another request task whenever all are busy, up to this many. Each waits on a thread
#: at most, so this bounds concurrency, not CPU.
MAX_REQUEST_TASKS = 64

_READY = b"ready\n"


class MountError(Exception):
    """The mount itself failed (after the options were valid): one line for the user."""


def _raise_descriptor_limit() -> None:
    """Hold as many directories open as the system lets us: every directory the kernel knows is held
    by descriptor (`layers.Branch`). The soft limit goes to the hard one, and as root the hard one
    to the kernel's maximum (fs.nr_open). Out of descriptors, directories are held by name instead."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
        return
    except (OSError, ValueError):
        pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(options: MountOptions, on_ready: Callable[[], None]) -> None:
    """Mount, call ON_READY once the mount answers, and serve until unmounted or signalled."""
    timeline.mark("serve: started")
    _raise_descriptor_limit()
    # Symlinks in the layer paths are followed once, here, as mount(8) resolves them (containers-storage
    # passes lowerdir=.../l/SHORT, a symlink to the layer): layers are then held without following any.
    stack = LayerStack.from_dirs([os.path.realpath(d) for d in options.lowerdirs],
                                 options.upperdir and os.path.realpath(options.upperdir))
    timeline.mark("layer stack opened")
    upper_dir = None
    if options.upperdir and options.workdir and not options.read_only:
        try:  # before the workspace is prepared: that clears WORKDIR/work, which the holder uses
            inuse.claim(options.upperdir, options.workdir, options.mountpoint)
        except inuse.InUseError as exc:
            raise MountError(str(exc)) from None
        except OSError as exc:
            raise MountError(f"workdir {options.workdir}: cannot lock it: {exc.strerror or exc}") from None
        try:
            upper_dir = UpperDir.prepare(options.upperdir, options.workdir, stack.layers[0],
                                         options.features)
        except OSError as exc:
            raise MountError(f"workdir {options.workdir}: {exc.strerror or exc}") from None
        if not upper_dir.style.device_whiteouts:
            log.info("cannot create device whiteouts here: writing OCI .wh. whiteouts instead")
        timeline.mark("upper dir claimed and prepared (whiteout probe)")
    ownership, upper_dir = _ownership(options, stack, upper_dir)
    # One pool for the tree's blocking work and the handlers' (reads, writes).
    poll = polling.poll_us(options.poll_us)
    # Handing jobs to waiting workers (pyfuse3 patch 0006) is polling too: off where polling is.
    extras = binding.detect()
    times = HandoffTimes.choose(poll, watch=extras.handoff_watch) if extras.handoff else HandoffTimes(0, 0)
    workers = Workers(stats=HopStats.from_environment(), standby=1,
                      handoff=binding.new_handoff() if times.on else None, times=times)
    tree = MergedTree(stack, upper_dir, workers)
    operations = OverlayOperations(
        tree, read_only=options.read_only, view=options.view, owners=ownership,
        acl="default_permissions" in options.fuse_options,
        passthrough=passthrough.wanted(asked=options.passthrough, control=options.control is not None,
                                       xattr_permissions=options.view.xattr_permissions != 0),
        killpriv_v2=killpriv.wanted(owners=ownership is not None and ownership.active),
    )  # fmt: skip
    control_server = _control_server(options, operations.gate)  # freezes the mount for commits
    if timeline.enabled():
        _trace_first_requests(operations)
    timeline.mark("tree and handlers built")
    try:
        pyfuse3.init(operations, options.mountpoint, set(options.fuse_options))
    except RuntimeError as exc:
        raise MountError(f"cannot mount on {options.mountpoint}: {_mount_failure_hint() or exc}") from None
    timeline.mark("kernel mount made (pyfuse3.init)")
    log.info("mounted %s: %s", options.mountpoint, describe_layers(options))
    timeline.flush()
    unmount = True
    try:
        unmount = trio.run(_run, options.mountpoint, on_ready, control_server,
                           poll if operations.binding.poll else None)
    except BaseExceptionGroup as group:  # trio's nursery wraps what its tasks raised
        raise _leaf(group) from group
    finally:
        pyfuse3.close(unmount=unmount)
        if tree.workspace is not None:
            tree.workspace.close()  # its files made ahead
        log.info("unmounted %s", options.mountpoint)
        timeline.flush()
        if workers.stats is not None:
            workers.stats.write()


def _trace_first_requests(operations: OverlayOperations) -> None:
    """For the start-up trace (`timeline`): mark the INIT handshake and the first request of each
    kind a first read needs. Instance attributes shadow the handlers only when tracing, so the
    normal path is untouched; pyfuse3 looks each handler up on the object per request."""
    init = operations.init

    def traced_init() -> None:
        timeline.mark("INIT handshake (Operations.init)")
        init()

    operations.init = traced_init  # type: ignore[method-assign]
    for name in ("lookup", "getattr", "open", "read"):
        handler = getattr(operations, name)

        def traced(*args: object, _handler: Any = handler, _name: str = name) -> Any:
            if not getattr(operations, f"_traced_{_name}", False):
                setattr(operations, f"_traced_{_name}", True)
                timeline.mark(f"first {_name.upper()} received")
            return _handler(*args)

        setattr(operations, name, traced)


def _ownership(
    options: MountOptions, stack: LayerStack, upper_dir: UpperDir | None
) -> tuple[owners.Ownership, UpperDir | None]:
    """fuse-overlayfs's ownership options at work (see `owners.for_mount`): the mount's policy, and
    UPPER_DIR with the workspace that writes owners and modes the way those options say."""
    view = options.view
    try:
        ownership, upper_xattr = owners.for_mount(view, stack.layers, options.lowerdirs, upper_dir is not None)
    except OSError as exc:
        what = f"xattr_permissions={view.xattr_permissions}: cannot keep" if view.xattr_permissions else "cannot read"
        raise MountError(f"{what} the owner/mode xattrs (override_stat) of {exc.filename or options.upperdir}: "
                         f"{exc.strerror or exc}") from None
    if upper_dir is not None:
        workspace = dataclasses.replace(upper_dir.workspace, owner=owners.disk_owner(view, upper_xattr),
                                        durable=view.fsync)
        upper_dir = dataclasses.replace(upper_dir, workspace=workspace)
    return ownership, upper_dir


def _mount_failure_hint() -> str | None:
    """Why libfuse's mount failed, when it is the usual cause: /dev/fuse closed to this user."""
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return ("/dev/fuse is not open to this user (udev makes it mode 0666; scripts/setup does where "
                "no udev runs)")
    return None


def describe_layers(options: MountOptions) -> str:
    """What the mount shows, for the log: ``lowerdir=A:B upperdir=U`` or ``lowerdir=A:B, read-only``."""
    lowers = "lowerdir=" + ":".join(options.lowerdirs)
    if options.upperdir is None:
        return f"{lowers}, read-only"
    return f"{lowers} upperdir={options.upperdir}" + (", read-only" if options.read_only else "")


async def _run(
    mountpoint: str, on_ready: Callable[[], None], control_server: Callable[[], Awaitable[None]] | None,
    poll_us: int | None,
) -> bool:
    """Serve requests; returns whether we still have to unmount (False when unmounted from outside).
    POLL_US: the request loop's polling window (`polling`), None where pyfuse3 has none."""
    signalled = False

    async def stop_on_signal(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal signalled
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                notify("STOPPING=1", f"STATUS=unmounting {mountpoint}")
                signalled = True
                pyfuse3.terminate()
                return

    async def announce_ready() -> None:
        # From a worker thread: the event loop serves this stat like any client's.
        timeline.mark("event loop running")
        try:
            await trio.to_thread.run_sync(_answer_and_widen, mountpoint)
        except OSError as exc:  # e.g. the kernel refused the session libfuse set up (ECONNREFUSED)
            raise MountError(
                f"{mountpoint} was mounted but does not answer ({exc.strerror}): the kernel refused the FUSE "
                "session; check the mount options (the daemon's log says which one libfuse rejected)"
            ) from exc
        notify("READY=1", f"STATUS=serving {mountpoint}", f"MAINPID={os.getpid()}")
        on_ready()
        timeline.mark("readiness signalled")

    async with trio.open_nursery() as nursery:
        await nursery.start(stop_on_signal)
        nursery.start_soon(announce_ready)
        if control_server is not None:  # cancelled with the rest once unmounted
            nursery.start_soon(control_server)
        if poll_us is None:
            await pyfuse3.main(max_tasks=MAX_REQUEST_TASKS)
        else:
            await pyfuse3.main(max_tasks=MAX_REQUEST_TASKS, poll_us=poll_us)
        if not signalled:
            notify("STOPPING=1", f"STATUS={mountpoint} was unmounted")
        nursery.cancel_scope.cancel()
    return signalled


def _answer_and_widen(mountpoint: str) -> None:
    """Stat MOUNTPOINT through the mount (raises OSError if it does not answer), then widen its
    readahead window. One worker-thread hop for both: each hop costs ~0.1 ms and start-up is on
    the path of every container start. The window is widened before readiness, not after, so that
    the first reader of a fresh mount already gets 1 MiB requests (a file's readahead is sized when
    it is opened); the sysfs write costs well under a millisecond."""
    timeline.mark("readiness probe: worker thread running")
    st = os.stat(mountpoint)
    timeline.mark("readiness probe: stat of the mountpoint answered")
    readahead.widen(st.st_dev)
    timeline.mark("readahead widened")
    timeline.flush()  # here, on a worker thread: the event loop never writes the trace


def _leaf(exc: BaseException) -> BaseException:
    """The one exception worth reporting inside (nested) exception groups: a MountError if there is one."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)] or list(exc.exceptions)
        exc = next((e for e in inner if isinstance(e, MountError)), inner[0])
    return exc


def failure_text(exc: BaseException) -> str:
    """One line for a failure that is no `MountError` (a bug, or an error we did not foresee): what
    happened and what to do, without the traceback (which goes to the log at debug level)."""
    exc = _leaf(exc)
    if isinstance(exc, MountError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        what = f"{exc.strerror or exc}{where}"
    else:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f"the daemon failed: {what} (run it with -d to see the log, and report it if the cause is not yours)"


def _control_server(options: MountOptions, gate: control.FreezeGate) -> Callable[[], Awaitable[None]] | None:
    """The ``-o control=`` socket's server, bound now: a clash fails before anything is mounted."""
    if not options.control:
        return None
    try:
        sock = control.bind(options.control)
    except OSError as exc:
        raise MountError(f"control socket {options.control}: {exc.strerror or exc}") from None
    return functools.partial(control.serve, sock, options.control, gate)


def run_detached(options: MountOptions) -> int:
    """Fork a daemon that mounts; return 0 once its mount answers, 1 (after printing why) if it fails."""
    read_end, write_end = os.pipe()
    timeline.flush()  # before the fork, or the daemon would write the parent's marks again
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read()
        timeline.mark("detached parent: heard the daemon")
        timeline.flush()
        if message == _READY:
            return 0
        os.waitpid(pid, 0)
        text = message.decode(errors="replace").strip() or "the daemon exited before the mount was ready"
        print(f"overlayfuse: error: {text}", file=sys.stderr)
        return 1

    timeline.mark("forked: daemon process running")
    os.close(read_end)
    os.setsid()
    os.chdir("/")
    _detach_stdio()
    status = 0
    try:
        serve(options, on_ready=lambda: _signal_ready(write_end))
    except MountError as exc:
        _report(write_end, str(exc))
        status = 1
    except BaseException as exc:  # the parent must hear *something* before the daemon dies
        log.debug("daemon failed", exc_info=True)
        log.error("%s", failure_text(exc))
        _report(write_end, failure_text(exc))
        status = 1
    os._exit(status)


def _signal_ready(fd: int) -> None:
    try:
        os.write(fd, _READY)
        os.close(fd)
    except OSError:
        pass


def _report(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


def _detach_stdio() -> None:
    """Point stdin, stdout and stderr at /dev/null; log to syslog when there is one."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler  # pickle, queue...: paid only where there is a syslog

        syslog = SysLogHandler(address="/dev/log")
        syslog.setFormatter(logging.Formatter("overlayfuse[%(process)d]: %(levelname)s %(message)s"))
        root.addHandler(syslog)
    else:
        root.addHandler(logging.NullHandler())
