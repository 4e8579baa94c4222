"""The write path of overlayfuse, compared with kernel overlayfs doing the same changes.

Each test builds one layer stack twice, mounts it under the kernel (``redirect_dir=on,index=on``,
the kernel at its most POSIX) and under overlayfuse, runs the same steps on both mounts (in child
processes, so a hung mount costs a timeout, not the suite) and compares: each step's outcome (a
value or an errno name), the merged view afterwards, and often the upper dir itself.

The harness (the shared layer stack, mounting a pair, steps, the comparisons, and the
`OFUSE_OURS=kernel` self-check) is in `tests/support/writes.py`.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.compare import kind_of, take_snapshot
from tests.support.gatefs import FILE_NAME, FILE_SIZE, gate_fs, wait_held
from tests.support.mounts import (
    daemon_pids,
    drop_caches,
    kernel_overlay,
    overlayfuse,
    run_isolated,
    teardown_overlayfuse,
    unmount_kernel,
    unnamed_files_held,
    wait_pids_gone,
)
from tests.support.rich_tree import LayerSet, build_layer_set
from tests.support.trees import Dir, Entry, File, has_data
from tests.support.writes import (
    KERNEL_OPTS,
    OURS_IS_KERNEL,
    SPARSE_CHUNKS,
    SPARSE_SIZE,
    F,
    MiB,
    Pair,
    Step,
    assert_same_changed,
    assert_same_steps,
    assert_same_upper,
    fsync_dir,
    mount_ours,
    mounted_pair,
    redirects,
    run_steps,
    standard_layers,
)

pytestmark = [pytest.mark.kernel, pytest.mark.mount]

SET_ATIME_NS = 1_500_000_000_987_654_321  # distinct from the build's times
SET_MTIME_NS = 1_550_000_000_111_111_111


# --- the pair fixture, and mounting it again -------------------------------------------


@contextlib.contextmanager
def remounted(pair: Pair, kernel_opts: str = KERNEL_OPTS) -> Iterator[None]:
    """Mount both sides again on the same dirs (the pair's own mounts must be gone)."""
    with kernel_overlay(pair.kernel.mnt, pair.kernel.lowers, pair.kernel.upper, pair.kernel.work,
                        kernel_opts), mount_ours(pair.ours, kernel_opts):
        yield


@pytest.fixture
def pair(tmp_path: Path, overlayfuse_bin: Path) -> Iterator[Pair]:
    with mounted_pair(tmp_path, standard_layers()) as p:
        yield p


# --- checking the upper dir ------------------------------------------------------------


def top_lower(ls: LayerSet, rel: str) -> Path:
    """The path of `rel` in the topmost lower layer that has it."""
    return next(layer / rel for layer in ls.lowers if os.path.lexists(layer / rel))


def assert_whiteout(upper: Path, rel: str) -> None:
    st = os.lstat(upper / rel)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0), \
        f"{rel} in upper is {kind_of(st.st_mode)} rdev={st.st_rdev}, not a 0:0 whiteout"


def assert_same_with_whiteouts(pair: Pair, since_ns: int, whiteouts: Sequence[str]) -> Path:
    """After changes that remove lower names: the merged views and the upper dirs match the
    kernel's, and each of `whiteouts` is a whiteout in our upper dir (returned)."""
    assert_same_changed(pair, since_ns)
    assert_same_upper(pair, since_ns)
    assert pair.ours.upper is not None
    for rel in whiteouts:
        assert_whiteout(pair.ours.upper, rel)
    return pair.ours.upper


# --- copy-up triggers ------------------------------------------------------------------

COPY_UP_TRIGGERS: dict[str, list[Step]] = {
    "open-wronly": [("open", F, os.O_WRONLY)],
    "open-rdwr": [("open", F, os.O_RDWR)],
    "open-trunc": [("open", F, os.O_WRONLY | os.O_TRUNC)],
    "open-append": [("append", F, b"appended\n")],
    "write": [("write", F, 7, b"XY")],
    "truncate": [("truncate", F, 10)],
    "truncate-grow": [("truncate", F, 5 * MiB)],
    "chmod": [("chmod", F, 0o600)],
    "chown": [("chown", F, 7, 8)],
    "utimens": [("utime", F, SET_ATIME_NS, SET_MTIME_NS)],
    "setxattr": [("setxattr", F, "user.new", b"v")],
    "removexattr": [("removexattr", F, "user.note")],
    "link": [("link", F, "d/sub/f-link")],
    "rename": [("rename", F, "d/sub/f-renamed")],
}


