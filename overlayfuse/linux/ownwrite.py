"""Changes an owner makes to its own object when the object's mode does not let it write.

Two kernel rules ask for write permission on the object itself, which its owner alone does not
have when the mode lacks the owner's write bit: setting a ``user.*`` xattr, and moving a directory
to another parent (its ``..`` changes). A daemon run by an unprivileged user meets both as the
owner of copies of read-only lower files and directories (0444, 0555): its markers are
``user.overlay.*`` xattrs, and a copied-up directory moves from the workdir into upper. Root, and
rootless podman's mount program (root in the user's namespace), pass both checks by capability and
never come here. The owner's write bit is set for the one call, and the mode put back after it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def setxattr(target: int | str, name: str, value: bytes, flags: int = 0, *, follow_symlinks: bool) -> None:
    """``os.setxattr(TARGET, NAME, VALUE, FLAGS)``, as the owner even of a read-only TARGET (an fd,
    FOLLOW_SYMLINKS true, or a path whose last component is never followed)."""
    retry(lambda: os.setxattr(target, name, value, flags, follow_symlinks=follow_symlinks), target, follow_symlinks)


def retry(call: Callable[[], T], target: int | str, follow_symlinks: bool, moved_to: str | None = None) -> T:
    """CALL(); if the kernel refuses it (EACCES) and TARGET is the caller's own object whose mode
    lacks the owner's write bit (not a symlink), CALL() again with that bit set, then the mode put
    back, at MOVED_TO where CALL moves the object there (a rename), else at TARGET."""
    try:
        return call()
    except PermissionError as exc:
        if exc.errno != errno.EACCES:
            raise
        st = os.stat(target, follow_symlinks=follow_symlinks)
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & stat.S_IWUSR:
            raise
    mode = stat.S_IMODE(st.st_mode)
    os.chmod(target, mode | stat.S_IWUSR, follow_symlinks=follow_symlinks)
    try:
        result = call()
    except BaseException:
        os.chmod(target, mode, follow_symlinks=follow_symlinks)
        raise
    os.chmod(moved_to or target, mode, follow_symlinks=follow_symlinks)
    return result
