"""The merged view: walking a mount into comparable entries, and comparing the targets' views."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from .processes import run

Entry = list[Any]  # [kind, permissions, size, symlink target, rdev]

KINDS = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
         stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


def walk_view(root: str) -> dict[str, Any]:
    """Every entry below `root` (not following symlinks), and how many names lstat ENOENT.

    The kernel lists whiteout names in directories that are not merged, and those names then
    fail lstat with ENOENT: they are counted, not compared.
    """
    entries: dict[str, Entry] = {}
    vanished = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel)) as it:
            names = sorted(e.name for e in it)
        for name in names:
            path = f"{rel}/{name}" if rel else name
            full = os.path.join(root, path)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                vanished += 1
                continue
            kind = KINDS.get(stat.S_IFMT(st.st_mode), "?")
            entries[path] = [kind, stat.S_IMODE(st.st_mode), st.st_size,
                             os.readlink(full) if kind == "l" else None,
                             st.st_rdev if kind in "cb" else None]
            if kind == "d":
                stack.append(path)
    return {"entries": entries, "vanished": vanished}


def walk_view_isolated(root: Path, timeout: float) -> dict[str, Any]:
    """walk_view in a child process, so a hung mount costs a timeout, not the run.

    The child is `python -m benchmarks --_walk ROOT`; it finds the package on the PYTHONPATH
    that scripts/bench sets, which it inherits.
    """
    package = __name__.rpartition(".")[0]
    proc = run([sys.executable, "-m", package, "--_walk", str(root)], timeout)
    view: dict[str, Any] = json.loads(proc.stdout)
    return view


def show(e: Entry) -> str:
    kind, perm, size, link, rdev = e
    extra = (f" -> {link}" if link is not None else "") + (
        f" {os.major(rdev)}:{os.minor(rdev)}" if rdev is not None else "")
    return f"[{kind} {perm:04o} {size}{extra}]"


def compare_views(views: dict[str, dict[str, Any]]) -> list[str]:
    """Differences between each target's view and the first one's, as readable lines."""
    names = list(views)
    ref_name, ref = names[0], views[names[0]]["entries"]
    problems = []
    for name in names[1:]:
        other = views[name]["entries"]
        only_ref = sorted(set(ref) - set(other))
        only_other = sorted(set(other) - set(ref))
        differ = sorted(p for p in set(ref) & set(other) if ref[p] != other[p])
        for p in only_ref[:10]:
            problems.append(f"{p}: only in {ref_name}'s view")
        for p in only_other[:10]:
            problems.append(f"{p}: only in {name}'s view")
        for p in differ[:10]:
            problems.append(f"{p}: {ref_name} {show(ref[p])} != {name} {show(other[p])}")
        extra = len(only_ref) + len(only_other) + len(differ) - 30
        if extra > 0:
            problems.append(f"... and more ({len(only_ref)} missing, {len(only_other)} extra,"
                            f" {len(differ)} different in {name})")
    return problems
