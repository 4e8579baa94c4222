"""Running the same changes under kernel overlayfs and under overlayfuse, and comparing them.

The harness of the write-path tests (`test_write_path.py`, `test_permissions.py`,
`test_upper_compat.py`): the layer stack most of them share, a `Pair` of mounts of one stack (the
kernel as oracle, overlayfuse under test), *steps* run in child processes on one mount (so a hung
mount costs a timeout, not the suite), and comparisons of the steps' outcomes, of the merged views
and of the upper dirs.

Times set by the changes themselves ("now") cannot match between two mounts; `assert_same_changed`
blanks an mtime only where *both* sides carry a time from after the steps began, so a copy-up that
loses the lower mtime still shows up.

`OFUSE_OURS=kernel` mounts the kernel on the "ours" side too: a self-check that the harness and
the expectations hold when both sides are the oracle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.compare import Snapshot, diff_views, kind_of, take_snapshot
from tests.support.mounts import FuseMount, kernel_overlay, overlayfuse, run_isolated
from tests.support.rich_tree import LayerSet, build_layer_set
from tests.support.syscalls import rename_exchange, rename_noreplace
from tests.support.trees import Dir, Entry, File, HardLink, Sparse, Whiteout

MiB = 1 << 20
KERNEL_OPTS = "redirect_dir=on,index=on"
OURS_IS_KERNEL = os.environ.get("OFUSE_OURS") == "kernel"
OWNER_UID, OWNER_GID = 1234, 5678
SPARSE_SIZE = 64 * MiB
SPARSE_CHUNKS = {0: b"head", 17 * MiB + 3: b"middle", SPARSE_SIZE - 4: b"tail"}
PRIVATE_XATTR_PREFIX = "trusted.overlay."


# --- the layer stack most tests share --------------------------------------------------


def standard_layers() -> dict[str, list[Entry]]:
    """Small, but with everything the write path must handle: owners, modes, xattrs, hardlinks,
    a sparse file, merged dirs, whiteouts in upper, dirs to rename and to remove."""
    return {
        "upper": [
            File("upperfile", b"upper\n"),
            Whiteout("was"),  # hides l2's file "was"
            Whiteout("wasdir"),  # hides l2's dir "wasdir"
            Whiteout("emptied/only"),  # the merged dir emptied/ has nothing left
        ],
        "l1": [
            # d's metadata comes from here, the topmost lower that has it
            Dir("d", 0o770, 99, 98, {"user.dir": b"from l1"}),
            Dir("d/sub", 0o711, 42, 43, {"trusted.sub": b"s"}),
            File("d/sub/g", b"from l1\n"),
            File("merged/l1file", b"l1\n"),
            File("full/f2", b"2\n"),
        ],
        "l2": [
            Dir("d", 0o750, OWNER_UID, OWNER_GID, {"user.dir": b"d", "trusted.dir": b"\x01"}),
            Dir("d/sub", 0o700, 1, 1, {"trusted.sub": b"hidden by l1's"}),
            File("d/sub/f", b"lower data\n" * 100, 0o4750, OWNER_UID, OWNER_GID,
                 {"user.note": b"n", "trusted.note": b"\x00\xff"}),
            File("hl/a", b"linked\n"),
            HardLink("hl/b", "hl/a"),
            File("hl3/a", b"three names\n"),
            HardLink("hl3/b", "hl3/a"),
            HardLink("hl3/c", "hl3/a"),
            Sparse("big/sparse", SPARSE_SIZE, SPARSE_CHUNKS),
            File("rd/x", b"x\n"),
            File("rd/y/z", b"z\n"),
            File("merged/l2file", b"l2\n"),
            File("full/f1", b"1\n"),
            File("gone/g", b"g\n"),
            File("was", b"hidden\n"),
            File("wasdir/hidden", b"hidden\n"),
            File("emptied/only", b"hidden\n"),
            File("target", b"target\n"),
            Dir("emptydir"),
        ],
    }


F = "d/sub/f"  # the lower file most steps change: setuid, owned, with xattrs


# --- mounting a pair -------------------------------------------------------------------


@dataclass(slots=True)
class Pair:
    """The same stack mounted by the kernel (oracle) and by overlayfuse."""

    kernel: LayerSet
    ours: LayerSet
    fuse: FuseMount | None  # None when OFUSE_OURS=kernel

    def both(self, func: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
        """`func(mnt, *args)` on each mount, each in a child process: (kernel, ours)."""
        return (run_isolated(func, str(self.kernel.mnt), *args),
                run_isolated(func, str(self.ours.mnt), *args))


@contextlib.contextmanager
def mount_ours(ls: LayerSet, extra_kernel_opts: str = KERNEL_OPTS) -> Iterator[FuseMount | None]:
    """overlayfuse on `ls` (or the kernel, for the self-check), always torn down."""
    assert ls.upper is not None and ls.work is not None
    if OURS_IS_KERNEL:
        with kernel_overlay(ls.mnt, ls.lowers, ls.upper, ls.work, extra_kernel_opts):
            yield None
    else:
        opts = [o for o in extra_kernel_opts.split(",") if o]
        with overlayfuse(ls.mnt, ls.lowers, ls.upper, ls.work, opts) as fuse:
            yield fuse


@contextlib.contextmanager
def mounted_pair(root: Path, layers: Mapping[str, Sequence[Entry]],
                 kernel_opts: str = KERNEL_OPTS) -> Iterator[Pair]:
    layers = {"upper": [], **layers}
    k = build_layer_set(root / "kernel", layers, kernel=True)
    o = build_layer_set(root / "ours", layers, kernel=True)
    with kernel_overlay(k.mnt, k.lowers, k.upper, k.work, kernel_opts), \
            mount_ours(o, kernel_opts) as fuse:
        yield Pair(k, o, fuse)


# --- steps: run in a child process on one mount ----------------------------------------

Step = tuple[Any, ...]  # (name, relative path, *arguments)
Outcome = tuple[str, Any]  # ("ok", value) or ("err", "ENOENT")


def stat_summary(st: os.stat_result) -> dict[str, Any]:
    """What a step reports about an object: comparable across mounts (no inode, no times)."""
    return {"kind": kind_of(st.st_mode), "mode": oct(st.st_mode), "uid": st.st_uid,
            "gid": st.st_gid, "size": st.st_size if not stat.S_ISDIR(st.st_mode) else None}


def _open_close(p: str, flags: int, mode: int = 0o644) -> None:
    os.close(os.open(p, flags, mode))


def _write(p: str, offset: int, data: bytes, flags: int = os.O_WRONLY) -> int:
    fd = os.open(p, flags)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _append(p: str, data: bytes) -> int:
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def _create(p: str, data: bytes, mode: int = 0o644) -> dict[str, Any]:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return stat_summary(os.lstat(p))


def _read(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def fsync_dir(p: str) -> None:
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


STEPS: dict[str, Callable[..., Any]] = {
    "open": _open_close,
    "write": _write,
    "append": _append,
    "create": _create,
    "read": _read,
    "truncate": os.truncate,
    "chmod": lambda p, mode: os.chmod(p, mode, follow_symlinks=False),
    "chown": lambda p, uid, gid: os.chown(p, uid, gid, follow_symlinks=False),
    "utime": lambda p, a, m: os.utime(p, ns=(a, m), follow_symlinks=False),
    "setxattr": lambda p, name, value: os.setxattr(p, name, value, follow_symlinks=False),
    "removexattr": lambda p, name: os.removexattr(p, name, follow_symlinks=False),
    "getxattr": lambda p, name: os.getxattr(p, name, follow_symlinks=False),
    "unlink": os.unlink,
    "rmdir": os.rmdir,
    "mkdir": lambda p, mode=0o755: os.mkdir(p, mode),
    "symlink": lambda p, target: os.symlink(target, p),
    "mkfifo": lambda p, mode=0o644: os.mkfifo(p, mode),
    "stat": lambda p: stat_summary(os.lstat(p)),
    "listdir": lambda p: sorted(os.listdir(p)),
    # Names and their lstat, as a walk sees them: after the kernel's caches are dropped, what
    # lstat says comes from the readdirplus answer itself.
    "list_stat": lambda p: {e.name: stat_summary(e.stat(follow_symlinks=False)) for e in os.scandir(p)},
    "fsync_dir": fsync_dir,
}
# Steps whose second argument is another path under the mount.
TWO_PATH_STEPS: dict[str, Callable[[str, str], Any]] = {
    "link": lambda a, b: os.link(a, b, follow_symlinks=False),
    "rename": os.rename,
    "rename_noreplace": rename_noreplace,
    "rename_exchange": rename_exchange,
}


def run_step(mnt: str, step: Step) -> Outcome:
    name, rel, *args = step
    path = os.path.join(mnt, rel)
    try:
        if name in TWO_PATH_STEPS:
            return ("ok", TWO_PATH_STEPS[name](path, os.path.join(mnt, args[0])))
        return ("ok", STEPS[name](path, *args))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))


def run_steps(mnt: str, steps: Sequence[Step]) -> list[Outcome]:
    os.umask(0o022)
    return [run_step(mnt, s) for s in steps]


def apply_steps(mnt: Path, steps: Sequence[Step]) -> None:
    """Run STEPS on MNT in a child process; every one must succeed (a test's set-up, not its check)."""
    outcomes = run_isolated(run_steps, str(mnt), list(steps))
    assert all(o[0] == "ok" for o in outcomes), list(zip(steps, outcomes, strict=True))


@dataclass(frozen=True, slots=True)
class MountDirs:
    """One side of a comparison that mounts each side by hand: its upper, work dir and mountpoint."""

    upper: Path
    work: Path
    mnt: Path


def mount_dirs(root: Path, name: str) -> MountDirs:
    """Empty upper, work and mountpoint dirs under ROOT/NAME."""
    side = MountDirs(root / name / "upper", root / name / "work", root / name / "mnt")
    for path in (side.upper, side.work, side.mnt):
        path.mkdir(parents=True)
    return side


def assert_same_steps(pair: Pair, steps: Sequence[Step]) -> list[Outcome]:
    """Run the steps on both mounts; every outcome must match the kernel's."""
    k, o = pair.both(run_steps, list(steps))
    bad = [f"{s!r}: kernel={ko!r} ours={oo!r}" for s, ko, oo in zip(steps, k, o, strict=True)
           if ko != oo]
    assert not bad, "steps differ from the kernel:\n  " + "\n  ".join(bad)
    return o


# --- comparing views after changes -----------------------------------------------------


#: ext4 keeps xattrs that do not fit in the inode in one extra block, counted in st_blocks; the
#: kernel's copies carry trusted.overlay.origin (a file handle), which tips some over.
XATTR_BLOCK_SECTORS = 8


def blank_new_times(k: Snapshot, o: Snapshot, since_ns: int) -> tuple[Snapshot, Snapshot]:
    """Blank what two uppers cannot share: mtimes both sides set during the test, and st_blocks
    differing by one xattr block."""
    k2, o2 = Snapshot(**vars_of(k)), Snapshot(**vars_of(o))
    k2.entries, o2.entries = dict(k.entries), dict(o.entries)
    for path in set(k.entries) & set(o.entries):
        ke, oe = k2.entries[path], o2.entries[path]
        if ke.mtime_ns >= since_ns and oe.mtime_ns >= since_ns:
            ke, oe = dataclasses.replace(ke, mtime_ns=0), dataclasses.replace(oe, mtime_ns=0)
        if ke.blocks is not None and oe.blocks is not None and \
                abs(ke.blocks - oe.blocks) <= XATTR_BLOCK_SECTORS:
            ke, oe = dataclasses.replace(ke, blocks=0), dataclasses.replace(oe, blocks=0)
        k2.entries[path], o2.entries[path] = ke, oe
    return k2, o2


def vars_of(snap: Snapshot) -> dict[str, Any]:
    return {f.name: getattr(snap, f.name) for f in dataclasses.fields(snap)}


def assert_same_changed(pair: Pair, since_ns: int, *, any_blocks: Sequence[str] = ()) -> tuple[Snapshot, Snapshot]:
    """The merged views are equal, but for times both sides set after `since_ns` (and st_blocks
    of the paths in `any_blocks`, which the test checks itself)."""
    k, o = blank_new_times(take_snapshot(pair.kernel.mnt), take_snapshot(pair.ours.mnt), since_ns)
    for snap in (k, o):
        for path in any_blocks:
            snap.entries[path] = dataclasses.replace(snap.entries[path], blocks=0)
    problems = diff_views(k, o, ours_is_kernel=OURS_IS_KERNEL)
    assert not problems, "views differ from the kernel after the same changes:\n  " + \
        "\n  ".join(problems[:60])
    return k, o


@dataclass(frozen=True, slots=True)
class UpperEntry:
    """An object in an upper dir as the other implementation must be able to read it."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    rdev: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]  # public ones
    opaque: bytes | None


def upper_view(upper: Path, since_ns: int) -> dict[str, UpperEntry]:
    """Every object in an upper dir (read directly, not through a mount).

    Not compared: link counts (the kernel's index=on keeps an extra link in workdir/index),
    private xattrs other than opaque (origin, redirect, impure are the kernel's business;
    whether they work is what the compatibility tests check), and new times (see module doc).
    """
    out: dict[str, UpperEntry] = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            names = sorted(os.listxattr(full, follow_symlinks=False))
            public = tuple((n, os.getxattr(full, n, follow_symlinks=False)) for n in names
                           if not n.startswith(PRIVATE_XATTR_PREFIX))
            opaque = (os.getxattr(full, "trusted.overlay.opaque", follow_symlinks=False)
                      if "trusted.overlay.opaque" in names else None)
            out[os.path.relpath(full, upper)] = UpperEntry(
                kind_of(st.st_mode), st.st_mode, st.st_uid, st.st_gid,
                None if stat.S_ISDIR(st.st_mode) else st.st_size,
                st.st_rdev, 0 if st.st_mtime_ns >= since_ns else st.st_mtime_ns, public, opaque)
    return out


def redirects(upper: Path) -> dict[str, bytes]:
    """Every directory's ``trusted.overlay.redirect`` in an upper dir (read directly), by path."""
    out = {}
    for dirpath, dirnames, _ in os.walk(upper):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if "trusted.overlay.redirect" in os.listxattr(full, follow_symlinks=False):
                out[os.path.relpath(full, upper)] = os.getxattr(full, "trusted.overlay.redirect",
                                                                follow_symlinks=False)
    return out


def assert_same_upper(pair: Pair, since_ns: int) -> dict[str, UpperEntry]:
    assert pair.kernel.upper is not None and pair.ours.upper is not None
    k, o = upper_view(pair.kernel.upper, since_ns), upper_view(pair.ours.upper, since_ns)
    # The kernel also marks a dir made inside a merged dir opaque, where no lower has that path:
    # there the marker hides nothing, so it is compared only where a lower has the path.
    for path in set(k) & set(o):
        if not any(os.path.lexists(layer / path) for layer in pair.ours.lowers):
            k[path] = dataclasses.replace(k[path], opaque=None)
            o[path] = dataclasses.replace(o[path], opaque=None)
    problems = [f"{p!r}: kernel={k.get(p)} ours={o.get(p)}" for p in sorted({*k, *o})
                if k.get(p) != o.get(p)]
    assert not problems, "upper dirs differ:\n  " + "\n  ".join(problems)
    return o
