"""The layer stack every target mounts, and the parts of it the workloads aim at."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import say
from .layers import build_chown_tree, build_create_tar, build_l2, generate_rootfs, subtree_counts, under, write_big
from .processes import run, sync
from .projects import build_git_checkout, build_source_tar, write_random_list
from .rootfs import debootstrap_rootfs
from .settings import BIG_DIR, SYNC_TIMEOUT, Scale
from .views import Entry


@dataclass(slots=True)
class Stack:
    """Everything the workloads need to know about the prepared layers."""

    l1: Path
    l2: Path
    big: int  # bytes in big.bin
    big2: int
    tarball: Path
    tar_files: int
    tar_bytes: int
    copyup_list: Path
    copyup_files: int
    rm_dir: str
    rm_entries: int
    source: str
    l2_summary: dict[str, Any] = field(default_factory=dict)
    view_entries: int = 0
    git_layer: Path | None = None
    """A git checkout (the layer's root is the work tree): git-status mounts it alone."""
    git_files: int = 0
    chown_layer: Path | None = None
    """chown-tree's layer: one dir of many small files and one big file, mounted alone."""
    chown_files: int = 0
    src_tar: Path | None = None  # build-like's source tarball
    src_files: int = 0
    src_bytes: int = 0
    random_list: Path | None = None  # random-read-4t's files, NUL-separated, in reading order
    random_files: int = 0


def prepare_stack(work: Path, scale: Scale, use_debootstrap: bool, cache: Path, release: str,
                  mirror: str | None) -> Stack:
    layers = work / "layers"
    l1, l2 = layers / "l1", layers / "l2"
    source = ""
    rootfs = None
    if use_debootstrap:
        rootfs, source = debootstrap_rootfs(cache, release, mirror)
        if rootfs is None:
            say(f"warning: {source}; falling back to a generated tree")
            source = f"generated tree ({scale.tree_entries} entries; {source})"
    if rootfs is not None:
        l1.parent.mkdir(parents=True, exist_ok=True)
        run(["cp", "-a", "--reflink=auto", str(rootfs), str(l1)], SYNC_TIMEOUT)
    else:
        n = generate_rootfs(l1, scale.tree_entries)
        source = source or f"generated tree ({n} entries)"
    say(f"bottom layer: {source}")
    write_big(l1 / BIG_DIR / "big.bin", scale.big, 10)
    write_big(l1 / BIG_DIR / "big2.bin", scale.big // 2, 11)
    summary = build_l2(l1, l2, scale.l2_changes)
    tarball = work / "create-small.tar"
    tar_bytes = build_create_tar(tarball, scale.create_files, scale.create_bytes)
    git_layer = layers / "git"
    build_git_checkout(git_layer, scale.repo_files)
    chown_layer = layers / "chown"
    build_chown_tree(chown_layer, scale.chown_files, scale.big)
    src_tar = work / "build-like.tar"
    src_bytes = build_source_tar(src_tar, scale.build_files)
    sync()
    return Stack(l1, l2, scale.big, scale.big // 2, tarball, scale.create_files, tar_bytes,
                 work / "copyup-list", 0, "", 0, source, summary, git_layer=git_layer,
                 git_files=scale.repo_files, chown_layer=chown_layer, chown_files=scale.chown_files,
                 src_tar=src_tar, src_files=scale.build_files, src_bytes=src_bytes,
                 random_list=work / "random-list")


def choose_targets_of_work(stack: Stack, view: dict[str, Entry], scale: Scale) -> None:
    """From the merged view: the files copyup-many appends to, the tree rm-tree removes."""
    files = sorted(p for p, e in view.items()
                   if e[0] == "f" and e[2] <= (4 << 20) and not under(p, [BIG_DIR]))
    step = max(1, len(files) // scale.copyup_files) if files else 1
    chosen = files[::step][:scale.copyup_files]
    stack.copyup_list.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in chosen))
    stack.copyup_files = len(chosen)
    if stack.random_list is not None:
        stack.random_files = write_random_list(stack.random_list, view, scale.random_files)
    counts = subtree_counts(view)
    candidates = [p for p in counts if not under(BIG_DIR, [p])]
    stack.rm_dir = min(candidates, key=lambda p: (abs(counts[p] - scale.rm_entries), p))
    stack.rm_entries = counts[stack.rm_dir]
    stack.view_entries = len(view)
