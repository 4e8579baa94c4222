"""What each operation does on a mount (run inside a `Worker`), and the same as Python to print.

`run_op` applies one operation with the mount's root as working directory and returns its
outcome: the return value, or the errno name.  Every path is relative, so the two sides see
the same strings whatever their mountpoints are called, and a path near PATH_MAX is near it
on both.  `render` writes the operation as a line of Python to run in the mount's root, for a
report.  Adding an operation means a generator in `ops`, a case here in `_apply` and one in
`render`.

Some operations hold descriptors across others (`hold`, `dir_hold`: slots kept in `_HELD`
of the worker process until `fd_close` or `close_held`); `as_user` operations run in a
second worker started under setpriv as an unprivileged caller.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import re
import stat
from typing import Any

from tests.support.compare import kind_of
from tests.support.differential.differences import comparable_mtime
from tests.support.differential.ops import DEEP_SEGMENT, MiB, Op, Outcome
from tests.support.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

# --- operations (run inside a Worker) ---------------------------------------------------

#: slot -> descriptor held across operations, in this worker process.
_HELD: dict[int, int] = {}
#: slot -> the path a `hold` opened (relative to the mount's root), for `_fchmod_held`.
_HELD_PATHS: dict[int, str] = {}

#: What `fd_fchmod` answers, on both sides, instead of changing a special file whose name went.
NOT_COMPARED = "not compared: a special file whose name went (README, differences from the kernel)"

_HOLD_FLAGS = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR,
               "trunc": os.O_WRONLY | os.O_TRUNC, "creat": os.O_RDWR | os.O_CREAT,
               "append": os.O_WRONLY | os.O_APPEND}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}
#: Small enough that one getdents64 call returns a few entries, not the whole directory.
_SOME_DENTS = 160


def _bytes(spec: tuple[str, int]) -> bytes:
    char, length = spec
    return char.encode() * length


def _write_all(fd: int, data: bytes, offset: int | None = None) -> int:
    written = 0
    while written < len(data):
        chunk = data[written:]
        n = os.write(fd, chunk) if offset is None else os.pwrite(fd, chunk, offset + written)
        written += n
    return written


def _write_with(path: str, flags: int, data: bytes, offset: int | None = None) -> int:
    # O_NONBLOCK: opening the fifo must fail (ENXIO) or succeed at once, never wait for a peer.
    fd = os.open(path, flags | os.O_NONBLOCK, 0o644)
    try:
        return _write_all(fd, data, offset)
    finally:
        os.close(fd)


def _digest(data: bytes) -> tuple[int, str]:
    return (len(data), hashlib.sha256(data).hexdigest()[:16])


def _describe(st: os.stat_result) -> tuple[Any, ...]:
    kind = kind_of(st.st_mode)
    is_dir = kind == "dir"
    return (kind, f"{st.st_mode:o}", st.st_uid, st.st_gid, None if is_dir else st.st_nlink,
            None if is_dir else st.st_size, comparable_mtime(st.st_mtime_ns, is_dir))


def _visible(names: list[str], dir_fd: int | None) -> tuple[list[str], list[str]]:
    """(names lstat finds, names lstat says ENOENT): the kernel lists whiteouts in pure dirs."""
    visible, vanished = [], []
    for name in sorted(names):
        try:
            os.lstat(name, dir_fd=dir_fd)
            visible.append(name)
        except FileNotFoundError:
            vanished.append(name)
    return visible, vanished


def _listdir(path: str) -> tuple[list[str], list[str]]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _visible(os.listdir(fd), fd)
    finally:
        os.close(fd)


def _rmtree(name: str, dir_fd: int | None = None) -> int:
    """Remove a tree bottom-up in name order, like `rm -r`, by descriptor (so a tree deeper
    than PATH_MAX goes too); the count of names removed."""
    removed = 0
    if stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            for child in sorted(os.listdir(fd)):
                try:
                    removed += _rmtree(child, fd)
                except FileNotFoundError:  # a whiteout the kernel lists in a pure directory
                    if _exists(child, fd):
                        raise
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
    return removed + 1


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def _held(slot: int) -> int:
    if slot not in _HELD:
        raise OSError(errno.EBADF, "nothing held in this slot", str(slot))
    return _HELD[slot]


def _hold(slot: int, path: str, flags: int) -> None:
    """Open PATH into SLOT. The slot's old descriptor is closed first, so an open that fails leaves
    the slot empty (EBADF from then on) on both sides, never the old directory or file still held:
    the operations after it would otherwise go on with a descriptor the sequence no longer names,
    whose position past its end the kernel and overlayfuse treat differently (see the README)."""
    old = _HELD.pop(slot, None)
    if old is not None:
        os.close(old)
    _HELD[slot] = os.open(path, flags, 0o644)
    _HELD_PATHS[slot] = path


def _fchmod_held(slot: int, mode: int) -> str | None:
    """fchmod a held descriptor; not done for a FIFO or device whose name is gone. An open for
    writing never copies one up, so the kernel copies it up at the fchmod into its old name, over
    the whiteout: the removed name comes back, which overlayfuse does not copy (its own test is
    `test_semantics.py::test_change_through_a_descriptor_after_the_lower_name_went`)."""
    fd = _held(slot)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        try:
            named = os.lstat(_HELD_PATHS[slot])
            gone = (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino)
        except OSError:  # nothing there, or no longer a path at all
            gone = True
        if gone:
            return NOT_COMPARED
    os.fchmod(fd, mode)
    return None


def close_held() -> list[tuple[int, str]]:
    """Close every held descriptor (before an unmount); (slot, errno name) for each close
    that failed (a FUSE flush can fail at close; the descriptor is gone all the same)."""
    failed = []
    for slot in sorted(_HELD):
        try:
            os.close(_HELD[slot])
        except OSError as exc:
            failed.append((slot, errno.errorcode.get(exc.errno or 0, str(exc.errno))))
    _HELD.clear()
    _HELD_PATHS.clear()
    return failed


def _getdents(fd: int, bufsize: int) -> list[str] | None:
    """One getdents64(2) call on `fd`: the names it returns (`.` and `..` left out), or None at the
    end of the directory (0 bytes). A batch may hold only `.` and `..`, which is not the end: how a
    listing is cut into batches is the filesystem's own (FUSE's kernel cache cuts it where its
    pages or the daemon's replies end)."""
    buf = ctypes.create_string_buffer(bufsize)
    n = _libc.syscall(ctypes.c_long(_SYS_GETDENTS64[platform.machine()]), ctypes.c_int(fd),
                      buf, ctypes.c_size_t(bufsize))
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "getdents64")
    if n == 0:
        return None
    names, pos, raw = [], 0, buf.raw[:n]
    while pos < len(raw):
        reclen = int.from_bytes(raw[pos + 16:pos + 18], "little")
        name = os.fsdecode(raw[pos + 19:pos + reclen].split(b"\0", 1)[0])
        if name not in (".", ".."):
            names.append(name)
        pos += reclen
    return names


