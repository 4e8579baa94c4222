"""Unprivileged users on a root mount: overlayfuse must give what kernel overlayfs gives.

overlayfuse mounted by root uses ``allow_other,default_permissions``; the kernel checks the
caller against the merged view's modes, owners and the sticky bit, and the daemon then does the
change as root on the caller's behalf (copy-up, create) with the caller's ownership.  One
operation table is run, in order, as the users `ofuse-a` and `ofuse-b` on a kernel overlay mount
and on overlayfuse over identical trees; outcomes (errno names, or the owner and mode of what was
made) and the resulting views must match.

The users are created (``useradd --system``) if missing and left in place; nothing else is
touched outside this module's temp dir.  The operations run under Debian's /usr/bin/python3
through ``setpriv``: the venv lives under /root, which other users cannot enter, and pytest's own
temp dir is 0700, so the mounts live in a 0755 dir of their own under /tmp.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.compare import diff_views, take_snapshot
from tests.support.mounts import mount_at
from tests.support.rich_tree import build_layer_set
from tests.support.trees import Dir, Entry, File
from tests.support.writes import (
    KERNEL_OPTS,
    OURS_IS_KERNEL,
    Pair,
    assert_same_upper,
    blank_new_times,
    mount_ours,
    mounted_pair,
)

pytestmark = [pytest.mark.kernel, pytest.mark.mount]

USERS = ("ofuse-a", "ofuse-b")
SYSTEM_PYTHON = "/usr/bin/python3"
USER_TIMEOUT = 60.0  # one batch of operations; only bounds a hang

# Runs as the unprivileged user: self-contained, standard library only.
RUNNER = r"""
import errno, json, os, stat, sys
mnt, ops = sys.argv[1], json.loads(sys.argv[2])
os.umask(0o022)

def summary(p):
    st = os.lstat(p)
    return [oct(st.st_mode), st.st_uid, st.st_gid]

def create(p, data, mode):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, data.encode())
    os.close(fd)
    return summary(p)

def write(p, data, flags=os.O_WRONLY):
    fd = os.open(p, flags)
    os.write(fd, data.encode())
    os.close(fd)

def mkdir(p, mode):
    os.mkdir(p, mode)
    return summary(p)

def read(p):
    with open(p, "rb") as f:
        return f.read().decode("latin-1")

P = lambda rel: os.path.join(mnt, rel)
OPS = {
    "read": lambda rel: read(P(rel)),
    "write": lambda rel, data: write(P(rel), data),
    "append": lambda rel, data: write(P(rel), data, os.O_WRONLY | os.O_APPEND),
    "create": lambda rel, data, mode: create(P(rel), data, mode),
    "mkdir": lambda rel, mode: mkdir(P(rel), mode),
    "mkfifo": lambda rel, mode: (os.mkfifo(P(rel), mode), summary(P(rel)))[1],
    "symlink": lambda rel, target: (os.symlink(target, P(rel)), summary(P(rel)))[1],
    "unlink": lambda rel: os.unlink(P(rel)),
    "rmdir": lambda rel: os.rmdir(P(rel)),
    "rename": lambda rel, to: os.rename(P(rel), P(to)),
    "chmod": lambda rel, mode: (os.chmod(P(rel), mode), summary(P(rel)))[1],
    "chown": lambda rel, uid, gid: os.chown(P(rel), uid, gid),
    "utime": lambda rel, ns: os.utime(P(rel), ns=tuple(ns)),
    "touch_now": lambda rel: os.utime(P(rel)),
    "truncate": lambda rel, size: os.truncate(P(rel), size),
    "setxattr": lambda rel, name, value: os.setxattr(P(rel), name, value.encode()),
    "listdir": lambda rel: sorted(os.listdir(P(rel))),
    "stat": lambda rel: summary(P(rel)),
    "access_w": lambda rel: os.access(P(rel), os.W_OK),
}
out = []
for name, *args in ops:
    try:
        out.append(["ok", OPS[name](*args)])
    except OSError as exc:
        out.append(["err", errno.errorcode.get(exc.errno, str(exc.errno))])
print(json.dumps(out))
"""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: int
    gid: int


def ensure_user(name: str) -> User:
    """The user, created as a system user without a home if it does not exist yet."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        proc = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                               "/usr/sbin/nologin", name], capture_output=True, timeout=60,
                              check=False)
        if proc.returncode not in (0, 9):  # 9: created meanwhile by a parallel run
            pytest.fail(f"useradd {name}: {proc.stderr.decode().strip()}")
        pw = pwd.getpwnam(name)
    return User(name, pw.pw_uid, pw.pw_gid)


