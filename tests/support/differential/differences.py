"""How the two sides are compared: call outcomes and merged views, less the accepted differences.

Accepted differences, normalised here (see `normalise` and `same_outcome`):
(1) kernel readdir lists whiteouts in non-merged directories (compare.py normalisation (a)); ours
    must list none; (2) raw st_ino/st_dev: only hardlink groups are compared; (3) directory
    st_size/st_blocks; (4) directory st_nlink; (5) mtimes, unless they carry one of the fixed
    values the trees were built with or the sequence set with utime: any other value means "set
    by the clock", and both sides must agree on that.  atime and ctime are never compared.
"""

from __future__ import annotations

import dataclasses
import os

from tests.support.compare import Snapshot, diff_views
from tests.support.differential.ops import UTIME_NS, Op, Outcome
from tests.support.rich_tree import LAYER_MTIME_NS
from tests.support.trees import DEFAULT_MTIME_NS

# Any mtime outside this set was set by a clock: the two sides only have to agree on that.
FIXED_MTIMES = frozenset({DEFAULT_MTIME_NS, *LAYER_MTIME_NS.values(), *UTIME_NS})

#: Directory mtimes are compared like any other (a fixed value must stay fixed): the kernel
#: restores a parent's timestamps after a copy-up, so a copy-up never shows in them.
#: OVERLAYFUSE_DIFF_DIR_MTIMES=0 ignores them, to look past that difference while exploring.
COMPARE_DIR_MTIMES = os.environ.get("OVERLAYFUSE_DIFF_DIR_MTIMES", "1") != "0"

#: st_blocks may differ by this much (512-byte units): one external xattr block, which the
#: kernel's own trusted.overlay.* xattrs on a copied-up file can push a user xattr into.
BLOCKS_SLACK = 8


def comparable_mtime(ns: int, is_dir: bool = False) -> int | str:
    """An mtime as a call's outcome reports it: a fixed value as itself, any other as "clock"."""
    return ns if ns in FIXED_MTIMES and (COMPARE_DIR_MTIMES or not is_dir) else "clock"


def _lists(op: Op) -> bool:
    """Whether `op`'s outcome is a listing, (visible names, names lstat says ENOENT)."""
    match op:
        case ("as_user", inner):
            return _lists(inner)
        case ("listdir" | "dir_rewind_list", *_) | ("deep", _, _, _, "listdir") \
                | ("deep_here", _, _, "listdir"):
            return True
    return False


def same_outcome(kernel: Outcome, ours: Outcome, op: Op, *, ours_is_kernel: bool) -> bool:
    """Whether two outcomes of `op` agree.  An exception other than OSError on either side is a
    harness bug and never agrees, not even with the same exception on the other side."""
    if "exc" in (kernel[0], ours[0]):
        return False
    if _lists(op) and kernel[0] == ours[0] == "ok" and not ours_is_kernel:
        # (1): kernel readdir may list whiteouts in a non-merged dir; ours must list none.
        return kernel[1][0] == ours[1][0] and not ours[1][1]
    return kernel == ours


def normalise(snap: Snapshot, dir_mtimes: bool = True) -> Snapshot:
    """The snapshot with the accepted differences (4) and (5) taken out; see the module doc."""
    out = dataclasses.replace(snap, entries=dict(snap.entries))
    compare_dirs = COMPARE_DIR_MTIMES and dir_mtimes
    for path, info in snap.entries.items():
        fixed = info.mtime_ns in FIXED_MTIMES and (compare_dirs or info.kind != "dir")
        out.entries[path] = dataclasses.replace(
            info,
            mtime_ns=info.mtime_ns if fixed else -1,
            nlink=-1 if info.kind == "dir" else info.nlink,
        )
    return out


def _forgive_blocks(kernel: Snapshot, ours: Snapshot) -> None:
    """Give ours the kernel's st_blocks where they differ by no more than BLOCKS_SLACK."""
    for path, o in ours.entries.items():
        k = kernel.entries.get(path)
        if (k is not None and k.blocks is not None and o.blocks is not None
                and abs(k.blocks - o.blocks) <= BLOCKS_SLACK):
            ours.entries[path] = dataclasses.replace(o, blocks=k.blocks)


def view_problems(kernel: Snapshot, ours: Snapshot, ours_is_kernel: bool, *,
                  dir_mtimes: bool = True) -> list[str]:
    """DIR_MTIMES false: directory mtimes are not compared (concurrent workers copying up into one
    parent race on restoring its times, so even two kernels disagree there)."""
    kernel, ours = normalise(kernel, dir_mtimes), normalise(ours, dir_mtimes)
    _forgive_blocks(kernel, ours)
    return diff_views(kernel, ours, ours_is_kernel=ours_is_kernel)