def _deep_path(depth: int, leaf: str) -> str:
    return "/".join([DEEP_SEGMENT] * depth + ([leaf] if leaf else []))


def _deep_mkdirs(top: str, depth: int) -> int:
    """chdir to `top`, then mkdir and chdir DEEP_SEGMENT `depth` times; the count created."""
    os.chdir(top)
    created = 0
    for _ in range(depth):
        try:
            os.mkdir(DEEP_SEGMENT, 0o755)
            created += 1
        except FileExistsError:
            pass
        os.chdir(DEEP_SEGMENT)
    return created


def _deep(top: str, depth: int, leaf: str, action: str) -> Any:
    """chdir to `top`, then `action` on a relative path `depth` segments deep."""
    os.chdir(top)
    path = _deep_path(depth, leaf)
    match action:
        case "create":
            return _write_with(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, b"deep\n")
        case "stat":
            return _describe(os.lstat(path))
        case "unlink":
            os.unlink(path)
        case "mkdir":
            os.mkdir(path, 0o755)
        case "rename_up":
            os.rename(path, "up")
        case "link_up":
            os.link(path, "up")
        case "listdir":
            return _listdir(path)
        case _:
            raise ValueError(f"unknown deep action {action!r}")
    return None


def _deep_here(top: str, depth: int, action: str) -> Any:
    """chdir to `top` and down `depth` segments one at a time, then `action` on short names
    there: the inode's own path is longer than PATH_MAX."""
    os.chdir(top)
    for _ in range(depth):
        os.chdir(DEEP_SEGMENT)
    match action:
        case "create":
            return _write_with("f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, b"here\n")
        case "stat":
            return _describe(os.lstat("f"))
        case "rename":
            os.rename("f", "g")
        case "link":
            os.link("f", "g")
        case "unlink":
            os.unlink("f")
        case "listdir":
            return _listdir(".")
        case _:
            raise ValueError(f"unknown deep action {action!r}")
    return None


def _apply(op: Op) -> Any:
    name, *args = op
    match name, args:
        case "create_excl", [path, data]:
            return _write_with(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _bytes(data))
        case "write_trunc", [path, data]:
            return _write_with(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _bytes(data))
        case "append", [path, data]:
            return _write_with(path, os.O_WRONLY | os.O_APPEND, _bytes(data))
        case "pwrite", [path, offset, data]:
            return _write_with(path, os.O_WRONLY, _bytes(data), offset)
        case "truncate", [path, size]:
            os.truncate(path, size)
        case "open_trunc", [path]:
            os.close(os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK))
        case "read", [path]:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                chunks = []
                while chunk := os.read(fd, MiB):
                    chunks.append(chunk)
                return _digest(b"".join(chunks))
            finally:
                os.close(fd)
        case "chmod", [path, mode]:
            os.chmod(path, mode)
        case "chown", [path]:
            os.chown(path, 1000, 1000, follow_symlinks=False)
        case "utime", [path, ns]:
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
        case "setxattr", [path, key, value]:
            os.setxattr(path, key, value, follow_symlinks=False)
        case "removexattr", [path, key]:
            os.removexattr(path, key, follow_symlinks=False)
        case "mkdir", [path]:
            os.mkdir(path, 0o755)
        case "mkfifo", [path]:
            os.mkfifo(path, 0o644)
        case "symlink", [target, path]:
            os.symlink(target, path)
        case "link", [src, dst]:
            os.link(src, dst, follow_symlinks=False)
        case "unlink", [path]:
            os.unlink(path)
        case "rmdir", [path]:
            os.rmdir(path)
        case "rmtree", [path]:
            return _rmtree(path)
        case "rename", [src, dst]:
            os.rename(src, dst)
        case "rename_noreplace", [src, dst]:
            renameat2(src, dst, RENAME_NOREPLACE)
        case "rename_exchange", [src, dst]:
            renameat2(src, dst, RENAME_EXCHANGE)
        case "listdir", [path]:
            return _listdir(path)
        case "stat", [path]:
            return _describe(os.lstat(path))
        # descriptors held across operations
        case "hold", [slot, path, how]:
            _hold(slot, path, _HOLD_FLAGS[how] | os.O_NONBLOCK)
        case "fd_write", [slot, data]:
            return _write_all(_held(slot), _bytes(data))
        case "fd_pwrite", [slot, offset, data]:
            return _write_all(_held(slot), _bytes(data), offset)
        case "fd_read", [slot, offset, length]:
            return _digest(os.pread(_held(slot), length, offset))
        case "fd_fstat", [slot]:
            return _describe(os.fstat(_held(slot)))
        case "fd_truncate", [slot, size]:
            os.ftruncate(_held(slot), size)
        case "fd_fchmod", [slot, mode]:
            return _fchmod_held(slot, mode)
        case "fd_close", [slot]:
            fd = _held(slot)
            del _HELD[slot]
            os.close(fd)
        case "dir_hold", [slot, path]:
            _hold(slot, path, os.O_RDONLY | os.O_DIRECTORY)
        case "dir_read_some", [slot]:
            # Which entries come first is each filesystem's own order: only success is compared.
            _getdents(_held(slot), _SOME_DENTS)
        case "dir_rewind_list", [slot]:
            fd = _held(slot)
            os.lseek(fd, 0, os.SEEK_SET)
            names: list[str] = []
            while (batch := _getdents(fd, 1 << 16)) is not None:
                names += batch
            return _visible(names, fd)
        # long paths
        case "deep_mkdirs", [top, depth]:
            return _deep_mkdirs(top, depth)
        case "deep", [top, depth, leaf, action]:
            return _deep(top, depth, leaf, action)
        case "deep_here", [top, depth, action]:
            return _deep_here(top, depth, action)
        case _:
            raise ValueError(f"unknown operation {op!r}")
    return None


