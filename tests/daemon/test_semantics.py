"""The object model, against the kernel: names, descriptors and listings behave as on kernel overlayfs.

Each scenario runs, in a child process, on kernel overlayfs (the oracle, mounted with
index=on,redirect_dir=on) and on overlayfuse over identical trees; the two answers must be equal.
The cases are the ones a path-per-inode daemon gets wrong: a hardlinked name that vanishes when
another name goes, an open file that was unlinked, paths and names at the kernel's limits, a
directory handle read after changes, set-id bits cleared for unprivileged writers.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlayfuse.daemon import binding
from tests.support import syscalls
from tests.support.mounts import overlayfuse, run_isolated
from tests.support.trees import Dir, Fifo, File, HardLink
from tests.support.writes import mounted_pair

pytestmark = [pytest.mark.kernel, pytest.mark.mount]

NOBODY = 65534


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _try(func: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return func(*args, **kwargs)
    except OSError as exc:
        return _errname(exc)


def _st(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size)


def _lst(path: str) -> Any:
    return _try(lambda: _st(os.lstat(path)))


# --- scenarios: module-level, run in a child process with the mount as first argument -------------


def lower_link_then_unlink_other(mnt: str) -> list[Any]:
    os.chdir(os.path.join(mnt, "a"))
    os.link("foo", "no_foo")
    out = [_lst("foo"), _lst("no_foo")]
    os.unlink("no_foo")
    out += [_lst("foo"), _lst("no_foo"), Path("foo").read_bytes()]
    return out


def upper_link_chain(mnt: str) -> list[Any]:
    os.chdir(mnt)
    os.close(os.open("n0", os.O_CREAT | os.O_WRONLY, 0o644))
    os.link("n0", "n1")
    os.link("n1", "n2")
    os.chmod("n1", 0o201)
    os.chown("n1", NOBODY, NOBODY - 1)
    os.unlink("n0")
    os.unlink("n2")
    return [_lst("n0"), _lst("n1"), _lst("n2"), sorted(os.listdir("."))]


def unlink_each_name_in_turn(mnt: str, names: list[str]) -> list[Any]:
    """Every name of a hardlinked file (lower: the layer's own links) unlinked one by one; after each,
    every other name still shows the file with the right link count."""
    os.chdir(os.path.join(mnt, "h"))
    out = []
    for victim in names:
        os.unlink(victim)
        out.append([victim] + [_lst(n) for n in names])
    return out


def rename_ring(mnt: str, where: str, rounds: int) -> list[Any]:
    """Seven names of one file rotated ROUNDS times with rename(2) (each over an existing name: a
    no-op between links of one file, a replacement otherwise), then every name unlinked."""
    os.chdir(os.path.join(mnt, where))
    names = [f"r{i}" for i in range(7)]
    out = []
    for round_ in range(rounds):
        src, dst = names[round_ % 7], names[(round_ * 3 + 1) % 7]
        out.append(_try(os.rename, src, dst))
        out.append([_lst(n) for n in names])
    for n in names:
        out.append(_try(os.unlink, n))
    out.append(sorted(os.listdir(".")))
    return out


def open_then_unlink(mnt: str, name: str, create: bool) -> list[Any]:
    os.chdir(os.path.join(mnt, "t"))
    if create:
        fd = os.open(name, os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"abc")
    else:
        fd = os.open(name, os.O_RDWR)
    os.unlink(name)
    out: list[Any] = [_lst(name), _try(lambda: os.fstat(fd).st_nlink)]
    out.append(_try(os.pwrite, fd, b"Z", 1))
    out.append(_try(os.pread, fd, 3, 0))
    out.append(_try(lambda: _st(os.fstat(fd))[::2]))
    os.close(fd)
    out.append(sorted(os.listdir(".")))
    return out


def xattrs_of_an_open_file_whose_name_went(mnt: str, name: str, create: bool) -> list[Any]:
    """An open file's xattrs, read and changed through its descriptor after its name went to a new
    file: the open file's own, never the new file's (fgetxattr, flistxattr, fsetxattr,
    fremovexattr reach the daemon by inode, not by name)."""
    os.chdir(os.path.join(mnt, "t"))
    fd = os.open(name, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    os.setxattr(fd, "user.a", b"old")
    os.unlink(name)
    with open(name, "wb") as new:
        new.write(b"new")
    os.setxattr(name, "user.a", b"new")
    out: list[Any] = [_try(os.getxattr, fd, "user.a"), _try(lambda: sorted(os.listxattr(fd)))]
    out.append(_try(os.setxattr, fd, "user.b", b"through the descriptor"))
    out.append(_try(os.getxattr, name, "user.b"))
    out.append(_try(os.removexattr, fd, "user.a"))
    out.append(_try(os.getxattr, fd, "user.a"))
    out.append(_try(os.getxattr, name, "user.a"))
    os.close(fd)
    return out


def _acl_of(path: str) -> str:
    done = subprocess.run(["getfacl", "-cnp", path], capture_output=True, text=True, timeout=60)
    return done.stdout if done.returncode == 0 else done.stderr.strip()


def new_objects_and_default_acls(mnt: str, umask: int) -> list[Any]:
    """New objects in a directory with no default ACL (the umask applies), one given a default ACL
    through the mount, and a lower one given one (copied up with it): there the ACL, masked by the
    mode asked for, takes the umask's place (the kernel's posix_acl_create)."""
    os.chdir(mnt)
    os.umask(umask)
    os.mkdir("plain")
    os.mkdir("inherits")
    for d in ("inherits", "low"):
        subprocess.run(["setfacl", "-d", "-m", "u:7:rwx,g:8:r-x", d], check=True, timeout=60)
    out: list[Any] = []
    for d in ("plain", "inherits", "low"):
        os.close(os.open(f"{d}/f", os.O_CREAT | os.O_WRONLY, 0o666))
        os.close(os.open(f"{d}/g", os.O_CREAT | os.O_WRONLY, 0o640))
        os.mkdir(f"{d}/sub", 0o777)
        os.mkfifo(f"{d}/fifo", 0o664)
        os.symlink("f", f"{d}/link")
        for name in ("f", "g", "sub", "fifo"):
            out.append((d, name, oct(os.lstat(f"{d}/{name}").st_mode), _acl_of(f"{d}/{name}")))
        os.close(os.open(f"{d}/sub/deeper", os.O_CREAT | os.O_WRONLY, 0o600))
        out.append((d, "sub/deeper", oct(os.lstat(f"{d}/sub/deeper").st_mode), _acl_of(f"{d}/sub/deeper")))
    return out


def _link_open_file(fd: int, name: str) -> None:
    """linkat(2) of /proc/self/fd/FD with AT_SYMLINK_FOLLOW, as open(2) documents to name an
    O_TMPFILE file (Python's os.link uses linkat only when given a directory descriptor)."""
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=here)
    finally:
        os.close(here)


