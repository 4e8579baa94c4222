"""Random operation sequences through overlayfuse and kernel overlayfs must agree (see differential.py).

CI mode (the default) runs sequences for OVERLAYFUSE_DIFF_SECONDS (90) or at most MAX_SEQUENCES,
with the fixed seed OVERLAYFUSE_DIFF_SEED (0).  The long mode is the same test with more time
and, usually, a fresh seed:

    ./scripts/test tests/test_differential.py --long 3600
    (the same as OVERLAYFUSE_DIFF_SECONDS=3600 OVERLAYFUSE_DIFF_SEED=random)

A failure prints the shortest sequence the shrinker found, as Python calls, with each call's
outcome on both sides and the differences it leads to.  The two harness tests check the
machinery kernel against kernel: identical mounts must agree, and a kernel mounted without
redirect_dir/index (a known, different behaviour) must be caught with a short sequence.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.differential import KERNEL, OVERLAYFUSE, Budget, Side, explore

SECONDS = float(os.environ.get("OVERLAYFUSE_DIFF_SECONDS", "90"))
_SEED = os.environ.get("OVERLAYFUSE_DIFF_SEED", "0")
SEED = str(time.time_ns()) if _SEED == "random" else _SEED
LENGTH = int(os.environ.get("OVERLAYFUSE_DIFF_LENGTH", "30"))
MAX_SEQUENCES = 10**9 if SECONDS > 300 else 150  # CI: bounded by count as well as time
SHRINK_SECONDS = 60.0 if SECONDS <= 300 else 600.0
# pytest-timeout (120 s by default in pyproject) must leave room for the budget and a shrink.
TEST_TIMEOUT = int(SECONDS + SHRINK_SECONDS + 120)

pytestmark = [pytest.mark.kernel]


def _log(message: str) -> None:
    print(message, flush=True)


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT)
def test_overlayfuse_matches_kernel(tmp_path: Path, overlayfuse_bin: Path) -> None:
    budget = Budget(SECONDS, MAX_SEQUENCES, LENGTH, SHRINK_SECONDS)
    result = explore(tmp_path, OVERLAYFUSE, budget, SEED, _log)
    _log(f"seed {SEED!r}: {result.sequences} sequences, {result.operations} operations "
         f"in {result.elapsed:.0f}s")
    assert result.failure is None, result.failure
    assert result.sequences >= 1


@pytest.mark.timeout(120)
def test_harness_kernel_matches_kernel(tmp_path: Path) -> None:
    """Two kernel mounts of identical trees agree, step by step, including the upper check."""
    result = explore(tmp_path, KERNEL, Budget(15, 20, LENGTH, 0), SEED, _log)
    assert result.failure is None, result.failure
    assert result.sequences >= 3


@pytest.mark.timeout(180)
def test_harness_shrinks_a_real_difference(tmp_path: Path) -> None:
    """Without redirect_dir/index the kernel renames merged dirs with EXDEV and breaks lower
    hardlinks on copy-up: the exploration must see it and shrink it to a call or two."""
    plain = Side("kernel", "redirect_dir=off,index=off")
    result = explore(tmp_path, plain, Budget(60, 20, LENGTH, 60), "shrink-check", _log)
    assert result.failure is not None, "a kernel without redirect_dir/index compared equal"
    _log(result.failure)
    calls = [line for line in result.failure.splitlines() if line.startswith("    ")
             and "# kernel=" in line]
    assert 1 <= len(calls) <= 2, result.failure
    assert "after" in result.failure and "shrink trials" in result.failure
