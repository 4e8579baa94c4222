"""Random operation sequences through overlayfuse and kernel overlayfs must agree (see
tests/differential/__init__.py).

CI mode (the default) runs sequential sequences for OVERLAYFUSE_DIFF_SECONDS (75) and the
concurrent mode for OVERLAYFUSE_DIFF_CONCURRENT_SECONDS (30), each with a fresh seed every run;
the seed is printed at the start, and a failure prints the one-line command that replays the
failing sequence.  Each test asserts a floor on the operations it ran (below it, the budget
was eaten by something other than testing) and prints the count in the log, green or red.

    OVERLAYFUSE_DIFF_SEED=abc ./scripts/test tests/daemon/test_differential.py   # the same run again
    OVERLAYFUSE_DIFF_REPLAY=abc-17 \
        ./scripts/test tests/daemon/test_differential.py::test_overlayfuse_matches_kernel
    ./scripts/test tests/daemon/test_differential.py --long 3600                  # an hour

The harness tests check the machinery kernel against kernel: identical mounts must agree, in
both modes, and a kernel mounted without redirect_dir/index (a known, different behaviour)
must be caught with a short sequence.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.differential import KERNEL, OVERLAYFUSE, Budget, Side, explore, explore_concurrently, replay
from tests.support.differential.ops import LONG, TOO_LONG, Op, Outcome
from tests.support.differential.worker import Workers

SECONDS = float(os.environ.get("OVERLAYFUSE_DIFF_SECONDS", "75"))
CONCURRENT_SECONDS = float(os.environ.get("OVERLAYFUSE_DIFF_CONCURRENT_SECONDS",
                                          "30" if SECONDS <= 300 else str(SECONDS / 3)))
_SEED = os.environ.get("OVERLAYFUSE_DIFF_SEED", "random")
SEED = secrets.token_hex(4) if _SEED == "random" else _SEED
#: A single sequence to replay ("SEED-N", as a failure prints it), instead of exploring.
ONLY = os.environ.get("OVERLAYFUSE_DIFF_REPLAY") or None
LENGTH = int(os.environ.get("OVERLAYFUSE_DIFF_LENGTH", "30"))
ROUNDS = int(os.environ.get("OVERLAYFUSE_DIFF_ROUNDS", "12"))
MAX_SEQUENCES = 10**9 if SECONDS > 300 else 400  # CI: bounded by count as well as time
SHRINK_SECONDS = 60.0 if SECONDS <= 300 else 600.0
#: Floors on the operations run in CI's budgets, about a third of what two busy cores manage
#: (sequential ~30 operations/s, concurrent ~40/s): below them the budget went elsewhere.
MIN_OPERATIONS = 0 if ONLY else int(SECONDS * 10)
MIN_CONCURRENT_OPERATIONS = 0 if ONLY else int(CONCURRENT_SECONDS * 10)
# pytest-timeout (120 s by default in pyproject) must leave room for the budget and a shrink.
TEST_TIMEOUT = int(SECONDS + SHRINK_SECONDS + 120)
REPLAY = "OVERLAYFUSE_DIFF_REPLAY={seed} ./scripts/test tests/daemon/test_differential.py::{test}"

pytestmark = [pytest.mark.kernel]


@pytest.fixture
def say(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print past pytest's capture: the seed and the counts belong in the CI log, green or red."""
    def _say(message: str) -> None:
        with capsys.disabled():
            print(f"\n[differential] {message}", flush=True)
    return _say


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT)
def test_overlayfuse_matches_kernel(tmp_path: Path, overlayfuse_bin: Path,
                                    say: Callable[[str], None]) -> None:
    say(f"seed {SEED!r}" + (f", replaying {ONLY!r}" if ONLY else "") +
        f"; run again with OVERLAYFUSE_DIFF_SEED={SEED}")
    budget = Budget(SECONDS, 1 if ONLY else MAX_SEQUENCES, LENGTH, SHRINK_SECONDS)
    result = explore(tmp_path, OVERLAYFUSE, budget, SEED, say, only=ONLY,
                     replay_command=REPLAY.replace("{test}", "test_overlayfuse_matches_kernel"))
    say(f"seed {SEED!r}: {result.sequences} sequences, {result.operations} operations "
        f"in {result.elapsed:.0f}s (floor {MIN_OPERATIONS})")
    assert result.failure is None, result.failure
    assert result.operations >= MIN_OPERATIONS, "the differential ran too few operations"


@pytest.mark.mount
@pytest.mark.timeout(int(CONCURRENT_SECONDS + 120))
def test_overlayfuse_matches_kernel_concurrently(tmp_path: Path, overlayfuse_bin: Path,
                                                 say: Callable[[str], None]) -> None:
    say(f"concurrent seed {SEED!r}; run again with OVERLAYFUSE_DIFF_SEED={SEED}")
    budget = Budget(CONCURRENT_SECONDS, 1 if ONLY else MAX_SEQUENCES, ROUNDS, 0)
    result = explore_concurrently(tmp_path, OVERLAYFUSE, budget, SEED, say, only=ONLY,
                                  replay_command=REPLAY.replace(
                                      "{test}", "test_overlayfuse_matches_kernel_concurrently"))
    say(f"concurrent seed {SEED!r}: {result.sequences} sequences, {result.operations} "
        f"operations in {result.elapsed:.0f}s (floor {MIN_CONCURRENT_OPERATIONS})")
    assert result.failure is None, result.failure
    assert result.operations >= MIN_CONCURRENT_OPERATIONS, "too few concurrent operations"


