"""The operations of a differential sequence: the starting tree, the pool of names and
arguments, and the seeded generator.

An operation is a plain tuple such as ``("rename", "d", "m/sub")``; what each one does on a mount
is in `calls`.  The names come from a small pool so that collisions, copy-ups, whiteouts and
renames over lower content are frequent.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

from tests.support.trees import Dir, Entry, Fifo, File, HardLink, Opaque, Symlink, Whiteout

Op = tuple[Any, ...]  # (name, *arguments); see OPERATIONS
Outcome = tuple[str, Any]  # ("ok", value) | ("err", "ENOENT") | ("exc", "ValueError(...)")

# --- the starting tree ------------------------------------------------------------------

MiB = 1 << 20
BIG_DATA = bytes(range(256)) * (MiB // 256)


def starting_layers() -> dict[str, list[Entry]]:
    """Three lower layers and an empty upper, in kernel forms only (both sides read them).

    Merged dirs (d, d/e, m, m/sub), an opaque dir (o), whiteouts (w, d/e/z, and p/ghost in a
    non-merged dir), a lower hardlink pair (h1, h2), symlinks to a file and to a dir, a fifo,
    a file with a user xattr and a 1 MiB file; a lower hardlink trio across merged dirs (t1,
    d/t2, m/t3), and a sticky world-writable dir g holding a file of the unprivileged caller.
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
            File("t1", b"linked thrice in l3\n"),
            HardLink("d/t2", "t1"),
            HardLink("m/t3", "t1"),
            Dir("g", mode=0o1777),
            File("g/s1", b"a file in a 1777 dir\n", uid=1000, gid=1000),
        ],
    }


#: The starting tree's lower hardlink groups.
LOWER_LINK_GROUPS = (("h1", "h2"), ("t1", "d/t2", "m/t3"))

# --- the pool of names and arguments, and the generator ---------------------------------

LONG = "L" * 255  # NAME_MAX: a name of 255 bytes, and one byte more
TOO_LONG = "T" * 256
#: The segment of a deep relative path: 15 of them and a 254-byte leaf make 4094 bytes.
DEEP_SEGMENT = "D" * 255

NAMES = (
    "a", "b", "c", "d", "d/x", "d/b", "d/c", "d/e", "d/e/y", "d/e/z", "d/e/q", "d/e/c", "m",
    "m/l3file", "m/sub", "m/sub/l1deep", "m/n", "o", "o/old", "o/new", "o/c", "p", "p/k",
    "p/ghost", "h1", "h2", "big", "f", "s", "sd", "sd/x", "w", "xa", "n",
    "t1", "d/t2", "m/t3", "g", "g/s1", LONG, "d/" + LONG,
)
FRESH = ("c", "n", "d/c", "d/e/c", "m/n", "o/c", "p/c", "w", "d/e/z", "o/old",
         LONG, "d/" + LONG, "m/" + LONG, TOO_LONG)  # new names
DIRS = ("d", "d/e", "m", "m/sub", "o", "p", "c", "n", "d/c", "m/n", "sd", "g", "d/" + LONG)
#: Names of hardlinked objects, and fresh names to link them to: the lower pair h1/h2, the
#: lower trio t1, d/t2, m/t3 across merged dirs, and upper-only links made by the sequence.
LINKED = ("h1", "h2", "t1", "d/t2", "m/t3", "h3", "d/h4", "m/sub/h5", "o/h6", "p/h7",
          "d/" + LONG)
DATA = ("q", "r", "z")  # a write's data is CHAR * LENGTH
LENGTHS = (1, 3, 100, 5000, 200_000)
OFFSETS = (0, 2, 4096, MiB - 3, 2 * MiB + 5)
SIZES = (0, 1, 7, 5000, MiB, 3 * MiB)
MODES = (0o600, 0o755, 0o4755, 0o000, 0o1777, 0o6777, 0o2775, 0o666)
XATTRS = ("user.color", "user.a")
XATTR_VALUES = (b"1", b"green")
UTIME_NS = (1_234_567_890_123_456_789, 1_111_111_111_000_000_001)
SYMLINK_TARGETS = ("a", "d", "../a", "nowhere")
SLOTS = (0, 1, 2)
HOLD_HOW = ("r", "w", "rw", "trunc", "creat", "append")
DEEP_TOPS = ("d", "g", "m/sub")
#: (depth, leaf): 4094 and 4095 bytes (allowed), 4096 and more (ENAMETOOLONG), a dir itself.
DEEP_PATHS = ((15, "f" * 254), (15, "f" * 255), (16, "f"), (14, "f"), (15, ""), (13, "f"))
DEEP_ACTIONS = ("create", "stat", "unlink", "mkdir", "rename_up", "link_up", "listdir")
DEEP_HERE_ACTIONS = ("create", "stat", "rename", "link", "unlink", "listdir")