def unnamed_files(mnt: str) -> list[Any]:
    """open(2) with O_TMPFILE (in a lower directory too: copied up first), written, then named with
    linkat(2) or closed unnamed; O_EXCL ones cannot be named."""
    os.chdir(os.path.join(mnt, "t"))
    os.umask(0o022)
    out: list[Any] = []
    fd = os.open(".", os.O_TMPFILE | os.O_RDWR, 0o666)
    os.write(fd, b"unnamed")
    st = os.fstat(fd)
    out.append((oct(st.st_mode), st.st_nlink, st.st_size, sorted(os.listdir("."))))
    out.append(_try(_link_open_file, fd, "named"))
    out.append((os.fstat(fd).st_nlink, _try(Path("named").read_bytes), sorted(os.listdir("."))))
    out.append(_try(_link_open_file, fd, "lowerfile"))  # a name that exists: EEXIST
    os.close(fd)
    excl = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_EXCL, 0o600)
    out.append(_try(_link_open_file, excl, "never"))
    os.close(excl)
    dropped = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o600)
    os.write(dropped, b"gone")
    os.close(dropped)
    out.append(sorted(os.listdir(".")))
    os.unlink("lowerfile")  # a whiteout, which a named unnamed file replaces
    fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o600)
    os.write(fd, b"over a whiteout")
    out.append(_try(_link_open_file, fd, "lowerfile"))
    os.close(fd)
    out.append((sorted(os.listdir(".")), Path("lowerfile").read_bytes()))
    return out