@pytest.mark.parametrize("trigger", COPY_UP_TRIGGERS)
def test_copy_up_trigger(pair: Pair, trigger: str) -> None:
    """Each change to a lower file copies it (and its parents, with their metadata) up."""
    since = time.time_ns()
    steps = [*COPY_UP_TRIGGERS[trigger], ("stat", F), ("read", F), ("listdir", "d/sub"),
             ("getxattr", "d", "user.dir")]
    assert_same_steps(pair, steps)
    assert_same_changed(pair, since)
    upper = assert_same_upper(pair, since)
    assert pair.ours.upper is not None
    if trigger == "rename":
        assert_whiteout(pair.ours.upper, F)
        assert upper["d/sub/f-renamed"].kind == "file"
    else:
        assert upper[F].kind == "file"
    for parent in ("d", "d/sub"):  # copied up first, with the lower dir's own metadata
        lower = os.lstat(top_lower(pair.ours, parent))
        got = upper[parent]
        assert (got.mode, got.uid, got.gid) == (lower.st_mode, lower.st_uid, lower.st_gid), parent
        if trigger not in ("link", "rename"):  # those change d/sub's own mtime
            assert got.mtime_ns == lower.st_mtime_ns, f"{parent}: mtime not kept"
    assert upper["d"].xattrs == (("user.dir", b"from l1"),)
    assert upper["d/sub"].xattrs == (("trusted.sub", b"s"),)


def test_copy_up_keeps_metadata_and_times(pair: Pair) -> None:
    """Opening for write copies up mode (setuid too), owner, xattrs, atime and mtime unchanged."""
    assert pair.ours.upper is not None
    lower = os.lstat(pair.ours.lowers[-1] / F)
    assert_same_steps(pair, [("open", F, os.O_WRONLY)])
    for side in (pair.kernel, pair.ours):  # lstat before anything reads the copy (atime)
        assert side.upper is not None
        st = os.lstat(side.upper / F)
        assert (st.st_mode, st.st_uid, st.st_gid, st.st_size) == \
            (lower.st_mode, lower.st_uid, lower.st_gid, lower.st_size), side.root.name
        assert (st.st_atime_ns, st.st_mtime_ns) == (lower.st_atime_ns, lower.st_mtime_ns), \
            side.root.name
        assert os.getxattr(side.upper / F, "user.note") == b"n"
        assert os.getxattr(side.upper / F, "trusted.note") == b"\x00\xff"
        assert (side.upper / F).read_bytes() == (side.lowers[-1] / F).read_bytes()


def test_listing_after_a_change_shows_the_change(pair: Pair) -> None:
    """overlayfuse replays a directory's readdirplus answers from memory; a change must not be
    replayed stale. The directory is held open while the kernel's caches are dropped, so the
    daemon keeps its answers, and what lstat says afterwards comes from those answers."""
    warm = [("list_stat", "d/sub"), ("list_stat", "d/sub")]
    held = [os.open(side.mnt / "d/sub", os.O_RDONLY | os.O_DIRECTORY) for side in (pair.kernel, pair.ours)]
    try:
        for change in ([("append", F, b"more\n"), ("chmod", "d/sub/g", 0o600),
                        ("create", "d/sub/new", b"new\n")],
                       # F is an upper file now: this write replaces no listing.
                       [("append", F, b"and more\n")]):
            assert_same_steps(pair, [*warm, *change, *warm])
            drop_caches()
            assert_same_steps(pair, warm)
    finally:
        for fd in held:
            os.close(fd)


