"""The start-up trace (`overlayfuse.daemon.timeline`): with ``OVERLAYFUSE_STARTUP_TRACE`` set, a
mount writes each step of its start, in the order it happened, and readiness still comes only after
the mount answered. The times themselves are scripts/bench's business (``--startup-steps``);
these tests assert steps and their order, never durations.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from overlayfuse.daemon.timeline import ENV
from tests.support.mounts import overlayfuse, run_isolated
from tests.support.trees import File, make_tree

pytestmark = pytest.mark.mount

#: The steps a detached mount goes through before the first read, in this order.
ORDERED_STEPS = (
    "cli imported",
    "options parsed",
    "options validated",
    "daemon imported (trio, pyfuse3, overlay)",
    "forked: daemon process running",
    "serve: started",
    "kernel mount made (pyfuse3.init)",
    "event loop running",
    "INIT handshake (Operations.init)",
    "readiness probe: stat of the mountpoint answered",
    "readiness signalled",
)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def trace_steps(trace: Path) -> list[tuple[int, int, str]]:
    """(monotonic ns, pid, step) for each line of TRACE, sorted by time."""
    entries = []
    for line in trace.read_text().splitlines():
        ns, pid, step = line.split(" ", 2)
        entries.append((int(ns), int(pid), step))
    return sorted(entries)


def test_trace_names_each_step_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        overlayfuse_bin: Path) -> None:
    lower = make_tree(tmp_path / "lower", File("d/hello", b"hello\n"))
    trace = tmp_path / "trace"
    for name in ("upper", "work"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv(ENV, str(trace))
    with overlayfuse(tmp_path / "mnt", [lower], tmp_path / "upper", tmp_path / "work"):
        assert run_isolated(read_file, str(tmp_path / "mnt" / "d" / "hello"), timeout=30) == b"hello\n"
    steps = trace_steps(trace)  # complete: the teardown waited for the daemon, which flushes at exit
    names = [step for _, _, step in steps]
    # No READ need come: a small lower file's data is handed to the kernel at its open (pagecache).
    for step in (*ORDERED_STEPS, "first LOOKUP received", "first OPEN received",
                 "detached parent: heard the daemon"):
        assert names.count(step) == 1, (step, names)
    assert [n for n in names if n in ORDERED_STEPS] == list(ORDERED_STEPS)
    # No behaviour change: the caller hears "ready" only after the mount answered a stat.
    assert names.index("detached parent: heard the daemon") > names.index(
        "readiness probe: stat of the mountpoint answered")
    # The parent's marks and the daemon's come from two processes; each step from exactly one.
    pids = {step: pid for _, pid, step in steps}
    assert pids["options parsed"] == pids["detached parent: heard the daemon"]
    assert pids["forked: daemon process running"] == pids["first OPEN received"] != pids["options parsed"]


def test_no_trace_without_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       overlayfuse_bin: Path) -> None:
    lower = make_tree(tmp_path / "lower", File("hello", b"hello\n"))
    monkeypatch.delenv(ENV, raising=False)
    with overlayfuse(tmp_path / "mnt", [lower]):
        assert run_isolated(read_file, str(tmp_path / "mnt" / "hello"), timeout=30) == b"hello\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lower", "mnt", "mnt.log"]
