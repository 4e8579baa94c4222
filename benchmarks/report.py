"""Reporting: the results as a JSON-ready dict, the table and header, and the host's versions."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .errors import BenchError
from .processes import run
from .runner import Bench
from .settings import REPO_ROOT, RSS_WALKS, VENV_BIN, WORKLOADS


def summarize(bench: Bench) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for w, row in bench.cells.items():
        per: dict[str, Any] = {}
        results[w] = {"unit": WORKLOADS[w][0], "targets": per}
        for t, c in row.items():
            per[t] = {
                "samples": c.samples,
                "median": statistics.median(c.samples) if c.samples else None,
                "min": min(c.samples) if c.samples else None,
                "max": max(c.samples) if c.samples else None,
                "peak_rss_kib": max(c.hwm_kib) if c.hwm_kib else None,
                "errors": c.errors,
            }
        ratios = {}
        for mine in ("overlayfuse", "overlayfuse-fs"):  # cold, and with the fork server running
            ours = per.get(mine, {}).get("median")
            for peer in ("fuse-overlayfs", "kernel"):
                theirs = per.get(peer, {}).get("median")
                if ours and theirs:
                    ratios[f"{mine}/{peer}"] = ours / theirs
        results[w]["ratios"] = ratios
    return results


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def render_table(bench: Bench, results: dict[str, Any]) -> str:
    head = ["workload", "target", "median", "min", "max", "unit", "peak RSS", "of/fo", "of/kern"]
    rows = [head]
    for w in bench.workloads:
        for i, t in enumerate(t for t in bench.targets if t in results[w]["targets"]):
            r = results[w]["targets"][t]
            rss = f"{r['peak_rss_kib'] / 1024:.1f} MiB" if r["peak_rss_kib"] else "-"
            of_fo = results[w]["ratios"].get(f"{t}/fuse-overlayfs")
            of_k = results[w]["ratios"].get(f"{t}/kernel")
            if r["median"] is None:
                line = [w if i == 0 else "", t, "FAILED", "", "", results[w]["unit"], "", "", ""]
            else:
                line = [w if i == 0 else "", t, fmt(r["median"]), fmt(r["min"]), fmt(r["max"]),
                        results[w]["unit"] + ("*" if r["errors"] else ""), rss,
                        f"{of_fo:.2f}x" if of_fo else "", f"{of_k:.2f}x" if of_k else ""]
            rows.append(line)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {2, 3, 4, 6, 7, 8}
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                             for i, c in enumerate(r)).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def render(bench: Bench, report: dict[str, Any]) -> str:
    h, st, check = report["host"], report["stack"], report["view_check"]
    lines = [
        f"overlayfuse bench ({bench.scale.name}), {h['date']}",
        f"host: load average {h['loadavg_start']} at start, {h['loadavg_end']} at end"
        f" (1-min max {h['load1_max_while_timing']} while timing); nproc {h['nproc']};"
        f" kernel {h['kernel']}; cpu idle {h.get('cpu_idle', '?')}",
        f"creating a file in the scratch dir (no FUSE): {h.get('create_us_start', '?')} µs at start,"
        f" {h.get('create_us_end', '?')} µs at end",
        f"versions: {h['fuse_overlayfs']}; overlayfuse {h['overlayfuse']} (git {h['git']});"
        f" python {h['python']}, pyfuse3 {h['pyfuse3']}",
        f"bottom layer: {st['source']}; merged view {st['view_entries']} entries",
        f"second layer: {st['l2']['added']} added, {st['l2']['replaced']} replaced,"
        f" {st['l2']['whiteouts']} file whiteouts, dirs whited out {st['l2']['whiteout_dirs']},"
        f" opaque dir {st['l2']['opaque_dir']}",
        f"big file: {st['big_bytes'] >> 20} MiB (+ big2 {st['big2_bytes'] >> 20} MiB), written in"
        " full with pseudo-random data; create-small:"
        f" {st['tar_files']} files, {st['tar_bytes'] / 2**20:.1f} MiB; copyup-many:"
        f" {st['copyup_files']} files; rm-tree: /{st['rm_dir']} ({st['rm_entries']} entries)",
        f"git-status: a checkout of {st['git_files']} files (its own layer); build-like:"
        f" {st['build_files']} sources, {st['build_bytes'] / 2**20:.1f} MiB; random-read-4t:"
        f" {st['random_read_files']} files; chown-tree: {st['chown_files']} small files and one big one"
        " (its own layer)",
        "view check: " + (f"same merged view on {', '.join(check['targets'])}" if check.get("same") else str(check)),
        f"reps {report['config']['reps']}; median [min, max]; seconds unless MB/s (1 MB = 10^6 B);"
        " of/fo and of/kern = overlayfuse / fuse-overlayfs and overlayfuse / kernel medians"
        " (time: >1 is slower; MB/s: <1 is slower); peak RSS = daemon VmHWM before unmount",
        "",
        render_table(bench, report["results"]),
    ]
    if report["config"]["overlayfuse_options"]:
        lines.insert(-2, f"overlayfuse mounted with the extra options {report['config']['overlayfuse_options']}")
    if bench.rss_walks:
        lines += ["", f"daemon VmRSS after a cold walk and {RSS_WALKS} warm walks on one mount:"]
        for t, r in bench.rss_walks.items():
            if "error" in r:
                lines.append(f"  {t:<14} FAILED: {r['error']}")
            else:
                vals = " -> ".join(f"{k / 1024:.1f}" if k else "?" for k in r["rss_kib"])
                hwm = f"{r['hwm_kib'] / 1024:.1f}" if r["hwm_kib"] else "?"
                lines.append(f"  {t:<14} {vals} MiB (VmHWM {hwm} MiB)")
    mounts = {t: statistics.median(v) for t, v in bench.mount_s.items() if v}
    if mounts:
        lines += ["", "mount until it answers (median): "
                  + ", ".join(f"{t} {v:.3f} s" for t, v in mounts.items())]
    errors = [(w, t, e) for w, row in bench.cells.items() for t, c in row.items() for e in c.errors]
    if errors:
        lines += ["", "failures (* in the table: some repetitions failed):"]
        lines += [f"  {w} {t}: {e}" for w, t, e in errors]
    return "\n".join(lines)


def tool_version(cmd: list[str], pick: str) -> str:
    with contextlib.suppress(BenchError, OSError):
        out = run(cmd, 30, check=False)
        for line in (out.stdout + out.stderr).decode(errors="replace").splitlines():
            if pick in line:
                return line.strip()
    return "unknown"


def cpu_idle() -> str:
    """The CPU idle driver and, under a VM's haltpoll driver, how long an idle CPU polls before it
    halts: on a VM with polling off (guest_halt_poll_ns 0) every FUSE round trip pays two wake-ups
    from a halt, which makes both FUSE daemons' per-request cost several times higher."""
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return "?"
    driver = read("/sys/devices/system/cpu/cpuidle/current_driver")
    if driver == "haltpoll":
        return f"haltpoll, guest_halt_poll_ns {read('/sys/module/haltpoll/parameters/guest_halt_poll_ns')}"
    return driver


