"""The worker processes: one step function per kind, run in a loop until the deadline.

Every call goes through Tally.attempt with the errnos names.py allows for its paths.  Paths are
relative to an fd of the mount root and never contain "..", the last name is never followed
(O_NOFOLLOW, lstat, follow_symlinks=False), and symlinks are never middle components: nothing
here can reach outside the mount.

Workers are processes, not threads, so that one stuck in a FUSE request can be SIGKILLed.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from . import names
from .linux import RENAME_EXCHANGE, renameat2
from .names import Path, text
from .settings import LISTER_HELD_DIRS, READER_HELD_FDS, WRITER_MAX_SIZE
from .tally import BAD_NAME, BAD_TARGET, WRONG_TYPE, Tally

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(slots=True)
class Ctx:
    """One worker's state: the mount root's fd, its random stream, its tally, its held fds."""

    root: int
    rng: random.Random
    tally: Tally
    held: list[tuple[int, Path]] = field(default_factory=list)

    def hold(self, fd: int, path: Path, limit: int) -> None:
        """Keep `fd` open; past `limit`, close a random older one."""
        self.held.append((fd, path))
        if len(self.held) > limit:
            self.close_one(*self.held.pop(self.rng.randrange(len(self.held) - 1)))

    def close_one(self, fd: int, path: Path) -> None:
        """close(2) may fail on FUSE (the FLUSH reply): counted, and the fd is gone either way."""
        self.tally.attempt("close", names.NOTHING, text(path), os.close, fd)

    def close(self) -> None:
        for fd, path in self.held:
            self.close_one(fd, path)
        self.held.clear()


def _check_type(c: Ctx, op: str, path: Path, mode: int) -> None:
    if path and not names.type_allowed(path[-1], mode):
        c.tally.anomaly(op, WRONG_TYPE, f"{op} {text(path)}: a {names.type_name(mode)}")


# --- listers ---------------------------------------------------------------------------


def _scan(fd: int) -> list[tuple[str, bool, bool, bool]]:
    """Names with what the listing itself says (d_type). scandir(fd) lists a dup of fd from offset
    0, through the same open directory: a held fd is listed again across changes."""
    with os.scandir(fd) as it:
        return [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                 e.is_symlink()) for e in it]


def _list(c: Ctx, op: str, fd: int, path: Path) -> None:
    entries = c.tally.attempt(op, names.HELD, text(path), _scan, fd)
    for name, is_dir, is_file, is_link in entries or ():
        child = (*path, name)
        if names.name_class(name) is None:
            c.tally.anomaly(op, BAD_NAME, f"{op} {text(path)}: lists {name!r}")
            continue
        # Judge d_type only when it names exactly one type (never on a failed lazy lstat).
        if is_dir + is_file + is_link == 1:
            mode = stat.S_IFDIR if is_dir else stat.S_IFREG if is_file else stat.S_IFLNK
            if not names.type_allowed(name, mode):
                c.tally.anomaly(op, WRONG_TYPE, f"{op} {text(path)}: {name} listed as a "
                                                f"{names.type_name(mode)}")
        st = c.tally.attempt("fstatat", names.HELD, text(child), os.stat, name, dir_fd=fd,
                             follow_symlinks=False)
        if st is not None:
            _check_type(c, "fstatat", child, st.st_mode)


def step_lister(c: Ctx) -> None:
    if c.held and c.rng.random() < 0.5:
        held_fd, path = c.rng.choice(c.held)
        _list(c, "list-held", held_fd, path)
        return
    path = names.random_dir(c.rng) if c.rng.random() < 0.8 else names.random_swap(c.rng)
    fd = c.tally.attempt("opendir", names.needs_dir(path), text(path), os.open, text(path),
                         DIR_FLAGS, dir_fd=c.root)
    if fd is None:
        return
    _list(c, "list", fd, path)
    if len(c.held) < LISTER_HELD_DIRS or c.rng.random() < 0.2:
        c.hold(fd, path, LISTER_HELD_DIRS)
    else:
        c.close_one(fd, path)


# --- staters and readers ---------------------------------------------------------------


def step_stater(c: Ctx) -> None:
    path = names.random_any(c.rng)
    st = c.tally.attempt("lstat", names.lookup(path), text(path), os.stat, text(path),
                         dir_fd=c.root, follow_symlinks=False)
    if st is None:
        return
    _check_type(c, "lstat", path, st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        target = c.tally.attempt("readlink", names.lookup(path), text(path), os.readlink,
                                 text(path), dir_fd=c.root)
        if target is not None and target not in names.LINK_TARGETS:
            c.tally.anomaly("readlink", BAD_TARGET, f"readlink {text(path)}: {target!r}")


def step_reader(c: Ctx) -> None:
    if c.held and c.rng.random() < 0.5:
        held_fd, path = c.rng.choice(c.held)
        c.tally.attempt("pread-held", names.NOTHING, text(path), os.pread, held_fd, 4096,
                        c.rng.randrange(0, 65536))
        st = c.tally.attempt("fstat-held", names.NOTHING, text(path), os.fstat, held_fd)
        if st is not None:
            _check_type(c, "fstat-held", path, st.st_mode)
        return
    path = names.random_file(c.rng) if c.rng.random() < 0.85 else names.random_swap(c.rng)
    fd = c.tally.attempt("open-read", names.lookup(path), text(path), os.open, text(path),
                         os.O_RDONLY | NOFOLLOW, dir_fd=c.root)
    if fd is None:
        return
    c.tally.attempt("read", names.read_fd(path), text(path), os.read, fd, 65536)
    st = c.tally.attempt("fstat", names.NOTHING, text(path), os.fstat, fd)
    if st is not None:
        _check_type(c, "fstat", path, st.st_mode)
    if st is not None and stat.S_ISREG(st.st_mode):
        c.hold(fd, path, READER_HELD_FDS)
    else:
        c.close_one(fd, path)


# --- writers ---------------------------------------------------------------------------

# op -> (open flags, creates, exclusive)
_WRITES: dict[str, tuple[int, bool, bool]] = {
    "create": (os.O_WRONLY | os.O_CREAT, True, False),
    "create-trunc": (os.O_WRONLY | os.O_CREAT | os.O_TRUNC, True, False),
    "create-excl": (os.O_WRONLY | os.O_CREAT | os.O_EXCL, True, True),
    "append": (os.O_WRONLY | os.O_APPEND, False, False),
    "overwrite": (os.O_RDWR, False, False),
    "truncate": (os.O_WRONLY, False, False),
}


def step_writer(c: Ctx) -> None:
    op = c.rng.choice(tuple(_WRITES))
    flags, creating, exclusive = _WRITES[op]
    path = names.random_file(c.rng) if c.rng.random() < 0.9 else names.random_swap(c.rng)
    expected = names.creates(path, exclusive) if creating else names.needs_file(path)
    fd = c.tally.attempt(op, expected, text(path), os.open, text(path), flags | NOFOLLOW, 0o644,
                         dir_fd=c.root)
    if fd is None:
        return
    try:
        st = c.tally.attempt("fstat", names.NOTHING, text(path), os.fstat, fd)
        if st is None:
            return
        _check_type(c, "fstat", path, st.st_mode)
        data = c.rng.randbytes(c.rng.choice((1, 100, 4096, 20000)))
        if op == "truncate" or st.st_size > WRITER_MAX_SIZE:
            c.tally.attempt("ftruncate", names.NOTHING, text(path), os.ftruncate, fd,
                            c.rng.randrange(0, 65536))
        elif op == "overwrite":
            c.tally.attempt("pwrite", names.NOTHING, text(path), os.pwrite, fd, data,
                            c.rng.randrange(0, st.st_size + 1))
        else:
            c.tally.attempt("write", names.NOTHING, text(path), os.write, fd, data)
    finally:
        c.close_one(fd, path)


# --- namespace changers ----------------------------------------------------------------


def _rename(c: Ctx, op: str, src: Path, dst: Path) -> None:
    c.tally.attempt(op, names.renames(src, dst), f"{text(src)} -> {text(dst)}", os.rename,
                    text(src), text(dst), src_dir_fd=c.root, dst_dir_fd=c.root)


def _exchange(c: Ctx, op: str, a: Path, b: Path) -> None:
    c.tally.attempt(op, names.exchanges(a, b), f"{text(a)} <-> {text(b)}", renameat2,
                    text(a), text(b), RENAME_EXCHANGE, dir_fd=c.root)


def _moved_depth(c: Ctx, depth: int) -> int:
    """Mostly the same depth (which keeps the tree's shape), sometimes one up or down."""
    roll = c.rng.random()
    shift = 0 if roll < 0.7 else -1 if roll < 0.85 else 1
    return min(max(depth + shift, 1), names.MAX_DEPTH)


def step_renamer(c: Ctx) -> None:
    roll = c.rng.random()
    if roll < 0.45:
        _rename(c, "rename-file", names.random_file(c.rng), names.random_file(c.rng))
    elif roll < 0.55:
        _rename(c, "rename-link", names.random_link(c.rng), names.random_link(c.rng))
    else:
        src = names.random_dir(c.rng, 1)
        depth = _moved_depth(c, len(src))
        _rename(c, "rename-dir", src, names.random_dir(c.rng, depth, depth))


def step_exchanger(c: Ctx) -> None:
    roll = c.rng.random()
    if roll < 0.5:
        _exchange(c, "exchange-x", names.random_swap(c.rng), names.random_swap(c.rng))
    elif roll < 0.65:
        _exchange(c, "exchange-file", names.random_file(c.rng), names.random_file(c.rng))
    elif roll < 0.8:
        a = names.random_dir(c.rng, 1)
        _exchange(c, "exchange-dir", a, names.random_dir(c.rng, len(a), len(a)))
    else:
        _rename(c, "rename-x", names.random_swap(c.rng), names.random_swap(c.rng))


def step_linker(c: Ctx) -> None:
    if c.rng.random() < 0.6:
        src, dst = names.random_file(c.rng), names.random_file(c.rng)
        c.tally.attempt("link", names.makes_name(src, dst), f"{text(src)} -> {text(dst)}",
                        os.link, text(src), text(dst), src_dir_fd=c.root, dst_dir_fd=c.root,
                        follow_symlinks=False)
    else:
        dst = names.random_link(c.rng)
        c.tally.attempt("symlink", names.makes_name(dst), text(dst), os.symlink,
                        c.rng.choice(names.LINK_TARGETS), text(dst), dir_fd=c.root)


def step_unlinker(c: Ctx) -> None:
    roll = c.rng.random()
    op, path = (("unlink-file", names.random_file(c.rng)) if roll < 0.6 else
                ("unlink-link", names.random_link(c.rng)) if roll < 0.85 else
                ("unlink-x", names.random_swap(c.rng)))
    c.tally.attempt(op, names.needs_file(path), text(path), os.unlink, text(path),
                    dir_fd=c.root)


def step_dirmaker(c: Ctx) -> None:
    roll = c.rng.random()
    if roll < 0.55:
        path = names.random_dir(c.rng, 1) if roll < 0.45 else names.random_swap(c.rng)
        c.tally.attempt("mkdir", names.makes_name(path), text(path), os.mkdir, text(path), 0o755,
                        dir_fd=c.root)
    else:
        path = names.random_dir(c.rng, 1) if roll < 0.9 else names.random_swap(c.rng)
        c.tally.attempt("rmdir", names.removes_dir(path), text(path), os.rmdir, text(path),
                        dir_fd=c.root)


STEPS: dict[str, Callable[[Ctx], None]] = {
    "lister": step_lister, "stater": step_stater, "reader": step_reader,
    "writer": step_writer, "renamer": step_renamer, "exchanger": step_exchanger,
    "linker": step_linker, "unlinker": step_unlinker, "dirmaker": step_dirmaker,
}


def run_worker(kind: str, index: int, mnt: str, seconds: float, seed: int,
               conn: Connection) -> None:
    """A worker process's body: loop until the deadline, close every fd, send the tally.

    SIGINT is ignored: on Ctrl-C the parent decides, and kills its workers itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    tally = Tally()
    result: dict[str, Any] = {"kind": kind, "index": index}
    try:
        ctx = Ctx(os.open(mnt, DIR_FLAGS), random.Random(f"{seed}/{kind}/{index}"), tally)
        step = STEPS[kind]
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                step(ctx)
        finally:
            ctx.close()
            os.close(ctx.root)
    except Exception:  # a bug in the stress code, or the mount gone: reported, the run fails
        result["crash"] = traceback.format_exc()
    result["tally"] = tally.as_dict()  # what it did up to a crash counts too
    conn.send(result)
    conn.close()
