"""The operations of a differential sequence: the starting tree, the pool of names and
arguments, and the seeded generator.

An operation is a plain tuple such as ``("rename", "d", "m/sub")``; what each one does on a mount
is in `calls`.  The names come from a small pool so that collisions, copy-ups, whiteouts and
renames over lower content are frequent.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from tests.trees import Entry, Fifo, File, HardLink, Opaque, Symlink, Whiteout

Op = tuple[Any, ...]  # (name, *arguments); see OPERATIONS
Outcome = tuple[str, Any]  # ("ok", value) | ("err", "ENOENT") | ("exc", "ValueError(...)")

# --- the starting tree ------------------------------------------------------------------

MiB = 1 << 20
BIG_DATA = bytes(range(256)) * (MiB // 256)


def starting_layers() -> dict[str, list[Entry]]:
    """Three lower layers and an empty upper, in kernel forms only (both sides read them).

    Merged dirs (d, d/e, m, m/sub), an opaque dir (o), whiteouts (w, d/e/z, and p/ghost in a
    non-merged dir), a lower hardlink pair (h1, h2), symlinks to a file and to a dir, a fifo,
    a file with a user xattr and a 1 MiB file.
    """
    return {
        "upper": [],
        "l1": [
            Whiteout("w"),
            Whiteout("d/e/z"),
            File("d/x", b"d/x from l1\n"),
            File("m/sub/l1deep", b"deep in l1\n"),
            File("p/k", b"pure l1 dir\n"),
            Whiteout("p/ghost"),
        ],
        "l2": [
            File("b", b"b from l2\n", mode=0o600),
            File("d/b", b"d/b from l2\n"),
            File("d/e/q", b"d/e/q from l2\n"),
            Opaque("o"),
            File("o/new", b"o/new above the opaque marker\n"),
            File("m/l2file", b"m/l2file\n"),
            Symlink("sd", "d"),
        ],
        "l3": [
            File("a", b"a from l3\n"),
            File("big", BIG_DATA),
            File("h1", b"hardlinked in l3\n"),
            HardLink("h2", "h1"),
            Fifo("f", 0o640),
            Symlink("s", "a"),
            File("xa", b"has an xattr\n", xattrs={"user.color": b"blue"}),
            File("d/x", b"d/x from l3\n"),
            File("d/e/y", b"d/e/y from l3\n"),
            File("d/e/z", b"whited out in l1\n"),
            File("o/old", b"hidden by the opaque o\n"),
            File("w", b"whited out in l1\n"),
            File("m/l3file", b"m/l3file\n", uid=1000, gid=1000),
            File("m/sub/l3deep", b"m/sub/l3deep\n"),
        ],
    }


# --- the pool of names and arguments, and the generator ---------------------------------

NAMES = (
    "a", "b", "c", "d", "d/x", "d/b", "d/c", "d/e", "d/e/y", "d/e/z", "d/e/q", "d/e/c", "m",
    "m/l3file", "m/sub", "m/sub/l1deep", "m/n", "o", "o/old", "o/new", "o/c", "p", "p/k",
    "p/ghost", "h1", "h2", "big", "f", "s", "sd", "sd/x", "w", "xa", "n",
)
FRESH = ("c", "n", "d/c", "d/e/c", "m/n", "o/c", "p/c", "w", "d/e/z", "o/old")  # new names
DIRS = ("d", "d/e", "m", "m/sub", "o", "p", "c", "n", "d/c", "m/n", "sd")
DATA = ("q", "r", "z")  # a write's data is CHAR * LENGTH
LENGTHS = (1, 3, 100, 5000, 200_000)
OFFSETS = (0, 2, 4096, MiB - 3, 2 * MiB + 5)
SIZES = (0, 1, 7, 5000, MiB, 3 * MiB)
MODES = (0o600, 0o755, 0o4755, 0o000, 0o1777)
XATTRS = ("user.color", "user.a")
XATTR_VALUES = (b"1", b"green")
UTIME_NS = (1_234_567_890_123_456_789, 1_111_111_111_000_000_001)
SYMLINK_TARGETS = ("a", "d", "../a", "nowhere")

# (weight, generator): writes and renames weigh most, they are where copy-up happens.
_GENERATORS: list[tuple[int, Callable[[random.Random], Op]]] = []


def _gen(weight: int) -> Callable[[Callable[[random.Random], Op]], Callable[[random.Random], Op]]:
    def register(func: Callable[[random.Random], Op]) -> Callable[[random.Random], Op]:
        _GENERATORS.append((weight, func))
        return func
    return register


def _name(rng: random.Random) -> str:
    return rng.choice(NAMES)


def _fresh(rng: random.Random) -> str:
    """Half the time a name that does not exist at first: creations must succeed often."""
    return rng.choice(FRESH) if rng.random() < 0.5 else rng.choice(NAMES)


def _dir(rng: random.Random) -> str:
    return rng.choice(DIRS) if rng.random() < 0.6 else rng.choice(NAMES)


def _data(rng: random.Random) -> tuple[str, int]:
    return (rng.choice(DATA), rng.choice(LENGTHS))


_gen(3)(lambda r: ("create_excl", _fresh(r), _data(r)))
_gen(3)(lambda r: ("write_trunc", _name(r), _data(r)))
_gen(3)(lambda r: ("append", _name(r), _data(r)))
_gen(3)(lambda r: ("pwrite", _name(r), r.choice(OFFSETS), _data(r)))
_gen(2)(lambda r: ("truncate", _name(r), r.choice(SIZES)))
_gen(2)(lambda r: ("read", _name(r)))
_gen(2)(lambda r: ("chmod", _name(r), r.choice(MODES)))
_gen(2)(lambda r: ("chown", _name(r)))
_gen(2)(lambda r: ("utime", _name(r), r.choice(UTIME_NS)))
_gen(2)(lambda r: ("setxattr", _name(r), r.choice(XATTRS), r.choice(XATTR_VALUES)))
_gen(1)(lambda r: ("removexattr", "xa" if r.random() < 0.3 else _name(r), r.choice(XATTRS)))
_gen(3)(lambda r: ("mkdir", _fresh(r)))
_gen(1)(lambda r: ("mkfifo", _fresh(r)))
_gen(2)(lambda r: ("symlink", r.choice(SYMLINK_TARGETS), _fresh(r)))
_gen(2)(lambda r: ("link", _name(r), _fresh(r)))
_gen(3)(lambda r: ("unlink", _name(r)))
_gen(3)(lambda r: ("rmdir", _dir(r)))
_gen(1)(lambda r: ("rmtree", _dir(r)))
_gen(5)(lambda r: ("rename", _name(r), _fresh(r)))
_gen(3)(lambda r: ("rename", _dir(r), _dir(r)))
_gen(2)(lambda r: ("rename_noreplace", _name(r), _fresh(r)))
_gen(2)(lambda r: ("rename_exchange", _name(r), _name(r)))
_gen(2)(lambda r: ("listdir", _dir(r)))
_gen(2)(lambda r: ("stat", _name(r)))


def generate(rng: random.Random, length: int) -> list[Op]:
    weights = [w for w, _ in _GENERATORS]
    funcs = [f for _, f in _GENERATORS]
    return [rng.choices(funcs, weights)[0](rng) for _ in range(length)]
