"""Kernel overlayfs as the target (--target kernel): the oracle that checks the checker.

The same workers and rules run on `mount -t overlay -o index=on,redirect_dir=on` (the kernel at
its most POSIX); a clean run there shows that every errno names.py calls a failure is one the
kernel never gives.  There is no daemon, so no fd or RSS probes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from benchmarks import mounting

from .errors import StressError
from .settings import MOUNT_TIMEOUT, UNMOUNT_TIMEOUT

KERNEL_OPTIONS = "index=on,redirect_dir=on"


def mount(lowers: Sequence[Path], upper: Path, work: Path, mnt: Path) -> None:
    opts = f"{mounting.overlay_options(lowers, upper, work)},{KERNEL_OPTIONS}"
    try:
        done = mounting.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], MOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        done = None
    if done is None or done.returncode != 0 or mounting.fstype_at(mnt) != "overlay":
        err = done.stderr.decode(errors="replace").strip() if done is not None else "timed out"
        unmount(mnt)
        raise StressError(f"mount -t overlay -o {opts} {mnt} failed: {err}")


def unmount(mnt: Path) -> None:
    if not mounting.unmount(mnt, mounting.KERNEL_UNMOUNTS, UNMOUNT_TIMEOUT):
        raise StressError(f"{mnt} is still mounted after a lazy unmount")
