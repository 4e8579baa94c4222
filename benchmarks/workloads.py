"""The measured jobs: each runs on one fresh mount and yields timings by workload name."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import BenchError
from .mounts import Mount
from .processes import bash, kill_groups, run, sync, timed
from .projects import GIT_ENV, git
from .settings import BIG_DIR, BUILD_DIR, CHOWN_DIR, PER_REQUEST_CALLS, RANDOM_READ_THREADS, Scale
from .stack import Stack

#: The kernel's options for constant-cost copy-up, as overlayfuse has them by default.
METADATA_ONLY_OPTS = "redirect_dir=on,metacopy=on"
#: No target syncs a copy-up: fuse-overlayfs never does, so the kernel and overlayfuse are told not
#: to (issue 14: compare copy-ups with fuse-overlayfs like with like; the plain rows keep each
#: target's default, durable copy-ups for the kernel and overlayfuse).
NO_SYNC_KERNEL_OPTS = "volatile"
NO_SYNC_OVERLAYFUSE_OPTS = "fsync=0"


@dataclass(slots=True)
class Job:
    """One fresh mount, some commands, measurements by workload name."""

    name: str
    produces: tuple[str, ...]
    run: Callable[[Mount, Stack, Scale], dict[str, float]]
    cold: bool
    first_read: bool = False  # time the mount itself: from its command's start to a first read
    kernel_opts: str = ""
    """Extra kernel mount options, so the kernel is compared with the same features overlayfuse has
    on by default (redirect_dir, metacopy: its own defaults are off), or without syncing."""
    overlayfuse_opts: str = ""
    """Extra overlayfuse mount options (``fsync=0`` for the rows where no target syncs)."""
    lowers: Callable[[Stack], list[Path]] | None = None
    """The lower layers this job mounts instead of the bench stack's (top first)."""


