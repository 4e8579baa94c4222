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
fails a sequence instead of freezing the suite.

Accepted differences, normalised here (see `normalise` and `same_outcome`):
(1) kernel readdir lists whiteouts in non-merged directories (compare.py normalisation (a)); ours
    must list none; (2) raw st_ino/st_dev: only hardlink groups are compared; (3) directory
    st_size/st_blocks; (4) directory st_nlink; (5) mtimes, unless they carry one of the fixed
    values the trees were built with or the sequence set with utime: any other value means "set
    by the clock", and both sides must agree on that.  atime and ctime are never compared.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import os
import pickle
import random
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.compare import MAX_REPORTED, Snapshot, diff_views, kind_of, snapshot
from tests.mounts import REPO_ROOT, MountError, kernel_overlay, overlayfuse
from tests.rich_tree import LAYER_MTIME_NS, LayerSet, build_layer_set
from tests.trees import (
    DEFAULT_MTIME_NS,
    Entry,
    Fifo,
    File,
    HardLink,
    Opaque,
    Symlink,
    Whiteout,
)

Op = tuple[Any, ...]  # (name, *arguments); see OPERATIONS
Outcome = tuple[str, Any]  # ("ok", value) | ("err", "ENOENT") | ("exc", "ValueError(...)")

KERNEL_OPTIONS = "redirect_dir=on,index=on"

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

# Any mtime outside this set was set by a clock: the two sides only have to agree on that.
FIXED_MTIMES = frozenset({DEFAULT_MTIME_NS, *LAYER_MTIME_NS.values(), *UTIME_NS})

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


# --- operations (run inside a Worker) ---------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


def _bytes(spec: tuple[str, int]) -> bytes:
    char, length = spec
    return char.encode() * length


def _write_with(path: str, flags: int, data: bytes, offset: int | None = None) -> int:
    # O_NONBLOCK: opening the fifo must fail (ENXIO) or succeed at once, never wait for a peer.
    fd = os.open(path, flags | os.O_NONBLOCK, 0o644)
    try:
        written = 0
        while written < len(data):
            chunk = data[written:]
            n = os.write(fd, chunk) if offset is None else os.pwrite(fd, chunk, offset + written)
            written += n
        return written
    finally:
        os.close(fd)


def _digest(data: bytes) -> tuple[int, str]:
    return (len(data), hashlib.sha256(data).hexdigest()[:16])


def _norm_mtime(ns: int, is_dir: bool = False) -> int | str:
    return ns if ns in FIXED_MTIMES and (COMPARE_DIR_MTIMES or not is_dir) else "clock"


def _describe(st: os.stat_result) -> tuple[Any, ...]:
    kind = kind_of(st.st_mode)
    is_dir = kind == "dir"
    return (kind, f"{st.st_mode:o}", st.st_uid, st.st_gid, None if is_dir else st.st_nlink,
            None if is_dir else st.st_size, _norm_mtime(st.st_mtime_ns, is_dir))


def _visible_names(path: str) -> tuple[list[str], list[str]]:
    """(names lstat finds, names lstat says ENOENT): the kernel lists whiteouts in pure dirs."""
    visible, vanished = [], []
    for name in sorted(os.listdir(path)):
        try:
            os.lstat(os.path.join(path, name))
            visible.append(name)
        except FileNotFoundError:
            vanished.append(name)
    return visible, vanished


def _rmtree(path: str) -> int:
    """Remove a tree bottom-up in name order, like `rm -r`; the count of names removed."""
    removed = 0
    if stat.S_ISDIR(os.lstat(path).st_mode):
        for name in sorted(os.listdir(path)):
            child = os.path.join(path, name)
            try:
                removed += _rmtree(child)
            except FileNotFoundError:  # a whiteout the kernel lists in a pure directory
                if os.path.lexists(child):
                    raise
        os.rmdir(path)
    else:
        os.unlink(path)
    return removed + 1


