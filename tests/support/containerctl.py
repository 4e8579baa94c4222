"""Driving ``overlayctl`` from the container and commit tests, always with timeouts and teardown.

`Ctl` runs the real command (a subprocess, with a timeout: a hung mount fails one test, not the
suite) against one store root. `store_with_images` imports the standard images (made by umoci in
`tests.support.imagebuild`) into a fresh store with the real importer. `unmount_all` is the teardown every
test that mounts goes through: unmount through overlayctl, then by force whatever is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tests.conftest import skip_or_fail
from tests.support.compare import Snapshot, take_snapshot
from tests.support.imagebuild import Images, missing_tools, standard_images
from tests.support.mounts import MountError, is_mounted, overlayctl_binary, run, teardown_overlayfuse

CTL_TIMEOUT = 60.0  # one overlayctl command on a tiny image; bounds a hang


@dataclass(frozen=True, slots=True)
class Ctl:
    """``overlayctl --root ROOT ...`` as a function."""

    root: Path

    def command(self, *args: str | os.PathLike[str]) -> list[str]:
        binary = overlayctl_binary()
        head = [str(binary)] if binary else [sys.executable, "-m", "overlayfuse.ctl"]
        return [*head, "--root", str(self.root), *(os.fspath(a) for a in args)]

    def run(self, *args: str | os.PathLike[str], timeout: float = CTL_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def ok(self, *args: str | os.PathLike[str], timeout: float = CTL_TIMEOUT) -> str:
        """Run, require exit 0, return stdout."""
        proc = self.run(*args, timeout=timeout)
        assert proc.returncode == 0, f"overlayctl {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr}"
        return proc.stdout

    def fails(self, *args: str | os.PathLike[str]) -> str:
        """Run, require a non-zero exit with exactly one ``overlayctl: error:`` line; return it."""
        proc = self.run(*args)
        assert proc.returncode != 0, f"overlayctl {' '.join(map(str, args))} succeeded: {proc.stdout}"
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("overlayctl: error: "), proc.stderr
        return lines[0]

    def ps(self, *flags: str) -> list[dict[str, Any]]:
        return json.loads(self.ok("ps", "--json", *flags))

    def state(self, name: str) -> dict[str, Any]:
        found = [s for s in self.ps("-a") if s["name"] == name]
        assert len(found) == 1, f"container {name} not listed once in ps -a: {found}"
        return found[0]


def build_images(directory: Path) -> Images:
    """The standard images, made under DIRECTORY; skipped (failed in CI) without umoci and skopeo."""
    missing = missing_tools()
    if missing:
        skip_or_fail(missing)
    return standard_images(directory / "layout", directory / "work")


def store_with_images(root: Path, images: Images, *tags: str) -> Ctl:
    """A new store at ROOT holding the standard images TAGS, imported by ``overlayctl image import``."""
    ctl = Ctl(root)
    for tag in tags:
        ctl.ok("image", "import", images.ref(tag), "--tag", f"test/{tag}")
    return ctl


def unmount_all(ctl: Ctl, *mountpoints: Path) -> None:
    """Teardown: unmount every container of the store, then anything still on MOUNTPOINTS; raises if
    something stays mounted (after trying everything)."""
    problems = []
    with contextlib.suppress(AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError):
        for state in ctl.ps():
            if state["name"] and state["mountpoint"]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc = ctl.run("umount", state["name"])
                    if proc.returncode != 0:
                        problems.append(proc.stderr.strip())
    for mnt in mountpoints:
        if is_mounted(mnt):
            try:
                teardown_overlayfuse(mnt)
            except MountError as exc:
                problems.append(str(exc))
            problems.append(f"{mnt} was still mounted after overlayctl umount")
    if problems:
        raise MountError("; ".join(problems))


@contextlib.contextmanager
def store_session(root: Path, scratch: Path) -> Iterator[Ctl]:
    """The store at ROOT for one test: afterwards nothing it mounted (containers, or anything on
    SCRATCH/mnt*) stays mounted, and the containers it made are removed."""
    ctl = Ctl(root)
    before = {state["name"] for state in ctl.ps("-a")}
    try:
        yield ctl
    finally:
        unmount_all(ctl, *sorted(scratch.glob("mnt*")))
        for state in ctl.ps("-a"):
            if state["name"] and state["name"] not in before:
                ctl.ok("rm", "--force", state["name"])


def sh(script: str, timeout: float = 30.0) -> str:
    """Run SCRIPT with sh (in a child: a hung mount costs a timeout, not the suite)."""
    proc = run(["sh", "-ec", script], timeout=timeout)
    assert proc.returncode == 0, f"{script!r} failed: {proc.stderr.decode()}"
    return proc.stdout.decode()


def change_container(mnt: Path) -> None:
    """Write a new file, change a lower one, delete lower ones, replace a lower directory."""
    sh(
        f"""
        cd {mnt}
        echo hello > etc/new.txt
        echo 10.0.0.1 db >> etc/hosts
        rm etc/passwd
        rm home/user/notes
        rm -r usr/lib
        mkdir usr/lib
        echo fresh > usr/lib/fresh.so
        mkdir -p srv/data/sub
        ln -s ../hosts srv/data/sub/link
        """
    )


def comparable(view: Snapshot | Path) -> Snapshot:
    """VIEW as a flat tree and an overlay mount can agree on: directory link counts are not
    compared (overlayfs reports 1 for a merged directory, find(1)'s "unknown")."""
    snap = view if isinstance(view, Snapshot) else take_snapshot(view)
    entries = {path: replace(info, nlink=1) if info.kind == "dir" else info for path, info in snap.entries.items()}
    return replace(snap, entries=entries)
