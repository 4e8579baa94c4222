"""The concurrent mode: several workers per side at once, compared on outcomes and end state.

Each of `WORKERS` workers per side owns a copy of the starting tree (``w0/``, ``w1/``, ...) and
runs batches of random operations in it, all workers of both sides at the same time; the
outcomes in a worker's own tree do not depend on timing, so they are compared one by one.
Some rounds add one *contended* operation that every worker runs on the same names in ``x/``
(create the same file, unlink the same name, link to the same new name...): which worker wins
depends on timing, so for those only the multiset of outcomes (one ``ok``, the rest ``EEXIST``,
say: the errno classes) is compared.  Each contended operation is chosen so that the end state
does not depend on the winner, and the merged views are compared every few rounds and at the
end, then the upper dirs as in `replay`.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.compare import Snapshot, snapshot
from tests.support.differential.calls import render, run_ops
from tests.support.differential.differences import same_outcome, view_problems
from tests.support.differential.ops import LOWER_LINK_GROUPS, Op, Outcome, generate, relocate, relocated_layers
from tests.support.differential.replay import (
    KERNEL,
    Mismatch,
    Side,
    close_held_in,
    compare_uppers,
    daemon_mismatch,
    mount_side,
)
from tests.support.differential.worker import Worker, WorkerHung, Workers
from tests.support.rich_tree import build_layer_set
from tests.support.trees import Entry, File, HardLink

WORKERS = 3
BATCH = 4  # own-tree operations per worker per round
VIEW_EVERY = 4  # rounds between view comparisons
PREFIXES = [f"w{i}" for i in range(WORKERS)]

#: Operations every worker runs at once on the shared names; the multiset of outcomes and
#: the end state are the same whichever worker wins.
CONTENDED: tuple[Op, ...] = (
    ("create_excl", "x/new", ("q", 100)), ("mkdir", "x/nd"), ("rmdir", "x/nd"),
    ("unlink", "x/a"), ("unlink", "x/h1"), ("unlink", "x/new"), ("link", "x/h2", "x/h3"),
    ("link", "x/h1", "x/h3"), ("unlink", "x/h3"), ("rename", "x/b", "x/c"),
    ("rename", "x/c", "x/b"), ("append", "x/h2", ("r", 10)), ("write_trunc", "x/a", ("z", 5000)),
    ("rename_noreplace", "x/h2", "x/h4"), ("rename_noreplace", "x/h4", "x/h2"),
    ("create_excl", "x/h1", ("q", 1)), ("truncate", "x/h2", 3), ("mkdir", "x/h3"),
    ("stat", "x/h2"), ("read", "x/h1"), ("listdir", "x"),
)


def shared_layers() -> dict[str, list[Entry]]:
    layers = relocated_layers(PREFIXES)
    layers["l2"] += [File("x/b", b"x/b from l2\n")]
    layers["l3"] += [File("x/a", b"x/a from l3\n"), File("x/h1", b"x/h1 linked\n"),
                     HardLink("x/h2", "x/h1")]
    return layers


def lower_link_groups() -> list[tuple[str, ...]]:
    return [("x/h1", "x/h2"),
            *[tuple(f"{p}/{name}" for name in group) for p in PREFIXES
              for group in LOWER_LINK_GROUPS]]


@dataclass(frozen=True, slots=True)
class Round:
    batches: list[list[Op]]  # per worker, own tree
    contended: Op | None
    positions: list[int]  # where in each batch the contended op runs

    def ops_of(self, worker: int) -> list[Op]:
        ops = list(self.batches[worker])
        if self.contended is not None:
            ops.insert(self.positions[worker], self.contended)
        return ops


def generate_rounds(rng: random.Random, rounds: int) -> list[Round]:
    worker_rngs = [random.Random(rng.random()) for _ in range(WORKERS)]
    out = []
    for _ in range(rounds):
        batches = [[relocate(op, PREFIXES[i]) for op in generate(worker_rngs[i], BATCH,
                                                                  user=False)]
                   for i in range(WORKERS)]
        contended = rng.choice(CONTENDED) if rng.random() < 0.6 else None
        positions = [rng.randint(0, len(b)) for b in batches]
        out.append(Round(batches, contended, positions))
    return out


@dataclass(slots=True)
class ConcurrentReplay:
    rounds: list[Round]
    operations: int = 0
    mismatch: Mismatch | None = None


@dataclass(slots=True)
class Pool:
    """WORKERS workers for each side, kept across sequences."""

    kernel: list[Worker] = field(default_factory=lambda: [Worker() for _ in range(WORKERS)])
    ours: list[Worker] = field(default_factory=lambda: [Worker() for _ in range(WORKERS)])

    def close(self) -> None:
        for worker in (*self.kernel, *self.ours):
            worker.close()


def replay_concurrently(root: Path, rounds: Sequence[Round], side: Side,
                        pool: Pool) -> ConcurrentReplay:
    result = ConcurrentReplay(list(rounds))
    layers = shared_layers()
    shutil.rmtree(root, ignore_errors=True)
    try:
        k_set = build_layer_set(root / "kernel", layers, kernel=True)
        o_set = build_layer_set(root / "ours", layers, kernel=True)
        linked: set[str] = set()
        try:
            with mount_side(KERNEL, k_set) as k_mnt, mount_side(side, o_set) as o_mnt:
                linked = _run_rounds(str(k_mnt), str(o_mnt), side, pool, result)
        except AssertionError as exc:  # overlayfuse's teardown found a traceback in its log
            result.mismatch = daemon_mismatch(result.mismatch, str(exc), len(rounds) - 1)
        if result.mismatch is None:
            pair = Workers(pool.kernel[0], pool.ours[0])
            result.mismatch = compare_uppers(k_set, o_set, pair, len(rounds) - 1, linked, dir_mtimes=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _run_rounds(k_mnt: str, o_mnt: str, side: Side, pool: Pool,
                result: ConcurrentReplay) -> set[str]:
    ours_is_kernel = side.is_kernel
    step = -1
    k_snap = Snapshot()
    lower_inodes: set[tuple[int, int]] = set()
    try:
        k_snap = pool.kernel[0].call(snapshot, k_mnt)
        lower_inodes = {k_snap.inodes[p] for g in lower_link_groups() for p in g
                        if p in k_snap.inodes}
        for step, rnd in enumerate(result.rounds):
            for i in range(WORKERS):  # every worker of both sides at once
                pool.kernel[i].submit(run_ops, k_mnt, rnd.ops_of(i))
                pool.ours[i].submit(run_ops, o_mnt, rnd.ops_of(i))
            k_outs = [w.result() for w in pool.kernel]
            o_outs = [w.result() for w in pool.ours]
            result.operations += sum(len(o) for o in o_outs)
            problems = _round_problems(rnd, k_outs, o_outs, ours_is_kernel)
            if problems:
                result.mismatch = Mismatch(step, "outcome", problems)
                return set()
            if step % VIEW_EVERY == VIEW_EVERY - 1 or step == len(result.rounds) - 1:
                k_snap = pool.kernel[0].call(snapshot, k_mnt)
                problems = view_problems(k_snap, pool.ours[0].call(snapshot, o_mnt),
                                         ours_is_kernel, dir_mtimes=False)
                if problems:
                    result.mismatch = Mismatch(step, "view", problems)
                    return set()
    except WorkerHung as exc:
        result.mismatch = Mismatch(step, "hang", [str(exc)])
        for worker in (*pool.kernel, *pool.ours):  # the others may still be answering
            worker.close()
    finally:
        close_held_in(*pool.kernel, *pool.ours)
    return {path for path, inode in k_snap.inodes.items() if inode in lower_inodes}


def _round_problems(rnd: Round, k_outs: list[list[Outcome]], o_outs: list[list[Outcome]],
                    ours_is_kernel: bool) -> list[str]:
    problems = []
    contended_k: list[Outcome] = []
    contended_o: list[Outcome] = []
    for i in range(WORKERS):
        for pos, op in enumerate(rnd.ops_of(i)):
            k, o = k_outs[i][pos], o_outs[i][pos]
            if rnd.contended is not None and pos == rnd.positions[i]:
                contended_k.append(k)
                contended_o.append(o)
                if "exc" in (k[0], o[0]):
                    problems.append(f"worker {i}: {render(op)}: kernel={k!r} ours={o!r}")
            elif not same_outcome(k, o, op, ours_is_kernel=ours_is_kernel):
                problems.append(f"worker {i}: {render(op)}: kernel={k!r} ours={o!r}")
    if rnd.contended is not None and sorted(map(repr, contended_k)) != \
            sorted(map(repr, contended_o)):
        problems.append(f"all {WORKERS} workers at once: {render(rnd.contended)}: "
                        f"kernel={sorted(map(repr, contended_k))} "
                        f"ours={sorted(map(repr, contended_o))}")
    return problems


def render_rounds(rounds: Sequence[Round], upto: int) -> list[str]:
    lines = []
    for r, rnd in enumerate(rounds[:upto + 1]):
        lines.append(f"  round {r}:" + (f" contended: {render(rnd.contended)}"
                                         if rnd.contended is not None else ""))
        for i in range(WORKERS):
            lines.append(f"    worker {i}: " + "; ".join(render(op) for op in rnd.ops_of(i)))
    return lines
