"""Snapshots of a mounted tree and their comparison: the oracle is kernel overlayfs.

`snapshot` walks a mount with lstat only (never following a symlink) and records what
a program could observe: type, mode, owner, link count, size, blocks, mtime, content
hash, symlink target, device number, xattrs, and each directory's full readdir listing
including `.` and `..` (read with getdents64, because os.listdir drops them).  Two
snapshots are then diffed field by field, after normalising the differences that the
project accepts on purpose (see `diff_views`).

The functions here are plain and module-level so that `mounts.run_isolated` can run them
in a child process that is killed if a mount hangs.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import stat
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from tests.support.mounts import run_isolated

# getdents64 syscall numbers; Python has no binding that keeps `.` and `..`.
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}
_GETDENTS_BUFSIZE = 1 << 16
_READ_CHUNK = 1 << 20

_DTYPES = {0: "unknown", 1: "fifo", 2: "chr", 4: "dir", 6: "blk", 8: "file", 10: "symlink",
           12: "socket", 14: "whiteout"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.access.argtypes = [ctypes.c_char_p, ctypes.c_int]


def kind_of(mode: int) -> str:
    """A readable name for the file type bits of `mode`."""
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk")):
        if test(mode):
            return name
    return f"unknown:{mode:o}"


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    d_type: str
    d_ino: int


def getdents(path: str, bufsize: int = _GETDENTS_BUFSIZE) -> list[DirEntry]:
    """Every entry the directory returns, `.` and `..` included, in the order returned.

    A small `bufsize` makes the listing take many getdents64 calls, each resuming from
    the offset of the previous one: that exercises a filesystem's readdir offsets.
    """
    sysno = _SYS_GETDENTS64[platform.machine()]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        buf = ctypes.create_string_buffer(bufsize)
        entries: list[DirEntry] = []
        while True:
            n = _libc.syscall(ctypes.c_long(sysno), ctypes.c_int(fd), buf,
                              ctypes.c_size_t(bufsize))
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), path)
            if n == 0:
                return entries
            entries += _parse_dirents(buf.raw[:n])
    finally:
        os.close(fd)


def _parse_dirents(raw: bytes) -> Iterable[DirEntry]:
    """struct linux_dirent64 { u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }"""
    pos = 0
    while pos < len(raw):
        d_ino = int.from_bytes(raw[pos:pos + 8], "little")
        reclen = int.from_bytes(raw[pos + 16:pos + 18], "little")
        d_type = raw[pos + 18]
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        yield DirEntry(os.fsdecode(name), _DTYPES.get(d_type, str(d_type)), d_ino)
        pos += reclen


# --- snapshots -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """What is compared for one path.  None means "not applicable to this type"."""

    kind: str
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int | None
    blocks: int | None
    mtime_ns: int
    rdev: int
    sha256: str | None
    target: str | None
    xattrs: tuple[tuple[str, bytes], ...]
    listing: tuple[tuple[str, str], ...] | None  # sorted (name, d_type), `.`/`..` included


@dataclass(slots=True)
class Snapshot:
    """A walk of one mount.  Paths are relative to the mount root, which is `.`."""

    entries: dict[str, EntryInfo] = field(default_factory=dict)
    inodes: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (dev, ino)
    d_inos: dict[str, int] = field(default_factory=dict)  # path -> d_ino seen in parent
    vanished: list[str] = field(default_factory=list)  # listed by readdir, lstat ENOENT
    errors: dict[str, str] = field(default_factory=dict)  # path -> errno name

    def hardlink_groups(self) -> set[frozenset[str]]:
        """Partition of paths by inode, keeping only classes with more than one path.

        Raw st_ino values differ between FUSE and the kernel; which paths share one does not.
        """
        by_inode: dict[tuple[int, int], set[str]] = defaultdict(set)
        for path, key in self.inodes.items():
            by_inode[key].add(path)
        return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def _join(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    names = sorted(os.listxattr(path, follow_symlinks=False))
    return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while chunk := os.read(fd, _READ_CHUNK):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _entry(path: str, st: os.stat_result, listing: list[DirEntry] | None) -> EntryInfo:
    kind = kind_of(st.st_mode)
    is_dir = kind == "dir"
    return EntryInfo(
        kind=kind,
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        nlink=st.st_nlink,
        size=None if is_dir else st.st_size,
        blocks=None if is_dir else st.st_blocks,
        mtime_ns=st.st_mtime_ns,
        rdev=st.st_rdev if kind in ("chr", "blk") else 0,
        sha256=_sha256(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        xattrs=_xattrs(path),
        listing=None if listing is None else tuple(sorted((e.name, e.d_type) for e in listing)),
    )


def snapshot(mnt: str) -> Snapshot:
    """Walk `mnt` with lstat only.

    Names that readdir returns but lstat cannot find are dropped from the listing and
    kept in `vanished` (kernel overlayfs lists whiteouts in non-merged directories; see
    normalisation (a) in diff_views).  Other errors are recorded, not raised, so that a
    failing path shows up in the diff instead of aborting the walk.
    """
    snap = Snapshot()
    _walk(os.fspath(mnt), ".", snap)
    return snap


def _walk(full: str, rel: str, snap: Snapshot) -> None:
    """Walk by directory descriptor: each child is reached as /proc/self/fd/N/./NAME, so a
    tree deeper than PATH_MAX is walked whole (the differential builds such trees)."""
    st = os.lstat(full)
    listing: list[DirEntry] | None = None
    children: list[tuple[str, str]] = []  # (path to reach it, path relative to the root)
    dir_fd = None
    try:
        if stat.S_ISDIR(st.st_mode):
            dir_fd = os.open(full, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            here = f"/proc/self/fd/{dir_fd}/."
            listing = []
            for dent in getdents(here):
                if dent.name in (".", ".."):
                    listing.append(dent)
                    continue
                child = _join(rel, dent.name)
                try:
                    os.lstat(dent.name, dir_fd=dir_fd)
                except FileNotFoundError:
                    snap.vanished.append(child)
                    continue
                listing.append(dent)
                snap.d_inos[child] = dent.d_ino
                children.append((f"{here}/{dent.name}", child))
        snap.entries[rel] = _entry(full, st, listing)
        snap.inodes[rel] = (st.st_dev, st.st_ino)
        for reach, child in children:
            try:
                _walk(reach, child, snap)
            except OSError as exc:
                snap.errors[child] = errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def take_snapshot(mnt: os.PathLike[str] | str) -> Snapshot:
    """`snapshot` in a child process, so that a hung mount costs a timeout, not the suite."""
    return run_isolated(snapshot, os.fspath(mnt))


# --- comparison ------------------------------------------------------------------------

MAX_REPORTED = 60  # enough to see a pattern, short enough to read


def diff_views(kernel: Snapshot, ours: Snapshot, *, ours_is_kernel: bool = False) -> list[str]:
    """Human-readable differences between the kernel's view and ours; empty if equal.

    Accepted differences, normalised away:
    (a) kernel readdir of a non-merged directory lists whiteouts that lstat cannot find:
        they were dropped while walking (both sides), and ours must have none at all;
    (c) st_dev and raw st_ino differ: only the partition of paths into inodes is compared;
    (d) directory st_size/st_blocks are not recorded.
    (`ours_is_kernel` is for checking the harness with the kernel on both sides.)
    """
    problems: list[str] = []
    if ours_is_kernel:
        problems += [f"{p!r}: listed by one side only" for p in
                     sorted(set(kernel.vanished) ^ set(ours.vanished))]
    else:
        problems += [f"ours lists {p!r} but lstat says ENOENT" for p in ours.vanished]
    for path in sorted({**kernel.errors, **ours.errors}):
        problems.append(
            f"{path!r}: walk error kernel={kernel.errors.get(path)} ours={ours.errors.get(path)}"
        )
    only_kernel = sorted(set(kernel.entries) - set(ours.entries))
    only_ours = sorted(set(ours.entries) - set(kernel.entries))
    problems += [f"{p!r}: missing from ours" for p in only_kernel]
    problems += [f"{p!r}: only in ours" for p in only_ours]
    for path in sorted(set(kernel.entries) & set(ours.entries)):
        problems += _diff_entry(path, kernel.entries[path], ours.entries[path])
    k_groups, o_groups = kernel.hardlink_groups(), ours.hardlink_groups()
    problems += [f"inode shared by {sorted(g)} in kernel only" for g in k_groups - o_groups]
    problems += [f"inode shared by {sorted(g)} in ours only" for g in o_groups - k_groups]
    return problems


def _diff_entry(path: str, k: EntryInfo, o: EntryInfo) -> list[str]:
    out = []
    for f in fields(EntryInfo):
        kv, ov = getattr(k, f.name), getattr(o, f.name)
        if kv == ov:
            continue
        if f.name == "listing":
            # Counters, not sets: a name listed twice is a difference too.
            k_only = sorted((Counter(kv or ()) - Counter(ov or ())).elements())
            o_only = sorted((Counter(ov or ()) - Counter(kv or ())).elements())
            out.append(f"{path!r}: listing kernel-only={k_only} ours-only={o_only}")
        elif f.name == "mode":
            out.append(f"{path!r}: mode kernel={kv:o} ours={ov:o}")
        else:
            out.append(f"{path!r}: {f.name} kernel={kv!r} ours={ov!r}")
    return out


def assert_same_view(kernel: Snapshot | os.PathLike[str] | str,
                     ours: Snapshot | os.PathLike[str] | str, *,
                     ours_is_kernel: bool = False) -> tuple[Snapshot, Snapshot]:
    """Assert two views are equal (after normalisation); return both snapshots."""
    k = kernel if isinstance(kernel, Snapshot) else take_snapshot(kernel)
    o = ours if isinstance(ours, Snapshot) else take_snapshot(ours)
    problems = diff_views(k, o, ours_is_kernel=ours_is_kernel)
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED])
        more = len(problems) - MAX_REPORTED
        raise AssertionError(
            f"{len(problems)} difference(s) between kernel overlayfs and overlayfuse:\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return k, o


# --- errno probes ----------------------------------------------------------------------

Outcome = tuple[str, Any]  # ("ok", value) or ("err", "ENOENT")
Probe = tuple[Any, ...]  # (operation name, path, *arguments)


def _op_lstat(p: str) -> Any:
    return kind_of(os.lstat(p).st_mode)


def _op_stat(p: str) -> Any:
    return kind_of(os.stat(p).st_mode)


def _op_readlink(p: str) -> Any:
    return os.readlink(p)


def _op_getxattr(p: str, name: str) -> Any:
    return os.getxattr(p, name, follow_symlinks=False)


def _op_listxattr(p: str) -> Any:
    return sorted(os.listxattr(p, follow_symlinks=False))


def _op_open_directory(p: str) -> Any:
    os.close(os.open(p, os.O_RDONLY | os.O_DIRECTORY))
    return None


def _op_listdir(p: str) -> Any:
    return sorted(os.listdir(p))


def _op_read(p: str, offset: int = 0, size: int = 16) -> Any:
    fd = os.open(p, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _op_open_nofollow(p: str) -> Any:
    os.close(os.open(p, os.O_RDONLY | os.O_NOFOLLOW))
    return None


def _op_open(p: str, flags: int) -> Any:
    os.close(os.open(p, flags))
    return None


def _op_access(p: str, mode: int) -> Any:
    """access(2) itself, because os.access hides the errno."""
    if _libc.access(os.fsencode(p), mode) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), p)
    return None


def _op_statfs(p: str) -> Any:
    st = os.statvfs(p)
    return {"f_bsize": st.f_bsize, "f_blocks": st.f_blocks, "f_namemax": st.f_namemax}


def _op_mkdir(p: str) -> Any:
    os.mkdir(p)


def _op_unlink(p: str) -> Any:
    os.unlink(p)


def _op_rmdir(p: str) -> Any:
    os.rmdir(p)


def _op_rename(p: str, to: str) -> Any:
    os.rename(p, os.path.join(os.path.dirname(p), to))


def _op_setxattr(p: str, name: str, value: bytes) -> Any:
    os.setxattr(p, name, value, follow_symlinks=False)


def _op_chmod(p: str, mode: int) -> Any:
    os.chmod(p, mode, follow_symlinks=False)


def _op_utime(p: str) -> Any:
    os.utime(p, ns=(0, 0), follow_symlinks=False)


def _op_symlink(p: str, target: str) -> Any:
    os.symlink(target, p)


def _op_truncate(p: str, size: int) -> Any:
    os.truncate(p, size)


OPERATIONS = {name[len("_op_"):]: func for name, func in globals().items()
              if name.startswith("_op_")}


def run_probe(mnt: str, probe: Probe) -> Outcome:
    """Run one probe on `mnt`; the outcome is comparable across mounts."""
    op, rel, *args = probe
    try:
        return ("ok", OPERATIONS[op](os.path.join(mnt, rel), *args))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))


def run_probes(mnt: str, probes: Sequence[Probe]) -> list[Outcome]:
    return [run_probe(mnt, p) for p in probes]


def assert_same_errnos(kernel_mnt: os.PathLike[str] | str, ours_mnt: os.PathLike[str] | str,
                       probes: Sequence[Probe]) -> list[Outcome]:
    """Run every probe on both mounts (each in a child process) and compare outcomes."""
    k = run_isolated(run_probes, os.fspath(kernel_mnt), list(probes))
    o = run_isolated(run_probes, os.fspath(ours_mnt), list(probes))
    bad = [f"{probe!r}: kernel={ko!r} ours={oo!r}"
           for probe, ko, oo in zip(probes, k, o, strict=True) if ko != oo]
    assert not bad, "errno probes differ:\n  " + "\n  ".join(bad)
    return o