def open_read_only_then_unlink(mnt: str) -> list[Any]:
    os.chdir(os.path.join(mnt, "t"))
    fd = os.open("lowerfile", os.O_RDONLY)
    os.unlink("lowerfile")
    out = [_try(os.pread, fd, 10, 0), _try(lambda: _st(os.fstat(fd))[0])]
    os.close(fd)
    return out


LONG = 200  # bytes per directory name in the deep chain


def deep_relative_paths(mnt: str) -> list[Any]:
    """A chain of 200-byte directories whose relative path reaches 4094 bytes, then create, chmod,
    stat, rename and unlink by that relative path."""
    os.chdir(mnt)
    names = []
    length = 0
    i = 0
    while True:
        name = f"{i:03d}" + "d" * (LONG - 3)
        if length + len(name) + 1 + 8 > 4094:
            break
        os.mkdir(name)
        os.chdir(name)
        names.append(name)
        length += len(name) + 1
        i += 1
    os.chdir(mnt)
    prefix = "/".join(names)
    leaf = "f" * (4094 - len(prefix) - 1)
    rel = f"{prefix}/{leaf}"
    out: list[Any] = [len(rel)]
    out.append(_try(lambda: os.close(os.open(rel, os.O_CREAT | os.O_WRONLY, 0o600))))
    out.append(_try(os.chmod, rel, 0o640))
    out.append(_try(lambda: stat.S_IMODE(os.lstat(rel).st_mode)))
    other = f"{prefix}/{'g' * len(leaf)}"
    out.append(_try(os.rename, rel, other))
    out.append(_try(os.unlink, other))
    out.append(_try(os.rmdir, prefix))
    return out


def long_name_rename(mnt: str) -> list[Any]:
    os.chdir(mnt)
    long = "n" * 255
    out = [_try(os.rename, "n0", long), _lst(long), _try(os.rename, long, "n0"), _lst("n0")]
    out.append(_try(os.link, "n0", long))
    out.append(_try(os.symlink, long, "s" * 255))
    out.append(_try(os.readlink, "s" * 255))
    out.append(_try(os.mkdir, "m" * 255))
    out.append(_try(os.rmdir, "m" * 255))
    out.append(_try(os.unlink, long))
    out.append(_try(os.rename, "n0", "x" * 256))
    return out


def listing_through_old_handle(mnt: str) -> list[Any]:
    path = os.path.join(mnt, "many")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    first = _getdents_names(fd, 1)
    for i in range(10):
        os.unlink(os.path.join(path, f"f{i:02d}"))
    os.rename(os.path.join(path, "f15"), os.path.join(path, "renamed"))
    os.lseek(fd, 0, os.SEEK_SET)  # rewind the same open directory (os.listdir(fd) reads on from here)
    again = sorted(os.listdir(fd))
    gone = [_lst(os.path.join(path, f"f{i:02d}")) for i in range(20)]
    os.close(fd)
    return [len(first), again, gone]


def continued_listing_has_no_deleted_names(mnt: str) -> list[str]:
    """Read part of a listing, delete names, read on: no deleted name may come back. (The kernel
    differs here: it reads on in the lower directory it opened, deleted names included, until a
    rewind; we answer each read from the directory as it is.)"""
    path = os.path.join(mnt, "many")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    seen = _getdents_names(fd, 1)
    deleted = [n for n in (f"f{i:02d}" for i in range(20)) if n not in seen][:10]
    for name in deleted:
        os.unlink(os.path.join(path, name))
    rest = _getdents_names(fd, 10_000)
    os.close(fd)
    return sorted(set(rest) & set(deleted))


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_GETDENTS64 = 217  # x86_64


def _getdents_names(fd: int, at_most: int) -> list[str]:
    """Names from getdents64 on FD, with a buffer sized so that few entries come per call."""
    names: list[str] = []
    buf = ctypes.create_string_buffer(64 if at_most == 1 else 32768)
    while len(names) < at_most:
        n = _libc.syscall(_SYS_GETDENTS64, fd, buf, len(buf))
        if n < 0:
            raise OSError(ctypes.get_errno(), "getdents64")
        if n == 0:
            break
        pos = 0
        while pos < n:
            reclen = int.from_bytes(buf.raw[pos + 16:pos + 18], "little")
            name = buf.raw[pos + 19:pos + reclen].split(b"\0", 1)[0].decode()
            if name not in (".", ".."):
                names.append(name)
            pos += reclen
    return names


