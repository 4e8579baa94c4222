"""What each operation does on a mount (run inside a `Worker`), and the same as Python to print.

`run_op` applies one operation under a mount's root and returns its outcome: the return value,
or the errno name.  `render` writes the operation as a line of Python to run with the mount's
root as working directory, for a report.  Adding an operation means a generator in `ops`, a case
here in `_apply` and one in `render`.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
from typing import Any

from tests.compare import kind_of
from tests.differential.differences import comparable_mtime
from tests.differential.ops import MiB, Op, Outcome

# --- operations (run inside a Worker) ---------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


def _bytes(spec: tuple[str, int]) -> bytes:
    char, length = spec
    return char.encode() * length


def _write_with(path: str, flags: int, data: bytes, offset: int | None = None) -> int:
    # O_NONBLOCK: opening the fifo must fail (ENXIO) or succeed at once, never wait for a peer.
    fd = os.open(path, flags | os.O_NONBLOCK, 0o644)
    try:
        written = 0
        while written < len(data):
            chunk = data[written:]
            n = os.write(fd, chunk) if offset is None else os.pwrite(fd, chunk, offset + written)
            written += n
        return written
    finally:
        os.close(fd)


def _digest(data: bytes) -> tuple[int, str]:
    return (len(data), hashlib.sha256(data).hexdigest()[:16])


def _describe(st: os.stat_result) -> tuple[Any, ...]:
    kind = kind_of(st.st_mode)
    is_dir = kind == "dir"
    return (kind, f"{st.st_mode:o}", st.st_uid, st.st_gid, None if is_dir else st.st_nlink,
            None if is_dir else st.st_size, comparable_mtime(st.st_mtime_ns, is_dir))


def _visible_names(path: str) -> tuple[list[str], list[str]]:
    """(names lstat finds, names lstat says ENOENT): the kernel lists whiteouts in pure dirs."""
    visible, vanished = [], []
    for name in sorted(os.listdir(path)):
        try:
            os.lstat(os.path.join(path, name))
            visible.append(name)
        except FileNotFoundError:
            vanished.append(name)
    return visible, vanished


def _rmtree(path: str) -> int:
    """Remove a tree bottom-up in name order, like `rm -r`; the count of names removed."""
    removed = 0
    if stat.S_ISDIR(os.lstat(path).st_mode):
        for name in sorted(os.listdir(path)):
            child = os.path.join(path, name)
            try:
                removed += _rmtree(child)
            except FileNotFoundError:  # a whiteout the kernel lists in a pure directory
                if os.path.lexists(child):
                    raise
        os.rmdir(path)
    else:
        os.unlink(path)
    return removed + 1


def _apply(mnt: str, op: Op) -> Any:
    name, *args = op
    p = lambda rel: os.path.join(mnt, rel)  # noqa: E731 - local shorthand
    match name, args:
        case "create_excl", [path, data]:
            return _write_with(p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, _bytes(data))
        case "write_trunc", [path, data]:
            return _write_with(p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _bytes(data))
        case "append", [path, data]:
            return _write_with(p(path), os.O_WRONLY | os.O_APPEND, _bytes(data))
        case "pwrite", [path, offset, data]:
            return _write_with(p(path), os.O_WRONLY, _bytes(data), offset)
        case "truncate", [path, size]:
            os.truncate(p(path), size)
        case "read", [path]:
            fd = os.open(p(path), os.O_RDONLY | os.O_NONBLOCK)
            try:
                chunks = []
                while chunk := os.read(fd, MiB):
                    chunks.append(chunk)
                return _digest(b"".join(chunks))
            finally:
                os.close(fd)
        case "chmod", [path, mode]:
            os.chmod(p(path), mode)
        case "chown", [path]:
            os.chown(p(path), 1000, 1000, follow_symlinks=False)
        case "utime", [path, ns]:
            os.utime(p(path), ns=(ns, ns), follow_symlinks=False)
        case "setxattr", [path, key, value]:
            os.setxattr(p(path), key, value, follow_symlinks=False)
        case "removexattr", [path, key]:
            os.removexattr(p(path), key, follow_symlinks=False)
        case "mkdir", [path]:
            os.mkdir(p(path), 0o755)
        case "mkfifo", [path]:
            os.mkfifo(p(path), 0o644)
        case "symlink", [target, path]:
            os.symlink(target, p(path))
        case "link", [src, dst]:
            os.link(p(src), p(dst), follow_symlinks=False)
        case "unlink", [path]:
            os.unlink(p(path))
        case "rmdir", [path]:
            os.rmdir(p(path))
        case "rmtree", [path]:
            return _rmtree(p(path))
        case "rename", [src, dst]:
            os.rename(p(src), p(dst))
        case "rename_noreplace", [src, dst]:
            renameat2(p(src), p(dst), RENAME_NOREPLACE)
        case "rename_exchange", [src, dst]:
            renameat2(p(src), p(dst), RENAME_EXCHANGE)
        case "listdir", [path]:
            return _visible_names(p(path))
        case "stat", [path]:
            return _describe(os.lstat(p(path)))
        case _:
            raise ValueError(f"unknown operation {op!r}")
    return None


def run_op(mnt: str, op: Op) -> Outcome:
    try:
        return ("ok", _apply(mnt, op))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))
    except Exception as exc:  # noqa: BLE001 - a harness bug shows up as a mismatch, not a crash
        return ("exc", repr(exc))


# --- rendering --------------------------------------------------------------------------

_FLAGS = {"create_excl": "os.O_WRONLY | os.O_CREAT | os.O_EXCL",
          "write_trunc": "os.O_WRONLY | os.O_CREAT | os.O_TRUNC",
          "append": "os.O_WRONLY | os.O_APPEND", "pwrite": "os.O_WRONLY"}


def render(op: Op) -> str:
    """One operation as Python to run with the mount's root as working directory."""
    name, *args = op
    match name, args:
        case ("create_excl" | "write_trunc" | "append"), [path, (char, n)]:
            return (f"fd = os.open({path!r}, {_FLAGS[name]} | os.O_NONBLOCK, 0o644); "
                    f"os.write(fd, b{char!r} * {n}); os.close(fd)")
        case "pwrite", [path, offset, (char, n)]:
            return (f"fd = os.open({path!r}, os.O_WRONLY | os.O_NONBLOCK); "
                    f"os.pwrite(fd, b{char!r} * {n}, {offset}); os.close(fd)")
        case "truncate", [path, size]:
            return f"os.truncate({path!r}, {size})"
        case "read", [path]:
            return f"open({path!r}, 'rb').read()"
        case "chmod", [path, mode]:
            return f"os.chmod({path!r}, 0o{mode:o})"
        case "chown", [path]:
            return f"os.chown({path!r}, 1000, 1000, follow_symlinks=False)"
        case "utime", [path, ns]:
            return f"os.utime({path!r}, ns=({ns}, {ns}), follow_symlinks=False)"
        case "setxattr", [path, key, value]:
            return f"os.setxattr({path!r}, {key!r}, {value!r}, follow_symlinks=False)"
        case "removexattr", [path, key]:
            return f"os.removexattr({path!r}, {key!r}, follow_symlinks=False)"
        case "mkdir", [path]:
            return f"os.mkdir({path!r}, 0o755)"
        case "mkfifo", [path]:
            return f"os.mkfifo({path!r}, 0o644)"
        case "symlink", [target, path]:
            return f"os.symlink({target!r}, {path!r})"
        case "link", [src, dst]:
            return f"os.link({src!r}, {dst!r}, follow_symlinks=False)"
        case ("unlink" | "rmdir"), [path]:
            return f"os.{name}({path!r})"
        case "rmtree", [path]:
            return f"shutil.rmtree({path!r})  # children in name order"
        case "rename", [src, dst]:
            return f"os.rename({src!r}, {dst!r})"
        case ("rename_noreplace" | "rename_exchange"), [src, dst]:
            return f"{name}({src!r}, {dst!r})  # renameat2"
        case "listdir", [path]:
            return f"sorted(os.listdir({path!r}))"
        case "stat", [path]:
            return f"os.lstat({path!r})"
    return repr(op)
