"""The measured jobs: each runs on one fresh mount and yields timings by workload name."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import BenchError
from .mounts import Mount
from .processes import bash, kill_groups, run, sync, timed
from .settings import BIG_DIR, PER_REQUEST_CALLS, Scale
from .stack import Stack

#: The kernel's options for constant-cost copy-up, as overlayfuse has them by default.
METADATA_ONLY_OPTS = "redirect_dir=on,metacopy=on"


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
    on by default (redirect_dir, metacopy: its own defaults are off)."""


def job_walk(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    cmd = bash('find "$1" -printf "%s %i %m\\n" >/dev/null', m.mnt)
    cold = timed(cmd, sc.cmd_timeout)
    sync()
    return {"walk-cold": cold, "walk-warm": timed(cmd, sc.cmd_timeout)}


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


def job_create_small(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    return {"create-small": timed(["tar", "xf", str(s.tarball), "-C", str(m.mnt)],
                                  sc.cmd_timeout)}


def job_copyup_many(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    cmd = bash('cd "$1" && xargs -0 -a "$2" sh -c \'for f; do printf x >> "$f"; done\' sh',
               m.mnt, s.copyup_list)
    return {"copyup-many": timed(cmd, sc.cmd_timeout)}


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


def job_mv_big_dir(m: Mount, s: Stack, sc: Scale) -> dict[str, float]:
    # A directory rename by redirect: the directory alone moves up, its big files stay below.
    cmd = bash('mv "$1" "$1.moved" && sync -f "$1.moved"', m.mnt / BIG_DIR)
    return {"mv-big-dir": timed(cmd, sc.cmd_timeout)}


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


JOBS = [
    Job("walk", ("walk-cold", "walk-warm"), job_walk, True),
    Job("stat-ls", ("stat-ls",), job_stat_ls, False),
    Job("read-all", ("read-all",), job_read_all, True),
    Job("seqread-1G", ("seqread-1G",), job_seqread, True),
    Job("copyup-big", ("copyup-big",), job_copyup_big, False),
    Job("create-small", ("create-small",), job_create_small, False),
    Job("copyup-many", ("copyup-many",), job_copyup_many, False),
    Job("rm-tree", ("rm-tree",), job_rm_tree, False),
    Job("parallel", ("parallel",), job_parallel, True),
    Job("per-request", ("per-request",), job_per_request, False),
    Job("du-s", ("du-s",), job_du, True),
    Job("mount-to-first-read", ("mount-to-first-read",), job_mount_to_first_read, False, first_read=True),
    Job("chown-big", ("chown-big",), job_chown_big, False, kernel_opts=METADATA_ONLY_OPTS),
    Job("mv-big-dir", ("mv-big-dir",), job_mv_big_dir, False, kernel_opts=METADATA_ONLY_OPTS),
]