def rename_a_lower_link_whose_sibling_moved_up(mnt: str, how: str) -> list[Any]:
    """d/t2 and m/t3 are one lower file; moving the merged dir d copies d/t2 up (into the link
    index): m/t3, still a lower name, must then move too (exchanged with d, or renamed after)."""
    os.chdir(mnt)
    out = [_lst("m/t3")]
    if how == "exchange":
        out.append(_try(syscalls.rename_exchange, "d", "m/t3"))
        out += [_lst(p) for p in ("d", "m/t3/t2", "m/t3/q", "t1")]  # not m/t3: see README, dir renames
    else:
        out.append(_try(os.rename, "d", "e"))
        out.append(_try(os.rename, "m/t3", "m/t4"))
        out += [_lst(p) for p in ("e/t2", "m/t3", "m/t4", "t1")]
    return out


def change_a_hardlinked_file_after_its_names_went(mnt: str, names: list[str]) -> list[Any]:
    """NAMES are one lower file. Writing through the first copies it up (into the link index);
    then the names go one by one while descriptors stay open: the last name keeps its inode
    number, and a change through a descriptor whose names all went still works (the copy is in
    upper already)."""
    os.chdir(os.path.join(mnt, "h"))
    first, second, *rest = names
    inos = [os.lstat(name).st_ino for name in rest]
    writer = os.open(first, os.O_RDWR)
    os.write(writer, b"new")
    os.unlink(first)
    reader = os.open(second, os.O_RDONLY)
    os.unlink(second)
    out: list[Any] = [[os.lstat(name).st_ino for name in rest] == inos]
    out += [_try(os.fchmod, reader, 0o666), _try(lambda: _st(os.fstat(reader)))]
    for name in rest:
        os.unlink(name)
    out += [_try(os.fchmod, writer, 0o600), _try(lambda: _st(os.fstat(writer))), os.pread(reader, 3, 0)]
    os.close(writer)
    os.close(reader)
    return out


