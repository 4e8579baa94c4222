"""Differential testing of the write path: random operation sequences, kernel overlayfs as oracle.

A *sequence* is a list of operations (plain tuples such as ``("rename", "d", "m/sub")``) drawn
from a seeded generator over a small pool of names, so that collisions, copy-ups, whiteouts and
renames over lower content are frequent.  `replay` builds the same starting stack twice, mounts
it once with kernel overlayfs (``redirect_dir=on,index=on``: the kernel at its most POSIX) and
once with the side under test, applies every operation to both, and compares each call's outcome
(return value or errno name) and the whole merged view.  After unmounting, it mounts the kernel
on the tested side's upper dir and checks that the kernel sees what it saw itself: the upper dir
must stay kernel-compatible.

When a sequence mismatches, `shrink` reduces it by delta debugging (each candidate replayed on
fresh trees and mounts) and `render` prints it as Python calls to run in the mount's root.

Every filesystem call runs in a `Worker`, a child process killed on timeout, so a hung mount
fails a sequence instead of freezing the suite.  Workers hold descriptors across operations
(open, then unlink/rename/write by name, then fstat/pread/write through the descriptor), an
unprivileged worker (setpriv) runs the permission and set-id cases, and the concurrent mode
runs several workers per side at once.

The accepted differences between the two sides are listed, and normalised, in `differences`.

Modules, each importing only those above it:
- `ops`: the starting tree, the pool of names and arguments, the seeded generator;
- `differences`: how outcomes and views are compared, less the accepted differences;
- `calls`: what each operation does on a mount, and `render`, the same as Python;
- `worker`: `Worker`, running calls in a killable child process;
- `replay`: `Side` and `replay`, one sequence on the kernel and on the side under test;
- `concurrent`: several workers per side at once, compared on outcomes and end state;
- `explore`: `explore` and `explore_concurrently`, random sequences until one mismatches, then
  shrinking (sequential mode only) and the report.
"""

from tests.support.differential.calls import render
from tests.support.differential.explore import Budget, Exploration, explore, explore_concurrently
from tests.support.differential.ops import generate, starting_layers
from tests.support.differential.replay import KERNEL, OVERLAYFUSE, Replay, Side, replay

__all__ = [
    "KERNEL",
    "OVERLAYFUSE",
    "Budget",
    "Exploration",
    "Replay",
    "Side",
    "explore",
    "explore_concurrently",
    "generate",
    "render",
    "replay",
    "starting_layers",
]