Generated = Op | list[Op]

# (weight, generator): writes, renames and links weigh most, they are where copy-up happens.
_GENERATORS: list[tuple[int, Callable[[random.Random], Generated]]] = []


def _gen(weight: int) -> Callable[[Callable[[random.Random], Generated]],
                                  Callable[[random.Random], Generated]]:
    def register(func: Callable[[random.Random], Generated]) -> Callable[[random.Random], Generated]:
        _GENERATORS.append((weight, func))
        return func
    return register


def _name(rng: random.Random) -> str:
    return rng.choice(NAMES) if rng.random() < 0.8 else rng.choice(LINKED)


def _fresh(rng: random.Random) -> str:
    """Half the time a name that does not exist at first: creations must succeed often."""
    return rng.choice(FRESH) if rng.random() < 0.5 else _name(rng)


def _dir(rng: random.Random) -> str:
    return rng.choice(DIRS) if rng.random() < 0.6 else rng.choice(NAMES)


def _linked(rng: random.Random) -> str:
    return rng.choice(LINKED)


def _data(rng: random.Random) -> tuple[str, int]:
    return (rng.choice(DATA), rng.choice(LENGTHS))


def _mutation(rng: random.Random, path: str) -> Op:
    """Something done by name to `path` (or another name of it) while a descriptor is held."""
    other = _linked(rng) if path in LINKED else _fresh(rng)
    return rng.choice([("unlink", path), ("rename", path, _fresh(rng)), ("rename", other, path),
                       ("write_trunc", path, _data(rng)), ("truncate", path, rng.choice(SIZES)),
                       ("chmod", path, rng.choice(MODES)), ("link", path, _fresh(rng)),
                       ("rename_exchange", path, other), ("unlink", other),
                       ("rmtree", path)])


def _held_use(rng: random.Random, slot: int) -> Op:
    return rng.choice([("fd_fstat", slot), ("fd_write", slot, _data(rng)),
                       ("fd_pwrite", slot, rng.choice(OFFSETS), _data(rng)),
                       ("fd_read", slot, rng.choice(OFFSETS), rng.choice(LENGTHS)),
                       ("fd_truncate", slot, rng.choice(SIZES)),
                       ("fd_fchmod", slot, rng.choice(MODES)), ("fd_close", slot)])


def _hold_scenario(rng: random.Random) -> list[Op]:
    """Open a name, change it by name (unlink, rename, write...), then use the descriptor."""
    slot = rng.choice(SLOTS)
    path = _linked(rng) if rng.random() < 0.5 else _name(rng)
    ops: list[Op] = [("hold", slot, path, rng.choice(HOLD_HOW))]
    for _ in range(rng.randint(1, 3)):
        ops.append(_mutation(rng, path) if rng.random() < 0.6 else _held_use(rng, slot))
    ops += [_held_use(rng, slot), ("fd_fstat", slot), ("read", path)]
    return ops


def _dir_scenario(rng: random.Random) -> list[Op]:
    """Open a directory, read some of it, change it, rewind and read it all."""
    slot = rng.choice(SLOTS)
    path = rng.choice(DIRS)
    child = rng.choice([n for n in NAMES + FRESH + LINKED if n.startswith(path + "/")]
                       or [path + "/c"])
    change = rng.choice([("unlink", child), ("create_excl", child, _data(rng)), ("mkdir", child),
                         ("rename", child, _fresh(rng)), ("rename", _name(rng), child),
                         ("rmtree", child), ("link", _linked(rng), child)])
    return [("dir_hold", slot, path), ("dir_read_some", slot), change,
            *([change] if rng.random() < 0.2 else []), ("dir_rewind_list", slot),
            ("dir_read_some", slot)]


def _link_chain(rng: random.Random) -> list[Op]:
    a, b, c = (_linked(rng) for _ in range(3))
    return [("link", a, b), ("link", b, c), ("stat", a)]


def _rename_ring(rng: random.Random) -> list[Op]:
    """Renames round names of one inode (a no-op where both names exist) and others."""
    names = rng.sample(LINKED, 3)
    return [("rename", names[0], names[1]), ("rename", names[1], names[2]),
            ("rename", names[2], names[0]), ("stat", names[0])]


