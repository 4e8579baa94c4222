"""The verdict (what makes a run fail) and the report, as a JSON-ready dict and as text."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .runner import Probe, RunResult
from .settings import FD_SLACK, HANG_GRACE, KINDS
from .tally import Outcome, Tally


def _merged(result: RunResult) -> list[Outcome]:
    total = Tally()
    for tally in result.tallies.values():
        total.merge(tally.as_dict())
    return sorted(total.outcomes.values(), key=lambda o: (o.expected, -o.count, o.op, o.error))


def failures(result: RunResult, tracebacks: int) -> list[str]:
    """Every reason the run fails; empty for a clean run."""
    found = [f"{o.op}: {o.error} x{o.count}, e.g. {o.example}"
             for o in _merged(result) if not o.expected]
    found += [f"worker hung: {name} had not reported {HANG_GRACE:g} s after the deadline"
              for name in result.hung]
    found += [f"worker crashed: {text}" for text in result.crashed]
    if result.daemon_died_after is not None:
        found.append(f"the daemon died, {result.daemon_died_after} s into the run")
    start, end = result.start.fds, result.end.fds
    # Judged only when every worker closed its fds and the daemon lived to forget its inodes.
    judged = not result.hung and not result.aborted and result.daemon_died_after is None
    if judged and start is not None and end is not None and end > start + FD_SLACK:
        found.append(f"the daemon's open fds grew from {start} to {end} (slack {FD_SLACK}), "
                     "with every worker's fds closed and the kernel's inodes forgotten")
    if tracebacks:
        found.append(f"the daemon logged {tracebacks} traceback(s) (see daemon.exceptions)")
    return found


def exceptions_logged(log: str) -> dict[str, int]:
    """How often the daemon logged each exception (the line that ends each traceback), so a
    report names the bugs behind its tracebacks even when the log's tail shows none."""
    found: Counter[str] = Counter()
    in_traceback = False
    for line in log.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            found[line[:200]] += 1
            in_traceback = False
    return dict(found.most_common())


def _probe(p: Probe) -> dict[str, int | None]:
    return {"fds": p.fds, "rss_kib": p.rss_kib}


def build(result: RunResult, config: dict[str, Any], tree: dict[str, int], pid: int | None,
          log: str) -> dict[str, Any]:
    exceptions = exceptions_logged(log)
    tracebacks = sum(exceptions.values())
    found = failures(result, tracebacks)
    return {
        "ok": not found,
        "failures": found,
        "config": config,
        "tree": tree,
        "seconds_run": result.seconds_run,
        "ops": {kind: dict(sorted(t.ops.items())) for kind, t in result.tallies.items()},
        "errors": [o.as_dict() for o in _merged(result)],
        "daemon": {
            "pid": pid,
            "died_after_s": result.daemon_died_after,
            "start": _probe(result.start),
            "peak": _probe(result.peak),
            "workers_done": _probe(result.workers_done),
            "end": _probe(result.end),
            "fd_slack": FD_SLACK,
            "fds_grown": result.grown,
            "tracebacks": tracebacks,
            "exceptions": exceptions,
            "log_tail": log[-3000:],
        },
        "aborted": result.aborted,
        "hung_workers": result.hung,
        "crashed_workers": result.crashed,
    }


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def render(report: dict[str, Any]) -> str:
    cfg = report["config"]
    target = ("kernel overlayfs" if cfg["target"] == "kernel"
              else f"overlayfuse (pid {report['daemon']['pid']})")
    lines = [f"stress: {cfg['workers_per_kind']} worker(s) of each of {len(KINDS)} kinds for "
             f"{cfg['seconds']:g} s on {target}, seed {cfg['seed']}",
             "tree: " + ", ".join(f"{v} {k}" for k, v in report["tree"].items()),
             "", "calls per worker kind:"]
    for kind, ops in report["ops"].items():
        total = sum(ops.values())
        detail = ", ".join(f"{op} {n}" for op, n in ops.items())
        lines.append(f"  {kind:<10} {total:>8}  ({detail})")
    errors = report["errors"]
    lines += ["", "failed calls (op, errno, count, expected: a race the namespace allows):"]
    if not errors:
        lines.append("  none")
    for e in errors:
        mark = "expected" if e["expected"] else "FAILURE "
        lines.append(f"  {mark} {e['op']:<14} {e['errno']:<11} {e['count']:>7}  e.g. {e['example']}")
    d = report["daemon"]
    if cfg["target"] != "kernel":
        lines += ["", f"daemon open fds: {d['start']['fds']} at start, {d['peak']['fds']} at peak, "
                      f"{d['workers_done']['fds']} when the workers were done, {d['end']['fds']} "
                      f"after the kernel forgot its inodes (slack {d['fd_slack']})",
                  f"daemon RSS: {_mib(d['start']['rss_kib'])} at start, "
                  f"{_mib(d['peak']['rss_kib'])} at peak, {_mib(d['end']['rss_kib'])} at the end"]
        if d["fds_grown"]:
            lines += [f"fds open at the end and not at the start ({len(d['fds_grown'])}):"]
            lines += [f"  {target}" for target in d["fds_grown"][:60]]
    if report["failures"]:
        lines += ["", f"FAILED ({len(report['failures'])}):"]
        lines += [f"  - {f}" for f in report["failures"]]
        if d["exceptions"]:
            lines += ["", "exceptions in the daemon's log:"]
            lines += [f"  {n:>5}  {line}" for line, n in d["exceptions"].items()]
        if d["log_tail"]:
            lines += ["", "daemon log (tail):", d["log_tail"]]
    else:
        lines += ["", "OK: no unexpected errno, no wrong type or name, no hung worker"
                  + (", daemon alive, no fd growth" if cfg["target"] != "kernel" else "")]
    return "\n".join(lines)