def _times_after_a_pause(mnt: str) -> list[int]:
    """Create a burst of files, wait, create more: how far (ns) each later file's times are before
    its creation's start (0 where they are not)."""
    def create(name: str) -> os.stat_result:
        fd = os.open(os.path.join(mnt, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    for i in range(12):  # a burst: files are made ahead from here on (`unnamed.START_AFTER`)
        create(f"first{i}")
    time.sleep(0.3)  # within the burst (`unnamed.IDLE_SECONDS`): the next creates take those files
    behind = []
    for i in range(3):
        start = time.time_ns()
        st = create(f"later{i}")
        behind.extend(max(0, start - t) for t in (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns))
    return behind


@pytest.mark.skipif(OURS_IS_KERNEL, reason="overlayfuse's files made ahead")
def test_new_files_have_their_creations_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new file is built from an unnamed file made ahead of the request (`overlay.unnamed`, told to
    make them ahead however fast this disk makes them): its times are still those of its creation."""
    from overlayfuse.overlay import unnamed

    monkeypatch.setenv(unnamed.SLOW_ENV, "0")
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    with overlayfuse(tmp_path / "mnt", [lower], upper, work) as fuse:
        behind = run_isolated(_times_after_a_pause, str(fuse.mnt))
    slack = 50_000_000  # a filesystem's clock is coarse (jiffies)
    assert max(behind) < slack, f"times {max(behind) / 1e9:.2f} s before the create"


def test_read_only_open_never_copies_up(pair: Pair) -> None:
    steps = [("read", F), ("read", "hl/b"), ("read", "big/sparse"), ("open", F, os.O_RDONLY),
             ("open", "d/sub/g", os.O_RDONLY | os.O_NOATIME), ("listdir", "d/sub"),
             ("stat", F), ("getxattr", F, "user.note")]
    assert_same_steps(pair, steps)
    for side in (pair.kernel, pair.ours):
        assert side.upper is not None
        assert sorted(os.listdir(side.upper)) == ["emptied", "upperfile", "was", "wasdir"], \
            side.root.name


def test_sparse_copy_up_keeps_holes(pair: Pair) -> None:
    """A 1-byte write into a 64 MiB file with three small chunks: upper stays small."""
    since = time.time_ns()
    assert_same_steps(pair, [("write", "big/sparse", 9 * MiB, b"!")])
    for side in (pair.kernel, pair.ours):
        assert side.upper is not None
        st = os.lstat(side.upper / "big/sparse")
        assert st.st_size == SPARSE_SIZE, side.root.name
        assert st.st_blocks * 512 < 4 * MiB, f"{side.root.name}: holes filled in ({st.st_blocks})"
        with open(side.upper / "big/sparse", "rb") as f:
            for offset, chunk in {**SPARSE_CHUNKS, 9 * MiB: b"!"}.items():
                f.seek(offset)
                assert f.read(len(chunk)) == chunk, (side.root.name, offset)
    # The kernel copies whole 1 MiB chunks around data (about 2 MiB here); fewer is fine.
    assert_same_changed(pair, since, any_blocks=["big/sparse"])


# --- deletion, whiteouts, opaque dirs --------------------------------------------------


def test_unlink_lower_file_leaves_whiteout(pair: Pair) -> None:
    since = time.time_ns()
    assert_same_steps(pair, [("unlink", "merged/l2file"), ("unlink", "d/sub/g"),
                             ("unlink", "upperfile"), ("stat", "merged/l2file"),
                             ("listdir", "merged"), ("listdir", "d/sub")])
    upper = assert_same_with_whiteouts(pair, since, ["merged/l2file", "d/sub/g"])
    assert not os.path.lexists(upper / "upperfile"), "upper-only file needs no whiteout"


RMDIR_STEPS: list[Step] = [
    ("rmdir", "full"),  # ENOTEMPTY: f1 and f2 from two layers
    ("rmdir", "emptied"),  # merged, but everything in it is whited out: empty view
    ("unlink", "gone/g"),
    ("rmdir", "gone"),  # emptied through the mount first
    ("rmdir", "emptydir"),  # lower-only, empty
    ("rmdir", "d"),  # ENOTEMPTY
    ("rmdir", "rd/y"),  # ENOTEMPTY
    ("rmdir", "upperfile"),  # ENOTDIR
    ("rmdir", "nothere"),  # ENOENT
    ("listdir", "."),
]


def test_rmdir_succeeds_exactly_when_merged_view_is_empty(pair: Pair) -> None:
    since = time.time_ns()
    outcomes = assert_same_steps(pair, RMDIR_STEPS)
    assert outcomes[0] == ("err", "ENOTEMPTY") and outcomes[1] == ("ok", None)
    assert_same_with_whiteouts(pair, since, ["emptied", "gone", "emptydir"])


def test_mkdir_over_whiteout_is_opaque(pair: Pair) -> None:
    since = time.time_ns()
    assert_same_steps(pair, [("mkdir", "wasdir", 0o700), ("listdir", "wasdir"),
                             ("stat", "wasdir"), ("create", "wasdir/new", b"new\n"),
                             ("listdir", "wasdir"),
                             # and a dir removed through the mount, then made again
                             ("rmdir", "emptydir"), ("mkdir", "emptydir"),
                             ("unlink", "rd/x"), ("unlink", "rd/y/z"), ("rmdir", "rd/y"),
                             ("rmdir", "rd"), ("mkdir", "rd"), ("listdir", "rd")])
    assert_same_changed(pair, since)
    upper = assert_same_upper(pair, since)
    for path in ("wasdir", "rd"):
        assert upper[path].kind == "dir" and upper[path].opaque == b"y", path


def test_create_over_whiteout_replaces_it(pair: Pair) -> None:
    since = time.time_ns()
    assert_same_steps(pair, [("create", "was", b"new\n", 0o600), ("read", "was"),
                             ("unlink", "target"), ("symlink", "target", "somewhere"),
                             ("unlink", "merged/l1file"), ("mkfifo", "merged/l1file", 0o640),
                             ("listdir", "merged")])
    assert_same_changed(pair, since)
    upper = assert_same_upper(pair, since)
    assert upper["was"].kind == "file" and upper["target"].kind == "symlink"
    assert upper["merged/l1file"].kind == "fifo"


# --- rename ----------------------------------------------------------------------------


def test_rename_lower_file_copies_up_and_whites_out(pair: Pair) -> None:
    since = time.time_ns()
    assert_same_steps(pair, [("rename", "target", "merged/moved"), ("read", "merged/moved"),
                             ("stat", "target"), ("rename", "merged/l1file", "merged/l2file"),
                             ("read", "merged/l2file"), ("listdir", "merged")])
    assert_same_with_whiteouts(pair, since, ["target", "merged/l1file"])


def test_rename_dir_with_lower_content(pair: Pair) -> None:
    """Kernel with redirect_dir=on (and we) succeed; content follows; survives a remount. Both move
    the directories by redirect: the same upper layout (the children stay below, none copied up)
    and the same redirects."""
    since = time.time_ns()
    steps: list[Step] = [("rename", "rd", "moved"), ("listdir", "moved"), ("read", "moved/y/z"),
                         ("stat", "rd"), ("rename", "d/sub", "merged/sub2"),
                         ("listdir", "merged/sub2"), ("read", "merged/sub2/f"),
                         ("mkdir", "rd"), ("listdir", "rd")]
    assert_same_steps(pair, steps)
    assert_same_changed(pair, since)
    assert_same_upper(pair, since)
    assert pair.kernel.upper is not None and pair.ours.upper is not None
    assert redirects(pair.ours.upper) == redirects(pair.kernel.upper) == \
        {"moved": b"rd", "merged/sub2": b"/d/sub"}
    _unmount_pair(pair)
    with remounted(pair):
        assert_same_changed(pair, since)
        assert_same_steps(pair, [("listdir", "moved/y"), ("read", "merged/sub2/g"),
                                 ("listdir", "rd")])


def _unmount_pair(pair: Pair) -> None:
    """Unmount both sides early (the fixture's teardown then finds nothing to do)."""
    unmount_kernel(pair.kernel.mnt)
    if OURS_IS_KERNEL:
        unmount_kernel(pair.ours.mnt)
    else:
        teardown_overlayfuse(pair.ours.mnt)


def test_rename_dir_without_redirect_dir_is_exdev_on_kernel(tmp_path: Path) -> None:
    """The kernel's default (redirect_dir=off): EXDEV. Recorded so the contrast stays true."""
    layers = {"upper": [], **{k: v for k, v in standard_layers().items() if k != "upper"}}
    ls = build_layer_set(tmp_path, layers, kernel=True)
    with kernel_overlay(ls.mnt, ls.lowers, ls.upper, ls.work, "redirect_dir=off,index=off"):
        assert run_isolated(run_steps, str(ls.mnt), [("rename", "rd", "moved")]) == \
            [("err", "EXDEV")]


RENAME_PROBES: list[Step] = [
    ("rename_noreplace", "target", "upperfile"),  # EEXIST (target in upper)
    ("rename_noreplace", "merged/l1file", "merged/l2file"),  # EEXIST (both lower)
    ("rename_noreplace", "target", "was"),  # a whiteout is not an entry: ok
    ("rename_noreplace", "was", "target2"),  # "was" is the old target now
    ("rename_exchange", "upperfile", "merged/l2file"),  # upper <-> lower file
    ("rename_exchange", "hl/a", "nothere"),  # ENOENT
    ("rename_exchange", "gone", "full/f1"),  # dir <-> file
    ("rename", "full", "emptydir"),  # dir over an empty lower dir: ok
    ("rename", "rd", "d"),  # ENOTEMPTY
    ("rename", "upperfile", "merged"),  # EISDIR
    ("rename", "d", "merged/l1file"),  # ENOTDIR
    ("rename", "d", "d/sub/inside"),  # EINVAL
    ("rename", "d/sub/f", "d/sub/f"),  # same name: ok, nothing happens
    ("rename", "hl/a", "hl/b"),  # two names of one inode: ok, nothing happens
    ("listdir", "."), ("listdir", "merged"), ("listdir", "hl"),
    ("read", "merged/l2file"), ("read", "upperfile"), ("read", "was"),
]


def test_rename_flags_and_errors(pair: Pair) -> None:
    since = time.time_ns()
    assert_same_steps(pair, RENAME_PROBES)
    assert_same_changed(pair, since)


# --- inode numbers and hardlinks -------------------------------------------------------


def ino_across_changes(mnt: str, rel: str, other: str) -> dict[str, Any]:
    """st_ino before and after a copy-up (chmod), and what a write through one name shows."""
    p, q = os.path.join(mnt, rel), os.path.join(mnt, other)
    before = os.lstat(p).st_ino
    os.chmod(p, 0o600)
    after_chmod = os.lstat(p).st_ino
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, b"WRITTEN", 0)
    finally:
        os.close(fd)
    with open(q, "rb") as f:
        through_other = f.read()
    st_p, st_q = os.lstat(p), os.lstat(q)
    return {"same_ino_after_copy_up": before == after_chmod == st_p.st_ino,
            "names_share_ino": st_p.st_ino == st_q.st_ino,
            "nlink": (st_p.st_nlink, st_q.st_nlink),
            "other_mode": oct(st_q.st_mode), "through_other": through_other}


def test_st_ino_stable_and_hardlinks_stay_together(pair: Pair) -> None:
    k, o = pair.both(ino_across_changes, "hl/a", "hl/b")
    assert k == {"same_ino_after_copy_up": True, "names_share_ino": True, "nlink": (2, 2),
                 "other_mode": "0o100600", "through_other": b"WRITTEN"}  # the oracle itself
    assert o == k


def test_plain_file_keeps_st_ino_on_copy_up(pair: Pair) -> None:
    k, o = pair.both(ino_across_changes, F, F)
    assert k["same_ino_after_copy_up"] and o == k


def unlink_the_written_name(mnt: str) -> list[tuple[str, int, int, bytes]]:
    """Write through one of three names, stat nothing, then unlink that name: what the rest show."""
    with open(os.path.join(mnt, "hl3/b"), "ab") as f:
        f.write(b"appended\n")
    os.unlink(os.path.join(mnt, "hl3/b"))
    shown = []
    for name in ("hl3/a", "hl3/c"):
        st = os.lstat(os.path.join(mnt, name))
        with open(os.path.join(mnt, name), "rb") as f:
            shown.append((name, st.st_nlink, st.st_ino, f.read()))
    return shown


def test_last_upper_name_of_a_hardlinked_copy_unlinked(pair: Pair) -> None:
    """Only the link index holds the copy then; the lower names still show it, and count two links."""
    k, o = pair.both(unlink_the_written_name)
    assert [(name, nlink, data) for name, nlink, _, data in k] == [
        ("hl3/a", 2, b"three names\nappended\n"), ("hl3/c", 2, b"three names\nappended\n")]
    assert [entry[:2] + entry[3:] for entry in o] == [entry[:2] + entry[3:] for entry in k]
    assert o[0][2] == o[1][2]


def test_hardlinks_stay_together_after_remount(pair: Pair) -> None:
    assert_same_steps(pair, [("write", "hl/a", 0, b"ONE")])
    _unmount_pair(pair)
    with remounted(pair):
        outcomes = assert_same_steps(pair, [("read", "hl/b"), ("write", "hl/b", 3, b"TWO"),
                                            ("read", "hl/a")])
        assert outcomes[0] == ("ok", b"ONEked\n") and outcomes[2] == ("ok", b"ONETWO\n")
        k, o = take_snapshot(pair.kernel.mnt), take_snapshot(pair.ours.mnt)
        assert k.hardlink_groups() == o.hardlink_groups() == {
            frozenset({"hl/a", "hl/b"}), frozenset({"hl3/a", "hl3/b", "hl3/c"})}


# --- mmap, fallocate, fsync ------------------------------------------------------------


def mmap_write(mnt: str, rel: str) -> tuple[bytes, bytes]:
    """Write through a shared writable map of a lower file; read back through another fd."""
    p = os.path.join(mnt, rel)
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[0:6] = b"MAPPED"
            m[len(m) - 3:] = b"END"
            m.flush()  # msync(MS_SYNC)
        with open(p, "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    return data[:16], data[-8:]


def test_shared_mmap_writes_land(pair: Pair) -> None:
    k, o = pair.both(mmap_write, F)
    assert k == (b"MAPPEDdata\nlower", b"er daEND")  # the oracle itself
    assert o == k
    _unmount_pair(pair)
    with remounted(pair):
        assert_same_steps(pair, [("read", F)])


def fallocate_outcomes(mnt: str) -> dict[str, Any]:
    """posix_fallocate (glibc falls back to writing zeros) and util-linux fallocate(1)."""
    out: dict[str, Any] = {}
    p = os.path.join(mnt, "merged/l2file")
    fd = os.open(p, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 1 * MiB)
        out["posix_fallocate"] = "ok"
    except OSError as exc:
        out["posix_fallocate"] = errno.errorcode[exc.errno or 0]
    finally:
        os.close(fd)
    out["posix_size"] = os.lstat(p).st_size
    with open(p, "rb") as f:
        out["posix_head"] = f.read(8)
    q = os.path.join(mnt, "merged/l1file")
    proc = subprocess.run(["fallocate", "-l", str(2 * MiB), q], capture_output=True, check=False,
                          timeout=60)
    out["util_rc"] = proc.returncode
    out["util_stderr"] = proc.stderr.decode(errors="replace").strip()
    out["util_size"] = os.lstat(q).st_size
    with open(q, "rb") as f:
        out["util_head"] = f.read(8)
    return out


def test_fallocate(pair: Pair, record_property: Callable[[str, object], None]) -> None:
    """posix_fallocate and fallocate(1) on lower files (each a copy-up), as on the kernel's overlay
    (pyfuse3 patch 0011 passes fallocate(2) on; tests/daemon/test_sparse.py has its modes)."""
    k, o = pair.both(fallocate_outcomes)
    record_property("kernel", k)
    record_property("ours", o)
    print(f"fallocate kernel={k}\nfallocate ours={o}")
    assert k["util_rc"] == 0 and k["util_size"] == 2 * MiB
    assert o == k


def sync_everything(mnt: str) -> list[str]:
    done = []
    p = os.path.join(mnt, "d/sub/f")
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"sync", 0)
        os.fsync(fd)
        done.append("fsync")
        os.fdatasync(fd)
        done.append("fdatasync")
        os.pwrite(fd, b"SYNC", 0)
    finally:
        os.close(fd)  # flush
    done.append("close")
    fsync_dir(os.path.join(mnt, "d/sub"))
    done.append("fsync-dir")
    new = os.path.join(mnt, "d/new")
    fd = os.open(new, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"new")
        os.fsync(fd)
    finally:
        os.close(fd)
    done.append("fsync-new")
    with open(p, "rb") as f:
        done.append(f.read(4).decode())
    return done


def test_fsync_and_flush_succeed(pair: Pair) -> None:
    k, o = pair.both(sync_everything)
    assert k == ["fsync", "fdatasync", "close", "fsync-dir", "fsync-new", "SYNC"]
    assert o == k


# --- concurrency and crashes (overlayfuse only, except as a sanity check) ---------------

CONCURRENT_WRITERS = 4
BIG_DATA = 192 * MiB  # real data, so a copy-up takes long enough to overlap


def write_big_data(path: Path, size: int, total: int | None = None) -> None:
    """`size` bytes of non-repeating data, then (optionally) fallocated up to `total`."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(i.to_bytes(8, "little") + block[8:])
        if total is not None:
            os.posix_fallocate(f.fileno(), size, total - size)
            f.truncate(total)


def concurrent_writers(mnt: str, rel: str, count: int) -> list[bytes]:
    """`count` processes, released together, each open O_RDWR and write their own offset."""
    p = os.path.join(mnt, rel)
    r, w = os.pipe()
    children = []
    for i in range(count):
        pid = os.fork()
        if pid == 0:  # child: wait for the start signal, then race the others
            os.close(w)
            os.read(r, 1)
            code = 0
            try:
                fd = os.open(p, os.O_RDWR)
                os.pwrite(fd, b"writer%d" % i, i * 3 * MiB + 100)
                os.close(fd)
            except OSError:
                code = 1
            os._exit(code)
        children.append(pid)
    os.close(r)
    os.close(w)  # EOF releases every child at once
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0] * count, codes
    got = []
    with open(p, "rb") as f:
        for i in range(count):
            f.seek(i * 3 * MiB + 100)
            got.append(f.read(7))
    return got


def test_concurrent_opens_for_write_share_one_copy_up(tmp_path: Path,
                                                      overlayfuse_bin: Path) -> None:
    layers: dict[str, list[Entry]] = {"upper": [], "l1": [Dir("data")]}
    with mounted_pair(tmp_path, layers) as pair:
        for side in (pair.kernel, pair.ours):
            write_big_data(side.lowers[0] / "data/big", BIG_DATA)
        # The lower changed under the mounts before any lookup of "big": allowed.
        k, o = pair.both(concurrent_writers, "data/big", CONCURRENT_WRITERS)
        expected = [b"writer%d" % i for i in range(CONCURRENT_WRITERS)]
        assert k == expected
        assert o == expected, "a writer's data was lost (two copy-ups?)"
        assert pair.ours.upper is not None and pair.ours.work is not None
        assert os.listdir(pair.ours.upper / "data") == ["big"]
        assert os.lstat(pair.ours.upper / "data/big").st_size == BIG_DATA
        staging = pair.ours.work / "work"
        assert not staging.exists() or os.listdir(staging) == []


GATED, GATED_SIZE = FILE_NAME.decode(), FILE_SIZE


def _start_writer(mnt: Path, rel: str) -> subprocess.Popen[bytes]:
    code = ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY); "
            "os.pwrite(fd, b'!', 12345); os.close(fd)")
    return subprocess.Popen([sys.executable, "-c", code, str(mnt / rel)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@contextlib.contextmanager
def _writer_held_mid_copy(control: Path, mnt: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A one-byte write into GATED through MNT, inside the block held mid-copy: its copy of the file
    is reading the gatefs lower, whose reads wait for the test (CONTROL). Reaped when the block ends,
    SIGKILLed if it has not ended by then."""
    writer = _start_writer(mnt, GATED)
    try:
        wait_held(control, 60)
        yield writer
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            writer.wait(timeout=30)
        if writer.poll() is None:
            writer.kill()
            writer.wait()


def _kill_daemon(pids: list[int]) -> None:
    """kill -9 the daemon processes PIDS, and wait until they are gone."""
    assert pids, "no daemon process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert wait_pids_gone(pids, 10) == []


@pytest.mark.skipif(OURS_IS_KERNEL, reason="kills the overlayfuse daemon")
def test_kill_during_copy_up_leaves_no_partial_file(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """kill -9 while a file is being copied up: the kill lands mid-copy every time, because
    the lower layer is tests.support.gatefs, whose file cannot be read until the test releases it.
    The half copy is an unnamed file (O_TMPFILE) in WORKDIR/work, held by the daemon alone: it
    goes with the daemon, never shows at the file's name, and the next mount shows the lower
    file whole. (The named fallback, for an upper without O_TMPFILE, has its kill test in
    tests/overlay/test_copyup.py, and test_staging_leftovers_removed_at_mount below.)"""
    control, upper, work = tmp_path / "control", tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    staging = work / "work"
    with gate_fs(control, tmp_path / "gate") as gate:
        with overlayfuse(tmp_path / "mnt", [gate], upper, work, KERNEL_OPTS.split(",")) as fuse:
            pids = daemon_pids(fuse.mnt)
            with _writer_held_mid_copy(control, fuse.mnt) as writer:  # the copy-up is reading the lower file
                assert os.listdir(staging) == [], "a copy-up under way has a name in WORKDIR/work"
                # (files made ahead for the next copy-ups, `overlay.unnamed`, are unnamed files too)
                assert unnamed_files_held(pids, staging) >= 1, "the copy-up under way is not an unnamed file"
                _kill_daemon(pids)
        assert writer.returncode != 0, "the write succeeded although its copy-up was killed"
        assert not os.path.lexists(upper / GATED), "a partial copy-up at the file's name"
        assert os.listdir(staging) == [], "the unnamed half copy outlived the daemon"
        (control / "release").touch()
        with overlayfuse(tmp_path / "mnt", [gate], upper, work, KERNEL_OPTS.split(",")) as fuse:
            assert os.listdir(staging) == [], "interrupted copy-up left in WORKDIR/work"
            assert run_isolated(run_steps, str(fuse.mnt), [("stat", GATED)]) == \
                [("ok", {"kind": "file", "mode": "0o100644", "uid": 0, "gid": 0,
                         "size": GATED_SIZE})]


@pytest.mark.skipif(OURS_IS_KERNEL, reason="overlayfuse's own staging dir")
def test_staging_leftovers_removed_at_mount(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """What an interrupted copy-up leaves in WORKDIR/work is gone once mounted again."""
    ls = build_layer_set(tmp_path, {"upper": [], "l1": [File("f", b"f\n")]}, kernel=True)
    assert ls.work is not None and ls.upper is not None
    staging = ls.work / "work"
    staging.mkdir()
    (staging / "#half-copied").write_bytes(b"partial")
    (staging / "#half-dir").mkdir()
    (staging / "#half-dir/inner").write_bytes(b"x")
    # A symlink to a canary dir of this test's own: removed, never followed.  A cleanup that
    # followed it would empty the canary, not the machine's /etc.
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_bytes(b"canary\n")
    os.symlink(canary, staging / "#link")
    with mount_ours(ls):
        assert os.listdir(staging) == []
        assert run_isolated(run_steps, str(ls.mnt), [("read", "f")]) == [("ok", b"f\n")]
    assert os.listdir(ls.upper) == []
    assert os.listdir(canary) == ["keep"] and (canary / "keep").read_bytes() == b"canary\n"


# -- metadata-only copy-up (metacopy=on) ------------------------------------------------------------

METACOPY_OPTS = KERNEL_OPTS + ",metacopy=on"
METACOPY_XATTR = "trusted.overlay.metacopy"


def test_metadata_changes_copy_up_no_data(tmp_path: Path) -> None:
    """Kernel and we, both with metacopy=on: chown, chmod, utimes and setxattr of lower files copy
    up metadata only: the same views, the same upper dirs, no data blocks in upper on either side;
    reads get the lower data; a write copies the data in (the kernel keeps the result readable)."""
    meta = [F, "big/sparse", "merged/l2file", "merged/l1file"]
    with mounted_pair(tmp_path, standard_layers(), METACOPY_OPTS) as pair:
        since = time.time_ns()
        assert_same_steps(pair, [
            ("chown", F, 7, 8), ("chmod", "big/sparse", 0o600),
            ("setxattr", "merged/l2file", "user.x", b"1"), ("utime", "merged/l1file", 5, 6),
            ("read", F), ("read", "big/sparse"), ("read", "merged/l2file"), ("stat", F),
            ("getxattr", "merged/l2file", "user.x"), ("list_stat", "merged"),
        ])  # fmt: skip
        assert_same_changed(pair, since)
        assert_same_upper(pair, since)
        assert pair.kernel.upper is not None and pair.ours.upper is not None
        for upper in (pair.kernel.upper, pair.ours.upper):
            for path in meta:
                assert not has_data(upper / path), f"{upper / path}: data in upper"
                assert METACOPY_XATTR in os.listxattr(upper / path, follow_symlinks=False)
        assert_same_steps(pair, [("write", "merged/l2file", 1, b"W"), ("read", "merged/l2file"),
                                 ("truncate", F, 7), ("read", F), ("stat", "merged/l2file")])
        assert_same_changed(pair, since)
        for path in ("merged/l2file", F):
            assert METACOPY_XATTR not in os.listxattr(pair.ours.upper / path, follow_symlinks=False)
    with remounted(pair, METACOPY_OPTS):
        assert_same_changed(pair, since)


@pytest.mark.skipif(OURS_IS_KERNEL, reason="overlayfuse's own copy-in")
def test_kill_during_metacopy_data_copy_in_leaves_the_file_readable(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """chmod makes a metacopy file (no data read); the first write copies the data in, and kill -9
    lands mid-copy (the lower is gatefs, whose reads wait for the test). The file is still a
    metacopy file at the next mount, with the new mode and the lower's content."""
    control, upper, work = tmp_path / "control", tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with gate_fs(control, tmp_path / "gate") as gate:
        with overlayfuse(tmp_path / "mnt", [gate], upper, work, METACOPY_OPTS.split(",")) as fuse:
            try:  # metadata only: no read of the gated data (a full copy-up would wait at the gate)
                chmod = run_isolated(run_steps, str(fuse.mnt), [("chmod", GATED, 0o600)], timeout=30)
            except BaseException:
                (control / "release").touch()  # let a stuck copy-up finish, so teardown can unmount
                raise
            assert chmod == [("ok", None)]
            assert METACOPY_XATTR in os.listxattr(upper / GATED)
            pids = daemon_pids(fuse.mnt)
            with _writer_held_mid_copy(control, fuse.mnt) as writer:  # the copy-in is reading the lower file
                _kill_daemon(pids)
        assert writer.returncode != 0, "the write succeeded although its copy-in was killed"
        assert METACOPY_XATTR in os.listxattr(upper / GATED), "marker gone before the data was in"
        (control / "release").touch()
        with overlayfuse(tmp_path / "mnt", [gate], upper, work, METACOPY_OPTS.split(",")) as fuse:
            out = run_isolated(run_steps, str(fuse.mnt), [("stat", GATED), ("read", GATED)])
            assert out[0] == ("ok", {"kind": "file", "mode": "0o100600", "uid": 0, "gid": 0, "size": GATED_SIZE})
            assert out[1] == ("ok", b"g" * GATED_SIZE)


#: A file capability (VFS_CAP_REVISION_2, effective: cap_net_bind_service), which a chown removes.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
#: An access ACL (user::rw-, user:1234:r--, group::r--, mask::r--, other::---): a chmod rewrites its mask.
ACCESS_ACL = struct.pack("<I" + "HHI" * 5, 2, 0x01, 6, 0xFFFFFFFF, 0x02, 4, 1234, 0x04, 4, 0xFFFFFFFF,
                         0x10, 4, 0xFFFFFFFF, 0x20, 0, 0xFFFFFFFF)


def test_chown_chmod_of_lower_files_like_the_kernels(tmp_path: Path) -> None:
    """A chown or chmod of a lower file is folded into its metacopy copy-up where that gives the
    same result (the copy is created with the new owner and mode), and done after the copy-up where
    the order matters: set-id bits and a file capability that a chown clears, an access ACL whose
    mask a chmod rewrites. Either way the views and the upper dirs are the kernel's, also after
    both upper dirs are mounted again."""
    layers = {"l1": [
        File("plain", b"p\n" * 100), File("group", b"g\n" * 100), File("moded", b"m\n" * 100),
        File("both", b"b\n" * 100, 0o640, 5, 6, {"user.kept": b"k"}),
        File("setuid", b"s\n", 0o4755), File("setgid", b"s\n", 0o2755), File("setgid-noexec", b"s\n", 0o2644),
        File("cap", b"c\n", 0o755, xattrs={"security.capability": CAPABILITY}),
        File("acl", b"a\n", 0o640, xattrs={"system.posix_acl_access": ACCESS_ACL}),
        File("acl-chown", b"a\n", 0o640, xattrs={"system.posix_acl_access": ACCESS_ACL}),
    ]}
    steps: list[Step] = [
        ("chown", "plain", 1000, 1000), ("chown", "group", -1, 77), ("chmod", "moded", 0o4711),
        ("chown", "both", 1000, -1), ("chown", "setuid", 1000, 1000), ("chown", "setgid", 1000, 1000),
        ("chown", "setgid-noexec", -1, 1000), ("chown", "cap", 1000, 1000), ("chmod", "acl", 0o600),
        ("chown", "acl-chown", 1000, 1000),
    ]
    with mounted_pair(tmp_path, layers, METACOPY_OPTS) as pair:
        since = time.time_ns()
        assert_same_steps(pair, [*steps, ("list_stat", ".")])
        assert_same_changed(pair, since)
        upper = assert_same_upper(pair, since)
        assert (upper["plain"].uid, upper["plain"].gid) == (1000, 1000) and upper["moded"].mode & 0o7777 == 0o4711
        assert not [name for name, _ in upper["cap"].xattrs if name == "security.capability"]
        assert upper["both"].xattrs == (("user.kept", b"k"),)
        assert pair.ours.upper is not None
        for name in ("plain", "group", "cap", "acl"):
            assert not has_data(pair.ours.upper / name), name
    with remounted(pair, METACOPY_OPTS):
        assert_same_changed(pair, since)
