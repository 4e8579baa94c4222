"""``scripts/bench --rss-walk``: what a daemon holds in memory for the objects the kernel knows.

One lower layer of FILES empty files (a thousand per directory) is mounted by each FUSE target;
``find`` walks it (the kernel then holds a reference to every object it met, and the daemon a node
for each); the daemon's VmRSS is read then, and again after ``echo 2 > /proc/sys/vm/drop_caches``
made the kernel let those objects go (FORGET requests: what a node costs that forget does not pay
back shows here). The kernel forgets only under memory pressure or on drop_caches, so the first
number is what a long-lived mount of a big tree holds; VmHWM is the peak on the way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BenchError, say
from .mounts import Mounter
from .processes import bash, timed

#: Files per directory of the generated layer (a big package's share of /usr/share, say).
PER_DIR = 1000
#: How long the daemon may take to answer the kernel's FORGETs after drop_caches (it is polled).
FORGET_SETTLE = 10.0
WALK_TIMEOUT = 1800.0


def generate(lower: Path, files: int) -> None:
    """FILES empty files, PER_DIR per directory, under LOWER."""
    for i in range(files):
        d = lower / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True)
        os.close(os.open(d / f"f{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))


def _settled_rss(read: Callable[[], int | None]) -> int | None:
    """VmRSS once it stops falling (the daemon works through the kernel's FORGETs)."""
    last = read()
    deadline = time.monotonic() + FORGET_SETTLE
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read()
        if now is None or last is None or now >= last:
            return now
        last = now
    return last


def measure(work: Path, files: int, targets: list[str]) -> dict[str, Any]:
    lower = work / "layers" / "many"
    say(f"rss-walk: generating {files} files under {lower}")
    generate(lower, files)
    mounter = Mounter(work / "mnt", [lower])
    results: dict[str, Any] = {"files": files}
    try:
        for target in targets:
            with mounter.mounted(target) as m:
                if m.pid is None:
                    raise BenchError(f"{target}: no daemon found for {m.mnt}")
                start = m.rss_kib()
                walk = timed(bash('find "$1" -printf "%i\\n" | wc -l >/dev/null', m.mnt), WALK_TIMEOUT)
                after_walk = m.rss_kib()
                Path("/proc/sys/vm/drop_caches").write_text("2\n")
                after_forget = _settled_rss(m.rss_kib)
                results[target] = {"rss_start_kib": start, "rss_after_walk_kib": after_walk,
                                   "rss_after_forget_kib": after_forget, "hwm_kib": m.hwm_kib(),
                                   "walk_s": walk}
                say(f"rss-walk {target}: {results[target]}")
    finally:
        mounter.unmount_all()
    return results


def render(results: dict[str, Any]) -> str:
    lines = [f"daemon memory, walk of {results['files']} files ({PER_DIR} per directory) in one lower layer:",
             "target          VmRSS start  after find  after forget  VmHWM    find"]
    for target, r in results.items():
        if target in ("files", "host"):
            continue
        mib = [f"{r[k] / 1024:.1f} MiB" if r[k] else "?" for k in
               ("rss_start_kib", "rss_after_walk_kib", "rss_after_forget_kib", "hwm_kib")]
        lines.append(f"{target:<15} {mib[0]:>11}  {mib[1]:>10}  {mib[2]:>12}  {mib[3]:>9}  {r['walk_s']:.2f} s")
    return "\n".join(lines)
