"""Exploring: random sequences replayed until one mismatches, then shrunk and reported.

When a sequence mismatches, `Shrinker` reduces it by delta debugging (each candidate replayed on
fresh trees and mounts) and `report` prints it as Python calls to run in the mount's root.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.compare import MAX_REPORTED
from tests.support.differential.calls import render
from tests.support.differential.concurrent import WORKERS, Pool, generate_rounds, render_rounds, replay_concurrently
from tests.support.differential.ops import Op, Outcome, generate
from tests.support.differential.replay import KERNEL_OPTIONS, Replay, Side, replay
from tests.support.differential.worker import Workers

# --- shrinking --------------------------------------------------------------------------


@dataclass(slots=True)
class Shrinker:
    """Delta debugging (ddmin) over a failing sequence, each candidate on fresh mounts."""

    root: Path
    side: Side
    workers: Workers
    deadline: float
    trials: int = 0

    def fails(self, ops: Sequence[Op]) -> bool:
        self.trials += 1
        return replay(self.root, ops, self.side, self.workers, every_step=False).mismatch is not None

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def shrink(self, ops: list[Op], outcomes: Sequence[tuple[Outcome, Outcome]]) -> list[Op]:
        # First, one cheap guess: drop the calls that only read, and those that failed the same
        # way on both sides (they rarely change state).
        padded = [*outcomes[:len(ops)], *[None] * (len(ops) - len(outcomes))]
        keep = [op for op, seen in zip(ops, padded, strict=True)
                if op[0] not in ("read", "listdir", "stat")
                and not (seen is not None and seen[0][0] == "err" and seen[0] == seen[1])]
        if len(keep) < len(ops) and self.fails(keep):
            ops = keep
        return self.ddmin(ops)

    def ddmin(self, ops: list[Op]) -> list[Op]:
        n = 2
        while len(ops) >= 2 and not self.out_of_time():
            chunk = -(-len(ops) // n)
            parts = [ops[i:i + chunk] for i in range(0, len(ops), chunk)]
            reduced = False
            for i in range(len(parts)):  # a complement first: it removes the most
                complement = [op for j, part in enumerate(parts) if j != i for op in part]
                if self.out_of_time():
                    break
                if self.fails(complement):
                    ops, n, reduced = complement, max(n - 1, 2), True
                    break
            if not reduced and not self.out_of_time() and n > 2:
                for part in parts:
                    if self.out_of_time():
                        break
                    if self.fails(part):
                        ops, n, reduced = part, 2, True
                        break
            if not reduced:
                if n >= len(ops):
                    break
                n = min(len(ops), 2 * n)
        if len(ops) == 1 and not self.out_of_time() and self.fails([]):
            return []
        return ops


# --- reports ----------------------------------------------------------------------------


def report(side: Side, seed: str, original: Replay, minimal: Replay, trials: int,
           shrink_done: bool) -> str:
    m = minimal.mismatch
    assert m is not None and original.mismatch is not None
    lines = [
        f"{side} differs from kernel overlayfs ({KERNEL_OPTIONS}); sequence seed {seed!r}, "
        f"{len(original.ops)} -> {len(minimal.ops)} operations after {trials} shrink trials"
        + ("" if shrink_done else " (shrink budget exhausted: may not be minimal)"),
        f"first seen: {original.mismatch.summary()}",
        "Starting tree: tests.support.differential.starting_layers(), upper empty. In the mount's root:",
        "    from tests.support.syscalls import rename_exchange, rename_noreplace",
    ]
    for i, op in enumerate(minimal.ops):
        outcome = ""
        if i < len(minimal.outcomes):
            k, o = minimal.outcomes[i]
            outcome = f"  # kernel={_short(k)}" + ("" if k == o else f" ours={_short(o)}")
        lines.append(f"    {render(op)}{outcome}")
    lines.append(f"mismatch ({m.where}, after step {m.step}):")
    lines += [f"    {d}" for d in m.details[:MAX_REPORTED]]
    if len(m.details) > MAX_REPORTED:
        lines.append(f"    ... and {len(m.details) - MAX_REPORTED} more")
    return "\n".join(lines)


def _short(outcome: Outcome) -> str:
    status, value = outcome
    if status == "ok":
        return "ok" if value is None else repr(value)
    return value if status == "err" else f"exception {value}"


# --- exploration ------------------------------------------------------------------------


@dataclass(slots=True)
class Budget:
    seconds: float
    max_sequences: int
    length: int
    shrink_seconds: float


@dataclass(slots=True)
class Exploration:
    sequences: int = 0
    operations: int = 0
    elapsed: float = 0.0
    failure: str | None = None


def sequence_seeds(base_seed: str, only: str | None) -> Iterator[str]:
    """The seed of each sequence: BASE-0, BASE-1, ...; or just `only`, to replay one."""
    if only is not None:
        yield only
        return
    yield from (f"{base_seed}-{i}" for i in itertools.count())


def _seeds_in_budget(result: Exploration, budget: Budget, base_seed: str, only: str | None,
                     start: float) -> Iterator[str]:
    """`sequence_seeds` while the budget lasts: each is handed out only while RESULT has run fewer
    than `budget.max_sequences` sequences and fewer than `budget.seconds` have passed since START."""
    for seed in sequence_seeds(base_seed, only):
        if result.sequences >= budget.max_sequences or time.monotonic() - start >= budget.seconds:
            return
        yield seed


def explore(root: Path, side: Side, budget: Budget, base_seed: str,
            log: Callable[[str], None] = print, *, only: str | None = None,
            replay_command: str = "") -> Exploration:
    """Run random sequences until one mismatches or the budget is spent; shrink a mismatch.

    `replay_command` (with ``{seed}``) is printed with a failure: the one line that replays
    the failing sequence by itself.
    """
    result = Exploration()
    workers = Workers()
    start = time.monotonic()
    try:
        for seed in _seeds_in_budget(result, budget, base_seed, only, start):
            ops = generate(random.Random(seed), budget.length)
            run = replay(root / "seq", ops, side, workers)
            result.sequences += 1
            result.operations += len(run.outcomes)
            if run.mismatch is None:
                continue
            log(f"sequence {seed!r}: {run.mismatch.summary()}; shrinking")
            failing = ops[:run.mismatch.step + 1] \
                if run.mismatch.where in ("outcome", "view", "hang") else ops
            shrinker = Shrinker(root / "shrink", side, workers,
                                time.monotonic() + budget.shrink_seconds)
            minimal_ops = shrinker.shrink(failing, run.outcomes)
            minimal = replay(root / "shrink", minimal_ops, side, workers)
            if minimal.mismatch is None:  # flaky: report the original as it was seen
                minimal = run
                log("the shrunk sequence did not fail again: reporting the original")
            result.failure = report(side, seed, run, minimal, shrinker.trials,
                                    not shrinker.out_of_time())
            if replay_command:
                result.failure += "\nreplay it: " + replay_command.format(seed=seed)
            break
    finally:
        workers.close()
        result.elapsed = time.monotonic() - start
    return result


def explore_concurrently(root: Path, side: Side, budget: Budget, base_seed: str,
                         log: Callable[[str], None] = print, *, only: str | None = None,
                         replay_command: str = "") -> Exploration:
    """The concurrent mode (see `concurrent`): `budget.length` rounds per sequence, no
    shrinking (which worker wins a race is not replayable), the failing rounds printed."""
    result = Exploration()
    pool = Pool()
    start = time.monotonic()
    try:
        for seed in _seeds_in_budget(result, budget, base_seed, only, start):
            rounds = generate_rounds(random.Random(seed), budget.length)
            run = replay_concurrently(root / "conc", rounds, side, pool)
            result.sequences += 1
            result.operations += run.operations
            if run.mismatch is None:
                continue
            m = run.mismatch
            lines = [f"{side} differs from kernel overlayfs ({KERNEL_OPTIONS}) with "
                     f"{WORKERS} workers per side; sequence seed {seed!r}",
                     "Starting tree: tests.support.differential.concurrent.shared_layers(), upper "
                     "empty; each worker in the mount's root, all at once, round by round:",
                     *render_rounds(rounds, m.step),
                     f"mismatch ({m.where}, in round {m.step}):",
                     *[f"    {d}" for d in m.details[:MAX_REPORTED]]]
            if replay_command:
                lines.append("replay it: " + replay_command.format(seed=seed))
            result.failure = "\n".join(lines)
            log(f"sequence {seed!r}: {m.summary()}")
            break
    finally:
        pool.close()
        result.elapsed = time.monotonic() - start
    return result
