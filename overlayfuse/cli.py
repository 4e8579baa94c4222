"""The ``overlayfuse`` command: parse, validate, then mount in the foreground or as a daemon."""

from __future__ import annotations

import logging
import subprocess
import sys

from . import daemon
from .mounttable import detach_dead_mounts
from .options import UsageError, parse_args, validate

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Entry point. Bad input: one line on stderr and a non-zero exit, nothing mounted."""
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"overlayfuse: error: {exc}", file=sys.stderr)
        return exc.status
    logging.basicConfig(
        level=logging.DEBUG if options.debug else logging.INFO,
        format="overlayfuse: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    for warning in options.warnings:
        log.warning("%s", warning)
    try:
        detach_dead_mounts(options.mountpoint)  # left by a killed daemon: would fail every check
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"overlayfuse: error: {options.mountpoint}: a dead FUSE mount is in the way: {exc}", file=sys.stderr)
        return 1
    try:
        validate(options)
    except UsageError as exc:
        print(f"overlayfuse: error: {exc}", file=sys.stderr)
        return exc.status
    if not options.foreground:
        return daemon.run_detached(options)
    try:
        daemon.serve(options, on_ready=lambda: log.info("ready: %s answers", options.mountpoint))
    except daemon.MountError as exc:
        print(f"overlayfuse: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
