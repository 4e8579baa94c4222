"""How much disk the store uses, by kind: what ``overlayctl system df`` reports.

Sizes are disk use (allocated blocks, as ``du`` counts them), each inode once however many names it
has (an export hardlinks blobs; a layer's hardlinks share blocks). Symlinks are never followed.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Usage:
    """One line of ``system df``."""

    kind: str
    count: int
    size: int  # bytes on disk


def disk_use(paths: list[Path], seen: set[tuple[int, int]]) -> int:
    """The bytes allocated to everything under PATHS whose inode is not in SEEN (which grows)."""
    total = 0
    pending = [os.fspath(p) for p in paths]
    while pending:
        path = pending.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # removed meanwhile (a command ran beside us)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as entries:
                    pending.extend(entry.path for entry in entries)
            except OSError as exc:
                log.warning("cannot read %s: %s", path, exc.strerror or exc)
    return total


def store_usage(store: Store) -> list[Usage]:
    """Blobs, layers, containers and the whole store; call it locked (or accept a moving target)."""
    seen: set[tuple[int, int]] = set()
    blobs = [p for p in (store.root / "blobs" / "sha256").iterdir() if not p.name.startswith(".")]
    layers = [p for p in (store.root / "layers").iterdir() if not p.name.startswith(".")]
    containers = [store.container_path(c.name) for c in store.containers()]
    rows = [
        Usage("Images", len(store.images()), 0),
        Usage("Blobs", len(blobs), disk_use(blobs, seen)),
        Usage("Layers", len(layers), disk_use(layers, seen)),
        Usage("Containers", len(containers), disk_use(containers, seen)),
    ]
    other = disk_use([store.root], seen)  # records, tmp/, the lock: what the rows above did not count
    total = sum(row.size for row in rows) + other
    images = rows[0]
    return [Usage(images.kind, images.count, rows[1].size + rows[2].size), *rows[1:], Usage("Total", 0, total)]