@pytest.mark.timeout(120)
def test_harness_kernel_matches_kernel(tmp_path: Path, say: Callable[[str], None]) -> None:
    """Two kernel mounts of identical trees agree, step by step, including the upper check."""
    result = explore(tmp_path, KERNEL, Budget(20, 30, LENGTH, 0), SEED, say)
    say(f"kernel vs kernel, seed {SEED!r}: {result.sequences} sequences, "
        f"{result.operations} operations")
    assert result.failure is None, result.failure
    assert result.operations >= 150


@pytest.mark.timeout(120)
def test_harness_kernel_matches_kernel_concurrently(tmp_path: Path,
                                                    say: Callable[[str], None]) -> None:
    result = explore_concurrently(tmp_path, KERNEL, Budget(15, 10, ROUNDS, 0), SEED, say)
    say(f"kernel vs kernel concurrently, seed {SEED!r}: {result.sequences} sequences, "
        f"{result.operations} operations")
    assert result.failure is None, result.failure
    assert result.operations >= 100


@pytest.mark.timeout(180)
def test_harness_shrinks_a_real_difference(tmp_path: Path, say: Callable[[str], None]) -> None:
    """Without redirect_dir/index the kernel renames merged dirs with EXDEV and breaks lower
    hardlinks on copy-up: the exploration must see it and shrink it to a call or two."""
    plain = Side("kernel", "redirect_dir=off,index=off")
    result = explore(tmp_path, plain, Budget(60, 20, LENGTH, 60), "shrink-check", say,
                     only=ONLY, replay_command=REPLAY.replace(
                         "{test}", "test_harness_shrinks_a_real_difference"))
    assert result.failure is not None, "a kernel without redirect_dir/index compared equal"
    say(result.failure)
    calls = [line for line in result.failure.splitlines() if line.startswith("    ")
             and "# kernel=" in line]
    assert 1 <= len(calls) <= 2, result.failure
    assert "after" in result.failure and "shrink trials" in result.failure
    assert "replay it: OVERLAYFUSE_DIFF_REPLAY=shrink-check-" in result.failure


#: Sequences whose kernel outcomes are known (POSIX, and what overlayfs does with
#: redirect_dir=on,index=on): the new kinds of operation work on the oracle side as meant.
#: (sequence, {step: expected outcome})
KNOWN: list[tuple[list[Op], dict[int, Outcome]]] = [
    # A write or an open(O_TRUNC) by a non-owner clears S_ISUID and S_ISGID.
    ([("chmod", "a", 0o6777), ("as_user", ("open_trunc", "a")), ("stat", "a")],
     {2: ("ok", ("file", "100777", 0, 0, 1, 0, "clock"))}),
    ([("chmod", "a", 0o6777), ("as_user", ("write_trunc", "a", ("q", 3))), ("stat", "a")],
     {2: ("ok", ("file", "100777", 0, 0, 1, 3, "clock"))}),
    ([("chmod", "a", 0o600), ("as_user", ("read", "a"))], {1: ("err", "EACCES")}),
    # A descriptor outlives its name: fstat, write and pread through it after the unlink.
    ([("hold", 0, "a", "rw"), ("unlink", "a"), ("fd_write", 0, ("q", 3)), ("fd_fstat", 0),
      ("fd_read", 0, 0, 100), ("stat", "a")],
     {2: ("ok", 3), 3: ("ok", ("file", "100644", 0, 0, 0, 10, "clock")), 5: ("err", "ENOENT")}),
    # Unlinking one name of a lower hardlink leaves the other, with one link.
    ([("hold", 0, "h1", "r"), ("unlink", "h1"), ("fd_fstat", 0), ("stat", "h2")],
     {2: ("ok", ("file", "100644", 0, 0, 1, 17, 1600000000123456789)),
      3: ("ok", ("file", "100644", 0, 0, 1, 17, 1600000000123456789))}),
    # Renaming a name over another name of the same inode does nothing.
    ([("link", "h1", "h3"), ("rename", "h1", "h3"), ("stat", "h1")],
     {2: ("ok", ("file", "100644", 0, 0, 3, 17, 1600000000123456789))}),
    # A directory handle rewound after changes lists what is there now.
    ([("dir_hold", 0, "d"), ("dir_read_some", 0), ("unlink", "d/x"),
      ("create_excl", "d/new", ("q", 1)), ("dir_rewind_list", 0)],
     {4: ("ok", (["b", "e", "new", "t2"], []))}),
    # 255-byte names work, 256 do not; paths of 4094 and 4095 bytes work, 4097 do not.
    ([("create_excl", LONG, ("q", 1)), ("create_excl", TOO_LONG, ("q", 1))],
     {0: ("ok", 1), 1: ("err", "ENAMETOOLONG")}),
    ([("deep_mkdirs", "d", 16), ("deep", "d", 15, "f" * 254, "create"),
      ("deep", "d", 15, "f" * 255, "create"), ("deep", "d", 16, "f", "create"),
      ("deep_here", "d", 16, "create"), ("deep_here", "d", 16, "rename"), ("rmtree", "d")],
     {0: ("ok", 16), 1: ("ok", 5), 2: ("ok", 5), 3: ("err", "ENAMETOOLONG"), 4: ("ok", 5),
      5: ("ok", None), 6: ("ok", 26)}),
]


@pytest.mark.timeout(180)
def test_harness_kernel_outcomes_are_the_known_ones(tmp_path: Path) -> None:
    """The oracle side of the new operations does what the kernel is known to do (so a
    harness bug cannot make both sides agree on nonsense), and two kernels agree on it."""
    workers = Workers()
    try:
        for ops, expected in KNOWN:
            result = replay(tmp_path / "known", ops, KERNEL, workers)
            assert result.mismatch is None, (ops, result.mismatch)
            seen = {step: result.outcomes[step][0] for step in expected}
            assert seen == expected, ops
    finally:
        workers.close()
