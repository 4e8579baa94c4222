"""Running the bench: the view check first, then every job on every target, rotating the order."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ctl, podman
from .errors import BenchError, ViewMismatch, say
from .mounts import Mounter
from .processes import bash, drop_caches, sync, timed
from .settings import CTL_WORKLOADS, PODMAN_WORKLOAD, RSS_WALKS, WORKLOADS, Scale
from .stack import Stack
from .views import Entry, compare_views, walk_view_isolated
from .workloads import JOBS, Job


@dataclass(slots=True)
class Cell:
    samples: list[float] = field(default_factory=list)
    hwm_kib: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, scale: Scale) -> None:
        self.args = args
        self.scale = scale
        self.targets: list[str] = args.targets
        self.workloads: list[str] = args.workloads
        self.cells = {w: {t: Cell() for t in self.targets if w not in CTL_WORKLOADS or t == "overlayfuse"}
                      for w in self.workloads}
        self.mount_s: dict[str, list[float]] = {t: [] for t in self.targets}
        self.loads: list[float] = []
        self.rss_walks: dict[str, dict[str, Any]] = {}
        self.view_check: dict[str, Any] = {"ran": False}

    def check_views(self, mounter: Mounter, stack: Stack) -> dict[str, Entry]:
        views: dict[str, dict[str, Any]] = {}
        for target in self.targets:
            with mounter.mounted(target) as m:
                views[target] = walk_view_isolated(m.mnt, self.scale.cmd_timeout)
            say(f"view check: {target}: {len(views[target]['entries'])} entries"
                + (f", {views[target]['vanished']} listed names that lstat ENOENT (ignored)"
                   if views[target]["vanished"] else ""))
        problems = compare_views(views)
        ref: dict[str, Entry] = views[self.targets[0]]["entries"]
        self.view_check = {
            "ran": True, "targets": list(views), "entries": len(ref), "same": not problems,
            "ignored_enoent_names": {t: v["vanished"] for t, v in views.items()},
        }
        if problems:
            raise ViewMismatch("the targets' merged views differ; not timing anything:\n  "
                               + "\n  ".join(problems))
        return ref

    def measure(self, mounter: Mounter, stack: Stack) -> None:
        jobs = [j for j in JOBS if any(w in self.workloads for w in j.produces)]
        reps = self.args.reps
        for job in jobs:
            for rep in range(reps):
                k = rep % len(self.targets)  # rotate the order, so no target always goes first
                for target in self.targets[k:] + self.targets[:k]:
                    self._one(mounter, stack, job, target, rep)
        if any(w in self.workloads for w in CTL_WORKLOADS) and "overlayfuse" in self.targets:
            self._ctl(mounter.root.parent)
        if PODMAN_WORKLOAD in self.workloads:
            self._podman(mounter.root.parent, mounter.fork_socket)
        if "walk-warm" in self.workloads:
            for target in self.targets:
                if target != "kernel":
                    self._rss_walks(mounter, target)

    def _one(self, mounter: Mounter, stack: Stack, job: Job, target: str, rep: int) -> None:
        wanted = [w for w in job.produces if w in self.workloads]
        try:
            lowers = job.lowers(stack) if job.lowers is not None else None
            with mounter.mounted(target, first_read=job.first_read, kernel_opts=job.kernel_opts,
                                 lowers=lowers, overlayfuse_opts=job.overlayfuse_opts) as m:
                self.mount_s[target].append(m.mount_s)
                if job.cold:
                    drop_caches()
                else:
                    sync()
                self.loads.append(os.getloadavg()[0])
                values = job.run(m, stack, self.scale)
                hwm = m.hwm_kib()  # just before the unmount
        except BenchError as exc:
            say(f"{job.name} rep {rep + 1} {target}: FAILED: {exc}")
            for w in wanted:
                self.cells[w][target].errors.append(str(exc))
            return
        shown = []
        for w in wanted:
            self.cells[w][target].samples.append(values[w])
            if hwm is not None:
                self.cells[w][target].hwm_kib.append(hwm)
            shown.append(f"{w} {values[w]:.3f} {WORKLOADS[w][0]}")
        rss = f", VmHWM {hwm / 1024:.1f} MiB" if hwm is not None else ""
        say(f"rep {rep + 1}/{self.args.reps} {target:<14} {', '.join(shown)}{rss}")

    def _ctl(self, work: Path) -> None:
        """overlayctl's listings, on a store built once (in the scratch dir)."""
        try:
            store = ctl.build_store(work)
            for rep in range(self.args.reps):
                for w, samples in ctl.measure(store, self.scale.cmd_timeout).items():
                    if w in self.workloads:
                        self.cells[w]["overlayfuse"].samples.extend(samples)
                        say(f"rep {rep + 1}/{self.args.reps} overlayctl     {w} "
                            + " ".join(f"{v:.3f}" for v in samples) + " s")
        except BenchError as exc:
            say(f"overlayctl listings: FAILED: {exc}")
            for w in CTL_WORKLOADS:
                if w in self.workloads:
                    self.cells[w]["overlayfuse"].errors.append(str(exc))

    def _podman(self, work: Path, fork_socket: str | None) -> None:
        """``podman run --rm IMAGE true`` on each target's own storage, rotating the order per rep."""
        cells = self.cells[PODMAN_WORKLOAD]
        try:
            with podman.storages(work, self.targets, fork_socket) as ready:
                for rep in range(self.args.reps):
                    k = rep % len(self.targets)
                    for target, samples in podman.measure(ready, self.targets[k:] + self.targets[:k]).items():
                        cells[target].samples.extend(samples)
                        say(f"rep {rep + 1}/{self.args.reps} {target:<14} {PODMAN_WORKLOAD} "
                            + " ".join(f"{v:.3f}" for v in samples) + " s")
        except BenchError as exc:
            say(f"{PODMAN_WORKLOAD}: FAILED: {exc}")
            for cell in cells.values():
                cell.errors.append(str(exc))

    def _rss_walks(self, mounter: Mounter, target: str) -> None:
        """VmRSS after a cold walk and after each of RSS_WALKS warm walks on one mount."""
        try:
            with mounter.mounted(target) as m:
                cmd = bash('find "$1" -printf "%s %i %m\\n" >/dev/null', m.mnt)
                drop_caches()
                rss = []
                for _ in range(RSS_WALKS + 1):
                    timed(cmd, self.scale.cmd_timeout)
                    rss.append(m.rss_kib())
                self.rss_walks[target] = {"rss_kib": rss, "hwm_kib": m.hwm_kib()}
        except BenchError as exc:
            self.rss_walks[target] = {"error": str(exc)}
        say(f"RSS across walks, {target}: {self.rss_walks[target]}")