@pytest.fixture(scope="module")
def users() -> dict[str, User]:
    if not os.access(SYSTEM_PYTHON, os.X_OK) or shutil.which("setpriv") is None:
        pytest.fail(f"needs {SYSTEM_PYTHON} and setpriv", pytrace=False)
    return {"a": ensure_user(USERS[0]), "b": ensure_user(USERS[1])}


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A temp dir other users can traverse; removed afterwards (mounts are gone by then)."""
    path = Path(tempfile.mkdtemp(prefix="ofuse-perm-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(user: User, mnt: Path, ops: list[list[Any]]) -> list[list[Any]]:
    proc = subprocess.run(
        ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
         SYSTEM_PYTHON, "-c", RUNNER, str(mnt), json.dumps(ops)],
        capture_output=True, timeout=USER_TIMEOUT, check=False, cwd="/",
    )
    assert proc.returncode == 0, f"runner as {user.name} failed: {proc.stderr.decode()}"
    return json.loads(proc.stdout)


def run_table(mnt: Path, table: list[tuple[str, list[Any]]], users: dict[str, User]
              ) -> list[list[Any]]:
    """Run the table in order, one runner process per run of consecutive rows of one user."""
    out: list[list[Any]] = []
    i = 0
    while i < len(table):
        who = table[i][0]
        j = i
        while j < len(table) and table[j][0] == who:
            j += 1
        out += as_user(users[who], mnt, [op for _, op in table[i:j]])
        i = j
    return out


def layers(a: User, b: User) -> dict[str, list[Entry]]:
    return {
        "l1": [
            File("secret", b"secret\n", 0o600),
            File("public", b"public\n", 0o644),
            Dir("rootdir", 0o755),
            File("rootdir/file", b"root\n"),
            Dir("tmp", 0o1777),
            File("tmp/a_lower", b"a\n", 0o644, a.uid, a.gid),
            File("tmp/b_lower", b"b\n", 0o644, b.uid, b.gid),
            Dir("adir", 0o755, a.uid, a.gid),
            File("adir/own", b"own\n", 0o644, a.uid, a.gid),
            File("adir/rootfile", b"root\n"),
            Dir("adir/sub", 0o750, a.uid, a.gid),
            File("adir/sub/deep", b"deep\n", 0o640, a.uid, a.gid),
            Dir("sgid", 0o2777, 0, b.gid),
            Dir("bdir", 0o700, b.uid, b.gid),
            File("bdir/x", b"x\n", 0o644, b.uid, b.gid),
        ],
    }


def table(a: User, b: User) -> list[tuple[str, list[Any]]]:
    """(user, operation) rows, run in this order; later rows see earlier rows' changes."""
    return [
        # what a user may not do to root's objects
        ("a", ["read", "secret"]),  # EACCES
        ("a", ["read", "public"]),
        ("a", ["write", "public", "x"]),  # EACCES
        ("a", ["access_w", "public"]),
        ("a", ["create", "rootdir/new", "n", 0o644]),  # EACCES
        ("a", ["mkdir", "rootdir/d", 0o755]),  # EACCES
        ("a", ["unlink", "rootdir/file"]),  # EACCES
        ("a", ["rename", "rootdir/file", "rootdir/file2"]),  # EACCES
        ("a", ["chmod", "public", 0o666]),  # EPERM
        ("a", ["chown", "adir/own", b.uid, -1]),  # EPERM
        ("a", ["utime", "public", [1, 2]]),  # EPERM
        ("a", ["touch_now", "public"]),  # EACCES
        ("a", ["truncate", "public", 0]),  # EACCES
        ("a", ["setxattr", "public", "user.x", "v"]),  # EACCES
        ("a", ["listdir", "bdir"]),  # EACCES
        ("a", ["stat", "bdir/x"]),  # EACCES
        # what a user may do to its own objects, lower ones included (copy-up as that user)
        ("a", ["write", "adir/own", "changed\n"]),
        ("a", ["stat", "adir/own"]),
        ("a", ["chmod", "adir/own", 0o600]),
        ("a", ["setxattr", "adir/own", "user.x", "v"]),
        ("a", ["utime", "adir/own", [1_000_000_000, 2_000_000_000]]),
        ("a", ["append", "adir/sub/deep", "more\n"]),
        ("a", ["stat", "adir/sub"]),
        ("a", ["stat", "adir/sub/deep"]),
        ("a", ["unlink", "adir/rootfile"]),  # root's file, a's dir: allowed
        ("a", ["rename", "adir/own", "adir/own2"]),
        ("a", ["mkdir", "adir/newdir", 0o777]),  # umask 022: 0755
        ("a", ["create", "adir/newdir/f", "f\n", 0o640]),
        ("a", ["create", "adir/g", "g\n", 0o666]),  # 0644
        ("a", ["mkfifo", "adir/fifo", 0o666]),
        ("a", ["symlink", "adir/link", "own2"]),
        ("a", ["chown", "adir/own2", a.uid, b.gid]),  # EPERM: a is not in b's group
        ("a", ["rmdir", "adir/sub"]),  # ENOTEMPTY
        ("a", ["create", "tmp/a_new", "a\n", 0o666]),
        # setgid dir: new objects take the dir's group; a subdir keeps the bit
        ("a", ["create", "sgid/afile", "s\n", 0o666]),
        ("a", ["mkdir", "sgid/adir", 0o777]),
        ("a", ["create", "sgid/sgidfile", "s\n", 0o2755]),  # S_ISGID dropped: not b's group
        ("a", ["stat", "sgid"]),
        # sticky dir: b cannot remove or rename a's files, only its own
        ("b", ["unlink", "tmp/a_lower"]),  # EPERM
        ("b", ["unlink", "tmp/a_new"]),  # EPERM
        ("b", ["rename", "tmp/a_new", "tmp/b_renamed"]),  # EPERM
        ("b", ["rename", "tmp/a_lower", "tmp/b_renamed"]),  # EPERM
        ("b", ["rename", "tmp/b_lower", "tmp/b_moved"]),
        ("b", ["write", "tmp/a_lower", "b"]),  # EACCES: 0644
        ("b", ["create", "tmp/b_new", "b\n", 0o600]),
        ("b", ["read", "adir/newdir/f"]),  # EACCES: 0640 a:a
        ("b", ["unlink", "adir/own2"]),  # EACCES: a's 0755 dir
        ("b", ["listdir", "tmp"]),
        ("a", ["unlink", "tmp/b_moved"]),  # EPERM
        ("a", ["unlink", "tmp/a_lower"]),  # a's own lower file: whiteout made for a
        ("a", ["listdir", "tmp"]),
        ("a", ["listdir", "adir"]),
    ]