def run_op(mnt: str | None, op: Op) -> Outcome:
    """Apply `op` with `mnt` (None: the worker's own working directory) as working directory.

    Any exception other than OSError is a harness bug: it is returned as ("exc", ...), which
    `differences.same_outcome` never accepts, even when both sides raise it.
    """
    back = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if mnt is not None:
            os.chdir(mnt)
        return ("ok", _apply(op))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))
    except Exception as exc:
        return ("exc", repr(exc))
    finally:
        os.fchdir(back)
        os.close(back)


def run_ops(mnt: str, ops: list[Op]) -> list[Outcome]:
    """Several operations in one call (the concurrent mode sends a batch to each worker)."""
    return [run_op(mnt, op) for op in ops]


# --- rendering --------------------------------------------------------------------------

_FLAGS = {"create_excl": "os.O_WRONLY | os.O_CREAT | os.O_EXCL",
          "write_trunc": "os.O_WRONLY | os.O_CREAT | os.O_TRUNC",
          "append": "os.O_WRONLY | os.O_APPEND", "pwrite": "os.O_WRONLY"}
_HOLD_RENDER = {"r": "os.O_RDONLY", "w": "os.O_WRONLY", "rw": "os.O_RDWR",
                "trunc": "os.O_WRONLY | os.O_TRUNC", "creat": "os.O_RDWR | os.O_CREAT",
                "append": "os.O_WRONLY | os.O_APPEND"}
