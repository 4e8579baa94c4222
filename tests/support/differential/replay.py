"""Replaying one sequence: the same operations on a kernel mount and on the side under test.

`replay` builds the same starting stack twice, mounts it once with kernel overlayfs
(``redirect_dir=on,index=on``: the kernel at its most POSIX) and once with the side under test,
applies every operation to both, and compares each call's outcome and the whole merged view.
After unmounting, it mounts the kernel on the tested side's upper dir and checks that the kernel
sees what it saw itself: the upper dir must stay kernel-compatible.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.compare import Snapshot, snapshot
from tests.support.differential.calls import close_held, render, run_op
from tests.support.differential.differences import same_outcome, view_problems
from tests.support.differential.ops import LOWER_LINK_GROUPS, Op, Outcome, starting_layers
from tests.support.differential.worker import SETPRIV, Worker, WorkerHung, Workers
from tests.support.mounts import MountError, kernel_overlay, overlayfuse
from tests.support.rich_tree import LayerSet, build_layer_set

KERNEL_OPTIONS = "redirect_dir=on,index=on"
#: How each side's upper dir is read back (`compare_uppers`): with every on-disk feature overlayfuse
#: writes by default (redirects, metacopy files; a kernel with metacopy=off refuses the latter).
UPPER_CHECK_OPTIONS = KERNEL_OPTIONS + ",metacopy=on"

# --- sides and replay -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """What is compared with the kernel: overlayfuse, or the kernel itself with some options."""

    kind: str  # "overlayfuse" | "kernel"
    options: str = ""

    @property
    def is_kernel(self) -> bool:
        return self.kind == "kernel"

    def __str__(self) -> str:
        return f"kernel({self.options})" if self.is_kernel else "overlayfuse"


OVERLAYFUSE = Side("overlayfuse")
KERNEL = Side("kernel", KERNEL_OPTIONS)


@contextlib.contextmanager
def mount_side(side: Side, layers: LayerSet) -> Iterator[Path]:
    if side.is_kernel:
        with kernel_overlay(layers.mnt, layers.lowers, layers.upper, layers.work,
                            side.options):
            yield layers.mnt
    else:
        with overlayfuse(layers.mnt, layers.lowers, layers.upper, layers.work):
            yield layers.mnt


@dataclass(slots=True)
class Mismatch:
    step: int  # index of the operation after which it showed; -1: the initial view
    where: str  # "outcome" | "view" | "upper" | "hang" | "daemon"
    details: list[str]

    def summary(self) -> str:
        return f"{self.where} after step {self.step}: " + "; ".join(self.details[:3])


@dataclass(slots=True)
class Replay:
    ops: list[Op]
    outcomes: list[tuple[Outcome, Outcome]] = field(default_factory=list)
    mismatch: Mismatch | None = None


def replay(root: Path, ops: Sequence[Op], side: Side, workers: Workers, *,
           every_step: bool = True, check_upper: bool = True) -> Replay:
    """Apply `ops` to the kernel and to `side` on fresh copies of the starting tree.

    Stops at the first mismatch.  `every_step=False` compares the views only at the start
    and the end (faster; used while shrinking).  The trees under `root` are removed after.
    """
    result = Replay(list(ops))
    layers = starting_layers()
    shutil.rmtree(root, ignore_errors=True)
    try:
        k_set = build_layer_set(root / "kernel", layers, kernel=True)
        o_set = build_layer_set(root / "ours", layers, kernel=True)
        lower_linked: set[str] = set()
        try:
            with mount_side(KERNEL, k_set) as k_mnt, mount_side(side, o_set) as o_mnt:
                lower_linked = _run_mounted(str(k_mnt), str(o_mnt), ops, side, workers,
                                            every_step, result)
        except AssertionError as exc:  # overlayfuse's teardown found a traceback in its log
            result.mismatch = daemon_mismatch(result.mismatch, str(exc), len(ops) - 1)
        if result.mismatch is None and check_upper:
            result.mismatch = compare_uppers(k_set, o_set, workers, len(ops) - 1, lower_linked)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def daemon_mismatch(seen: Mismatch | None, message: str, step: int) -> Mismatch:
    """The mismatch to report when the daemon logged a traceback (`message`)."""
    log_lines = message.splitlines()[:40]
    if seen is None:
        return Mismatch(step, "daemon", log_lines)
    seen.details += ["and the daemon logged:", *log_lines]
    return seen


@dataclass(slots=True)
class _UserWorkers:
    """The unprivileged caller on each side: started in the mount's root on first use (it
    cannot traverse pytest's tmp dir itself), killed before the unmount."""

    k_mnt: str
    o_mnt: str
    pair: tuple[Worker, Worker] | None = None

    def get(self) -> tuple[Worker, Worker]:
        if self.pair is None:
            self.pair = (Worker(SETPRIV, self.k_mnt), Worker(SETPRIV, self.o_mnt))
        return self.pair

    def close(self) -> None:
        if self.pair is not None:
            for worker in self.pair:
                worker.close()