def _as_user(rng: random.Random) -> list[Op]:
    """Permission and set-id cases: root makes a file set-id or shared, an unprivileged
    caller writes, truncates, chmods it (the kernel clears S_ISUID/S_ISGID on a write by a
    non-owner)."""
    path = rng.choice([*NAMES[:34], *LINKED[:5], "m/l3file"])
    setup = rng.choice([("chmod", path, rng.choice((0o6777, 0o4777, 0o2777, 0o666, 0o1777))),
                        ("write_trunc", path, _data(rng)), ("chown", path), ("stat", path)])
    inner = rng.choice([("write_trunc", path, _data(rng)), ("append", path, _data(rng)),
                        ("open_trunc", path), ("open_trunc", path),
                        ("pwrite", path, rng.choice(OFFSETS), _data(rng)),
                        ("truncate", path, rng.choice(SIZES)), ("chmod", path, 0o755),
                        ("unlink", path), ("rename", path, _fresh(rng)), ("read", path),
                        ("create_excl", rng.choice(FRESH), _data(rng)), ("mkdir", _fresh(rng)),
                        ("link", path, _fresh(rng)), ("utime", path, UTIME_NS[0]),
                        ("setxattr", path, "user.a", b"1"), ("listdir", _dir(rng))])
    return [setup, ("as_user", inner), ("stat", path)]


def _deep_scenario(rng: random.Random) -> list[Op]:
    top = rng.choice(DEEP_TOPS)
    depth, leaf = rng.choice(DEEP_PATHS)
    ops: list[Op] = []
    if rng.random() < 0.8:
        ops.append(("deep_mkdirs", top, rng.choice((15, 16))))
    ops.append(("deep", top, depth, leaf, rng.choice(DEEP_ACTIONS)))
    if rng.random() < 0.5:
        ops.append(("deep_here", top, rng.choice((14, 15, 16)), rng.choice(DEEP_HERE_ACTIONS)))
    return ops


_gen(3)(lambda r: ("create_excl", _fresh(r), _data(r)))
_gen(3)(lambda r: ("write_trunc", _name(r), _data(r)))
_gen(3)(lambda r: ("append", _name(r), _data(r)))
_gen(3)(lambda r: ("pwrite", _name(r), r.choice(OFFSETS), _data(r)))
_gen(2)(lambda r: ("truncate", _name(r), r.choice(SIZES)))
_gen(1)(lambda r: ("open_trunc", _name(r)))
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
# hardlinks: links between linked names, unlinking one of several names, chains and rings
_gen(4)(lambda r: ("link", _linked(r), _linked(r)))
_gen(3)(lambda r: ("unlink", _linked(r)))
_gen(2)(lambda r: ("rename", _linked(r), _linked(r)))
_gen(2)(lambda r: ("write_trunc", _linked(r), _data(r)))
_gen(2)(_link_chain)
_gen(2)(_rename_ring)
# descriptors held across operations, directory handles, unprivileged callers, long paths
_gen(4)(_hold_scenario)
_gen(2)(_dir_scenario)
_gen(3)(_as_user)
_gen(1)(_deep_scenario)


def generate(rng: random.Random, length: int, *, user: bool = True) -> list[Op]:
    """`length` operations (a scenario may run over by a few).  `user=False` leaves out the
    unprivileged caller (the concurrent mode has none)."""
    weights = [w for w, _ in _GENERATORS]
    funcs = [f for _, f in _GENERATORS]
    ops: list[Op] = []
    while len(ops) < length:
        made = rng.choices(funcs, weights)[0](rng)
        made = made if isinstance(made, list) else [made]
        if not user and any(op[0] == "as_user" for op in made):
            continue
        ops += made
    return ops


# --- moving a sequence to its own subtree (the concurrent mode) ---------------------------

#: Argument positions (after the name) that are paths, per operation.
PATH_ARGS: dict[str, tuple[int, ...]] = {
    "create_excl": (0,), "write_trunc": (0,), "append": (0,), "pwrite": (0,), "truncate": (0,),
    "open_trunc": (0,),
    "read": (0,), "chmod": (0,), "chown": (0,), "utime": (0,), "setxattr": (0,),
    "removexattr": (0,), "mkdir": (0,), "mkfifo": (0,), "symlink": (1,), "link": (0, 1),
    "unlink": (0,), "rmdir": (0,), "rmtree": (0,), "rename": (0, 1), "rename_noreplace": (0, 1),
    "rename_exchange": (0, 1), "listdir": (0,), "stat": (0,), "hold": (1,), "dir_hold": (1,),
    "deep_mkdirs": (0,), "deep": (0,), "deep_here": (0,),
}


def relocate(op: Op, prefix: str) -> Op:
    """`op` with every path argument under `prefix` (a directory holding the starting tree)."""
    name, *args = op
    for i in PATH_ARGS.get(name, ()):
        args[i] = f"{prefix}/{args[i]}"
    return (name, *args)


def relocated_layers(prefixes: list[str]) -> dict[str, list[Entry]]:
    """The starting tree once under each prefix (hardlinks stay within their own copy)."""
    out: dict[str, list[Entry]] = {}
    for layer, entries in starting_layers().items():
        out[layer] = []
        for prefix in prefixes:
            for entry in entries:
                moved = dataclasses.replace(entry, path=f"{prefix}/{entry.path}")
                if isinstance(moved, HardLink):
                    moved = dataclasses.replace(moved, target=f"{prefix}/{moved.target}")
                out[layer].append(moved)
    return out