def _apply(mnt: str, op: Op) -> Any:
    name, *args = op
    p = lambda rel: os.path.join(mnt, rel)  # noqa: E731 - local shorthand
    match name, args:
        case "create_excl", [path, data]:
            return _write_with(p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, _bytes(data))
        case "write_trunc", [path, data]:
            return _write_with(p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _bytes(data))
        case "append", [path, data]:
            return _write_with(p(path), os.O_WRONLY | os.O_APPEND, _bytes(data))
        case "pwrite", [path, offset, data]:
            return _write_with(p(path), os.O_WRONLY, _bytes(data), offset)
        case "truncate", [path, size]:
            os.truncate(p(path), size)
        case "read", [path]:
            fd = os.open(p(path), os.O_RDONLY | os.O_NONBLOCK)
            try:
                chunks = []
                while chunk := os.read(fd, MiB):
                    chunks.append(chunk)
                return _digest(b"".join(chunks))
            finally:
                os.close(fd)
        case "chmod", [path, mode]:
            os.chmod(p(path), mode)
        case "chown", [path]:
            os.chown(p(path), 1000, 1000, follow_symlinks=False)
        case "utime", [path, ns]:
            os.utime(p(path), ns=(ns, ns), follow_symlinks=False)
        case "setxattr", [path, key, value]:
            os.setxattr(p(path), key, value, follow_symlinks=False)
        case "removexattr", [path, key]:
            os.removexattr(p(path), key, follow_symlinks=False)
        case "mkdir", [path]:
            os.mkdir(p(path), 0o755)
        case "mkfifo", [path]:
            os.mkfifo(p(path), 0o644)
        case "symlink", [target, path]:
            os.symlink(target, p(path))
        case "link", [src, dst]:
            os.link(p(src), p(dst), follow_symlinks=False)
        case "unlink", [path]:
            os.unlink(p(path))
        case "rmdir", [path]:
            os.rmdir(p(path))
        case "rmtree", [path]:
            return _rmtree(p(path))
        case "rename", [src, dst]:
            os.rename(p(src), p(dst))
        case "rename_noreplace", [src, dst]:
            renameat2(p(src), p(dst), RENAME_NOREPLACE)
        case "rename_exchange", [src, dst]:
            renameat2(p(src), p(dst), RENAME_EXCHANGE)
        case "listdir", [path]:
            return _visible_names(p(path))
        case "stat", [path]:
            return _describe(os.lstat(p(path)))
        case _:
            raise ValueError(f"unknown operation {op!r}")
    return None


def run_op(mnt: str, op: Op) -> Outcome:
    try:
        return ("ok", _apply(mnt, op))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))
    except Exception as exc:  # noqa: BLE001 - a harness bug shows up as a mismatch, not a crash
        return ("exc", repr(exc))


def same_outcome(kernel: Outcome, ours: Outcome, op: Op, *, ours_is_kernel: bool) -> bool:
    if op[0] == "listdir" and kernel[0] == ours[0] == "ok" and not ours_is_kernel:
        # (1): kernel readdir may list whiteouts in a non-merged dir; ours must list none.
        return kernel[1][0] == ours[1][0] and not ours[1][1]
    return kernel == ours


#: Directory mtimes are compared like any other (a fixed value must stay fixed): the kernel
#: restores a parent's timestamps after a copy-up, so a copy-up never shows in them.
#: OVERLAYFUSE_DIFF_DIR_MTIMES=0 ignores them, to look past that difference while exploring.
COMPARE_DIR_MTIMES = os.environ.get("OVERLAYFUSE_DIFF_DIR_MTIMES", "1") != "0"

#: st_blocks may differ by this much (512-byte units): one external xattr block, which the
#: kernel's own trusted.overlay.* xattrs on a copied-up file can push a user xattr into.
BLOCKS_SLACK = 8


def normalise(snap: Snapshot) -> Snapshot:
    """The snapshot with the accepted differences (4) and (5) taken out; see the module doc."""
    out = dataclasses.replace(snap, entries=dict(snap.entries))
    for path, info in snap.entries.items():
        fixed = info.mtime_ns in FIXED_MTIMES and (COMPARE_DIR_MTIMES or info.kind != "dir")
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


# --- rendering --------------------------------------------------------------------------

_FLAGS = {"create_excl": "os.O_WRONLY | os.O_CREAT | os.O_EXCL",
          "write_trunc": "os.O_WRONLY | os.O_CREAT | os.O_TRUNC",
          "append": "os.O_WRONLY | os.O_APPEND", "pwrite": "os.O_WRONLY"}


