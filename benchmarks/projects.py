"""Source-tree content for the workloads people notice: a git checkout, a tarball to build, small files.

- `build_git_checkout`: a checkout of about N files committed in a repository whose objects are
  packed (as a clone leaves them), in l1: ``git status`` runs on it through the mount;
- `build_source_tar`: a C-project-shaped tarball the build-like workload unpacks, "compiles" and
  removes;
- `write_random_list`: small files of the merged view, in a fixed random order, for the
  random-read workload.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections.abc import Sequence
from pathlib import Path

from .processes import run
from .settings import BIG_DIR, BUILD_DIR, GIT_TIMEOUT, RANDOM_READ_MAX
from .views import Entry

#: git without the machine's or user's configuration (the checkout must be the same everywhere).
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "bench",
           "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@localhost", "GIT_AUTHOR_DATE": "1700000000 +0000",
           "GIT_COMMITTER_DATE": "1700000000 +0000"}


def git(repo: Path, *args: str) -> list[str]:
    """A git command line on REPO (run with `GIT_ENV`): any owner is trusted, no background gc."""
    return ["git", "-C", str(repo), "-c", "safe.directory=*", "-c", "gc.auto=0", *args]


def _source_paths(files: int, rng: random.Random) -> list[tuple[str, int]]:
    """FILES (relative path, size) pairs shaped like a C project: nested module dirs of .c and .h
    files, sizes log-uniform from 500 B to 40 KiB."""
    out = []
    for i in range(files):
        module = f"src/mod{i // 400:02d}/sub{(i // 40) % 10}"
        ext = ".h" if i % 4 == 3 else ".c"
        out.append((f"{module}/unit{i:05d}{ext}", int(500 * 80 ** rng.random())))
    return out


def build_git_checkout(root: Path, files: int, seed: int = 4) -> None:
    """A repository at ROOT with FILES files committed, objects packed, the work tree clean."""
    rng = random.Random(seed)
    for rel, size in _source_paths(files, rng):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size // 2).hex().encode()[:size])
    env = os.environ | GIT_ENV
    for args in (("init", "-q"), ("add", "-A"), ("commit", "-q", "-m", "bench"), ("repack", "-adq"),
                 ("prune-packed",)):
        run(git(root, *args), GIT_TIMEOUT, env=env)


def build_source_tar(path: Path, files: int, seed: int = 5) -> int:
    """The build-like tarball: FILES sources under BUILD_DIR/; returns their bytes."""
    rng = random.Random(seed)
    total = 0
    made: set[str] = set()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for rel, size in _source_paths(files, rng):
            parts = f"{BUILD_DIR}/{rel}".split("/")
            for k in range(1, len(parts)):
                sub = "/".join(parts[:k])
                if sub not in made:
                    made.add(sub)
                    info = tarfile.TarInfo(sub)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                    tar.addfile(info)
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
            total += size
    return total


def write_random_list(path: Path, view: dict[str, Entry], files: int, skip: Sequence[str] = (BIG_DIR,),
                      seed: int = 6) -> int:
    """Up to FILES regular files of VIEW no bigger than RANDOM_READ_MAX, shuffled, written to PATH
    NUL-separated; returns how many."""
    small = sorted(p for p, e in view.items() if e[0] == "f" and e[2] <= RANDOM_READ_MAX
                   and not any(p == d or p.startswith(d + "/") for d in skip))
    rng = random.Random(seed)
    chosen = rng.sample(small, min(files, len(small)))
    path.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in chosen))
    return len(chosen)
