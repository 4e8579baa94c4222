"""Copy-up on real files: every file type round-trips, data keeps its holes, nothing half-built shows.

No mounts: `overlayfuse.overlay.copyup` works on plain directories, so these run anywhere root can mknod and
set ``trusted.*`` xattrs.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from overlayfuse.overlay import copyup
from overlayfuse.overlay.copyup import Workspace, copy_up, copy_up_size
from tests.support.gatefs import gate_fs, wait_held
from tests.support.mounts import unnamed_files_held
from tests.support.trees import BlockDev, CharDev, Dir, Fifo, File, Socket, Sparse, Symlink, make_tree

MIB = 1 << 20
UID, GID = 1234, 5678
# Distinct, non-round atime and mtime: a copy that swaps them or drops nanoseconds shows up.
ATIME_NS = 1_500_000_000_987_654_321
MTIME_NS = 1_600_000_000_123_456_789
PRIVATE = {"trusted.overlay.opaque": b"y", "trusted.overlay.redirect": b"/elsewhere"}
USER_PRIVATE = {"user.overlay.opaque": b"y", "user.overlay.origin": b"\x00"}
# Linux allows user.* xattrs only on regular files and directories; trusted.* goes anywhere.
TRUSTED_ONLY = {"trusted.note": b"\x00binary\xff"}
ALL_NAMESPACES = {"trusted.note": b"\x00binary\xff", "user.mime": b"text/plain"}

# (entry, mode to set after chown, public xattrs); mode None leaves a symlink's fixed 0777.
KINDS = {
    "file": (File("obj", b"hello\n" * 1000), 0o4755, ALL_NAMESPACES),
    "empty-file": (File("obj"), 0o2640, ALL_NAMESPACES),
    "dir": (Dir("obj"), 0o3775, ALL_NAMESPACES),
    "symlink": (Symlink("obj", "../some/where"), None, TRUSTED_ONLY),
    "fifo": (Fifo("obj"), 0o640, TRUSTED_ONLY),
    "socket": (Socket("obj"), 0o751, TRUSTED_ONLY),
    "chardev": (CharDev("obj", 4, 64), 0o620, TRUSTED_ONLY),
    "blockdev": (BlockDev("obj", 7, 3), 0o660, TRUSTED_ONLY),
}


def workspace(tmp_path: Path, unnamed: bool = True) -> Workspace:
    """A prepared workspace whose regular files are built in unnamed files (O_TMPFILE, which the
    test filesystems make: checked) or, with UNNAMED false, under a name in staging (the fallback
    for an upper filesystem without O_TMPFILE)."""
    (tmp_path / "upper").mkdir()
    (tmp_path / "workdir").mkdir()
    ws = Workspace.prepare(str(tmp_path / "upper"), str(tmp_path / "workdir"))
    assert ws.tmpfile, "the test's filesystem makes O_TMPFILE files: prepare should have found it"
    return dataclasses.replace(ws, tmpfile=unnamed)


#: Both ways a regular file's copy is built (`workspace`).
BUILT = pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed", "staged"])


def decorate(path: Path, mode: int | None, xattrs: dict[str, bytes]) -> None:
    """Owner, mode, xattrs (public and overlay-private) and times, in an order that keeps them all."""
    os.chown(path, UID, GID, follow_symlinks=False)
    if mode is not None:
        os.chmod(path, mode)
    user_ok = stat.S_ISREG(os.lstat(path).st_mode) or stat.S_ISDIR(os.lstat(path).st_mode)
    private = PRIVATE | (USER_PRIVATE if user_ok else {})
    for name, value in {**xattrs, **private}.items():
        os.setxattr(path, name, value, follow_symlinks=False)
    os.utime(path, ns=(ATIME_NS, MTIME_NS), follow_symlinks=False)


def xattrs_of(path: Path | str) -> dict[str, bytes]:
    return {name: os.getxattr(path, name, follow_symlinks=False)
            for name in os.listxattr(path, follow_symlinks=False)}


def assert_same_metadata(src: os.stat_result, dst: os.stat_result) -> None:
    assert stat.S_IFMT(dst.st_mode) == stat.S_IFMT(src.st_mode)
    assert oct(dst.st_mode) == oct(src.st_mode)
    assert (dst.st_uid, dst.st_gid) == (src.st_uid, src.st_gid)
    assert dst.st_mtime_ns == src.st_mtime_ns
    assert dst.st_atime_ns == src.st_atime_ns
    assert dst.st_rdev == src.st_rdev
    assert dst.st_size == src.st_size


def staging_entries(ws: Workspace) -> list[str]:
    return os.listdir(ws.staging)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def write_random(path: Path, size: int) -> None:
    """SIZE bytes with no holes and no repeated MiB (a copy at a wrong offset cannot compare equal)."""
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for i in range(size // MIB):
            f.write(i.to_bytes(8, "little") + block[8:])


@BUILT
@pytest.mark.parametrize("kind", KINDS)
def test_each_file_type_round_trips(tmp_path: Path, kind: str, unnamed: bool) -> None:
    entry, mode, xattrs = KINDS[kind]
    lower = make_tree(tmp_path / "lower", entry)
    source = lower / "obj"
    decorate(source, mode, xattrs)
    before = os.lstat(source)
    ws = workspace(tmp_path, unnamed)
    target = tmp_path / "upper" / "obj"

    result = copy_up(ws, str(source), str(target))

    after = os.lstat(target)
    assert_same_metadata(before, after)
    assert result.st_ino == after.st_ino and result.st_ino != before.st_ino
    assert xattrs_of(target) == xattrs  # the public ones, and none of the overlay's own
    if not stat.S_ISLNK(before.st_mode):  # readlink always bumps atime; files are read O_NOATIME
        assert os.lstat(source).st_atime_ns == ATIME_NS
    if stat.S_ISLNK(before.st_mode):
        assert os.readlink(target) == "../some/where"
    elif stat.S_ISREG(before.st_mode):
        assert target.read_bytes() == source.read_bytes()
    elif stat.S_ISDIR(before.st_mode):
        assert os.listdir(target) == []
    assert staging_entries(ws) == []


def test_directory_copy_leaves_contents_below(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", File("d/a", b"a"), Dir("d/sub"), Dir("d", mode=0o700))
    ws = workspace(tmp_path)
    copy_up(ws, str(lower / "d"), str(tmp_path / "upper" / "d"))
    assert os.listdir(tmp_path / "upper" / "d") == []
    assert os.lstat(tmp_path / "upper" / "d").st_mode == stat.S_IFDIR | 0o700
    assert sorted(os.listdir(lower / "d")) == ["a", "sub"]


def test_sparse_file_keeps_its_holes(tmp_path: Path) -> None:
    chunks = {0: b"head" * 1000, 17 * MIB + 5: b"middle" * 3000, 40 * MIB: b"tail" * 100}
    lower = make_tree(tmp_path / "lower", Sparse("big", 64 * MIB, chunks))  # trailing 24 MiB hole
    source, target = lower / "big", tmp_path / "upper" / "big"
    ws = workspace(tmp_path)

    copy_up(ws, str(source), str(target))

    src_st, dst_st = os.stat(source), os.stat(target)
    assert dst_st.st_size == 64 * MIB
    assert src_st.st_blocks < 1024  # the builder did make holes (under 512 KiB allocated)
    assert dst_st.st_blocks <= src_st.st_blocks + 64  # at most 32 KiB more than the source
    assert sha256(target) == sha256(source)
    with open(target, "rb") as f:
        for offset, chunk in chunks.items():
            assert os.pread(f.fileno(), len(chunk), offset) == chunk
        assert os.pread(f.fileno(), MIB, 5 * MIB) == bytes(MIB)
        assert os.pread(f.fileno(), MIB, 63 * MIB) == bytes(MIB)
        assert os.lseek(f.fileno(), 5 * MIB, os.SEEK_HOLE) == 5 * MIB  # a real hole, not zeros


def test_large_file_copies_exactly(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    source, target = lower / "big", tmp_path / "upper" / "big"
    write_random(source, 100 * MIB)
    ws = workspace(tmp_path)
    try:
        copy_up(ws, str(source), str(target))
        assert os.stat(target).st_size == 100 * MIB
        assert sha256(target) == sha256(source)
    finally:
        source.unlink()
        target.unlink(missing_ok=True)


@pytest.mark.parametrize("durable", [True, False])
def test_writeback_is_started_early_only_for_a_copy_that_is_fsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool) -> None:
    """With fsync on, each 32 MiB chunk goes to the disk as soon as it is copied (the fsync then
    waits for the last one only); with fsync=0 the copy stays in the page cache for the kernel's
    own writeback, as fuse-overlayfs leaves its copies, instead of waiting on the disk queue."""
    lower = tmp_path / "lower"
    lower.mkdir()
    source, target = lower / "big", tmp_path / "upper" / "big"
    write_random(source, 70 * MIB)
    ws = dataclasses.replace(workspace(tmp_path), durable=durable)
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(copyup, "start_writeback", lambda fd, offset, count: started.append((offset, count)))
    copy_up(ws, str(source), str(target))
    assert sha256(target) == sha256(source)
    assert started == ([(0, 32 * MIB), (32 * MIB, 32 * MIB), (64 * MIB, 6 * MIB)] if durable else [])


def test_copy_up_size_zero_copies_no_data(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    source, target = lower / "f", tmp_path / "upper" / "f"
    write_random(source, 8 * MIB)
    decorate(source, 0o640, ALL_NAMESPACES)
    before = os.lstat(source)
    ws = workspace(tmp_path)

    copy_up_size(ws, str(source), str(target), 0)

    after = os.lstat(target)
    assert after.st_size == 0 and after.st_blocks == 0
    assert (oct(after.st_mode), after.st_uid, after.st_gid) == (oct(before.st_mode), UID, GID)
    assert after.st_mtime_ns == MTIME_NS
    assert xattrs_of(target) == ALL_NAMESPACES
    assert staging_entries(ws) == []


@pytest.mark.parametrize("size", [3 * MIB + 17, MIB, 10 * MIB, 12 * MIB + 1])
def test_copy_up_size_cuts_or_extends(tmp_path: Path, size: int) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    source, target = lower / "f", tmp_path / "upper" / "f"
    write_random(source, 10 * MIB)
    ws = workspace(tmp_path)

    copy_up_size(ws, str(source), str(target), size)

    data = source.read_bytes()
    copied = target.read_bytes()
    assert len(copied) == size
    assert copied[: min(size, len(data))] == data[:size]
    assert copied[len(data):] == bytes(max(0, size - len(data)))  # growing adds zeros...
    if size > len(data) + MIB:  # ...as a hole, not as written blocks
        assert os.stat(target).st_blocks <= os.stat(source).st_blocks + 64


def test_copy_up_size_through_a_hole(tmp_path: Path) -> None:
    chunks = {0: b"a" * 4096, 8 * MIB: b"b" * 4096, 30 * MIB: b"c" * 4096}
    lower = make_tree(tmp_path / "lower", Sparse("s", 32 * MIB, chunks))
    target = tmp_path / "upper" / "s"
    ws = workspace(tmp_path)

    copy_up_size(ws, str(lower / "s"), str(target), 20 * MIB)

    assert os.stat(target).st_size == 20 * MIB
    assert os.stat(target).st_blocks <= os.stat(lower / "s").st_blocks
    with open(target, "rb") as f:
        assert os.pread(f.fileno(), 4096, 8 * MIB) == b"b" * 4096
        assert os.pread(f.fileno(), 4096, 8 * MIB + 4096) == bytes(4096)


def test_copy_up_size_refuses_non_files(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", Dir("d"), Fifo("p"))
    ws = workspace(tmp_path)
    with pytest.raises(IsADirectoryError):
        copy_up_size(ws, str(lower / "d"), str(tmp_path / "upper" / "d"), 0)
    with pytest.raises(OSError) as excinfo:
        copy_up_size(ws, str(lower / "p"), str(tmp_path / "upper" / "p"), 0)
    assert excinfo.value.errno == errno.EINVAL
    assert os.listdir(tmp_path / "upper") == [] and staging_entries(ws) == []


def test_prepare_creates_staging_with_mode_zero(tmp_path: Path) -> None:
    (tmp_path / "upper").mkdir()
    (tmp_path / "workdir").mkdir()
    ws = Workspace.prepare(str(tmp_path / "upper"), str(tmp_path / "workdir"))
    assert ws == Workspace(upper=str(tmp_path / "upper"), staging=str(tmp_path / "workdir" / "work"),
                           tmpfile=True)
    assert os.lstat(ws.staging).st_mode == stat.S_IFDIR | 0o000


def test_prepare_removes_leftovers_and_nothing_else(tmp_path: Path) -> None:
    outside = make_tree(tmp_path / "outside", File("precious", b"keep me"), File("d/inner", b"me too"))
    work = tmp_path / "workdir"
    make_tree(
        work,
        File("work/#1-0-half", b"half writ"),
        File("work/#1-1-tree/a/b/c", b"deep"),
        Dir("work/#1-1-tree/a/locked", mode=0o000),
        Symlink("work/#1-2-link", str(outside / "precious")),
        Symlink("work/#1-1-tree/to-dir", str(outside / "d")),
        Fifo("work/#1-3-fifo"),
        File("index/kept", b"not ours"),
    )
    (tmp_path / "upper").mkdir()

    ws = Workspace.prepare(str(tmp_path / "upper"), str(work))

    assert staging_entries(ws) == []
    assert (work / "index" / "kept").read_bytes() == b"not ours"
    assert (outside / "precious").read_bytes() == b"keep me"
    assert (outside / "d" / "inner").read_bytes() == b"me too"


def test_prepare_refuses_a_symlinked_staging_dir(tmp_path: Path) -> None:
    victim = make_tree(tmp_path / "victim", File("f", b"x"))
    (tmp_path / "upper").mkdir()
    (tmp_path / "workdir").mkdir()
    os.symlink(victim, tmp_path / "workdir" / "work")
    with pytest.raises(OSError):
        Workspace.prepare(str(tmp_path / "upper"), str(tmp_path / "workdir"))
    assert (victim / "f").read_bytes() == b"x"


@BUILT
def test_failed_rename_leaves_nothing(tmp_path: Path, unnamed: bool) -> None:
    lower = make_tree(tmp_path / "lower", File("f", b"data" * 10_000), Dir("d"), Fifo("p"))
    ws = workspace(tmp_path, unnamed)
    for name in ("f", "d", "p"):
        target = tmp_path / "upper" / "missing-parent" / name
        with pytest.raises(FileNotFoundError):
            copy_up(ws, str(lower / name), str(target))
        assert not os.path.lexists(target)
        assert staging_entries(ws) == []


@BUILT
def test_existing_target_is_never_replaced(tmp_path: Path, unnamed: bool) -> None:
    lower = make_tree(tmp_path / "lower", File("f", b"lower"), Dir("d"))
    upper = tmp_path / "upper"
    ws = workspace(tmp_path, unnamed)
    make_tree(upper, File("f", b"already copied up and written"), File("d/child"))
    with pytest.raises(FileExistsError):
        copy_up(ws, str(lower / "f"), str(upper / "f"))
    with pytest.raises(FileExistsError):  # a plain rename would also refuse a non-empty dir...
        copy_up(ws, str(lower / "d"), str(upper / "d"))
    os.unlink(upper / "d" / "child")
    with pytest.raises(FileExistsError):  # ...but would silently replace an empty one
        copy_up(ws, str(lower / "d"), str(upper / "d"))
    assert (upper / "f").read_bytes() == b"already copied up and written"
    assert staging_entries(ws) == []


def test_missing_source_leaves_nothing(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    with pytest.raises(FileNotFoundError):
        copy_up(ws, str(tmp_path / "nope"), str(tmp_path / "upper" / "nope"))
    assert staging_entries(ws) == [] and os.listdir(tmp_path / "upper") == []


KILL_SCRIPT = """
import sys
from overlayfuse.overlay.copyup import Workspace, copy_up
ws = Workspace(upper=sys.argv[1], staging=sys.argv[2], tmpfile=sys.argv[5] == "unnamed")
print("ready", flush=True)
copy_up(ws, sys.argv[3], sys.argv[4])
print("done", flush=True)
"""


@BUILT
def test_kill_during_copy_up_leaves_nothing_visible(tmp_path: Path, unnamed: bool) -> None:
    """SIGKILL mid-copy, every time: the source is tests.support.gatefs's file, whose read waits until
    the test releases it, so the kill lands while the copy is under way, not by a race. A copy in an
    unnamed file leaves nothing at all; one under a name in staging leaves it for `prepare`."""
    control = tmp_path / "control"
    target = tmp_path / "upper" / "gated"
    ws = workspace(tmp_path, unnamed)
    with gate_fs(control, tmp_path / "gate") as gate:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, ws.upper, ws.staging, str(gate / "gated"),
             str(target), "unnamed" if unnamed else "staged"],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            wait_held(control, 60)  # copy_up is reading the source: mid-copy
            if unnamed:
                assert staging_entries(ws) == []
                assert unnamed_files_held([proc.pid], ws.staging) == 1, "the copy under way is not unnamed"
            else:
                assert staging_entries(ws) != [], "a copy under way has nothing in staging"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.lexists(target), "a half copy at the target's name"
    if unnamed:
        assert staging_entries(ws) == []  # the unnamed file went with the process
    else:
        assert staging_entries(ws) != []  # the half copy is in staging, where prepare finds it
    Workspace.prepare(ws.upper, str(tmp_path / "workdir"))
    assert staging_entries(ws) == []



def test_fallback_copy_lands_at_the_same_offsets(tmp_path: Path) -> None:
    """The sendfile path, used where copy_file_range is refused (ext4 never refuses it, so call it)."""
    from overlayfuse.overlay.copyup import _copy_chunk_fallback

    source, target = tmp_path / "src", tmp_path / "dst"
    write_random(source, 4 * MIB)
    src = os.open(source, os.O_RDONLY)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert _copy_chunk_fallback(src, dst, MIB + 3, 2 * MIB) == 2 * MIB
        os.ftruncate(dst, 4 * MIB)
    finally:
        os.close(src)
        os.close(dst)
    data, copied = source.read_bytes(), target.read_bytes()
    assert copied[MIB + 3 : 3 * MIB + 3] == data[MIB + 3 : 3 * MIB + 3]
    assert copied[: MIB + 3] == bytes(MIB + 3) and copied[3 * MIB + 3 :] == bytes(MIB - 3)


def test_a_copy_ending_in_data_is_not_truncated_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose data runs to its end has its length once copied: a truncate to that length
    would still zero the last page's tail on ext4 and wait for the writeback started on it. One
    with a trailing hole is given its length by a truncate."""
    lower = make_tree(tmp_path / "lower", File("full", os.urandom(3309)), Sparse("holed", 4 * MIB, {0: b"head" * 1000}))
    truncated: list[int] = []
    real_ftruncate = os.ftruncate

    def counting_ftruncate(fd: int, length: int) -> None:
        truncated.append(length)
        real_ftruncate(fd, length)

    monkeypatch.setattr(copyup.os, "ftruncate", counting_ftruncate)
    ws = workspace(tmp_path)
    copy_up(ws, str(lower / "full"), str(tmp_path / "upper" / "full"))
    assert truncated == [] and (tmp_path / "upper" / "full").read_bytes() == (lower / "full").read_bytes()
    copy_up(ws, str(lower / "holed"), str(tmp_path / "upper" / "holed"))
    assert truncated == [4 * MIB] and os.stat(tmp_path / "upper" / "holed").st_size == 4 * MIB
