"""The namespace the workers share, and which errno each call may legitimately return.

Every name belongs to a class given by its first letter, and no operation ever changes the
type behind a class, in any layer or through the mount:

  d<N>  always a directory (mkdir, rmdir, rename onto other d names, exchange with d names)
  f<N>  always a regular file (create, unlink, rename and link onto other f names)
  s<N>  always a symlink (symlink, unlink, rename onto other s names); never a path component
        other than the last, and its target is relative without "..", so nothing the workers do
        could lead out of the tree even if a symlink were followed
  x<N>  a "swap" name: a file or a directory, swapped by RENAME_EXCHANGE; an x directory holds
        only f names

Paths are tuples of names from a fixed universe: up to MAX_DEPTH d components, then an x
component or not, then the last name.  So the only way a call can meet a non-directory in the
middle of a path is through an x component, and the only way it can meet the wrong type at the
end is at an x name.  That makes each errno decidable from the path alone:

  ENOENT     always expected: any name may be gone, or not there yet
  ENOTDIR    expected only when an x name is a component before the last (it may be a file),
             or, for calls that need a directory at the end (scandir, rmdir), at an x name
  EISDIR     expected only at an x name, for calls that need a non-directory (open for write,
             read, unlink, rename of a file onto it)
  EEXIST     expected only from calls that create a name (O_EXCL, mkdir, link, symlink)
  ENOTEMPTY  expected only from rmdir and from renaming a directory onto a directory (POSIX
             also allows EEXIST there; Linux, kernel overlayfs included, says ENOTEMPTY)
  EINVAL     expected only when a directory moves (rename or exchange of d names): a concurrent
             rename may have put the destination inside the source in between

Calls on an open file (read, write, fstat, ftruncate, close) expect nothing (but EISDIR from
reading an x name that opened as a directory); listing or fstatat through a held directory fd
expects ENOENT only (the directory, or the entry, may be gone).
This was checked against the oracle: `scripts/stress --target kernel` runs the same workers on
kernel overlayfs and comes out clean.

Everything else (EIO above all, ENOTDIR for a path of d names, ELOOP, ESTALE, ENOTCONN) is a
failure, and so are successful calls whose result breaks a class (`f3` listed as a directory,
a name that is in no class such as a leaked whiteout or temp file).
"""

from __future__ import annotations

import errno
import random
import re
import stat

Path = tuple[str, ...]

DIR_NAMES = ("d0", "d1", "d2", "d3")
FILE_NAMES = ("f0", "f1", "f2", "f3", "f4", "f5")
X_FILE_NAMES = ("f0", "f1", "f2")  # the files an x directory may hold
LINK_NAMES = ("s0", "s1")
SWAP_NAMES = ("x0", "x1", "x2")
MAX_DEPTH = 3  # d components in a directory path
# Symlink targets: relative, no "..": wherever the link is moved, they point inside the tree.
LINK_TARGETS = ("f0", "f1", "d0/f2", "x0", "d1/d2", "missing")

_NAME = re.compile(r"[dfsx][0-9]+")


def text(path: Path) -> str:
    return "/".join(path) if path else "."


def name_class(name: str) -> str | None:
    """'d', 'f', 's' or 'x'; None for a name outside every class (which must never appear)."""
    return name[0] if _NAME.fullmatch(name) else None


def type_allowed(name: str, mode: int) -> bool:
    """Whether an object of this mode may be at a name of this class."""
    cls = name_class(name)
    if cls == "d":
        return stat.S_ISDIR(mode)
    if cls == "f":
        return stat.S_ISREG(mode)
    if cls == "s":
        return stat.S_ISLNK(mode)
    if cls == "x":
        return stat.S_ISDIR(mode) or stat.S_ISREG(mode)
    return False


def type_name(mode: int) -> str:
    return {stat.S_IFDIR: "directory", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}.get(
        stat.S_IFMT(mode), f"type {stat.S_IFMT(mode):o}")


# --- the universe and random picks ---------------------------------------------------


def all_dirs(depth: int) -> list[Path]:
    """Every directory path of exactly `depth` d components."""
    paths: list[Path] = [()]
    for _ in range(depth):
        paths = [(*p, d) for p in paths for d in DIR_NAMES]
    return paths


