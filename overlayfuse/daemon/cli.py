"""The ``overlayfuse`` command: parse, validate, then mount in the foreground or as a daemon.

Every container start runs this command, so what it imports is on that path. Option parsing,
``--help``, ``--version`` and bad input need neither trio nor pyfuse3 (about 0.15 s of imports on a
2-core VM, most of a start-up): `daemon` is imported only once the options are valid and a mount is
to be made. Nothing from `overlayfuse.images` or `overlayfuse.service` loads here at all.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from ..linux.journal import configure_logging, print_error
from ..linux.mounttable import detach_dead_mounts
from . import timeline
from .options import UsageError, parse_args, validate

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Entry point. Bad input: one line on stderr and a non-zero exit, nothing mounted."""
    timeline.mark("cli imported")
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
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
    from . import mount  # trio and pyfuse3: only now that there is a mount to make

    timeline.mark("daemon imported (trio, pyfuse3, overlay)")

    if not options.foreground:
        return mount.run_detached(options)
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


if __name__ == "__main__":
    sys.exit(main())