def render(op: Op) -> str:
    """One operation as Python to run with the mount's root as working directory."""
    name, *args = op
    match name, args:
        case ("create_excl" | "write_trunc" | "append"), [path, (char, n)]:
            return (f"fd = os.open({path!r}, {_FLAGS[name]} | os.O_NONBLOCK, 0o644); "
                    f"os.write(fd, b{char!r} * {n}); os.close(fd)")
        case "pwrite", [path, offset, (char, n)]:
            return (f"fd = os.open({path!r}, os.O_WRONLY | os.O_NONBLOCK); "
                    f"os.pwrite(fd, b{char!r} * {n}, {offset}); os.close(fd)")
        case "truncate", [path, size]:
            return f"os.truncate({path!r}, {size})"
        case "read", [path]:
            return f"open({path!r}, 'rb').read()"
        case "chmod", [path, mode]:
            return f"os.chmod({path!r}, 0o{mode:o})"
        case "chown", [path]:
            return f"os.chown({path!r}, 1000, 1000, follow_symlinks=False)"
        case "utime", [path, ns]:
            return f"os.utime({path!r}, ns=({ns}, {ns}), follow_symlinks=False)"
        case "setxattr", [path, key, value]:
            return f"os.setxattr({path!r}, {key!r}, {value!r}, follow_symlinks=False)"
        case "removexattr", [path, key]:
            return f"os.removexattr({path!r}, {key!r}, follow_symlinks=False)"
        case "mkdir", [path]:
            return f"os.mkdir({path!r}, 0o755)"
        case "mkfifo", [path]:
            return f"os.mkfifo({path!r}, 0o644)"
        case "symlink", [target, path]:
            return f"os.symlink({target!r}, {path!r})"
        case "link", [src, dst]:
            return f"os.link({src!r}, {dst!r}, follow_symlinks=False)"
        case ("unlink" | "rmdir"), [path]:
            return f"os.{name}({path!r})"
        case "rmtree", [path]:
            return f"shutil.rmtree({path!r})  # children in name order"
        case "rename", [src, dst]:
            return f"os.rename({src!r}, {dst!r})"
        case ("rename_noreplace" | "rename_exchange"), [src, dst]:
            return f"{name}({src!r}, {dst!r})  # renameat2"
        case "listdir", [path]:
            return f"sorted(os.listdir({path!r}))"
        case "stat", [path]:
            return f"os.lstat({path!r})"
    return repr(op)


# --- workers: filesystem calls in a child process, killed on timeout ---------------------

WORKER_TIMEOUT = 30.0  # one call; the slowest is a snapshot of a few MiB on two busy cores

_WORKER_BOOTSTRAP = """
import importlib, os, pickle, struct, sys
sys.path.insert(0, sys.argv[1])
os.chdir("/")  # never hold a mount busy
os.umask(0o022)
out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # a stray print must not corrupt the protocol
inp = sys.stdin.buffer
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    module, name, args = pickle.loads(inp.read(struct.unpack("<Q", head)[0]))
    try:
        outcome = ("ok", getattr(importlib.import_module(module), name)(*args))
    except BaseException as exc:
        outcome = ("raised", exc)
    body = pickle.dumps(outcome)
    out.write(struct.pack("<Q", len(body)) + body)
    out.flush()
"""


class WorkerHung(RuntimeError):
    """A call did not answer within WORKER_TIMEOUT: the worker was killed."""