def random_dir(rng: random.Random, lo: int = 0, hi: int = MAX_DEPTH) -> Path:
    """A d path; its depth is uniform, so shallow dirs (where renames collide) get most traffic."""
    depth = rng.randint(lo, hi)
    return tuple(rng.choice(DIR_NAMES) for _ in range(depth))


def random_file(rng: random.Random) -> Path:
    """An f path: in a d directory, or (one time in five) inside an x name."""
    parent = random_dir(rng)
    if rng.random() < 0.2:
        return (*parent, rng.choice(SWAP_NAMES), rng.choice(X_FILE_NAMES))
    return (*parent, rng.choice(FILE_NAMES))


def random_swap(rng: random.Random) -> Path:
    return (*random_dir(rng), rng.choice(SWAP_NAMES))


def random_link(rng: random.Random) -> Path:
    return (*random_dir(rng), rng.choice(LINK_NAMES))


def random_any(rng: random.Random) -> Path:
    """Any path of the universe (for staters and readers)."""
    roll = rng.random()
    if roll < 0.4:
        return random_file(rng)
    if roll < 0.65:
        return random_dir(rng, 1)
    if roll < 0.85:
        return random_swap(rng)
    return random_link(rng)


# --- which errno is a race, and which is a bug -----------------------------------------


def _through_swap(path: Path) -> bool:
    return any(name_class(c) == "x" for c in path[:-1])


def _at_swap(path: Path) -> bool:
    return bool(path) and name_class(path[-1]) == "x"


def lookup(*paths: Path) -> frozenset[int]:
    """Any call that resolves these paths: ENOENT, and ENOTDIR through an x component."""
    expected = {errno.ENOENT}
    if any(_through_swap(p) for p in paths):
        expected.add(errno.ENOTDIR)
    return frozenset(expected)


def needs_dir(path: Path) -> frozenset[int]:
    """scandir/opendir: the last name must be a directory (an x name may be a file)."""
    return lookup(path) | ({errno.ENOTDIR} if _at_swap(path) else set())


def needs_file(path: Path) -> frozenset[int]:
    """open for write, unlink: the last name must not be a directory (an x name may be one)."""
    return lookup(path) | ({errno.EISDIR} if _at_swap(path) else set())


def read_fd(path: Path) -> frozenset[int]:
    """read(2) through an fd opened O_RDONLY at `path` (an x directory opens, then EISDIR)."""
    return frozenset({errno.EISDIR}) if _at_swap(path) else frozenset()


def creates(path: Path, exclusive: bool) -> frozenset[int]:
    """open(O_CREAT) of a file: EEXIST only with O_EXCL."""
    return needs_file(path) | ({errno.EEXIST} if exclusive else set())


def makes_name(*paths: Path) -> frozenset[int]:
    """mkdir, link, symlink: the new name may exist already."""
    return lookup(*paths) | {errno.EEXIST}


def removes_dir(path: Path) -> frozenset[int]:
    """rmdir: it may have entries; at an x name it may be a file."""
    return needs_dir(path) | {errno.ENOTEMPTY}


def renames(src: Path, dst: Path) -> frozenset[int]:
    """rename(2) within one class. A directory may meet a non-empty one, or (a concurrent rename
    having moved things in between) the destination's parent may now be inside the source."""
    expected = set(lookup(src, dst))
    cls = name_class(src[-1])
    if cls == "d":
        expected |= {errno.ENOTEMPTY, errno.EINVAL}
    elif cls == "x":  # x onto x: file onto dir, dir onto file, dir onto non-empty dir
        expected |= {errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY}
    return frozenset(expected)


def exchanges(a: Path, b: Path) -> frozenset[int]:
    """renameat2(RENAME_EXCHANGE): both must exist; types may differ. d names may have become
    each other's ancestors through a concurrent rename (EINVAL); x directories hold no
    directories, so x<->x never can."""
    expected = set(lookup(a, b))
    if name_class(a[-1]) == "d" or name_class(b[-1]) == "d":
        expected.add(errno.EINVAL)
    return frozenset(expected)


HELD = frozenset({errno.ENOENT})
"""fstatat through a held dir fd, or listing it again: the entry (or the directory itself,
removed: getdents on a dead directory is ENOENT) may be gone."""

NOTHING = frozenset[int]()
"""Calls on an open regular file (pread, write, fstat, ftruncate) never fail for a race: an open
file stays usable after every name of it is gone or renamed."""