def job_walk(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    cmd = bash('find "$1" -printf "%s %i %m\\n" >/dev/null', m.mnt)
    cold = timed(cmd, sc.cmd_timeout)
    sync()
    warm = timed(cmd, sc.cmd_timeout)
    # A FUSE mount's first walk after the cold one still sends a GETATTR per directory: the kernel
    # drops a directory's atime after listing it from the daemon (fs/fuse/readdir.c), and find's
    # fstat of the directory asks again. The third walk is the steady state.
    return {"walk-cold": cold, "walk-warm": warm, "walk-again": timed(cmd, sc.cmd_timeout)}


def job_stat_ls(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    return {"stat-ls": timed(bash('ls -lR "$1" >/dev/null', m.mnt / "usr"), sc.cmd_timeout)}


def job_read_all(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    cmd = bash('tar cf - -C "$1" --exclude="./$2" . | wc -c >/dev/null', m.mnt, BIG_DIR)
    return {"read-all": timed(cmd, sc.cmd_timeout)}


def job_seqread(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    cmd = ["dd", f"if={m.mnt / BIG_DIR / 'big.bin'}", "of=/dev/null", "bs=1M", "status=none"]
    return {"seqread-1G": s.big / 1e6 / timed(cmd, sc.cmd_timeout)}


def job_copyup_big(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    # The lower file is read into the page cache first (outside the mount and the timing), so
    # each target copies from memory and the number measures the copy-up, not the disk.
    run(["cat", str(s.l1 / BIG_DIR / "big.bin")], sc.cmd_timeout, capture=False)
    sync()
    cmd = bash('printf x | dd of="$1" bs=1 count=1 conv=notrunc status=none',
               m.mnt / BIG_DIR / "big.bin")
    return {"copyup-big": timed(cmd, sc.cmd_timeout)}


def job_copyup_big_nosync(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    return {"copyup-big-nosync": job_copyup_big(m, s, sc)["copyup-big"]}


def job_create_small(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    return {"create-small": timed(["tar", "xf", str(s.tarball), "-C", str(m.mnt)],
                                  sc.cmd_timeout)}


def job_copyup_many(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    cmd = bash('cd "$1" && xargs -0 -a "$2" sh -c \'for f; do printf x >> "$f"; done\' sh',
               m.mnt, s.copyup_list)
    return {"copyup-many": timed(cmd, sc.cmd_timeout)}


def job_copyup_many_nosync(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    return {"copyup-many-nosync": job_copyup_many(m, s, sc)["copyup-many"]}


def job_rm_tree(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    return {"rm-tree": timed(["rm", "-rf", str(m.mnt / s.rm_dir)], sc.cmd_timeout)}


def job_parallel(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    cmds = [["dd", f"if={m.mnt / BIG_DIR / name}", "of=/dev/null", "bs=1M", "status=none"]
            for name in ("big.bin", "big2.bin")]
    cmds.append(bash('find "$1" -printf "%s %i %m\\n" >/dev/null', m.mnt))
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True) for c in cmds]
    try:
        deadline = time.monotonic() + sc.cmd_timeout
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except BaseException as exc:
        kill_groups(procs)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise BenchError(f"parallel took more than {sc.cmd_timeout:.0f} s: killed") from None
        raise
    elapsed = time.perf_counter() - start
    for c, p in zip(cmds, procs, strict=True):
        err = p.stderr.read().decode(errors="replace").strip() if p.stderr else ""
        if p.stderr:
            p.stderr.close()
        if p.returncode != 0:
            raise BenchError(f"{shlex.join(c)} exited {p.returncode}: {err[-300:]}")
    return {"parallel": elapsed}


def job_chown_big(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    # Metadata only (metacopy): no file data should be copied; sync so written data is counted.
    cmd = bash('chown -R 1000:1000 "$1" && sync -f "$1"', m.mnt / BIG_DIR)
    return {"chown-big": timed(cmd, sc.cmd_timeout)}


def job_chown_tree(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    # Issue 18's own case: each small file costs a metadata copy-up, the big one no data.
    cmd = bash('chown -R 1000:1000 "$1" && sync -f "$1"', m.mnt / CHOWN_DIR)
    return {"chown-tree": timed(cmd, sc.cmd_timeout)}


def job_mv_big_dir(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    # A directory rename by redirect: the directory alone moves up, its big files stay below.
    cmd = bash('mv "$1" "$1.moved" && sync -f "$1.moved"', m.mnt / BIG_DIR)
    return {"mv-big-dir": timed(cmd, sc.cmd_timeout)}


def job_mv_big_file(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    # A file rename by metacopy: a metacopy file with a redirect moves, its data stays below.
    cmd = bash('mv "$1" "$1.moved" && sync -f "$1.moved"', m.mnt / BIG_DIR / "big.bin")
    return {"mv-big-file": timed(cmd, sc.cmd_timeout)}


_PER_REQUEST = """
import os, sys, time
path, calls = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
for _ in range(calls):
    try:
        os.getxattr(path, "user.overlayfuse-bench-none", follow_symlinks=False)
    except OSError:
        pass
print((time.perf_counter() - start) / calls * 1e6)
"""


def job_per_request(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    """What one request costs end to end: no cache of the kernel's answers a missing xattr, so
    each call is one GETXATTR the daemon answers ENODATA (kernel overlayfs: one real getxattr)."""
    out = run([sys.executable, "-c", _PER_REQUEST, str(m.mnt), str(PER_REQUEST_CALLS)], sc.cmd_timeout)
    return {"per-request": float(out.stdout.decode().strip())}


def job_du(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    return {"du-s": timed(["du", "-s", str(m.mnt)], sc.cmd_timeout)}


def job_mount_to_first_read(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    """What a container start pays for the mount: the mount command run, until a read answers."""
    if m.first_read_s is None:
        raise BenchError("the mount command failed before a file read through the mount")
    return {"mount-to-first-read": m.first_read_s}


def job_git_status(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    """git status on a checkout that is the mount's only lower layer; the first run (untimed) warms
    the caches and refreshes the index (a copy-up of .git/index where stat data differ)."""
    cmd = git(m.mnt, "status", "--porcelain")
    env = os.environ | GIT_ENV
    run(cmd, sc.cmd_timeout, env=env)
    start = time.perf_counter()
    out = run(cmd, sc.cmd_timeout, env=env)
    elapsed = time.perf_counter() - start
    if out.stdout.strip():
        raise BenchError(f"git status in the mount is not clean: {out.stdout.decode(errors='replace')[:300]}")
    return {"git-status": elapsed}


_RANDOM_READ = """
import os, sys, time
from concurrent.futures import ThreadPoolExecutor
root, listing, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(listing, "rb") as f:
    paths = [os.path.join(root, os.fsdecode(p)) for p in f.read().split(b"\\0") if p]
def read(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        n = 0
        while chunk := os.read(fd, 1 << 16):
            n += len(chunk)
        return n
    finally:
        os.close(fd)
start = time.perf_counter()
with ThreadPoolExecutor(threads) as pool:
    total = sum(pool.map(read, paths, chunksize=8))
print(time.perf_counter() - start, total)
"""


def job_random_read(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    """Small files read by 4 threads in a random order (like a language server or a test runner
    importing modules): lookups and opens of cold files, concurrently. Timed inside the reader,
    so the interpreter's start is not counted."""
    return {"random-read-4t": _random_read(m, s, sc)}


def job_random_read_warm(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    """The same on a fresh mount whose lower files the host's page cache holds: a container
    started from an image that others, or an earlier start, have read."""
    return {"random-read-warm": _random_read(m, s, sc)}


def _random_read(m: Mount, s: Stack, sc: Scale) -> float:
    assert s.random_list is not None
    out = run([sys.executable, "-c", _RANDOM_READ, str(m.mnt), str(s.random_list), str(RANDOM_READ_THREADS)],
              sc.cmd_timeout)
    elapsed, _total = out.stdout.decode().split()
    return float(elapsed)


_BUILD = """
import os, subprocess, sys, time
mnt, tarball, top, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
root = os.path.join(mnt, top)
start = time.perf_counter()
subprocess.run(["tar", "xf", tarball, "-C", mnt], check=True, timeout=timeout)
objects = []
for dirpath, _dirs, files in os.walk(root):
    for name in sorted(files):
        if not name.endswith(".c"):
            continue
        with open(os.path.join(dirpath, name), "rb") as f:
            source = f.read()
        obj = os.path.join(dirpath, name[:-2] + ".o")
        with open(obj + ".tmp", "wb") as f:  # as a compiler's driver: write, then rename into place
            f.write(source * 3)
        os.rename(obj + ".tmp", obj)
        objects.append(obj)
with open(os.path.join(root, "a.out"), "wb") as out:
    for obj in objects:
        with open(obj, "rb") as f:
            out.write(f.read())
subprocess.run(["rm", "-rf", root], check=True, timeout=timeout)
print(time.perf_counter() - start)
"""


def job_build_like(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    """A build in the mount: unpack sources, write an object per source and one linked output,
    clean it all away (creates, small writes, renames, reads back, a recursive rm)."""
    assert s.src_tar is not None
    out = run([sys.executable, "-c", _BUILD, str(m.mnt), str(s.src_tar), BUILD_DIR, str(sc.cmd_timeout)],
              sc.cmd_timeout)
    return {"build-like": float(out.stdout.decode().strip())}


def _chown_layer(s: Stack) -> list[Path]:
    assert s.chown_layer is not None
    return [s.chown_layer]


def _git_layer(s: Stack) -> list[Path]:
    assert s.git_layer is not None
    return [s.git_layer]


JOBS = [
    Job("walk", ("walk-cold", "walk-warm", "walk-again"), job_walk, True),
    Job("stat-ls", ("stat-ls",), job_stat_ls, False),
    Job("read-all", ("read-all",), job_read_all, True),
    Job("seqread-1G", ("seqread-1G",), job_seqread, True),
    Job("copyup-big", ("copyup-big",), job_copyup_big, False),
    Job("create-small", ("create-small",), job_create_small, False),
    Job("copyup-many", ("copyup-many",), job_copyup_many, False),
    Job("copyup-big-nosync", ("copyup-big-nosync",), job_copyup_big_nosync, False,
        kernel_opts=NO_SYNC_KERNEL_OPTS, overlayfuse_opts=NO_SYNC_OVERLAYFUSE_OPTS),
    Job("copyup-many-nosync", ("copyup-many-nosync",), job_copyup_many_nosync, False,
        kernel_opts=NO_SYNC_KERNEL_OPTS, overlayfuse_opts=NO_SYNC_OVERLAYFUSE_OPTS),
    Job("rm-tree", ("rm-tree",), job_rm_tree, False),
    Job("parallel", ("parallel",), job_parallel, True),
    Job("per-request", ("per-request",), job_per_request, False),
    Job("du-s", ("du-s",), job_du, True),
    Job("mount-to-first-read", ("mount-to-first-read",), job_mount_to_first_read, False, first_read=True),
    Job("chown-big", ("chown-big",), job_chown_big, False, kernel_opts=METADATA_ONLY_OPTS),
    Job("mv-big-dir", ("mv-big-dir",), job_mv_big_dir, False, kernel_opts=METADATA_ONLY_OPTS),
    Job("mv-big-file", ("mv-big-file",), job_mv_big_file, False, kernel_opts=METADATA_ONLY_OPTS),
    Job("chown-tree", ("chown-tree",), job_chown_tree, False, kernel_opts=METADATA_ONLY_OPTS,
        lowers=_chown_layer),
    Job("git-status", ("git-status",), job_git_status, False, lowers=_git_layer),
    Job("random-read-4t", ("random-read-4t",), job_random_read, True),
    Job("random-read-warm", ("random-read-warm",), job_random_read_warm, False),
    Job("build-like", ("build-like",), job_build_like, False),
]