class Worker:
    """A child process that runs module-level functions; SIGKILLed if a call hangs.

    A process stuck in a FUSE request dies on SIGKILL, a thread would not.  The worker keeps
    no file descriptor or working directory on any mount between calls.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOTSTRAP, str(REPO_ROOT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
        return self._proc

    def call(self, func: Callable[..., Any], *args: Any, timeout: float = WORKER_TIMEOUT) -> Any:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        body = pickle.dumps((func.__module__, func.__qualname__, args))
        try:
            proc.stdin.write(struct.pack("<Q", len(body)) + body)
            proc.stdin.flush()
            deadline = time.monotonic() + timeout
            head = self._read(proc, 8, deadline)
            status, value = pickle.loads(self._read(proc, struct.unpack("<Q", head)[0], deadline))
        except (WorkerHung, BrokenPipeError, EOFError) as exc:
            self.close()
            raise WorkerHung(f"{func.__qualname__}{args!r}: {exc or 'no answer'}") from exc
        if status == "raised":
            raise value
        return value

    @staticmethod
    def _read(proc: subprocess.Popen[bytes], size: int, deadline: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        data = b""
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise WorkerHung(f"no answer within {WORKER_TIMEOUT}s: is a mount hung?")
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise EOFError("worker died")
            data += chunk
        return data

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()
            self._proc = None


# --- sides and replay -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """What is compared with the kernel: overlayfuse, or the kernel itself with some options."""

    kind: str  # "overlayfuse" | "kernel"
    options: str = ""

    @property
    def is_kernel(self) -> bool:
        return self.kind == "kernel"

    def __str__(self) -> str:
        return f"kernel({self.options})" if self.is_kernel else "overlayfuse"


OVERLAYFUSE = Side("overlayfuse")
KERNEL = Side("kernel", KERNEL_OPTIONS)


@contextlib.contextmanager
def mount_side(side: Side, layers: LayerSet) -> Iterator[Path]:
    if side.is_kernel:
        with kernel_overlay(layers.mnt, layers.lowers, layers.upper, layers.work,
                            side.options):
            yield layers.mnt
    else:
        with overlayfuse(layers.mnt, layers.lowers, layers.upper, layers.work):
            yield layers.mnt


@dataclass(slots=True)
class Mismatch:
    step: int  # index of the operation after which it showed; -1: the initial view
    where: str  # "outcome" | "view" | "upper" | "hang" | "daemon"
    details: list[str]

    def summary(self) -> str:
        return f"{self.where} after step {self.step}: " + "; ".join(self.details[:3])


@dataclass(slots=True)
class Replay:
    ops: list[Op]
    outcomes: list[tuple[Outcome, Outcome]] = field(default_factory=list)
    mismatch: Mismatch | None = None


@dataclass(slots=True)
class Workers:
    kernel: Worker = field(default_factory=Worker)
    ours: Worker = field(default_factory=Worker)

    def close(self) -> None:
        self.kernel.close()
        self.ours.close()


def _view_problems(kernel: Snapshot, ours: Snapshot, ours_is_kernel: bool) -> list[str]:
    kernel, ours = normalise(kernel), normalise(ours)
    _forgive_blocks(kernel, ours)
    return diff_views(kernel, ours, ours_is_kernel=ours_is_kernel)


def replay(root: Path, ops: Sequence[Op], side: Side, workers: Workers, *,
           every_step: bool = True, check_upper: bool = True) -> Replay:
    """Apply `ops` to the kernel and to `side` on fresh copies of the starting tree.

    Stops at the first mismatch.  `every_step=False` compares the views only at the start
    and the end (faster; used while shrinking).  The trees under `root` are removed after.
    """
    result = Replay(list(ops))
    layers = starting_layers()
    shutil.rmtree(root, ignore_errors=True)
    try:
        k_set = build_layer_set(root / "kernel", layers, kernel=True)
        o_set = build_layer_set(root / "ours", layers, kernel=True)
        try:
            with mount_side(KERNEL, k_set) as k_mnt, mount_side(side, o_set) as o_mnt:
                _run_mounted(str(k_mnt), str(o_mnt), ops, side, workers, every_step, result)
        except AssertionError as exc:  # overlayfuse's teardown found a traceback in its log
            log_lines = str(exc).splitlines()[:40]
            if result.mismatch is None:
                result.mismatch = Mismatch(len(ops) - 1, "daemon", log_lines)
            else:
                result.mismatch.details += ["and the daemon logged:", *log_lines]
        if result.mismatch is None and check_upper:
            result.mismatch = _check_upper(k_set, o_set, workers, len(ops) - 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _run_mounted(k_mnt: str, o_mnt: str, ops: Sequence[Op], side: Side, workers: Workers,
                 every_step: bool, result: Replay) -> None:
    ours_is_kernel = side.is_kernel
    step = -1
    try:
        k_snap = workers.kernel.call(snapshot, k_mnt)
        problems = _view_problems(k_snap, workers.ours.call(snapshot, o_mnt), ours_is_kernel)
        if problems:
            result.mismatch = Mismatch(step, "view", problems)
            return
        for step, op in enumerate(ops):
            k_out = workers.kernel.call(run_op, k_mnt, op)
            o_out = workers.ours.call(run_op, o_mnt, op)
            result.outcomes.append((k_out, o_out))
            if not same_outcome(k_out, o_out, op, ours_is_kernel=ours_is_kernel):
                result.mismatch = Mismatch(
                    step, "outcome", [f"{render(op)}: kernel={k_out!r} ours={o_out!r}"])
                return
            if every_step or step == len(ops) - 1:
                k_snap = workers.kernel.call(snapshot, k_mnt)
                problems = _view_problems(k_snap, workers.ours.call(snapshot, o_mnt),
                                          ours_is_kernel)
                if problems:
                    result.mismatch = Mismatch(step, "view", problems)
                    return
    except WorkerHung as exc:
        result.mismatch = Mismatch(step, "hang", [str(exc)])


def _check_upper(k_set: LayerSet, o_set: LayerSet, workers: Workers, step: int) -> Mismatch | None:
    """Mount the kernel on each side's upper dir, with a fresh workdir: the views must agree.

    A fresh workdir on both sides, because neither side's workdir is the other's format; see
    `_drop_hardlinked` for what that costs.
    """
    views = []
    for layers, worker in ((k_set, workers.kernel), (o_set, workers.ours)):
        work = layers.root / "work-check"
        mnt = layers.root / "mnt-check"
        work.mkdir()
        try:
            with kernel_overlay(mnt, layers.lowers, layers.upper, work, KERNEL_OPTIONS):
                views.append(worker.call(snapshot, str(mnt)))
        except MountError as exc:
            return Mismatch(step, "upper", [f"the kernel refuses {layers.upper}: {exc}"])
        except WorkerHung as exc:
            return Mismatch(step, "upper", [str(exc)])
    _drop_hardlinked(*views)
    problems = _view_problems(views[0], views[1], True)
    return Mismatch(step, "upper", problems) if problems else None


def _drop_hardlinked(*views: Snapshot) -> None:
    """Forget files with st_nlink > 1 on either side (their names stay in the listings).

    What a hardlinked lower file shows after a copy-up depends on an index kept in workdir,
    which a fresh workdir does not have (the kernel's own upper loses its links too), and
    which name the upper copy takes is not fixed: overlayfuse names it after the first name
    looked up.  The live comparison checks these files; the upper check cannot.
    """
    linked = {path for view in views for path, info in view.entries.items()
              if info.kind != "dir" and info.nlink > 1}
    for view in views:
        for path in linked:
            view.entries.pop(path, None)
            view.inodes.pop(path, None)


# --- shrinking --------------------------------------------------------------------------


@dataclass(slots=True)
class Shrinker:
    """Delta debugging (ddmin) over a failing sequence, each candidate on fresh mounts."""

    root: Path
    side: Side
    workers: Workers
    deadline: float
    trials: int = 0

    def fails(self, ops: Sequence[Op]) -> bool:
        self.trials += 1
        return replay(self.root, ops, self.side, self.workers, every_step=False).mismatch is not None

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def shrink(self, ops: list[Op], outcomes: Sequence[tuple[Outcome, Outcome]]) -> list[Op]:
        # First, one cheap guess: drop the calls that only read, and those that failed the same
        # way on both sides (they rarely change state).
        padded = [*outcomes[:len(ops)], *[None] * (len(ops) - len(outcomes))]
        keep = [op for op, seen in zip(ops, padded, strict=True)
                if op[0] not in ("read", "listdir", "stat")
                and not (seen is not None and seen[0][0] == "err" and seen[0] == seen[1])]
        if len(keep) < len(ops) and self.fails(keep):
            ops = keep
        return self.ddmin(ops)

    def ddmin(self, ops: list[Op]) -> list[Op]:
        n = 2
        while len(ops) >= 2 and not self.out_of_time():
            chunk = -(-len(ops) // n)
            parts = [ops[i:i + chunk] for i in range(0, len(ops), chunk)]
            reduced = False
            for i in range(len(parts)):  # a complement first: it removes the most
                complement = [op for j, part in enumerate(parts) if j != i for op in part]
                if self.out_of_time():
                    break
                if self.fails(complement):
                    ops, n, reduced = complement, max(n - 1, 2), True
                    break
            if not reduced and not self.out_of_time() and n > 2:
                for part in parts:
                    if self.out_of_time():
                        break
                    if self.fails(part):
                        ops, n, reduced = part, 2, True
                        break
            if not reduced:
                if n >= len(ops):
                    break
                n = min(len(ops), 2 * n)
        if len(ops) == 1 and not self.out_of_time() and self.fails([]):
            return []
        return ops


# --- reports ----------------------------------------------------------------------------


def report(side: Side, seed: str, original: Replay, minimal: Replay, trials: int,
           shrink_done: bool) -> str:
    m = minimal.mismatch
    assert m is not None and original.mismatch is not None
    lines = [
        f"{side} differs from kernel overlayfs ({KERNEL_OPTIONS}); sequence seed {seed!r}, "
        f"{len(original.ops)} -> {len(minimal.ops)} operations after {trials} shrink trials"
        + ("" if shrink_done else " (shrink budget exhausted: may not be minimal)"),
        f"first seen: {original.mismatch.summary()}",
        "Starting tree: tests.differential.starting_layers(), upper empty. In the mount's root:",
        "    from tests.differential import renameat2  # rename_noreplace/rename_exchange",
    ]
    for i, op in enumerate(minimal.ops):
        outcome = ""
        if i < len(minimal.outcomes):
            k, o = minimal.outcomes[i]
            outcome = f"  # kernel={_short(k)}" + ("" if k == o else f" ours={_short(o)}")
        lines.append(f"    {render(op)}{outcome}")
    lines.append(f"mismatch ({m.where}, after step {m.step}):")
    lines += [f"    {d}" for d in m.details[:MAX_REPORTED]]
    if len(m.details) > MAX_REPORTED:
        lines.append(f"    ... and {len(m.details) - MAX_REPORTED} more")
    return "\n".join(lines)


def _short(outcome: Outcome) -> str:
    status, value = outcome
    if status == "ok":
        return "ok" if value is None else repr(value)
    return value if status == "err" else f"exception {value}"


# --- exploration ------------------------------------------------------------------------


@dataclass(slots=True)
class Budget:
    seconds: float
    max_sequences: int
    length: int
    shrink_seconds: float


@dataclass(slots=True)
class Exploration:
    sequences: int = 0
    operations: int = 0
    elapsed: float = 0.0
    failure: str | None = None


def explore(root: Path, side: Side, budget: Budget, base_seed: str,
            log: Callable[[str], None] = print) -> Exploration:
    """Run random sequences until one mismatches or the budget is spent; shrink a mismatch."""
    result = Exploration()
    workers = Workers()
    start = time.monotonic()
    try:
        while (result.sequences < budget.max_sequences
               and time.monotonic() - start < budget.seconds):
            seed = f"{base_seed}-{result.sequences}"
            ops = generate(random.Random(seed), budget.length)
            run = replay(root / "seq", ops, side, workers)
            result.sequences += 1
            result.operations += len(run.outcomes)
            if run.mismatch is None:
                continue
            log(f"sequence {seed!r}: {run.mismatch.summary()}; shrinking")
            failing = ops[:run.mismatch.step + 1] \
                if run.mismatch.where in ("outcome", "view", "hang") else ops
            shrinker = Shrinker(root / "shrink", side, workers,
                                time.monotonic() + budget.shrink_seconds)
            minimal_ops = shrinker.shrink(failing, run.outcomes)
            minimal = replay(root / "shrink", minimal_ops, side, workers)
            if minimal.mismatch is None:  # flaky: report the original as it was seen
                minimal = run
                log("the shrunk sequence did not fail again: reporting the original")
            result.failure = report(side, seed, run, minimal, shrinker.trials,
                                    not shrinker.out_of_time())
            break
    finally:
        workers.close()
        result.elapsed = time.monotonic() - start
    return result
