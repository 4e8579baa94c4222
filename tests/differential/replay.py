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

from tests.compare import Snapshot, snapshot
from tests.differential.calls import render, run_op
from tests.differential.differences import same_outcome, view_problems
from tests.differential.ops import Op, Outcome, starting_layers
from tests.differential.worker import WorkerHung, Workers
from tests.mounts import MountError, kernel_overlay, overlayfuse
from tests.rich_tree import LayerSet, build_layer_set

KERNEL_OPTIONS = "redirect_dir=on,index=on"

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
        try:
            with mount_side(KERNEL, k_set) as k_mnt, mount_side(side, o_set) as o_mnt:
                _run_mounted(str(k_mnt), str(o_mnt), ops, side, workers, every_step, result)
        except AssertionError as exc:  # overlayfuse's teardown found a traceback in its log
            log_lines = str(exc).splitlines()[:40]
            if result.mismatch is None:
                result.mismatch = Mismatch(len(ops) - 1, "daemon", log_lines)
            else:
                result.mismatch.details += ["and the daemon logged:", *log_lines]
        if result.mismatch is None and check_upper:
            result.mismatch = _check_upper(k_set, o_set, workers, len(ops) - 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _run_mounted(k_mnt: str, o_mnt: str, ops: Sequence[Op], side: Side, workers: Workers,
                 every_step: bool, result: Replay) -> None:
    ours_is_kernel = side.is_kernel
    step = -1
    try:
        k_snap = workers.kernel.call(snapshot, k_mnt)
        problems = view_problems(k_snap, workers.ours.call(snapshot, o_mnt), ours_is_kernel)
        if problems:
            result.mismatch = Mismatch(step, "view", problems)
            return
        for step, op in enumerate(ops):
            k_out = workers.kernel.call(run_op, k_mnt, op)
            o_out = workers.ours.call(run_op, o_mnt, op)
            result.outcomes.append((k_out, o_out))
            if not same_outcome(k_out, o_out, op, ours_is_kernel=ours_is_kernel):
                result.mismatch = Mismatch(
                    step, "outcome", [f"{render(op)}: kernel={k_out!r} ours={o_out!r}"])
                return
            if every_step or step == len(ops) - 1:
                k_snap = workers.kernel.call(snapshot, k_mnt)
                problems = view_problems(k_snap, workers.ours.call(snapshot, o_mnt),
                                         ours_is_kernel)
                if problems:
                    result.mismatch = Mismatch(step, "view", problems)
                    return
    except WorkerHung as exc:
        result.mismatch = Mismatch(step, "hang", [str(exc)])


def _check_upper(k_set: LayerSet, o_set: LayerSet, workers: Workers, step: int) -> Mismatch | None:
    """Mount the kernel on each side's upper dir, with a fresh workdir: the views must agree.

    A fresh workdir on both sides, because neither side's workdir is the other's format; see
    `_drop_hardlinked` for what that costs.
    """
    views = []
    for layers, worker in ((k_set, workers.kernel), (o_set, workers.ours)):
        work = layers.root / "work-check"
        mnt = layers.root / "mnt-check"
        work.mkdir()
        try:
            with kernel_overlay(mnt, layers.lowers, layers.upper, work, KERNEL_OPTIONS):
                views.append(worker.call(snapshot, str(mnt)))
        except MountError as exc:
            return Mismatch(step, "upper", [f"the kernel refuses {layers.upper}: {exc}"])
        except WorkerHung as exc:
            return Mismatch(step, "upper", [str(exc)])
    _drop_hardlinked(*views)
    problems = view_problems(views[0], views[1], True)
    return Mismatch(step, "upper", problems) if problems else None


def _drop_hardlinked(*views: Snapshot) -> None:
    """Forget files with st_nlink > 1 on either side (their names stay in the listings).

    What a hardlinked lower file shows after a copy-up depends on an index kept in workdir,
    which a fresh workdir does not have (the kernel's own upper loses its links too), and
    which name the upper copy takes is not fixed: overlayfuse names it after the first name
    looked up.  The live comparison checks these files; the upper check cannot.
    """
    linked = {path for view in views for path, info in view.entries.items()
              if info.kind != "dir" and info.nlink > 1}
    for view in views:
        for path in linked:
            view.entries.pop(path, None)
            view.inodes.pop(path, None)
