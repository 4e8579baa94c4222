"""What a container changed, as ``docker diff`` prints it: A(dded), C(hanged), D(eleted) paths.

Changes are read from the upper dir alone (only it can differ from the image), and each path is
judged against the image's view, the merged lower layers, through `layers` (the same resolution
the daemon uses, so whiteouts and opaque dirs in the image itself count):

- A: the upper dir has it and the image does not;
- C: both have it; this includes directories the upper dir holds only as parents of a change, as
  docker reports them;
- D: the upper dir whites out something the image has, or an opaque (or replaced) directory hides
  an image entry it does not hold itself. Only the topmost deleted path is listed, not its content.

Paths are absolute from the container root and sorted. A directory renamed by a kernel mounted
with ``redirect_dir=on`` is reported at its new path with the entries its upper dir holds; its
content still in the lower layers is not listed (overlayfuse itself never writes redirects).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..overlay import layers, whiteout
from ..overlay.layers import Branch, LayerStack

log = logging.getLogger(__name__)

ChangeKind = Literal["A", "C", "D"]


@dataclass(frozen=True, slots=True)
class Change:
    """One changed path: KIND is "A", "C" or "D"; PATH is absolute from the container root."""

    kind: ChangeKind
    path: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def list_changes(lowers: Sequence[Path], upper: Path) -> list[Change]:
    """The changes UPPER makes over the image LOWERS (top first, as lowerdirs), sorted by path."""
    below: tuple[Branch, ...] = ()
    if lowers:
        below = LayerStack.from_dirs([os.fspath(p) for p in lowers], None).resolve_root().branches
    changes: list[Change] = []
    root = os.fspath(upper)
    markers = whiteout.read_dir_markers(root)
    _walk(root, "", markers, below, opaque=False, changes=changes)
    changes.sort(key=lambda change: change.path)
    return changes


def _walk(dir_path: str, rel: str, markers: whiteout.DirMarkers, below: tuple[Branch, ...],
          *, opaque: bool, changes: list[Change]) -> None:
    """Changes inside one upper directory. BELOW: the image's directory at the same path, as its
    branches (empty when the image has no directory there). OPAQUE: this directory hides all of
    BELOW (the layer root never does)."""
    listing = whiteout.read_layer_dir(dir_path, markers)
    for name, st in listing.entries.items():
        path = f"{rel}/{name}"
        in_image = layers.lookup(below, name) if below else None
        changes.append(Change("C" if in_image is not None else "A", path))
        if stat.S_ISDIR(st.st_mode):
            child_path = os.path.join(dir_path, name)
            child = whiteout.read_dir_markers(child_path)
            child_below = in_image.branches if in_image is not None and in_image.is_dir else ()
            if child.redirect and not child_below:
                log.debug("%s: renamed by the kernel (redirect %s); lower content not listed",
                          path, child.redirect)
            _walk(child_path, path, child, child_below,
                  opaque=child.opaque or name in listing.whiteouts, changes=changes)
    if not below:
        return  # nothing in the image here: nothing to delete
    hidden = {name for name, _ in layers.list_dir(below)} if opaque else set()
    deleted = hidden - listing.entries.keys()
    for name in listing.whiteouts.keys() - listing.entries.keys() - hidden:
        if layers.lookup(below, name) is not None:
            deleted.add(name)
    changes.extend(Change("D", f"{rel}/{name}") for name in deleted)
