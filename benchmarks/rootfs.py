"""The Debian minbase rootfs for l1: debootstrap once, cached between runs."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .errors import BenchError, say
from .mounts import mounts_under, remove_tree
from .processes import run
from .settings import DEBOOTSTRAP_TIMEOUT, UNMOUNT_TIMEOUT


def debootstrap_rootfs(cache: Path, release: str, mirror: str | None) -> tuple[Path | None, str]:
    """The cached minbase rootfs for `release`, built on first use; (None, why) on failure."""
    dest = cache / f"{release}-minbase"
    done = cache / f"{release}-minbase.complete"
    if dest.is_dir() and done.exists():
        return dest, f"debootstrap --variant=minbase {release} (cached in {dest})"
    cache.mkdir(parents=True, exist_ok=True)
    if shutil.which("debootstrap") is None:
        say("installing debootstrap with apt-get")
        apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-qq", "-o",
               "DPkg::Lock::Timeout=300"]
        try:
            if run([*apt, "-y", "install", "debootstrap"], 600, check=False).returncode != 0:
                run([*apt, "update"], 600)
                run([*apt, "-y", "install", "debootstrap"], 600)
        except BenchError as exc:
            return None, f"could not install debootstrap: {exc}"
    partial = cache / f"{release}-minbase.partial"
    log = cache / f"{release}-minbase.log"
    remove_tree(partial)
    cmd = ["debootstrap", "--variant=minbase", release, str(partial)] + ([mirror] if mirror else [])
    say(f"running {shlex.join(cmd)} (log: {log}); a few minutes, once")
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=DEBOOTSTRAP_TIMEOUT)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
    except subprocess.TimeoutExpired:
        rc = -1
    finally:
        for point in reversed(mounts_under(partial)):  # proc/sys left by a failed run
            run(["umount", "-l", point], UNMOUNT_TIMEOUT, check=False)
    if rc != 0:
        tail = " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        remove_tree(partial)
        return None, f"debootstrap failed ({rc}): {tail}"
    remove_tree(dest)
    partial.rename(dest)
    done.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return dest, f"debootstrap --variant=minbase {release} (built now, cached in {dest})"
