"""A merged tree on plain directories, assembled as the daemon assembles it, with no mount.

`open_tree` takes layer directories (top first) and an upper and work dir and returns the
`MergedTree` the daemon would serve, so the union semantics (lookups, listings, copy-up, whiteouts,
renames) can be driven call by call and the result read straight off the upper dir.
"""

from __future__ import annotations

import os
from pathlib import Path

from overlayfuse.overlay.features import DEFAULT, CopyUpFeatures
from overlayfuse.overlay.layers import LayerStack
from overlayfuse.overlay.merged import Caller, MergedTree
from overlayfuse.overlay.upper import UpperDir
from overlayfuse.overlay.whiteout import MarkerStyle

ROOT = Caller(0, 0)


def open_tree(lowers: list[Path], upper: Path | None = None, work: Path | None = None,
              features: CopyUpFeatures = DEFAULT, style: MarkerStyle | None = None) -> MergedTree:
    """LOWERS (top first) under UPPER, with WORK as the workdir; read-only without UPPER. FEATURES:
    the copy-up features the mount options ask for (redirect_dir, metacopy; on by default). STYLE:
    the marker forms to write instead of the probed ones (root's are the kernel's)."""
    stack = LayerStack.from_dirs([str(p) for p in lowers], str(upper) if upper else None)
    if upper is None or work is None:
        return MergedTree(stack)
    os.makedirs(work, exist_ok=True)
    return MergedTree(stack, UpperDir.prepare(str(upper), str(work), stack.layers[0], features, style))