#: Files `create_cost_us` creates (and removes) to price one create in the scratch dir.
CREATE_PROBE_FILES = 300


def create_cost_us(directory: Path) -> float:
    """What creating (and closing) one empty file costs in DIRECTORY's file system, in µs (median of
    three rounds of CREATE_PROBE_FILES), with no FUSE or overlay involved.

    On the VM this bench runs on, that cost was seen to vary twentyfold between runs and between
    directories of the same ext4 file system (about 20 µs at times, 400-800 µs of the creating
    process's kernel CPU at others): every target's write rows (create-small, copyup-many,
    build-like, chown-big) carry it. Printed at the start and the end of a run, so a reader can
    tell a run made on a slow disk from a slow daemon."""
    probe = directory / "create-probe"
    rounds = []
    probe.mkdir()
    try:
        for _ in range(3):
            start = time.perf_counter()
            for i in range(CREATE_PROBE_FILES):
                os.close(os.open(probe / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            rounds.append((time.perf_counter() - start) / CREATE_PROBE_FILES * 1e6)
            for i in range(CREATE_PROBE_FILES):
                os.unlink(probe / str(i))
    finally:
        shutil.rmtree(probe, ignore_errors=True)  # inside the scratch dir, removed at the end anyway
    return round(statistics.median(rounds), 1)


def host_info() -> dict[str, Any]:
    git = "unknown"
    with contextlib.suppress(BenchError, OSError):
        head = run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], 30)
        dirty = run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "overlayfuse"],
                    30).stdout.strip()
        git = head.stdout.decode().strip() + ("+changes" if dirty else "")
    pyfuse3 = "unknown"
    with contextlib.suppress(Exception):
        from importlib.metadata import version
        pyfuse3 = version("pyfuse3")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "nproc": os.cpu_count(),
        "kernel": os.uname().release,
        "cpu_idle": cpu_idle(),
        "fuse_overlayfs": tool_version(["fuse-overlayfs", "--version"], "fuse-overlayfs"),
        "overlayfuse": tool_version([str(VENV_BIN / "overlayfuse"), "--version"],
                                    "overlayfuse").removeprefix("overlayfuse").strip(),
        "git": git,
        "python": sys.version.split()[0],
        "pyfuse3": pyfuse3,
    }
