"""The FUSE operations: thin async handlers over `layers` and `inodes`.

This is the one place where errors become errno values: every handler runs inside `_boundary`, which
turns an ``OSError`` from the layers into the same errno for the caller, and anything unexpected into
EIO with the cause in the log (an exception escaping a pyfuse3 handler would end the mount).

Where the work can be long (file data, whole directories) it runs in a worker thread under a
`trio.CapacityLimiter`, so one slow request never holds up the others; single lstats stay inline,
where they cost less than the hop to a thread.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from . import layers, whiteout
from .inodes import ROOT_INODE, InodeTable, Node
from .layers import LayerStack, Resolved

log = logging.getLogger(__name__)

#: How long the kernel may trust an entry or attributes without asking again. Lower layers never
#: change under a mount and the upper dir changes only through this daemon, so "a day" is safe.
CACHE_TIMEOUT = 86400.0

#: Worker threads for file data and directory listings: enough to keep a disk queue busy and let
#: several readers progress at once, few enough to bound memory (each holds at most one 128 KiB read).
IO_THREADS = 16

#: Open flags that would change a file. Until the write path exists they are refused with EROFS.
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _boundary(handler: F) -> F:
    """Log the request (at debug level) and map every error to the errno the caller will see."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: OverlayOperations, *args: Any) -> Any:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%s", name, _brief(args))
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError as exc:
            log.debug("%s -> %s", name, errno.errorcode.get(exc.errno, exc.errno))
            raise
        except OSError as exc:
            if exc.errno is None:
                log.error("%s%s failed without an errno: %r; answering EIO", name, _brief(args), exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
            log.debug("%s -> %s (%s)", name, errno.errorcode.get(exc.errno, exc.errno), exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("%s%s failed unexpectedly; answering EIO", name, _brief(args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _brief(args: Sequence[Any]) -> str:
    shown = [a for a in args if not isinstance(a, (pyfuse3.RequestContext, pyfuse3.ReaddirToken))]
    return "(" + ", ".join(repr(a) for a in shown) + ")"


@dataclass(slots=True)
class DirHandle:
    """An open directory: its listing, merged once at opendir, so offsets stay stable under changes."""

    node: Node
    entries: list[tuple[str, Resolved]]


def _fuse_error(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def _refuse_change(name: str) -> Any:
    """A handler for an operation that would change the merged view: EROFS until the write path."""

    async def refuse(self: OverlayOperations, *args: Any) -> Any:
        raise _fuse_error(errno.EROFS)

    refuse.__name__ = name
    return _boundary(refuse)


class OverlayOperations(pyfuse3.Operations):
    """The merged view of a `LayerStack` as FUSE operations."""

    def __init__(self, stack: LayerStack, *, read_only: bool) -> None:
        super().__init__()
        self.stack = stack
        self.read_only = read_only
        root = stack.resolve_root()
        self.inodes = InodeTable(root, [os.lstat(layer.root).st_dev for layer in stack.layers])
        self._dirs: dict[int, DirHandle] = {}
        self._next_dir_handle = 1
        self._io = trio.CapacityLimiter(IO_THREADS)

    # -- attributes -------------------------------------------------------------------------------

    def _attributes(self, ino: int, resolved: Resolved, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.generation = 0
        attrs.entry_timeout = CACHE_TIMEOUT
        attrs.attr_timeout = CACHE_TIMEOUT
        attrs.st_mode = st.st_mode
        # Like the kernel: a merged directory's link count cannot be known cheaply, and 1 tells
        # find(1) and friends not to rely on it.
        attrs.st_nlink = 1 if resolved.is_merged else st.st_nlink
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = st.st_rdev
        attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    def _fresh_attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        return self._attributes(node.ino, node.resolved, os.lstat(node.resolved.path))

    def _child_path(self, parent: Node, name: str) -> str:
        return f"{parent.path}/{name}" if parent.path else name

    def _dir_node(self, ino: int) -> Node:
        node = self.inodes.get(ino)
        if not node.resolved.is_dir:
            raise _fuse_error(errno.ENOTDIR)
        return node

    # -- lookup and attributes --------------------------------------------------------------------

    @_boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir_node(parent_inode)
        if name == b".":
            node = self.inodes.remember(parent.path, parent.resolved, parent.parent)
            return self._fresh_attributes(node)
        if name == b"..":
            grandparent = self.inodes.get(parent.parent)
            node = self.inodes.remember(grandparent.path, grandparent.resolved, grandparent.parent)
            return self._fresh_attributes(node)
        child = os.fsdecode(name)
        resolved = layers.lookup(parent.resolved.branches, child)
        if resolved is None:
            raise _fuse_error(errno.ENOENT)
        node = self.inodes.remember(self._child_path(parent, child), resolved, parent.ino)
        return self._attributes(node.ino, resolved, resolved.stat)

    @_boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._fresh_attributes(self.inodes.get(inode))

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self.inodes.get(inode).resolved.path))

    @_boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        st = os.lstat(self.inodes.get(inode).resolved.path)
        if mode & os.W_OK and self.read_only:
            raise _fuse_error(errno.EROFS)
        return _permitted(st, mode, ctx)

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # Like the kernel: the space is the top layer's (where new data would go).
        real = os.statvfs(self.stack.layers[0].root)
        data = pyfuse3.StatvfsData()
        for field_name in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
            "f_files", "f_ffree", "f_favail", "f_namemax",
        ):  # fmt: skip
            setattr(data, field_name, getattr(real, field_name))
        return data

    # -- xattrs -----------------------------------------------------------------------------------

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        attr = os.fsdecode(name)
        if whiteout.is_private_xattr(attr):
            raise _fuse_error(pyfuse3.ENOATTR)
        return os.getxattr(self.inodes.get(inode).resolved.path, attr, follow_symlinks=False)

    @_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = os.listxattr(self.inodes.get(inode).resolved.path, follow_symlinks=False)
        return [os.fsencode(n) for n in names if not whiteout.is_private_xattr(n)]

    # -- file data --------------------------------------------------------------------------------

    @_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise _fuse_error(errno.EROFS)
        node = self.inodes.get(inode)
        # O_NOATIME: like the kernel, reading through the overlay does not touch lower atimes.
        real_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        if not node.resolved.layer.writable:
            real_flags |= os.O_NOATIME
        fd = await trio.to_thread.run_sync(_open_real, node.resolved.path, real_flags, limiter=self._io)
        # The data cannot change behind the kernel's back: keep its page cache across opens.
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, fh, size, off, limiter=self._io)

    @_boundary
    async def flush(self, fh: int) -> None:
        return None

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    @_boundary
    async def release(self, fh: int) -> None:
        os.close(fh)

    # -- directories ------------------------------------------------------------------------------

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._dir_node(inode)
        entries = await trio.to_thread.run_sync(
            layers.list_dir, node.resolved.branches, limiter=self._io
        )
        handle = self._next_dir_handle
        self._next_dir_handle += 1
        self._dirs[handle] = DirHandle(node, entries)
        return handle

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        node = handle.node
        # Offsets: 0 and 1 are "." and "..", then entries[i] has offset i + 2. The listing is a
        # snapshot taken at opendir, so an offset always means the same entry.
        if start_id == 0:
            if not pyfuse3.readdir_reply(token, b".", self._fresh_attributes(node), 1):
                return
            start_id = 1
        if start_id == 1:
            parent = self.inodes.get(node.parent) if node.parent in self.inodes else node
            if not pyfuse3.readdir_reply(token, b"..", self._fresh_attributes(parent), 2):
                return
            start_id = 2
        for index in range(start_id - 2, len(handle.entries)):
            name, resolved = handle.entries[index]
            path = self._child_path(node, name)
            ino = self.inodes.number_for(path, resolved)
            attrs = self._attributes(ino, resolved, resolved.stat)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 3):
                return
            # An accepted readdirplus entry counts as a lookup ("." and ".." do not).
            self.inodes.remember(path, resolved, node.ino)

    @_boundary
    async def releasedir(self, fh: int) -> None:
        del self._dirs[fh]

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # -- changes: refused until the write path lands ----------------------------------------------

    setattr = _refuse_change("setattr")
    mknod = _refuse_change("mknod")
    mkdir = _refuse_change("mkdir")
    unlink = _refuse_change("unlink")
    rmdir = _refuse_change("rmdir")
    symlink = _refuse_change("symlink")
    rename = _refuse_change("rename")
    link = _refuse_change("link")
    create = _refuse_change("create")
    write = _refuse_change("write")
    setxattr = _refuse_change("setxattr")
    removexattr = _refuse_change("removexattr")

def _open_real(path: str, flags: int) -> int:
    try:
        return os.open(path, flags)
    except PermissionError:
        if not flags & os.O_NOATIME:
            raise
        # O_NOATIME needs file ownership or CAP_FOWNER: without it, open normally.
        return os.open(path, flags & ~os.O_NOATIME)


def _permitted(st: os.stat_result, mode: int, ctx: pyfuse3.RequestContext) -> bool:
    """access(2) rules: root passes everything but X_OK on a file nobody may execute."""
    if mode == os.F_OK:
        return True
    if ctx.uid == 0:
        if mode & os.X_OK and not stat.S_ISDIR(st.st_mode):
            return bool(st.st_mode & 0o111)
        return True
    if ctx.uid == st.st_uid:
        granted = (st.st_mode >> 6) & 0o7
    elif st.st_gid == ctx.gid or st.st_gid in pyfuse3.get_sup_groups(ctx.pid):
        granted = (st.st_mode >> 3) & 0o7
    else:
        granted = st.st_mode & 0o7
    return mode & granted == mode


__all__ = ["OverlayOperations", "ROOT_INODE", "CACHE_TIMEOUT"]
