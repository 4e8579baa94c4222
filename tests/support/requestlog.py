"""A `-d` overlayfuse whose debug log names every request the kernel sent, and the reading of it.

The request tests (tests/daemon/test_requests.py) and the kernel-cache tests
(tests/daemon/test_kernel_cache.py) judge the daemon by what reached it, never by timing: both
mount the same way and read the same log, so both live here.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tests.support.mounts import (
    DAEMON_EXIT_TIMEOUT,
    overlay_options,
    overlayfuse_cmd,
    teardown_overlayfuse,
    wait_mounted,
)

#: One request in the daemon's debug log: "DEBUG read(5, 1048576, 1048576)".
_REQUEST = re.compile(r"DEBUG (\w+)\((.*)\)$")


@contextlib.contextmanager
def debug_daemon(tmp_path: Path, lower: Path, *, stock: bool = False, options: str = "",
                 upper_in: Path | None = None, writable: bool = True) -> Iterator[tuple[Path, Path]]:
    """A `-d` overlayfuse over LOWER with an upper dir; yields the mountpoint and its log.

    STOCK runs the daemon as on a stock pyfuse3 (`OVERLAYFUSE_BINDING=stock`); otherwise it gets
    this process's environment, whatever binding that asks for. OPTIONS: more `-o` options.
    UPPER_IN: where the upper and work dirs are made (default TMP_PATH); not WRITABLE: none, a
    read-only mount of LOWER alone.
    """
    base = upper_in or tmp_path
    mnt, upper, work = tmp_path / "mnt", base / "upper", base / "work"
    for path in (mnt, upper, work) if writable else (mnt,):
        path.mkdir()
    log = tmp_path / "daemon.log"
    layers = overlay_options([lower], upper, work) if writable else overlay_options([lower])
    cmd = overlayfuse_cmd(mnt, layers, *([options] if options else []))
    cmd.insert(1, "-d")
    env = dict(os.environ)
    if stock:
        env["OVERLAYFUSE_BINDING"] = "stock"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    try:
        wait_mounted(mnt, proc)
        yield mnt, log
    finally:
        teardown_overlayfuse(mnt)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DAEMON_EXIT_TIMEOUT)


def requests(log: Path, since: int = 0) -> list[tuple[str, str]]:
    """The (operation, arguments) of every request logged after byte SINCE of LOG."""
    with open(log, "rb") as text:
        text.seek(since)
        lines = text.read().decode(errors="replace").splitlines()
    return [m.groups() for m in map(_REQUEST.search, lines) if m and " -> " not in m.group(2)]


def request_counts(log: Path, since: int = 0) -> Counter[str]:
    """How many requests of each operation LOG shows after byte SINCE."""
    return Counter(op for op, _ in requests(log, since))
