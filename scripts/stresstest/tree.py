"""The two lower layers the stress runs on, built from the seed on plain disk before mounting.

lower0 (bottom): most of the universe's directories, about 60% of its files (a few hundred, a
tenth of them 64-256 KiB so that copy-ups take long enough to overlap other calls), pairs of
hardlinked files across directories, relative symlinks, and x names that are files or
directories.
lower1 (top): replaces some files, whites out others (0:0 character devices and OCI `.wh.`
files), marks a few directories opaque (trusted.overlay.opaque=y), adds files and
directories, and puts an x file over an x directory and the other way round.

Every name keeps its class's type in every layer (names.py), so the merged view starts valid.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from . import names

OPAQUE_XATTR = "trusted.overlay.opaque"


@dataclass(frozen=True, slots=True)
class Layers:
    """The built stack (top first, as lowerdir= wants it) and what is in it."""

    lowers: tuple[Path, ...]
    files: int
    dirs: int
    hardlinks: int
    symlinks: int
    whiteouts: int
    opaque_dirs: int

    def summary(self) -> dict[str, int]:
        return {"files": self.files, "dirs": self.dirs, "hardlinks": self.hardlinks,
                "symlinks": self.symlinks, "whiteouts": self.whiteouts,
                "opaque_dirs": self.opaque_dirs}


@dataclass(slots=True)
class _Counts:
    files: int = 0
    dirs: int = 0
    hardlinks: int = 0
    symlinks: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0


def _content(rng: random.Random) -> bytes:
    size = rng.randrange(64 << 10, 256 << 10) if rng.random() < 0.1 else rng.randrange(0, 4096)
    return rng.randbytes(size)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _bottom(root: Path, rng: random.Random, n: _Counts) -> list[names.Path]:
    """lower0; returns its directories (the root included)."""
    dirs: list[names.Path] = [()]
    for depth in range(1, names.MAX_DEPTH + 1):
        keep = {1: 1.0, 2: 0.9, 3: 0.5}[depth]
        dirs += [d for d in names.all_dirs(depth) if d[:-1] in dirs and rng.random() < keep]
    files: list[names.Path] = []
    for d in dirs:
        (root.joinpath(*d)).mkdir(parents=True, exist_ok=True)
        n.dirs += 1
        for f in names.FILE_NAMES:
            if rng.random() < 0.6:
                _write(root.joinpath(*d, f), _content(rng))
                files.append((*d, f))
                n.files += 1
        for s in names.LINK_NAMES:
            if rng.random() < 0.5:
                os.symlink(rng.choice(names.LINK_TARGETS), root.joinpath(*d, s))
                n.symlinks += 1
        for x in names.SWAP_NAMES:
            roll = rng.random()
            if roll < 0.45:
                _write(root.joinpath(*d, x), _content(rng))
                n.files += 1
            elif roll < 0.8:
                (root.joinpath(*d, x)).mkdir()
                n.dirs += 1
                for f in names.X_FILE_NAMES:
                    if rng.random() < 0.6:
                        _write(root.joinpath(*d, x, f), _content(rng))
                        n.files += 1
    # Hardlinks: a second name, in another directory, for some files.
    for src in rng.sample(files, min(80, len(files))):
        dst = (*rng.choice(dirs), rng.choice(names.FILE_NAMES))
        if not os.path.lexists(root.joinpath(*dst)):
            os.link(root.joinpath(*src), root.joinpath(*dst))
            n.hardlinks += 1
    return dirs


def _whiteout(path: Path, oci: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if oci:
        (path.parent / f".wh.{path.name}").write_bytes(b"")
    else:
        os.mknod(path, 0o600 | 0o020000, os.makedev(0, 0))  # S_IFCHR 0:0


def _top(root: Path, bottom: Path, dirs: list[names.Path], rng: random.Random,
         n: _Counts, oci: bool) -> None:
    """lower1, over lower0's directories."""
    root.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        for f in names.FILE_NAMES:
            below = bottom.joinpath(*d, f)
            roll = rng.random()
            if below.exists() and roll < 0.15:
                _write(root.joinpath(*d, f), _content(rng))  # replaced
                n.files += 1
            elif below.exists() and roll < 0.25:
                _whiteout(root.joinpath(*d, f), oci=oci and roll < 0.2)
                n.whiteouts += 1
            elif not below.exists() and roll < 0.1:
                _write(root.joinpath(*d, f), _content(rng))  # added
                n.files += 1
        for x in names.SWAP_NAMES:
            below = bottom.joinpath(*d, x)
            if rng.random() < 0.15:
                if below.is_dir():  # a file over a directory hides it
                    _write(root.joinpath(*d, x), _content(rng))
                    n.files += 1
                else:  # a directory over a file (or over nothing)
                    (root.joinpath(*d, x)).mkdir(parents=True)
                    _write(root.joinpath(*d, x, "f0"), _content(rng))
                    n.dirs += 1
                    n.files += 1
    for d in rng.sample([d for d in dirs if len(d) == 2], 3):
        top = root.joinpath(*d)
        top.mkdir(parents=True, exist_ok=True)
        os.setxattr(top, OPAQUE_XATTR, b"y")
        for stale in (top / "f1", top / ".wh.f1"):  # a whiteout made above, in this layer
            if os.path.lexists(stale):
                stale.unlink()
        _write(top / "f1", _content(rng))
        n.opaque_dirs += 1
        n.files += 1
    for d in rng.sample([d for d in names.all_dirs(3) if d not in dirs and d[:-1] in dirs], 4):
        _write(root.joinpath(*d, "f2"), _content(rng))  # a new directory with a file
        n.dirs += 1
        n.files += 1


def build(base: Path, seed: int, oci_whiteouts: bool = True) -> Layers:
    """Build base/lower0 and base/lower1 (both must not exist yet).

    Without `oci_whiteouts`, every whiteout is a 0:0 device: kernel overlayfs reads no `.wh.`
    files (it would list them)."""
    rng = random.Random(f"{seed}/tree")
    n = _Counts()
    bottom, top = base / "lower0", base / "lower1"
    bottom.mkdir(parents=True)
    dirs = _bottom(bottom, rng, n)
    _top(top, bottom, dirs, rng, n, oci_whiteouts)
    return Layers((top, bottom), n.files, n.dirs, n.hardlinks, n.symlinks, n.whiteouts,
                  n.opaque_dirs)