_RUN = re.compile(r"(.)\1{15,}")


def lit(text: str) -> str:
    """A string as a Python expression, long runs of one character written as 'c' * n."""
    parts, pos = [], 0
    for m in _RUN.finditer(text):
        if m.start() > pos:
            parts.append(repr(text[pos:m.start()]))
        parts.append(f"{m.group(1)!r} * {len(m.group(0))}")
        pos = m.end()
    if pos < len(text) or not parts:
        parts.append(repr(text[pos:]))
    return " + ".join(parts)


def _deep_render(top: str, depth: int, leaf: str) -> str:
    seg = lit(DEEP_SEGMENT)
    path = f"'/'.join([{seg}] * {depth}" + (f" + [{lit(leaf)}])" if leaf else "])")
    return f"os.chdir({lit(top)}); p = {path}"


def render(op: Op) -> str:
    """One operation as Python to run with the mount's root as working directory."""
    name, *args = op
    match name, args:
        case "as_user", [inner]:
            return (f"{render(inner)}  # as uid 1000 gid 1000, no groups "
                    "(setpriv --reuid=1000 --regid=1000 --clear-groups)")
        case ("create_excl" | "write_trunc" | "append"), [path, (char, n)]:
            return (f"fd = os.open({lit(path)}, {_FLAGS[name]} | os.O_NONBLOCK, 0o644); "
                    f"os.write(fd, b{char!r} * {n}); os.close(fd)")
        case "pwrite", [path, offset, (char, n)]:
            return (f"fd = os.open({lit(path)}, os.O_WRONLY | os.O_NONBLOCK); "
                    f"os.pwrite(fd, b{char!r} * {n}, {offset}); os.close(fd)")
        case "truncate", [path, size]:
            return f"os.truncate({lit(path)}, {size})"
        case "open_trunc", [path]:
            return f"os.close(os.open({lit(path)}, os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK))"
        case "read", [path]:
            return f"open({lit(path)}, 'rb').read()"
        case "chmod", [path, mode]:
            return f"os.chmod({lit(path)}, 0o{mode:o})"
        case "chown", [path]:
            return f"os.chown({lit(path)}, 1000, 1000, follow_symlinks=False)"
        case "utime", [path, ns]:
            return f"os.utime({lit(path)}, ns=({ns}, {ns}), follow_symlinks=False)"
        case "setxattr", [path, key, value]:
            return f"os.setxattr({lit(path)}, {key!r}, {value!r}, follow_symlinks=False)"
        case "removexattr", [path, key]:
            return f"os.removexattr({lit(path)}, {key!r}, follow_symlinks=False)"
        case "mkdir", [path]:
            return f"os.mkdir({lit(path)}, 0o755)"
        case "mkfifo", [path]:
            return f"os.mkfifo({lit(path)}, 0o644)"
        case "symlink", [target, path]:
            return f"os.symlink({target!r}, {lit(path)})"
        case "link", [src, dst]:
            return f"os.link({lit(src)}, {lit(dst)}, follow_symlinks=False)"
        case ("unlink" | "rmdir"), [path]:
            return f"os.{name}({lit(path)})"
        case "rmtree", [path]:
            return f"shutil.rmtree({lit(path)})  # children in name order"
        case "rename", [src, dst]:
            return f"os.rename({lit(src)}, {lit(dst)})"
        case ("rename_noreplace" | "rename_exchange"), [src, dst]:
            return f"{name}({lit(src)}, {lit(dst)})  # tests.support.syscalls"
        case "listdir", [path]:
            return f"sorted(os.listdir({lit(path)}))"
        case "stat", [path]:
            return f"os.lstat({lit(path)})"
        case "hold", [slot, path, how]:
            return f"fd{slot} = os.open({lit(path)}, {_HOLD_RENDER[how]} | os.O_NONBLOCK, 0o644)"
        case "fd_write", [slot, (char, n)]:
            return f"os.write(fd{slot}, b{char!r} * {n})"
        case "fd_pwrite", [slot, offset, (char, n)]:
            return f"os.pwrite(fd{slot}, b{char!r} * {n}, {offset})"
        case "fd_read", [slot, offset, length]:
            return f"os.pread(fd{slot}, {length}, {offset})"
        case "fd_fstat", [slot]:
            return f"os.fstat(fd{slot})"
        case "fd_truncate", [slot, size]:
            return f"os.ftruncate(fd{slot}, {size})"
        case "fd_fchmod", [slot, mode]:
            return f"os.fchmod(fd{slot}, 0o{mode:o})"
        case "fd_close", [slot]:
            return f"os.close(fd{slot})"
        case "dir_hold", [slot, path]:
            return f"fd{slot} = os.open({lit(path)}, os.O_RDONLY | os.O_DIRECTORY)"
        case "dir_read_some", [slot]:
            return f"getdents64(fd{slot}, {_SOME_DENTS})  # one call: a few entries"
        case "dir_rewind_list", [slot]:
            return f"os.lseek(fd{slot}, 0, 0); sorted(getdents64 of fd{slot} until empty)"
        case "deep_mkdirs", [top, depth]:
            return (f"os.chdir({lit(top)}); [(os.mkdir({lit(DEEP_SEGMENT)}), "
                    f"os.chdir({lit(DEEP_SEGMENT)})) for _ in range({depth})]  # EEXIST ignored")
        case "deep", [top, depth, leaf, action]:
            return f"{_deep_render(top, depth, leaf)}; {action}(p)  # len(p) = " \
                   f"{len(_deep_path(depth, leaf))}; then chdir back to the root"
        case "deep_here", [top, depth, action]:
            return (f"os.chdir({lit(top)}); [os.chdir({lit(DEEP_SEGMENT)}) for _ in "
                    f"range({depth})]; {action} on 'f' (-> 'g'); then chdir back to the root")
    return repr(op)