def change_a_lower_file_after_its_name_went(mnt: str, name: str, flags: int) -> list[Any]:
    """Open a lower NAME with FLAGS (which never copy it up), unlink it, then fchmod through the
    descriptor."""
    os.chdir(os.path.join(mnt, "t"))
    fd = os.open(name, flags | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        os.unlink(name)
        return [_try(os.fchmod, fd, 0o606), _try(lambda: stat.S_IMODE(os.fstat(fd).st_mode))]
    finally:
        os.close(fd)


def lexists(mnt: str, path: str) -> bool:
    return os.path.lexists(os.path.join(mnt, path))


def unprivileged_set_id(mnt: str, op: str) -> Any:
    """As nobody: change a 06777 file owned by root by OP; its mode afterwards."""
    where = os.open(os.path.join(mnt, "s"), os.O_RDONLY | os.O_DIRECTORY)  # the test's tmp dir is 0700
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    if op == "trunc_open":
        os.close(os.open(op, os.O_WRONLY | os.O_TRUNC, dir_fd=where))
    elif op == "write":
        fd = os.open(op, os.O_WRONLY, dir_fd=where)
        os.write(fd, b"x")
        os.close(fd)
    elif op == "truncate":
        fd = os.open(op, os.O_WRONLY, dir_fd=where)
        os.truncate(fd, 1)
        os.close(fd)
    return stat.S_IMODE(os.stat(op, dir_fd=where, follow_symlinks=False).st_mode)


def root_chown_set_id(mnt: str) -> Any:
    path = os.path.join(mnt, "s", "chown")
    os.chown(path, 1, 1)
    return stat.S_IMODE(os.lstat(path).st_mode), _try(lambda: os.lstat(path).st_uid)


def reads_through_readers_opened_before_changes(mnt: str) -> list[Any]:
    """Readers of small lower files opened, and not yet read, before other descriptors and names
    change the files (overlayfuse hands such a file's data to the kernel's cache at its open)."""
    os.chdir(os.path.join(mnt, "r"))
    reader = os.open("f", os.O_RDONLY)
    linked = os.open("b", os.O_RDONLY)  # a hardlink of "a", which the writes below go through
    replaced = os.open("g", os.O_RDONLY)  # "f" is renamed over "g" at the end
    out: list[Any] = []

    def seen() -> None:
        out.append([os.pread(reader, 4096, 0), os.fstat(reader).st_size, os.pread(linked, 4096, 0),
                    os.pread(replaced, 4096, 0)])

    writer = os.open("f", os.O_WRONLY)  # copies up while the reader is open
    os.pwrite(writer, b"NEW", 100)
    os.close(writer)
    with open("a", "r+b") as through_other_name:
        through_other_name.write(b"A-NEW")
    seen()
    os.truncate("f", 50)
    seen()
    fd = os.open("f", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"short")
    os.close(fd)
    seen()
    os.rename("f", "g")
    seen()
    for fd in (reader, linked, replaced):
        os.close(fd)
    out.append([Path(name).read_bytes() for name in ("a", "b", "g")])
    return out


# --- the tests --------------------------------------------------------------------------------------


def _same(tmp_path: Path, layers: dict[str, list[Any]], func: Any, *args: Any) -> Any:
    with mounted_pair(tmp_path, layers) as pair:
        kernel, ours = pair.both(func, *args)
    assert ours == kernel
    return ours


def test_lower_hardlink_survives_unlink_of_the_new_name(tmp_path: Path) -> None:
    out = _same(tmp_path, {"l1": [Dir("a"), File("a/foo", b"lower")]}, lower_link_then_unlink_other)
    assert out[2][1] == 1  # foo: one link left, as the kernel says


def test_upper_link_chain_keeps_the_last_name(tmp_path: Path) -> None:
    out = _same(tmp_path, {"l1": [File("x")]}, upper_link_chain)
    assert out[1] != "ENOENT" and out[1][1] == 1


@pytest.mark.parametrize("where", ["l1", "upper"])
def test_every_name_of_a_hardlinked_file_unlinked_in_turn(tmp_path: Path, where: str) -> None:
    names = ["a", "b", "c", "d"]
    entries = [Dir("h"), File("h/a", b"data")] + [HardLink(f"h/{n}", "h/a") for n in names[1:]]
    layers = {"l1": entries} if where == "l1" else {"upper": entries, "l1": [File("x")]}
    _same(tmp_path, layers, unlink_each_name_in_turn, names)


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_rename_ring_among_hardlinked_names(tmp_path: Path, where: str) -> None:
    links = [HardLink(f"{where}/r{i}", f"{where}/r0") for i in range(1, 7)]
    entries = [Dir(where), File(f"{where}/r0", b"ring"), *links]
    layers = {"l1": entries} if where == "lower" else {"upper": entries, "l1": [File("x")]}
    _same(tmp_path, layers, rename_ring, where, 31)


@pytest.mark.parametrize("how", ["exchange", "rename"])
def test_rename_of_a_lower_link_whose_other_name_was_copied_up(tmp_path: Path, how: str) -> None:
    links = [Dir("d"), Dir("m"), File("t1", b"linked"), HardLink("d/t2", "t1"), HardLink("m/t3", "t1")]
    layers = {"l1": [Dir("d"), File("d/q", b"upper layer of d")], "l2": links}
    out = _same(tmp_path, layers, rename_a_lower_link_whose_sibling_moved_up, how)
    assert None in out[1:3] and "ENOENT" not in out[1:3]


@pytest.mark.parametrize("count", [2, 3])
def test_a_hardlinked_file_changed_through_descriptors_after_its_names_went(tmp_path: Path, count: int) -> None:
    names = [f"h{i}" for i in range(1, count + 1)]
    entries = [Dir("h"), File("h/h1", b"old data")] + [HardLink(f"h/{n}", "h/h1") for n in names[1:]]
    out = _same(tmp_path, {"l1": entries}, change_a_hardlinked_file_after_its_names_went, names)
    assert out[:2] == [True, None]


@pytest.mark.parametrize("name,create", [("tmpf", True), ("lowerfile", False)])
def test_open_file_works_after_its_name_is_unlinked(tmp_path: Path, name: str, create: bool) -> None:
    out = _same(tmp_path, {"l1": [Dir("t"), File("t/lowerfile", b"xyz")]}, open_then_unlink, name, create)
    assert out[3] in (b"aZc", b"xZz")


@pytest.mark.parametrize("name,create", [("tmpf", True), ("lowerfile", False)])
def test_xattrs_of_an_open_file_whose_name_went_to_another(tmp_path: Path, name: str, create: bool) -> None:
    out = _same(tmp_path, {"l1": [Dir("t"), File("t/lowerfile", b"xyz")]}, xattrs_of_an_open_file_whose_name_went,
                name, create)  # fmt: skip
    assert out[0] == b"old" and out[3] == "ENODATA" and out[6] == b"new"


@pytest.mark.parametrize("umask", [0, 0o022, 0o077])
def test_new_objects_inherit_default_acls(tmp_path: Path, umask: int) -> None:
    if umask and not binding.detect().dont_mask:
        # README, "POSIX ACLs": without patch 0012 the kernel applies the umask before the daemon
        # sees the mode, and an inherited ACL's mask is narrowed by it (the stock-binding venv).
        pytest.skip("a stock pyfuse3 cannot ask for the mode as asked (FUSE_CAP_DONT_MASK)")
    out = _same(tmp_path, {"l1": [Dir("low")]}, new_objects_and_default_acls, umask)
    assert "user:7:rwx" in out[5][3] and "default:user:7:rwx" in out[7][3]  # the oracle inherits


def test_unnamed_files_made_and_named(tmp_path: Path) -> None:
    if not binding.detect().tmpfile:
        # README, "Where we differ": a stock pyfuse3 registers no tmpfile, and the kernel fails
        # O_TMPFILE with EOPNOTSUPP (the stock-binding venv)
        pytest.skip("a stock pyfuse3 has no tmpfile operation")
    out = _same(tmp_path, {"l1": [Dir("t"), File("t/lowerfile", b"xyz")]}, unnamed_files)
    assert out[0][1] == 0 and out[1] is None and out[2][:2] == (1, b"unnamed")
    assert (out[3], out[4]) == ("EEXIST", "ENOENT")


def test_read_only_open_file_survives_its_whiteout(tmp_path: Path) -> None:
    _same(tmp_path, {"l1": [Dir("t"), File("t/lowerfile", b"lower data")]}, open_read_only_then_unlink)


def test_relative_paths_of_4094_bytes(tmp_path: Path) -> None:
    out = _same(tmp_path, {"l1": [File("x")]}, deep_relative_paths)
    assert out[0] == 4094 and out[1] is None


def test_names_of_255_bytes(tmp_path: Path) -> None:
    out = _same(tmp_path, {"l1": [File("n0", b"0")]}, long_name_rename)
    assert out[0] is None


def test_listing_through_a_handle_opened_before_changes(tmp_path: Path) -> None:
    files = [File(f"many/f{i:02d}", b"x") for i in range(20)]
    out = _same(tmp_path, {"l1": [Dir("many"), *files]}, listing_through_old_handle)
    assert len(out[1]) == 10


def test_continued_listing_skips_names_deleted_meanwhile(tmp_path: Path) -> None:
    files = [File(f"many/f{i:02d}", b"x") for i in range(20)]
    with mounted_pair(tmp_path, {"l1": [Dir("many"), *files]}) as pair:
        ours = run_isolated(continued_listing_has_no_deleted_names, str(pair.ours.mnt))
    assert ours == []


@pytest.mark.parametrize(("name", "flags", "answer"), [
    ("lowerfile", os.O_RDONLY, ["EEXIST", 0o644]),  # the kernel copies up to the old name: a whiteout
    ("fifo", os.O_RDWR, [None, 0o606]),  # an open for writing copies no FIFO up: the change does
])
def test_change_through_a_descriptor_after_the_lower_name_went(
        tmp_path: Path, name: str, flags: int, answer: list[Any]) -> None:
    """The kernel copies a FIFO whose name went up into that name, over the whiteout, so a removed
    name comes back (a difference in the README): ours copies it up with no name, and the name stays
    gone."""
    layers = {"l1": [Dir("t"), File("t/lowerfile", b"xyz"), Fifo("t/fifo", 0o640)]}
    with mounted_pair(tmp_path, layers) as pair:
        kernel, ours = pair.both(change_a_lower_file_after_its_name_went, name, flags)
        assert ours == kernel == answer
        assert run_isolated(lexists, str(pair.ours.mnt), f"t/{name}") is False
    assert stat.S_ISCHR(os.lstat(pair.ours.upper / "t" / name).st_mode)  # still its whiteout


@pytest.mark.parametrize("op", ["trunc_open", "write", "truncate"])
def test_unprivileged_change_clears_set_id_bits(tmp_path: Path, op: str) -> None:
    layers = {"l1": [Dir("s", mode=0o777), File(f"s/{op}", b"data", mode=0o6777)]}
    out = _same(tmp_path, layers, unprivileged_set_id, op)
    assert out == 0o777


def test_chown_clears_set_id_bits(tmp_path: Path) -> None:
    _same(tmp_path, {"l1": [Dir("s"), File("s/chown", b"data", mode=0o6755)]}, root_chown_set_id)


# --- ENOSPC in the middle of a directory rename ------------------------------------------------------


@pytest.fixture
def small_upper(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for upper and work dirs, unmounted in teardown."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(where)], check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def rename_dir(mnt: str) -> Any:
    return _try(os.rename, os.path.join(mnt, "big"), os.path.join(mnt, "moved"))


def tree_of(mnt: str) -> list[tuple[str, int]]:
    """Every name with its file size (directories: -1, their size is the filesystem's business)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            found.append((os.path.relpath(p, mnt), -1 if stat.S_ISDIR(st.st_mode) else st.st_size))
    return sorted(found)


def _big_lower(tmp_path: Path, small_upper: Path) -> tuple[Path, Path, Path, Path]:
    """A 4 MiB lower dir "big", twice the size of the small upper's filesystem."""
    from tests.support.trees import make_tree

    lower = make_tree(tmp_path / "lower", Dir("big"), Dir("big/sub"),
                      *[File(f"big/sub/f{i}", os.urandom(256 * 1024)) for i in range(16)])
    upper, work, mnt = small_upper / "upper", small_upper / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    return lower, upper, work, mnt


def test_directory_rename_out_of_space_leaves_nothing_behind(tmp_path: Path, small_upper: Path,
                                                          overlayfuse_bin: Path) -> None:
    """redirect_dir=off: the tree is copied up to move, and a copy that runs out of space is undone."""
    lower, upper, work, mnt = _big_lower(tmp_path, small_upper)
    with overlayfuse(mnt, [lower], upper, work, ["redirect_dir=off"]):
        before = run_isolated(tree_of, str(mnt))
        result = run_isolated(rename_dir, str(mnt))
        after = run_isolated(tree_of, str(mnt))
    assert result == "ENOSPC"
    assert after == before
    left = [p for p in upper.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size]
    assert left == [], f"partial copy left in upper: {left[:5]}"


def test_directory_rename_by_redirect_needs_no_space_for_data(tmp_path: Path, small_upper: Path,
                                                             overlayfuse_bin: Path) -> None:
    """redirect_dir=on (the default): the same rename copies up the directory alone, so it succeeds
    on an upper too small for the tree, and the content shows at the new name."""
    lower, upper, work, mnt = _big_lower(tmp_path, small_upper)
    with overlayfuse(mnt, [lower], upper, work):
        before = run_isolated(tree_of, str(mnt))
        result = run_isolated(rename_dir, str(mnt))
        after = run_isolated(tree_of, str(mnt))
    assert result is None
    assert after == [(p.replace("big", "moved", 1), size) for p, size in before]
    assert sorted(p.name for p in upper.iterdir()) == ["big", "moved"]  # the whiteout and the dir
    assert list((upper / "moved").iterdir()) == []


def test_readers_opened_before_changes_see_them(tmp_path: Path) -> None:
    """As on the kernel's overlay, a read-only descriptor opened before a copy-up reads the copy,
    and every change made through other descriptors or names, however its data was cached."""
    data = bytes(range(256)) * 12
    layers = {"l1": [Dir("r"), File("r/f", data), File("r/g", b"g" * 3000), File("r/a", data[::-1]),
                     HardLink("r/b", "r/a")]}
    out = _same(tmp_path, layers, reads_through_readers_opened_before_changes)
    assert out[0][0][100:103] == b"NEW" and out[0][2].startswith(b"A-NEW")
    assert out[3][0] == b"short"
