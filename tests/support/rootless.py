"""An unprivileged user for rootless tests: subordinate ids, podman's storage with a mount program,
and a tiny busybox image in a local OCI layout (no network).

`RootlessUser.create` makes the user (home and everything else under one 0755 scratch dir of the
test's), gives it /etc/subuid and /etc/subgid ranges, and lets it reach the checkout's venv (a
search-only ACL on any ancestor that others may not enter, taken back afterwards). `close` undoes all
of it: podman's containers and storage reset, the user's leftover processes (podman's pause process)
ended by pid, FUSE mounts under the scratch dir detached, the user, its ranges and the ACLs removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.imagebuild import tool

#: Users are named USER_PREFIX + the test process's pid, so two test runs on one machine never share
#: one; a user left by a run that was killed (its pid gone) is removed by the next.
USER_PREFIX = "ofuse-rl-"
SUBID_START = 400000
SUBID_COUNT = 65536
#: One podman command on a busybox image takes about a second; the first one also starts the pause
#: process. Generous: only a guard against a hang.
PODMAN_TIMEOUT = 180.0
COMMAND_TIMEOUT = 60.0
TAG = "t"
BUSYBOX_APPLETS = ("sh", "id", "stat", "grep", "chown", "cat", "rm", "echo", "ls", "test", "mkdir", "find")


class RootlessError(RuntimeError):
    """A command run as the rootless user failed; the message has the command and its stderr."""


@dataclass
class RootlessUser:
    """The test's unprivileged user; see the module docstring."""

    scratch: Path
    name: str
    uid: int
    gid: int
    home: Path
    acls: list[Path] = field(default_factory=list)

    @classmethod
    def create(cls, needs: Sequence[Path]) -> RootlessUser:
        """Make the user; NEEDS are files it must be able to execute (the venv's commands)."""
        for stale in pwd.getpwall():
            if stale.pw_name.startswith(USER_PREFIX) and not _alive(stale.pw_name[len(USER_PREFIX):]):
                _remove_user(stale.pw_name)
        name = f"{USER_PREFIX}{os.getpid()}"
        _remove_user(name)
        scratch = _scratch_dir()
        scratch.chmod(0o755)
        home = scratch / "home"
        try:
            tool("useradd", "--home-dir", home, "--create-home", "--user-group", "--shell", "/bin/sh",
                 "--no-log-init", name)  # fmt: skip
            entry = pwd.getpwnam(name)
            user = cls(scratch, name, entry.pw_uid, entry.pw_gid, home)
            for table in ("/etc/subuid", "/etc/subgid"):
                _set_subids(Path(table), name, SUBID_START, SUBID_COUNT)
            for path in needs:
                user._grant_search(path)
        except BaseException:
            _remove_user(name)
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return user

    def _grant_search(self, path: Path) -> None:
        """Let the user reach PATH: ancestors that others may not enter get a search-only ACL entry."""
        for parent in reversed(path.resolve().parents):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                tool("setfacl", "-m", f"u:{self.name}:x", parent)
                self.acls.append(parent)
        probe = self.run("test", "-x", str(path), check=False)
        if probe.returncode != 0:
            raise RootlessError(f"{path} is not executable by the unprivileged user {self.name}")

    def run(self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run ARGV as the user, from its home, with a clean environment."""
        base = {"HOME": str(self.home), "USER": self.name, "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                "LANG": "C.UTF-8"}  # fmt: skip
        base.update(env or {})
        cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--reset-env", "--",
               "env", *(f"{k}={v}" for k, v in base.items()), *argv]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.home, check=False)
        if check and proc.returncode != 0:
            raise RootlessError(f"{' '.join(argv)} (as {self.name}) exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def mkdir(self, *parts: str) -> Path:
        """A directory owned by the user under the scratch dir."""
        path = self.scratch
        for part in parts:
            path = path / part
            if not path.is_dir():
                path.mkdir()
                os.chown(path, self.uid, self.gid)
        return path

    def close(self) -> None:
        """Undo `create`, whatever state the tests left."""
        for pid in _pids_of(self.uid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        detach_mounts_under(self.scratch)
        for parent in self.acls:
            with contextlib.suppress(Exception):
                tool("setfacl", "-x", f"u:{self.name}", parent)
        _remove_user(self.name)
        shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass
class Podman:
    """Rootless podman for one mount program, with its own storage and runtime dirs."""

    user: RootlessUser
    program: str
    root: Path

    @classmethod
    def configure(cls, user: RootlessUser, label: str, program: str) -> Podman:
        root = user.mkdir("podman", label)
        config = user.mkdir("podman", label, "config", "containers")
        runtime = user.mkdir("podman", label, "run")
        runtime.chmod(0o700)
        (config / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'runroot = "{runtime / "storage"}"\n'
            f'graphroot = "{root / "graph"}"\n'
            "[storage.options.overlay]\n"
            f'mount_program = "{program}"\n'
        )
        # runc with cgroupfs: crun refuses this machine's hybrid cgroup layout, and without systemd
        # there is no user session to ask for a scope. No network: the tests need none.
        (config / "containers.conf").write_text(
            '[containers]\nnetns = "none"\n'
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\nruntime = "runc"\n'
        )
        for path in (config / "storage.conf", config / "containers.conf"):
            os.chown(path, user.uid, user.gid)
        return cls(user, program, root)

    @property
    def env(self) -> dict[str, str]:
        return {"XDG_CONFIG_HOME": str(self.root / "config"), "XDG_RUNTIME_DIR": str(self.root / "run")}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.user.run("podman", *args, check=check, timeout=PODMAN_TIMEOUT, env=self.env)

    def reset(self) -> None:
        """Remove every container and image of this storage (its mounts go with them)."""
        with contextlib.suppress(Exception):
            self("rm", "--all", "--force", check=False)
        with contextlib.suppress(Exception):
            self("system", "reset", "--force", check=False)


def _scratch_dir() -> Path:
    """A new dir under the system temp dir, named so that podman takes paths in it inside an `oci:`
    reference: `mkdtemp` may end a name with `_`, which the reference grammar refuses ("invalid
    reference format", about one run in five), so the name is hex digits only."""
    while True:
        path = Path(tempfile.gettempdir()) / f"overlayfuse-rootless-{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path


def busybox_layout(directory: Path) -> Path:
    """An OCI layout (tag `TAG`) of one layer: static busybox, a few applets, /etc/data.txt, owners 0:0."""
    rootfs = directory / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    (rootfs / "tmp").mkdir()
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", rootfs / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "data.txt").write_text("image-data\n")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    layout = directory / "layout"
    bundle = directory / "bundle"
    tool("umoci", "init", "--layout", layout)
    tool("umoci", "new", "--image", f"{layout}:{TAG}")
    tool("umoci", "unpack", "--image", f"{layout}:{TAG}", bundle)
    shutil.rmtree(bundle / "rootfs")
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    tool("umoci", "repack", "--image", f"{layout}:{TAG}", bundle)
    tool("umoci", "config", "--image", f"{layout}:{TAG}", "--config.cmd", "/bin/sh")
    for path in [layout, *layout.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    return layout


def detach_mounts_under(directory: Path) -> None:
    """Lazily unmount every mount below DIRECTORY, deepest first (from /proc/self/mountinfo)."""
    prefix = str(directory.resolve()) + "/"
    with open("/proc/self/mountinfo") as table:
        points = [line.split(" ")[4] for line in table]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=COMMAND_TIMEOUT, check=False)


def snapshot(root: Path) -> dict[str, tuple[str, int, int, int]]:
    """ROOT's tree (never following a symlink) as path -> (type, uid, gid, mode), without the marker
    entries (whiteouts in both forms, opaque markers), which the two tools write differently;
    whiteouts are kept as (\"whiteout\", 0, 0, 0) under the name they hide."""
    found: dict[str, tuple[str, int, int, int]] = {}
    pending = [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                rel = os.path.relpath(entry.path, root)
                name = entry.name
                if name.startswith(".wh..") or name == ".wh..wh..opq":
                    continue  # opaque markers, AUFS bookkeeping
                if name.startswith(".wh."):
                    found[os.path.join(os.path.dirname(rel), name[4:])] = ("whiteout", 0, 0, 0)
                    continue
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    found[rel] = ("whiteout", 0, 0, 0)
                    continue
                kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
                found[rel] = (kind, st.st_uid, st.st_gid, 0 if kind == "l" else stat.S_IMODE(st.st_mode))
                if kind == "d":
                    pending.append(Path(entry.path))
    return found


def _set_subids(table: Path, name: str, start: int, count: int) -> None:
    lines = [line for line in table.read_text().splitlines() if line and not line.startswith(f"{name}:")] \
        if table.exists() else []  # fmt: skip
    lines.append(f"{name}:{start}:{count}")
    table.write_text("\n".join(lines) + "\n")


def _remove_subids(table: Path, name: str) -> None:
    if table.exists():
        kept = [line for line in table.read_text().splitlines() if line and not line.startswith(f"{name}:")]
        table.write_text("".join(line + "\n" for line in kept))


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
    return pids


def _alive(pid: str) -> bool:
    return pid.isdigit() and Path("/proc", pid).exists()


def _remove_user(name: str) -> None:
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        uid = None
    if uid is not None:
        for pid in _pids_of(uid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        subprocess.run(["userdel", "--force", name], capture_output=True, timeout=COMMAND_TIMEOUT, check=False)
        with contextlib.suppress(Exception):
            tool("groupdel", name)
    for table in ("/etc/subuid", "/etc/subgid"):
        _remove_subids(Path(table), name)
