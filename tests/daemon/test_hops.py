"""Real mount: each request that changes the upper dir makes at most one trip to a worker thread.

A hop costs far more than the syscalls it carries (see `overlay.workers`), so the blocking steps of
one request are one function run once. The daemon counts its hops per request type
(``OVERLAYFUSE_HOP_STATS``) and writes the table at unmount; this test reads it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayfuse.daemon import binding, polling
from overlayfuse.overlay.workers import HOP_STATS_ENV, SPIN_ENV, WAIT_ENV
from tests.support.mounts import (
    DAEMON_EXIT_TIMEOUT,
    overlay_options,
    overlayfuse_cmd,
    teardown_overlayfuse,
    wait_mounted,
)

#: Requests that change the upper dir, each of which must make at most one hop.
ONE_HOP = ("create", "mkdir", "mknod", "symlink", "link", "write", "setattr", "unlink", "rmdir", "rename")


@contextlib.contextmanager
def counted_mount(tmp_path: Path, extra_env: dict[str, str] | None = None) -> Iterator[Path]:
    """An overlayfuse mount with an upper dir, counting its hops into tmp_path/hops.txt. Without
    passthrough: these tests count the hops of writes, which passthrough keeps from the daemon."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for path in (lower, upper, work, mnt):
        path.mkdir()
    env = dict(os.environ, **{HOP_STATS_ENV: str(tmp_path / "hops.txt")}, **(extra_env or {}))
    cmd = overlayfuse_cmd(mnt, overlay_options([lower], upper, work), "passthrough=off", foreground=True)
    with open(tmp_path / "daemon.log", "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    try:
        wait_mounted(mnt, proc)
        yield mnt
    finally:
        teardown_overlayfuse(mnt)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DAEMON_EXIT_TIMEOUT)


def hops_per_request(table: Path) -> dict[str, tuple[int, int]]:
    """The table's summary: request -> (requests, hops)."""
    lines = table.read_text(encoding="utf-8").split("\n\n")[1].splitlines()
    counts = {}
    for line in lines[1:]:
        request, requests, hops, _ = line.split()
        counts[request] = (int(requests), int(hops))
    return counts


def test_changes_make_one_hop_each(tmp_path: Path) -> None:
    """In upper dirs (a copy-up is a hop of its own, made once per object)."""
    with counted_mount(tmp_path) as mnt:
        for i in range(5):
            d = mnt / f"d{i}"
            d.mkdir()
            fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"x" * 100)
                os.fchmod(fd, 0o600)
                os.utime(fd, ns=(1, 2))
                os.ftruncate(fd, 10)
            finally:
                os.close(fd)
            os.chown(d / "f", 1000, 1000)
            os.symlink("f", d / "s")
            os.mknod(d / "p", stat.S_IFIFO | 0o600)
            os.link(d / "f", d / "h")
            os.rename(d / "h", d / "g")
            for name in ("f", "g", "s", "p"):
                os.unlink(d / name)
            d.rmdir()
    counts = hops_per_request(tmp_path / "hops.txt")
    for request in ONE_HOP:
        requests, hops = counts[request]
        assert requests >= 5, (request, counts[request])
        assert hops <= requests, f"{request}: {hops} hops for {requests} requests"


def _routes(table: Path) -> dict[str, int]:
    """The table's last line, ``hops handed N, queued N, parked N`` (only some of them)."""
    last = table.read_text(encoding="utf-8").splitlines()[-1]
    assert last.startswith("hops "), last
    return {route: int(n) for route, n in (part.split() for part in last[len("hops "):].split(", "))}


def _writes(mnt: Path) -> None:
    fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for i in range(50):
            os.pwrite(fd, b"x" * 100, i * 100)
    finally:
        os.close(fd)
    assert (mnt / "f").read_bytes() == b"x" * 5000


@pytest.mark.skipif(not binding.detect().handoff or len(os.sched_getaffinity(0)) < 2,
                    reason="pyfuse3 without patch 0006 (stock), or one CPU: no worker handoff")
@pytest.mark.parametrize(("spin_us", "handed"), [("2000", True), ("0", False)])
def test_writes_are_handed_to_a_waiting_worker(tmp_path: Path, spin_us: str, handed: bool) -> None:
    """The daemon wires the handoff up (and ``OVERLAYFUSE_HOP_SPIN_US=0`` turns it off): a client's
    writes in a row find a worker waiting. Wide windows, so a loaded machine still hands some."""
    env = {SPIN_ENV: spin_us, WAIT_ENV: "2000", polling.POLL_ENV: "50"}
    with counted_mount(tmp_path, env) as mnt:
        _writes(mnt)
    routes = _routes(tmp_path / "hops.txt")
    assert (routes.get("handed", 0) > 0) is handed, routes
    assert routes.get("queued", 0) > 0, routes  # the first hop starts a thread through the queue
