"""Kernel overlayfs as the target (--target kernel): the oracle that checks the checker.

The same workers and rules run on `mount -t overlay -o index=on,redirect_dir=on` (the kernel at
its most POSIX); a clean run there shows that every errno names.py calls a failure is one the
kernel never gives.  There is no daemon, so no fd or RSS probes.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .daemon import fstype_at, run
from .errors import StressError
from .settings import MOUNT_TIMEOUT, UNMOUNT_TIMEOUT

KERNEL_OPTIONS = "index=on,redirect_dir=on"


def mount(lowers: Sequence[Path], upper: Path, work: Path, mnt: Path) -> None:
    opts = (f"lowerdir={':'.join(str(p) for p in lowers)},upperdir={upper},workdir={work},"
            f"{KERNEL_OPTIONS}")
    try:
        done = run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], MOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        done = None
    if done is None or done.returncode != 0 or fstype_at(mnt) != "overlay":
        err = done.stderr.decode(errors="replace").strip() if done is not None else "timed out"
        unmount(mnt)
        raise StressError(f"mount -t overlay -o {opts} {mnt} failed: {err}")


def unmount(mnt: Path) -> None:
    for cmd in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        if fstype_at(mnt) is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            run(cmd, UNMOUNT_TIMEOUT)
    if fstype_at(mnt) is not None:
        raise StressError(f"{mnt} is still mounted after a lazy unmount")
