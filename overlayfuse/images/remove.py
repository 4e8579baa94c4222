"""Removing a directory tree of any depth or width, iteratively, without following a symlink.

`shutil.rmtree` recurses once per level (a layer 10,000 directories deep raises RecursionError half
way, leaving a tree that every later cleanup trips over again) and keeps one fd per level open. Here
the walk holds two fds at most: it goes down by name with ``O_NOFOLLOW`` and back up through
``..``, checking that ``..`` is the directory it came from (same device and inode), so a tree moved
under its feet stops the removal instead of sending it elsewhere. Each directory is listed once:
its non-directories are unlinked at once and its subdirectories queued, so time is linear in the
number of entries and memory in the number of directories still pending.

Modes are no obstacle: a directory we may not list or write is given 0700 first (its owner, or
root, may always do that). An entry whose inode carries the immutable or append-only flag (which
stop even root) has those flags cleared when we may.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: ioctls and flags of <linux/fs.h>: the inode flags that make an entry unremovable even by root.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x10
_FS_APPEND_FL = 0x20


@dataclass(slots=True)
class _Level:
    """One directory on the way down: its name in its parent, its identity, and the
    subdirectories it still holds (listed once, when the walk first entered it)."""

    name: str
    dev: int
    ino: int
    pending: list[str] = field(default_factory=list)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove PATH and, if it is a directory, everything under it; a missing PATH is fine.
    PATH itself is never followed if it is a symlink (the link goes, not its target)."""
    path = Path(path)
    parent = os.open(path.parent, _DIR_FLAGS)
    try:
        remove_at(parent, path.name)
    finally:
        os.close(parent)


def remove_at(dir_fd: int, name: str) -> None:
    """Remove NAME in the directory DIR_FD, a whole tree if it is one; a missing NAME is fine."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(dir_fd, name)
        return
    _remove_dir_tree(dir_fd, name)


def _remove_dir_tree(top_fd: int, top_name: str) -> None:
    fd = _enter(top_fd, top_name)
    stack = [_enter_level(fd, top_name)]
    try:
        while stack:
            level = stack[-1]
            if level.pending:
                name = level.pending.pop()
                child = _enter(fd, name)
                os.close(fd)
                fd = child
                stack.append(_enter_level(fd, name))
                continue
            stack.pop()
            if stack:
                parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = parent
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (stack[-1].dev, stack[-1].ino):
                    raise OSError(errno.ESTALE, f"{stack[-1].name!r} was moved while being removed")
                _rmdir(fd, level.name)
            else:
                os.close(fd)
                fd = -1
                _rmdir(top_fd, top_name)
    finally:
        if fd >= 0:
            os.close(fd)


def _enter(parent_fd: int, name: str) -> int:
    """An fd of the directory NAME, made listable and writable (0700) if it was not."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        # Not listable by us (mode 0, say): we may chmod what we own. lstat first, as chmod
        # follows symlinks: only a directory is changed.
        if not stat.S_ISDIR(os.lstat(name, dir_fd=parent_fd).st_mode):
            raise
        os.chmod(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _enter_level(fd: int, name: str) -> _Level:
    """List FD once: unlink its non-directories, return its subdirectories as pending."""
    st = os.fstat(fd)
    level = _Level(name, st.st_dev, st.st_ino)
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                level.pending.append(entry.name)
            else:
                _unlink(fd, entry.name)
    return level


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        if not _unflag(dir_fd, name):
            raise
        os.unlink(name, dir_fd=dir_fd)


def _rmdir(dir_fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        if not _unflag(dir_fd, name):
            raise
        os.rmdir(name, dir_fd=dir_fd)


def _unflag(dir_fd: int, name: str) -> bool:
    """Clear the immutable and append-only flags of the directory DIR_FD and of NAME in it (if
    a regular file or a directory: anything else is never opened, a device or a fifo could block
    or act on open); True if any were cleared, so the removal is worth a retry."""
    cleared = _clear_flags(dir_fd)
    try:
        st = os.lstat(name, dir_fd=dir_fd)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return cleared
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return cleared
    try:
        return _clear_flags(fd) or cleared
    finally:
        os.close(fd)


def _clear_flags(fd: int) -> bool:
    try:
        current = struct.unpack("l", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        if not current & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
            return False
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("l", current & ~(_FS_IMMUTABLE_FL | _FS_APPEND_FL)))
    except OSError:
        return False
    log.debug("cleared the immutable/append-only flags of fd %d to remove what it holds", fd)
    return True
