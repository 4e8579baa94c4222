"""Entering another process's namespaces and root by descriptor: setns(2) and an fchroot.

The fork server (`overlayfuse.daemon.forkserver`) forks a daemon for a caller that may live in
another user namespace (rootless podman runs its mount program inside its own) and another mount
namespace; the caller sends descriptors of ``/proc/self/ns/user``, ``/proc/self/ns/mnt`` and of its
root and working directory, and the child enters them here. Python 3.11's os module has no
``setns`` (3.12 adds it), so it is bound with ctypes like the calls in `syscalls`.
"""

from __future__ import annotations

import ctypes
import logging
import os

from .syscalls import LIBC

log = logging.getLogger(__name__)

#: include/uapi/linux/sched.h
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

_setns = getattr(LIBC, "setns", None)
if _setns is not None:
    _setns.argtypes = (ctypes.c_int, ctypes.c_int)
    _setns.restype = ctypes.c_int


def setns(fd: int, nstype: int, what: str) -> None:
    """setns(2) into the namespace FD refers to (NSTYPE checks its kind); WHAT names it in errors."""
    if _setns is None:
        raise OSError(38, "setns is not available in this libc", what)
    if _setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), what)


def same_object(fd: int, path: str) -> bool:
    """Whether FD and PATH (followed: /proc/self/ns/* are magic links) are one object: for a
    namespace, whether the caller's is the one we are in already."""
    a, b = os.fstat(fd), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def enter_namespaces(userns_fd: int, mntns_fd: int) -> None:
    """Enter the user namespace, then the mount namespace, that the descriptors name, each only
    where it is not ours already. User namespace first: the mount namespace is owned by it, and
    only inside it do we hold CAP_SYS_ADMIN over that mount namespace (a user may enter a user
    namespace it owns; a process must be single-threaded to do so)."""
    if not same_object(userns_fd, "/proc/self/ns/user"):
        setns(userns_fd, CLONE_NEWUSER, "the caller's user namespace")
    if not same_object(mntns_fd, "/proc/self/ns/mnt"):
        setns(mntns_fd, CLONE_NEWNS, "the caller's mount namespace")


def enter_root_and_cwd(root_fd: int, cwd_fd: int) -> None:
    """Make ROOT_FD's directory our root (where it is not already) and CWD_FD's our working
    directory. setns into a mount namespace resets both to that namespace's root, and the caller
    may be chrooted anyway: paths in its command line mean what they mean for it."""
    if not same_object(root_fd, "/"):
        os.fchdir(root_fd)
        os.chroot(".")
    os.fchdir(cwd_fd)


def in_initial_user_namespace() -> bool:
    """Whether this process is in the machine's first user namespace, where root's capabilities are
    real (the kernel asks CAP_SYS_ADMIN there for some calls, FUSE passthrough's backing files among
    them). Its uid map maps all 2^32 ids onto themselves; no other user namespace's can."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as uid_map:
            return uid_map.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False