def close_held_in(*workers: Worker) -> list[Any]:
    """Close the descriptors operations held, so that the unmount finds the mount idle; what
    each worker's closes failed with (None for a worker that hung)."""
    failed = []
    for worker in workers:
        try:
            failed.append(worker.call(close_held))
        except WorkerHung:
            failed.append(None)
    return failed


def _lower_hardlinked(snap: Snapshot) -> set[tuple[int, int]]:
    """The inodes of the starting tree's lower hardlink groups, as the kernel reports them."""
    return {snap.inodes[path] for group in LOWER_LINK_GROUPS for path in group
            if path in snap.inodes}


def _run_mounted(k_mnt: str, o_mnt: str, ops: Sequence[Op], side: Side, workers: Workers,
                 every_step: bool, result: Replay) -> set[str]:
    """Run and compare; return the paths that are, at the end, names of a lower hardlink
    group in the kernel's view (see `_drop_lower_hardlinked`)."""
    ours_is_kernel = side.is_kernel
    step = -1
    users = _UserWorkers(k_mnt, o_mnt)
    lower_inodes: set[tuple[int, int]] = set()
    k_snap = Snapshot()
    try:
        k_snap = workers.kernel.call(snapshot, k_mnt)
        lower_inodes = _lower_hardlinked(k_snap)
        problems = view_problems(k_snap, workers.ours.call(snapshot, o_mnt), ours_is_kernel)
        if problems:
            result.mismatch = Mismatch(step, "view", problems)
            return set()
        for step, op in enumerate(ops):
            if op[0] == "as_user":
                k_user, o_user = users.get()
                k_out = k_user.call(run_op, None, op[1])
                o_out = o_user.call(run_op, None, op[1])
            else:
                k_out = workers.kernel.call(run_op, k_mnt, op)
                o_out = workers.ours.call(run_op, o_mnt, op)
            result.outcomes.append((k_out, o_out))
            if not same_outcome(k_out, o_out, op, ours_is_kernel=ours_is_kernel):
                result.mismatch = Mismatch(
                    step, "outcome", [f"{render(op)}: kernel={k_out!r} ours={o_out!r}"])
                return set()
            if every_step or step == len(ops) - 1:
                k_snap = workers.kernel.call(snapshot, k_mnt)
                problems = view_problems(k_snap, workers.ours.call(snapshot, o_mnt),
                                         ours_is_kernel)
                if problems:
                    result.mismatch = Mismatch(step, "view", problems)
                    return set()
    except WorkerHung as exc:
        result.mismatch = Mismatch(step, "hang", [str(exc)])
    finally:
        users.close()
        k_failed, o_failed = close_held_in(workers.kernel, workers.ours)
    if result.mismatch is None and k_failed != o_failed:
        result.mismatch = Mismatch(len(ops) - 1, "outcome", [
            f"closing the held descriptors at the end: kernel={k_failed!r} ours={o_failed!r}"])
    return {path for path, inode in k_snap.inodes.items() if inode in lower_inodes}


def compare_uppers(k_set: LayerSet, o_set: LayerSet, workers: Workers, step: int,
                 lower_linked: set[str], *, dir_mtimes: bool = True) -> Mismatch | None:
    """Mount the kernel (`UPPER_CHECK_OPTIONS`) on each side's upper dir, with a fresh workdir: the
    views must agree.

    A fresh workdir on both sides, because neither side's workdir is the other's format; see
    `_drop_lower_hardlinked` for what that costs. DIR_MTIMES: see `view_problems`.
    """
    views = []
    for layers, worker in ((k_set, workers.kernel), (o_set, workers.ours)):
        work = layers.root / "work-check"
        mnt = layers.root / "mnt-check"
        work.mkdir()
        try:
            with kernel_overlay(mnt, layers.lowers, layers.upper, work, UPPER_CHECK_OPTIONS):
                views.append(worker.call(snapshot, str(mnt)))
        except MountError as exc:
            return Mismatch(step, "upper", [f"the kernel refuses {layers.upper}: {exc}"])
        except WorkerHung as exc:
            return Mismatch(step, "upper", [str(exc)])
    _drop_lower_hardlinked(lower_linked, *views)
    problems = view_problems(views[0], views[1], True, dir_mtimes=dir_mtimes)
    return Mismatch(step, "upper", problems) if problems else None


def _drop_lower_hardlinked(paths: set[str], *views: Snapshot) -> None:
    """Forget the names of the starting tree's lower hardlinks (h1/h2, t1/d/t2/m/t3, and any
    name linked to them since); every other file is compared, whatever its link count.

    What a hardlinked lower file shows after a copy-up depends on an index kept in workdir,
    which a fresh workdir does not have (the kernel's own upper loses its links too), and each
    side's index is invisible to the other (README, "Where we differ").  The live comparison
    checks these names; the upper check cannot.  Upper-only hardlinks have no such index and
    are compared in full.
    """
    for view in views:
        for path in paths:
            view.entries.pop(path, None)
            view.inodes.pop(path, None)