@contextlib.contextmanager
def permission_pair(root: Path, a: User, b: User) -> Iterator[Pair]:
    with mounted_pair(root, layers(a, b)) as pair:
        yield pair


def test_unprivileged_users_get_kernel_outcomes(public_tmp: Path, users: dict[str, User],
                                                overlayfuse_bin: Path) -> None:
    a, b = users["a"], users["b"]
    rows = table(a, b)
    since = time.time_ns()
    with permission_pair(public_tmp, a, b) as pair:
        k = run_table(pair.kernel.mnt, rows, users)
        o = run_table(pair.ours.mnt, rows, users)
        bad = [f"{who} {op}: kernel={ko} ours={oo}"
               for (who, op), ko, oo in zip(rows, k, o, strict=True) if ko != oo]
        assert not bad, f"{len(bad)} outcome(s) differ from the kernel:\n  " + "\n  ".join(bad)
        # The oracle itself, for the rows whose meaning the table comments claim.
        expect = {0: ["err", "EACCES"], 4: ["err", "EACCES"], 8: ["err", "EPERM"],
                  38: ["err", "EPERM"], 40: ["err", "EPERM"]}
        assert {i: k[i] for i in expect} == expect
        ks, os_ = blank_new_times(take_snapshot(pair.kernel.mnt), take_snapshot(pair.ours.mnt),
                                  since)
        problems = diff_views(ks, os_, ours_is_kernel=OURS_IS_KERNEL)
        assert not problems, "views differ:\n  " + "\n  ".join(problems[:60])
        upper = assert_same_upper(pair, since)
        # copy-up as the user: a's lower file and its parents keep a's ownership in upper
        for rel in ("adir", "adir/sub", "adir/sub/deep", "adir/own2", "adir/newdir/f"):
            assert (upper[rel].uid, upper[rel].gid) == (a.uid, a.gid), rel


def test_created_objects_belong_to_the_caller(public_tmp: Path, users: dict[str, User],
                                               overlayfuse_bin: Path) -> None:
    """The same facts spelled out on our side alone, so a failure reads plainly."""
    a, b = users["a"], users["b"]
    with permission_pair(public_tmp, a, b) as pair:
        rows: list[tuple[str, list[Any]]] = [
            ("a", ["create", "adir/n", "n", 0o666]),
            ("a", ["mkdir", "adir/nd", 0o777]),
            ("a", ["create", "sgid/n", "n", 0o640]),
            ("a", ["mkdir", "sgid/nd", 0o770]),
        ]
        got = run_table(pair.ours.mnt, rows, users)
        assert got == [
            ["ok", ["0o100644", a.uid, a.gid]],
            ["ok", ["0o40755", a.uid, a.gid]],
            ["ok", ["0o100640", a.uid, b.gid]],
            ["ok", ["0o42750", a.uid, b.gid]],
        ]


def test_mount_is_allow_other_default_permissions(tmp_path: Path, overlayfuse_bin: Path) -> None:
    if OURS_IS_KERNEL:
        pytest.skip("a property of the FUSE mount")
    ls = build_layer_set(tmp_path, {"upper": [], "l1": [File("f")]}, kernel=True)
    with mount_ours(ls, KERNEL_OPTS):
        info = mount_at(ls.mnt)
        assert info is not None
        assert "allow_other" in info.options and "default_permissions" in info.options, info
