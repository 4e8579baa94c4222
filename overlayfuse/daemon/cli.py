"""The ``overlayfuse`` command: parse, validate, then mount in the foreground or as a daemon.

Every container start runs this command, so what it imports is on that path. Option parsing,
``--help``, ``--version`` and bad input need neither trio nor pyfuse3 (about 0.15 s of imports on a
2-core VM, most of a start-up): `daemon` is imported only once the options are valid and a mount is
to be made. Nothing from `overlayfuse.images` or `overlayfuse.service` loads here at all.

The installed command (`overlayfuse.commands`) and ``python -m overlayfuse.daemon.cli`` (how
overlayctl and the service start a daemon) run with the cyclic garbage collector off until the
daemon is imported (see `overlayfuse.commands` for why); then what the imports made is frozen and
the collector is on for what the daemon makes while serving. Importing this module changes
nothing.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # python -m: the collector off before the imports below (see above)
    gc.disable()

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import NoReturn

from ..collector import collector_on
from ..linux.journal import configure_logging, print_error
from ..linux.libc import pthread_in_libc
from ..linux.mounttable import detach_dead_mounts
from . import timeline
from .options import UsageError, parse_args, validate

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None, *, report: Callable[[int], None] | None = None) -> int:
    """Entry point. Bad input: one line on stderr and a non-zero exit, nothing mounted.

    (``overlayfuse --fork-server`` never comes here: the installed command starts the fork server,
    `forkserver`, which calls this in each child it forks.) REPORT, if given, hears the exit
    status of a detached mount's command just before it exits without returning (see
    `_exit_now`): the fork server's child tells its caller with it.
    """
    timeline.mark("cli imported")
    args = sys.argv[1:] if argv is None else argv
    try:
        return _main(args, report)
    finally:
        collector_on()  # whichever way it went; `_main` does it already on the mounting path


def _main(args: list[str], report: Callable[[int], None] | None) -> int:
    try:
        options = parse_args(args)
    except UsageError as exc:
        print_error("overlayfuse", str(exc))
        return exc.status
    timeline.mark("options parsed")
    # Under systemd each line carries journald's <N> priority prefix instead of the level's name.
    configure_logging("overlayfuse", logging.DEBUG if options.debug else logging.INFO)
    for warning in options.warnings:
        log.warning("%s", warning)
    timeline.mark("logging configured")
    try:
        detach_dead_mounts(options.mountpoint)  # left by a killed daemon: would fail every check
    except (OSError, subprocess.SubprocessError) as exc:
        print_error("overlayfuse", f"{options.mountpoint}: a dead FUSE mount is in the way: {exc}")
        return 1
    timeline.mark("dead mounts checked (mount table read)")
    try:
        validate(options)
    except UsageError as exc:
        print_error("overlayfuse", str(exc))
        return exc.status
    timeline.mark("options validated")
    with pthread_in_libc():  # trio without its `ldconfig -p` subprocess (see linux.libc)
        from . import mount  # trio and pyfuse3: only now that there is a mount to make
    collector_on()
    timeline.mark("daemon imported (trio, pyfuse3, overlay)")

    if not options.foreground:
        _exit_now(mount.run_detached(options), report)
    try:
        mount.serve(options, on_ready=lambda: log.info("ready: %s answers", options.mountpoint))
    except mount.MountError as exc:
        print_error("overlayfuse", str(exc))
        return 1
    except Exception as exc:  # a bug, or a failure we did not foresee: one line; the traceback with -d
        log.debug("daemon failed", exc_info=True)
        print_error("overlayfuse", mount.failure_text(exc))
        return 1
    return 0


def _exit_now(status: int, report: Callable[[int], None] | None) -> NoReturn:
    """End the detached mount command: its daemon serves the mount (or it failed, and we said why).
    Without the interpreter's teardown: with trio and pyfuse3 loaded, finalising every module took
    the command 65-75 ms after the daemon's "ready" on the 2-core VM (scripts/bench
    --startup-steps, load 3.2), and podman waits for its mount program to exit before it goes on.
    Nothing is left to tear down here: the daemon is another process, and this one holds no file
    but stdio, flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a reader that left: nothing more to say anyway
            pass
    logging.shutdown()
    if report is not None:
        report(status)
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
