"""The FUSE operations: thin async handlers over `merged.MergedTree`.

This is the one place where errors become errno values: every handler runs inside `_boundary`, which
turns an ``OSError`` from the layers into the same errno for the caller, and anything unexpected into
EIO with the cause in the log (an exception escaping a pyfuse3 handler would end the mount).

Handlers decode names, build attributes and keep open-file state; what the merged view means, and
how it changes, is `merged`'s business.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3

from ..linux import fileattr, nowait, syscalls
from ..linux.peers import Peer
from ..overlay import whiteout
from ..overlay.inodes import Node, UnknownInode, identity
from ..overlay.layers import Fd, Resolved
from ..overlay.merged import KEPT_LISTINGS, Caller, MergedTree
from ..overlay.metachange import MetadataChange
from ..overlay.ownership import DiskOwner
from . import binding, killpriv, passthrough
from .compat import ViewOptions
from .control import FreezeGate
from .handles import HandleTable, UnknownHandle
from .owners import ACL_XATTRS, Ownership
from .pagecache import LowerDataStore
from .passthrough import BACKING_STACK_DEPTH, BackingFiles

log = logging.getLogger(__name__)

#: How long the kernel may trust an entry or attributes without asking again. Lower layers never
#: change under a mount and the upper dir changes only through this daemon, which the kernel sees
#: happen, so "a day" is safe.
CACHE_TIMEOUT = 86400.0

#: Flags that make no sense on the real file: the kernel already created it (O_CREAT/O_EXCL), and
#: O_DIRECT would need aligned buffers that Python bytes are not.
_STRIP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT

#: The first readdir offset of a name: 1 and 2 are the offsets after "." and "..".
FIRST_COOKIE = 3

#: getxattr answers "no such attribute" remembered (see `OverlayOperations._remember_absent`);
#: all are dropped when there are more, so memory stays bounded (about 200 bytes each).
ABSENT_XATTRS = 4096
#: The errno of "no such attribute" (ENODATA on Linux), looked up once: getxattr answers it most.
ENOATTR = pyfuse3.ENOATTR

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_FD = TypeVar("_FD", bound="int | None")  # os.open gives an fd; nowait.open_cached may give None


def _boundary(handler: F) -> F:
    """Log the request (at debug level) and map every error to the errno the caller will see."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: OverlayOperations, *args: Any) -> Any:
        # Asked once per request, and nothing formatted unless it is shown: an answered error
        # (ENOENT, ENODATA) is the common case on hot paths, not an exceptional one.
        debug = log.isEnabledFor(logging.DEBUG)
        if self.workers.stats is not None:  # OVERLAYFUSE_HOP_STATS: hops counted per request type
            self.workers.stats.request(name)
        if debug:
            log.debug("%s%s", name, _brief(args))
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError as exc:
            if debug:
                log.debug("%s -> %s", name, errno.errorcode.get(exc.errno, exc.errno))
            raise
        except OSError as exc:
            if exc.errno is None:
                log.error("%s%s failed without an errno: %r; answering EIO", name, _brief(args), exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
            if exc.errno == errno.EIO:
                log.error("%s%s: EIO from the layers: %s", name, _brief(args), exc)
            elif debug:
                log.debug("%s -> %s (%s)", name, errno.errorcode.get(exc.errno, exc.errno), exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except (UnknownInode, UnknownHandle) as exc:  # a number the kernel should not have used
            log.error("%s%s: unknown %s; answering ESTALE", name, _brief(args), exc)
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        except Exception:
            log.exception("%s%s failed unexpectedly; answering EIO", name, _brief(args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _change(handler: F) -> F:
    """A request that changes the upper dir: it runs inside `OverlayOperations._changing` (the
    freeze gate, so a frozen mount holds it back until the thaw and a freeze waits for it, and the
    kernel's listings dropped when the change shows under other names)."""

    @functools.wraps(handler)
    async def wrapper(self: OverlayOperations, *args: Any) -> Any:
        async with self._changing():
            return await handler(self, *args)

    return wrapper  # type: ignore[return-value]


def _brief(args: Sequence[Any]) -> str:
    shown = [
        a if not isinstance(a, bytes) or len(a) <= 64 else f"<{len(a)} bytes>"
        for a in args
        if not isinstance(a, (pyfuse3.RequestContext, pyfuse3.ReaddirToken, pyfuse3.SetattrFields))
    ]
    return "(" + ", ".join(repr(a) for a in shown) + ")"


def _fuse_error(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@dataclass(slots=True)
class DirHandle:
    """An open directory. Each readdir answers from the directory's listing as it is *then*, so a
    name deleted before the reply is never sent, and never with another object's inode."""

    node: Node


@dataclass(slots=True)
class Cookies:
    """A directory's readdir offsets: each name gets one the first time it is listed and keeps it
    while the directory is known to the kernel, so an offset means the same place across changes
    (a deleted name's offset is simply skipped; a new name comes after every old one)."""

    by_name: dict[str, int]
    next: int = FIRST_COOKIE

    @classmethod
    def numbering(cls, names: Sequence[str]) -> Cookies:
        """A directory's first listing (every name new): NAMES numbered in their order, so they are
        in cookie order already (most directories of a walk are listed once)."""
        values = _shared_cookies(FIRST_COOKIE, len(names))
        return cls(dict(zip(names, values, strict=True)), FIRST_COOKIE + len(names))

    def of(self, name: str) -> int:
        cookie = self.by_name.get(name)
        if cookie is None:
            cookie = self.by_name[name] = _shared_cookie(self.next)
            self.next += 1
        return cookie


def _shared_cookie(value: int) -> int:
    """VALUE as one int object for every directory: each directory numbers its names 3, 4, 5...
    and an int above 256 is otherwise an object of its own (28 bytes, one per name listed)."""
    values = _COOKIE_VALUES
    if value < len(values):
        return values[value]
    while len(values) <= value and len(values) < SHARED_COOKIES:
        values.append(len(values))
    return values[value] if value < len(values) else value


def _shared_cookies(start: int, count: int) -> list[int]:
    """`_shared_cookie` of START, START + 1, ... (COUNT of them), made in one go."""
    values = _COOKIE_VALUES
    end = start + count
    if len(values) < min(end, SHARED_COOKIES):
        values.extend(range(len(values), min(end, SHARED_COOKIES)))
    shared = values[start:end]
    return shared + list(range(start + len(shared), end))


#: Cookie values shared across directories (`_shared_cookie`), made as the largest listing needs
#: them: at most SHARED_COOKIES of them (about 2 MiB), past which a huge directory's are its own.
SHARED_COOKIES = 1 << 16
_COOKIE_VALUES: list[int] = []


@dataclass(slots=True)
class ListingReplies:
    """The readdirplus answers for one merged listing, in offset order, built the first time each
    entry is sent.

    A lower entry's answer never changes while its listing stands (a copy-up, whiteout or rename
    in the directory replaces the listing), so a warm walk replays it instead of rebuilding it.
    Upper entries are answered afresh each time: their attributes change.
    """

    entries: list[tuple[str, Resolved]]
    """The listing, sorted by cookie."""
    cookies: list[int]
    lower: list[tuple[bytes, pyfuse3.EntryAttributes, int] | None]
    """A lower entry's reply once built: its name, its attributes and its inode number (the int
    `number_for` gave, kept as that object: the node the kernel's acceptance makes holds it, where
    reading ``st_ino`` back from the attributes would make another int per node)."""
    source: list[tuple[str, Resolved]]
    """The listing object these replies were built from (replaced when the directory changes)."""


@dataclass(slots=True)
class FileHandle:
    """An open file: the real fd, and which real file it is (a read-only fd follows a copy-up)."""

    node: Node
    fd: int
    resolved: Resolved
    writable: bool
    dev: int  # the real file's st_dev, for `nowait.read_cached`
    passed_through: bool = False  # the kernel reads and writes it itself (see `passthrough`)
    opener: Peer | None = None  # who writes through it, for set-id bits (see `killpriv`)


class OverlayOperations(pyfuse3.Operations):
    """The merged view of a `MergedTree` as FUSE operations."""

    def __init__(
        self,
        tree: MergedTree,
        *,
        read_only: bool,
        view: ViewOptions | None = None,
        owners: Ownership | None = None,
        acl: bool = False,
        passthrough: bool = False,
        killpriv_v2: bool = False,
    ) -> None:
        super().__init__()
        self.tree = tree
        self.workers = tree.workers  # one pool, so one limit bounds the handlers' and the tree's hops
        self.view = view or ViewOptions()  # fuse-overlayfs's options (see `compat`)
        # POSIX ACLs as the kernel's overlay has them: the kernel checks them (with
        # default_permissions, which ACL support needs) and caches each inode's ACLs, negative
        # answers included, so `ls -l` asks for system.posix_acl_access once per inode, not per run.
        # Not with ``noacl``/``noxattrs`` (as fuse-overlayfs): an ACL read the kernel makes for a
        # permission check would get EOPNOTSUPP, and the check would fail with it.
        self.enable_acl = acl and self.view.acl and self.view.xattrs
        self.owners = owners if owners is not None and owners.active else None
        self._timeout = CACHE_TIMEOUT if self.view.timeout is None else self.view.timeout
        self.gate = FreezeGate()  # the daemon's control socket freezes it
        self.read_only = read_only
        self._dirs: HandleTable[DirHandle] = HandleTable("directory handle")
        self._replies: dict[int, ListingReplies] = {}  # by directory inode, dropped on its forget
        self._cookies: dict[int, Cookies] = {}  # by directory inode, dropped on its forget
        self._files: HandleTable[FileHandle] = HandleTable("file handle")
        self.lower_data = LowerDataStore()  # small lower files' data handed to the kernel at open
        self._absent: dict[tuple[int, bytes], os.stat_result] = {}  # see `_remember_absent`
        self._next_handle = 1
        self.binding = binding.detect()
        log.debug("pyfuse3 extras in use: %s", self.binding.describe())
        # Symlinks never change (a new target is a new symlink, with an inode of its own), so the
        # kernel may keep their targets; pyfuse3 reads this at init where the binding offers it.
        self.enable_symlink_cache = self.binding.symlink_cache
        # The mode of create, mkdir and mknod as asked, umask not applied: `_caller` applies it, or
        # the directory's default ACL in its place, as the kernel does (pyfuse3 patch 0012).
        self.enable_dont_mask = self.binding.dont_mask
        # FUSE passthrough for files whose data is in the upper dir (see `passthrough`): asked for
        # at init where the binding has it and the caller allows it (`passthrough.wanted`).
        self.enable_passthrough = passthrough and self.binding.passthrough
        self.passthrough_stack_depth = BACKING_STACK_DEPTH
        self.backing = BackingFiles()
        # Killpriv v2 (see `killpriv`): set-id bits and file capabilities cleared here, not by the
        # kernel, which then stops asking for security.capability before writes.
        self.enable_killpriv_v2 = killpriv_v2 and self.binding.killpriv_v2
        self.killpriv = False

    def init(self) -> None:
        """After the kernel's INIT: whether it agreed to passthrough."""
        self.backing.active = self.enable_passthrough and passthrough.active()
        if self.enable_passthrough:
            log.debug("FUSE passthrough: %s", "on" if self.backing.active else "not offered by the kernel")
        self.killpriv = self.enable_killpriv_v2 and killpriv.active()
        if self.enable_killpriv_v2:
            log.debug("killpriv v2: %s", "on" if self.killpriv else "not offered by the kernel")

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _check_writable(self) -> None:
        if self.read_only:
            raise _fuse_error(errno.EROFS)

    # -- attributes -------------------------------------------------------------------------------

    def _attributes(
        self, ino: int, resolved: Resolved, st: os.stat_result, node: Node | None = None
    ) -> pyfuse3.EntryAttributes:
        """The attributes the kernel is given for RESOLVED's object (lstat ST). NODE: its node,
        whose descriptor holds the object once its name went (its link count and override xattrs
        are then read through it, `_xattr_target`); else RESOLVED's name is the object's."""
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.generation = 0
        attrs.entry_timeout = self._timeout
        attrs.attr_timeout = self._timeout
        attrs.st_mode = st.st_mode
        attrs.st_nlink = self.tree.link_count(resolved, st, node.detached if node is not None else None)
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = st.st_rdev
        attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks if resolved.data is None else resolved.data.stat.st_blocks  # metacopy
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        if self.owners is not None:  # ID mapping, squash, override xattrs, static nlink
            path, follow = _xattr_target(node) if node is not None else (resolved.path, False)
            self.owners.present(attrs, st, resolved.layer.root, path, follow)
        return attrs

    def _caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        """The owner a caller's new object gets on disk, and its umask: the kernel passes the mode
        as the caller asked for it (`enable_dont_mask`), and a directory's default ACL, where it has
        one, takes the umask's place (`overlay.acl`). Without that capability the kernel applied
        the umask already, and applying it again changes nothing."""
        uid, gid = (ctx.uid, ctx.gid) if self.owners is None else self.owners.caller_on_disk(ctx.uid, ctx.gid)
        return Caller(uid, gid, ctx.umask, self.enable_acl)

    def _check_xattr(self, attr: str) -> None:
        """``noxattrs``: no xattrs at all (ENOSYS: the kernel stops asking); ``noacl``: no ACLs."""
        if not self.view.xattrs:
            raise _fuse_error(errno.ENOSYS)
        if not self.view.acl and attr in ACL_XATTRS:
            raise _fuse_error(errno.EOPNOTSUPP)

    async def _node_attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        st = await self._current_stat(node)
        return self._attributes(node.ino, node.resolved, st, node)

    async def _current_stat(self, node: Node) -> os.stat_result:
        """NODE's object's lstat; if a change is moving it right now, after that change."""
        st = self.tree.current_stat(node)
        if st is None:
            await self.tree.settled()
            st = self.tree.current_stat(node)
            if st is None:
                raise _fuse_error(errno.ENOENT)
        return st

    # -- lookup and attributes --------------------------------------------------------------------

    @_boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            node = self.tree.lookup(parent_inode, os.fsdecode(name))
        except FileNotFoundError:
            missing = _missing_entry()
            missing.entry_timeout = self._timeout
            return missing
        return self._attributes(node.ino, node.resolved, node.resolved.stat)

    @_boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            if self.tree.forget(ino, count):
                self._replies.pop(ino, None)
                self._cookies.pop(ino, None)
                self.lower_data.forget(ino)

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._node_attributes(self.tree.node(inode))

    @_boundary
    @_change
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:  # fmt: skip
        self._check_writable()
        node = self.tree.node(inode)
        if self.killpriv and _changes_nothing(fields) and node.resolved.layer.writable:
            # Under killpriv v2 the kernel's own clearing before a passed-through write by a caller
            # without CAP_FSETID (file_remove_privs, fs/fuse/dir.c's fuse_setattr) arrives as a
            # SETATTR that changes nothing: the bits go here, by that caller's rights.
            await self.tree.on_object(node, _clearing_set_id(ctx))
        if fields.update_size:
            # With killpriv v2 a truncate clears set-id bits here, by the caller's rights (`killpriv`).
            await self.tree.truncate(node, attr.st_size, then=_clearing_set_id(ctx) if self.killpriv else None)
        if self.owners is not None and (fields.update_uid or fields.update_gid):
            uid, gid = self.owners.chown_on_disk(attr.st_uid if fields.update_uid else -1,
                                                 attr.st_gid if fields.update_gid else -1)  # fmt: skip
            attr.st_uid, attr.st_gid = max(uid, 0), max(gid, 0)
        ws = self.tree.workspace
        changes = _metadata_changes(attr, fields, ws.owner if ws is not None else None)
        if changes is not None:
            st = await self.tree.change_metadata(node, changes)
            if st is not None:  # folded into its copy-up: the copy's stat is the final one
                return self._attributes(node.ino, node.resolved, st, node)
        return await self._node_attributes(node)

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.node(inode)
        held = self.tree.hold_object(node)
        if held is None:  # a change is moving it: after that change
            await self.tree.settled()
            held = self.tree.hold_object(node)
            if held is None:
                raise _fuse_error(errno.ENOENT)
        return os.fsencode(os.readlink("", dir_fd=held.fd))

    @_boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        node = self.tree.node(inode)
        st = await self._current_stat(node)
        if mode & os.W_OK and self.read_only:
            raise _fuse_error(errno.EROFS)
        if self.owners is not None:  # owner and mode as the mount shows them
            return _permitted(self._attributes(node.ino, node.resolved, st), mode, ctx)  # type: ignore[arg-type]
        return _permitted(st, mode, ctx)

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # Like the kernel: the space is the top layer's (where new data would go).
        real = os.statvfs(self.tree.stack.layers[0].root)
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
        node = self.tree.node(inode)
        resolved = self.tree.fresh(node)
        if self._absent.get((inode, name)) is resolved.stat:
            # Asked before, and nothing has set it since. First, before the checks below: a name
            # is remembered only once it passed them, and what they test is fixed at mount.
            raise pyfuse3.FUSEError(ENOATTR)
        attr = os.fsdecode(name)
        self._check_xattr(attr)
        if whiteout.is_private_xattr(attr):
            raise _fuse_error(ENOATTR)
        try:
            path, follow = _xattr_target(node)
            value = os.getxattr(path, attr, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == ENOATTR:
                self._remember_absent(inode, name, resolved.stat)
                raise _fuse_error(ENOATTR) from None
            if exc.errno == errno.EOPNOTSUPP and attr in ACL_XATTRS:
                # A layer with no ACLs (ramfs, an upper without xattrs) holds none: no ACL, as the
                # kernel's overlay answers. EOPNOTSUPP would fail the permission checks the kernel
                # makes with the ACLs it asks for (`enable_acl`).
                raise _fuse_error(pyfuse3.ENOATTR) from None
            raise
        if self.owners is not None and attr in ACL_XATTRS:
            return self.owners.acl_shown(value)
        return value

    def _remember_absent(self, inode: int, name: bytes, found: os.stat_result) -> None:
        """INODE's object has no xattr NAME (as the kernel sent it: the cache is asked before the
        name is decoded): answer the next getxattr of it without asking the disk, while
        the node still leads to that object and until a setxattr through the mount
        (`_xattrs_may_change`).

        FOUND is the stat result of the `Resolved` it was found missing on: a node that leads
        elsewhere (a copy-up, a rename over it, a new object) has a new one, so ``is`` tells. Not
        the `Resolved` itself: that holds its directories' descriptors, which must close when the
        kernel forgets them (the stress run counts the daemon's fds).

        Nothing else adds one: lower layers never change under a mount, and the upper dir changes
        only through this daemon: chmod and chown write only private xattrs (override_stat), and
        the kernel's removal of security.capability on a write only makes an absent name more
        absent. The kernel itself caches no getxattr answer, and asks for
        security.capability before every write and security.selinux on every ``ls -l``."""
        if len(self._absent) >= ABSENT_XATTRS:
            self._absent.clear()
        self._absent[(inode, name)] = found

    def _xattrs_may_change(self) -> None:
        self._absent.clear()

    @_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._check_xattr("")
        path, follow = _xattr_target(self.tree.node(inode))
        names = os.listxattr(path, follow_symlinks=follow)
        if not self.view.acl:
            names = [n for n in names if n not in ACL_XATTRS]
        return [os.fsencode(n) for n in names if not whiteout.is_private_xattr(n)]

    @_boundary
    @_change
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        attr = os.fsdecode(name)
        self._check_xattr(attr)
        if whiteout.is_private_xattr(attr):
            raise _fuse_error(errno.EPERM)
        if self.owners is not None and attr in ACL_XATTRS:
            value = self.owners.acl_on_disk(value)  # EINVAL for an id with no mapping
        self._xattrs_may_change()  # before (a getxattr meanwhile must not remember "absent") and after
        try:
            await self.tree.change_metadata(self.tree.node(inode), lambda path: os.setxattr(path, attr, value))
        finally:
            self._xattrs_may_change()

    @_boundary
    @_change
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        attr = os.fsdecode(name)
        self._check_xattr(attr)
        if whiteout.is_private_xattr(attr):
            raise _fuse_error(pyfuse3.ENOATTR)
        node = self.tree.node(inode)
        # Removing what is not there fails without a copy-up, as in the kernel.
        path, follow = _xattr_target(node)
        os.getxattr(path, attr, follow_symlinks=follow)
        await self.tree.change_metadata(node, lambda path: os.removexattr(path, attr))

    # -- file data --------------------------------------------------------------------------------

    @_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.tree.node(inode)
        # Opening for writing copies up (and O_TRUNC truncates): a change, held back by a freeze.
        async with self._changing() if _opens_to_write(flags) else contextlib.nullcontext():
            return await self._open(node, flags, ctx)

    async def _open(self, node: Node, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open NODE (inside `_changing` when writing: the caller holds it)."""
        writing = _opens_to_write(flags)
        # Counted as open from the start: a rename or unlink meanwhile must keep the object held.
        node.opened += 1
        try:
            if writing:
                self._check_writable()
                await self.tree.copy_up(node, size=0 if flags & os.O_TRUNC else None, for_open=True)
            resolved, fd = await self._open_node(node, flags)
            if flags & os.O_TRUNC and (ctx.uid != 0 or os.fstat(fd).st_mode & (stat.S_ISUID | stat.S_ISGID)):
                # As truncate(2) by a caller without CAP_FSETID (the kernel leaves this to us with
                # or without killpriv v2: an open with O_TRUNC sends no SETATTR). Root's other
                # opens skip the hop (a fstat of an open file reads no disk).
                await self.workers.run(killpriv.clear_set_id, fd, _requester(ctx))
        except BaseException:
            node.opened -= 1
            raise
        handle = FileHandle(node, fd, resolved, writing, resolved.stat.st_dev,
                            opener=_requester(ctx) if writing else None)
        info = self._file_info(handle, counted=True)
        if not writing and not resolved.layer.writable and not handle.passed_through:
            await self._cache_lower_data(handle)
        return info

    async def _cache_lower_data(self, handle: FileHandle) -> None:
        """A lower file just opened to read: a small one's data in the kernel's cache before the
        open is answered, so that its reads send no READ (`pagecache`), taken from the host's cache
        at once where it holds it, else read by a worker (the disk); a larger one on its way into
        the host's cache, so that the first READ finds it there.

        A READ is a round trip, and its reply makes the kernel drop the file's atime, so the
        reader's next fstat (tar's after each file) is a GETATTR: two requests a file, which a
        store at the open saves where the host's cache is cold too. The worker's read waits for
        the disk as the first READ would have. Only while no other open of the file exists, also
        when the read is done (`pagecache`: another open's READ in flight would hold the pages
        the store must lock), and only if the file was not copied up meanwhile."""
        node, st = handle.node, handle.resolved.stat
        if self.lower_data.stored(node.ino):
            return
        if self._names_of_a_broken_link(node) or not self.lower_data.may_store(st, opens=node.opened):
            nowait.prefetch(handle.fd, st.st_size)
            return
        data = nowait.read_cached(handle.fd, st.st_size, 0, handle.dev)
        if data is None:
            if not self.workers.would_hand():
                # Readers at once (other hops out): a queued hop costs two wake-ups, more than the
                # READ it saves, whose data the prefetch has brought in by the time it comes.
                nowait.prefetch(handle.fd, st.st_size)
                return
            try:
                data = await self.workers.run(os.pread, handle.fd, st.st_size, 0)
            except OSError as exc:  # the open stands; its READs will meet the error themselves
                log.debug("reading inode %d's data ahead: %s", node.ino, exc)
                return
            if node.opened != 1 or node.resolved.layer.writable or self.lower_data.stored(node.ino):
                # Opened again meanwhile (that open's READs go as READs), or copied up (a
                # truncate(2) sends no OPEN): the lower data may no longer be the file's.
                return
        self.lower_data.store(node.ino, data, st)

    def _names_of_a_broken_link(self, node: Node) -> bool:
        """NODE has several names on a mount whose upper keeps no hardlink index: there a copy-up
        breaks a lower file's hardlinks, as the kernel's overlay does without index=on, and the
        kernel's overlay shows each name as an inode of its own. This daemon shows them as one
        inode (a known difference), whose reads stay right only through the size the kernel
        learnt at each name's lookup, which reads of a backing file would not respect."""
        upper = self.tree.upper_dir
        return upper is not None and upper.links is None and node.own_names is not None and len(node.own_names) > 1

    def _file_info(self, handle: FileHandle, *, counted: bool = False) -> pyfuse3.FileInfo:
        number = self._new_handle()
        self._files[number] = handle
        node = handle.node
        if not counted:
            node.opened += 1
        # Data that stays put: passed through where the kernel allows it (every open of an inode
        # passed through or none: `node.opened` counts this one and those in flight).
        if self.backing.active and (self.read_only or handle.resolved.layer.writable) and (
                self.backing.opens(node.ino) or (node.opened == 1 and self._stays_put(handle))):
            backing_id = self.backing.acquire(node.ino, handle.fd, identity(handle.resolved))
            if backing_id is not None:
                handle.passed_through = True
                return passthrough.file_info(number, backing_id)
        # Every change to the data goes through this daemon, which the kernel sees: keep its cache.
        return pyfuse3.FileInfo(fh=number, keep_cache=True)

    def _stays_put(self, handle: FileHandle) -> bool:
        """HANDLE's file may be passed through (`passthrough.stays_put`; its mode as it is now: a
        fstat of an open file, which reads no disk)."""
        return passthrough.stays_put(handle.resolved, lambda: os.fstat(handle.fd).st_mode,
                                     read_only=self.read_only) and not self._names_of_a_broken_link(handle.node)

    async def _open_node(self, node: Node, flags: int) -> tuple[Resolved, int]:
        """Open NODE's real file: by its name in its held directory (inline when the caches can
        answer), checked to be NODE's object; if a change is moving it, after that change; if its
        last name is gone while it is open, through the object itself. A metacopy file opened to
        read opens its lower data file (immutable, so no race to check)."""
        data = node.resolved.data
        if data is not None and (flags & os.O_ACCMODE) == os.O_RDONLY and not flags & os.O_TRUNC:
            return data, await self.workers.run(_open_blocking, data, flags)
        for attempt in range(2):
            resolved = node.resolved
            if node.detached is not None and not node.names:
                return resolved, await self.workers.run(_reopen, node.detached, flags)
            if attempt == 1:  # after a race: only through a descriptor checked to be NODE's object
                held = self.tree.hold_object(node)
                if held is None:
                    break
                return node.resolved, await self.workers.run(_reopen, held, flags)
            try:
                fd = _open_real(resolved, flags, nowait.open_cached)
                if fd is None:
                    fd = await self.workers.run(_open_blocking, resolved, flags)
            except OSError:
                # Whatever is at the name now (a symlink: ELOOP, a whiteout: ENXIO, nothing: ENOENT)
                # may be a change in flight: after it, the second try answers for real.
                fd = None
            if fd is not None:
                if resolved.same_object(os.fstat(fd)) or resolved.branches:
                    return resolved, fd
                os.close(fd)
            if attempt == 0:
                await self.tree.settled()
        if node.detached is not None:
            return node.resolved, await self.workers.run(_reopen, node.detached, flags)
        raise _fuse_error(errno.ENOENT)

    @_boundary
    @_change
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_writable()
        try:
            node, fd = await self.tree.create(
                parent_inode, os.fsdecode(name), stat.S_IFREG | stat.S_IMODE(mode), self._caller(ctx),
                open_flags=flags,
            )  # fmt: skip
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            return await self._open_existing(parent_inode, name, flags, ctx)
        assert fd is not None
        return await self._opened_new(node, fd, ctx)

    @_boundary
    @_change
    async def tmpfile(
        self, parent_inode: int, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """open(2) with O_TMPFILE in a directory of the mount (pyfuse3 patch 0013; the kernel sends
        it from Linux 6.3): a regular file with no name, made in upper, open, as the kernel's
        overlay makes one (Linux 6.6); linkat(2) of the open file may name it (`link`)."""
        if not self.binding.tmpfile:
            raise _fuse_error(errno.ENOSYS)  # OVERLAYFUSE_BINDING=stock: what a stock pyfuse3 answers
        self._check_writable()
        node, fd = await self.tree.create_unnamed(parent_inode, stat.S_IFREG | stat.S_IMODE(mode),
                                                  self._caller(ctx), flags)
        return await self._opened_new(node, fd, ctx)

    async def _opened_new(
        self, node: Node, fd: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """The reply to a create or tmpfile: a handle on the new file's fd (CTX's process writes
        through it) and the file's attributes."""
        info = self._file_info(FileHandle(node, fd, node.resolved, True, node.resolved.stat.st_dev,
                                          opener=_requester(ctx)))
        return info, await self._node_attributes(node)

    async def _open_existing(
        self, parent_inode: int, name: bytes, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """O_CREAT without O_EXCL for a name another request made after the kernel's lookup found it
        missing: open what is there now, as open(2) does (the kernel passes on EEXIST from CREATE)."""
        node = self.tree.lookup(parent_inode, os.fsdecode(name))  # the reply hands the kernel one lookup
        try:
            if node.resolved.is_dir:
                raise _fuse_error(errno.EISDIR)
            info = await self._open(node, flags & ~os.O_CREAT, ctx)
        except BaseException:
            self.tree.forget(node.ino, 1)
            raise
        try:
            return info, await self._node_attributes(node)
        except BaseException:
            await self.release(info.fh)
            self.tree.forget(node.ino, 1)
            raise

    def _readable_fd(self, handle: FileHandle) -> int:
        """A read-only fd opened before a copy-up reads the upper copy afterwards, like the kernel's.

        The copy is reopened through a descriptor checked to be the node's object, never by its
        name alone: a name being renamed over or unlinked right now may show a whiteout (ENXIO) or
        nothing; then this read still reads the file it opened, and a later one switches."""
        node = handle.node
        current = node.resolved
        if not handle.writable and current is not handle.resolved and \
                not current.readable.same_object(handle.resolved.stat):
            held = self.tree.hold_object(node) if current.data is None else None
            if held is None:
                return handle.fd
            fd = _reopen(held, os.O_RDONLY)
            os.close(handle.fd)
            handle.fd, handle.resolved, handle.dev = fd, node.resolved, os.fstat(fd).st_dev
        return handle.fd

    @_boundary
    # pyfuse3's stub says bytes; it sends any buffer, and a memoryview of the read saves a copy.
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        handle = self._files[fh]
        fd = self._readable_fd(handle)
        data = nowait.read_cached(fd, size, off, handle.dev)
        if data is None:
            data = await self.workers.run(os.pread, fd, size, off)
        return data

    @_boundary
    @_change
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._files[fh]
        if not self.killpriv or handle.opener is None:
            return await self.workers.run(os.pwrite, handle.fd, buf, off)
        written, cleared = await self.workers.run(killpriv.write, handle.fd, buf, off, handle.opener)
        if cleared:  # the kernel's cached mode still has the bits
            await self.workers.run(_invalidate_attributes, handle.node.ino)
        return written

    @_boundary
    async def flush(self, fh: int) -> None:
        # Every write has already reached the real file, so a close has nothing to flush. ENOSYS
        # tells the kernel so once, and it stops sending FLUSH at all: one request less per close.
        raise _fuse_error(errno.ENOSYS)

    @_boundary
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """lseek(2)'s SEEK_DATA and SEEK_HOLE (pyfuse3 patch 0010; the kernel answers the other
        whences itself), asked of the real file: a sparse file's holes show through the mount as
        through the kernel's overlay (``ovl_llseek``), so cp, tar --sparse and rsync -S keep them.
        ENXIO where there is none, as lseek(2) says. In a worker: finding a hole may read the
        file's extent map from the disk. The fd's own position moves, which nothing here uses
        (reads and writes give their offsets)."""
        if not self.binding.lseek:
            raise _fuse_error(errno.ENOSYS)  # OVERLAYFUSE_BINDING=stock: what a stock pyfuse3 answers
        handle = self._files[fh]
        fd = handle.fd if handle.writable else self._readable_fd(handle)
        offset_found: int = await self.workers.run(os.lseek, fd, offset, whence)
        return offset_found

    @_boundary
    async def ioctl(self, inode: int, fh: int, cmd: int, in_data: bytes, out_size: int, flags: int) -> bytes:
        """The file attribute flags lsattr reads and chattr changes, and xfs_io's fsxattr (pyfuse3
        patch 0014; the kernel passes a daemon no other ioctl): read from the object's real file,
        the upper copy or the lower one, as the kernel's overlay reads them (``ovl_fileattr_get``);
        a change copies the object up, its metadata only, and is made on the upper copy
        (``ovl_fileattr_set``), by the daemon: the kernel has checked the caller's rights
        (ownership, CAP_LINUX_IMMUTABLE). Append-only and immutable go on the upper object itself,
        as fuse-overlayfs and kernels before 5.15 put them, where the kernel's overlay now keeps
        them in ``overlay.protattr``: read here too, so an upper dir a kernel wrote shows them.
        Any other command: ENOTTY."""
        if not self.binding.ioctl:
            raise _fuse_error(errno.ENOSYS)  # OVERLAYFUSE_BINDING=stock: what a stock pyfuse3 answers
        if cmd not in fileattr.COMMANDS:
            raise _fuse_error(errno.ENOTTY)
        node = self.tree.node(inode)
        if fileattr.reads(cmd):
            upper = self.tree.upper_dir
            protattr = upper.features.protattr if upper is not None and node.resolved.layer.writable else ""
            read = functools.partial(_read_fileattr, cmd=cmd, size=out_size, protattr=protattr)
            data: bytes = await self.tree.on_object(node, read)
            return data
        self._check_writable()
        async with self._changing():
            await self.tree.copy_up(node, meta_only=True)
            await self.tree.on_object(node, functools.partial(fileattr.set_, cmd=cmd, data=in_data))
        await self.workers.run(_invalidate_attributes, node.ino)  # its ctime moved
        return b""

    @_boundary
    @_change
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) (pyfuse3 patch 0011) on the real file, which an open for writing copied up
        (the kernel checks the open's mode before it asks): allocation, FALLOC_FL_KEEP_SIZE, hole
        punching and zeroing, as the kernel's overlay passes them on (``ovl_fallocate``). A
        change, so a frozen mount holds it back. Set-id bits: the kernel clears them first, as
        for a write (a SETATTR under killpriv v2, see `setattr`)."""
        if not self.binding.fallocate:
            raise _fuse_error(errno.ENOSYS)  # OVERLAYFUSE_BINDING=stock: what a stock pyfuse3 answers
        handle = self._files[fh]
        await self.workers.run(syscalls.fallocate, handle.fd, mode, offset, length)

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Writes out the file's upper copy through any open of it, read-only ones too (coreutils'
        ``sync FILE`` opens it read-only), as the kernel's overlay does (``ovl_fsync``). A lower
        file has nothing of this mount's to write, and is never synced (nor by the kernel: a
        read-only layer's filesystem may refuse it)."""
        if not self.view.fsync:  # fsync=0 / volatile: ENOSYS, and the kernel stops asking (as the peer)
            raise _fuse_error(errno.ENOSYS)
        handle = self._files[fh]
        sync = os.fdatasync if datasync else os.fsync
        if handle.writable:
            await self.workers.run(sync, handle.fd)
            return
        fd = self._readable_fd(handle)  # an open made before a copy-up follows it, as its reads do
        if handle.resolved.layer.writable:
            await self.workers.run(sync, fd)
        elif not datasync and handle.node.resolved.layer.writable:
            # copied up since as a metacopy file, its data still below: its metadata is in upper
            held = self.tree.hold_object(handle.node)
            if held is not None:
                await self.workers.run(_fsync_held, held)

    @_boundary
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh)
        handle.node.opened -= 1
        if handle.passed_through:
            self.backing.release(handle.node.ino)
        # Inline, not a hop: closing one of several references only drops it, and a created file's
        # data is written back later by the kernel, not at close. Two closes can do disk work on
        # the loop: the last reference of a file with no name left (the inode is freed), and, on
        # ext4 with auto_da_alloc, a file truncated to 0 and rewritten (close starts its writeback).
        # Both are rare next to the one-per-file close of an untar, which a hop would double-cost.
        os.close(handle.fd)

    # -- directories ------------------------------------------------------------------------------

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self.binding.readdir_inode:
            # No-opendir mode: the kernel stops sending opendir/releasedir and caches listings
            # itself; readdir finds the directory by token.ino (see `_invalidate_listings`).
            raise _fuse_error(errno.ENOSYS)
        node, _ = self.tree.directory(inode)
        handle = self._new_handle()
        self._dirs[handle] = DirHandle(node)
        return handle

    async def _replies_now(self, node: Node) -> ListingReplies:
        """The directory's listing as it is now, with its replies in cookie order."""
        _, entries = await self.tree.list_dir(node.ino)
        replies = self._replies.pop(node.ino, None)  # put back last: the most recently used
        if replies is None or replies.source is not entries:
            cookies = self._cookies.get(node.ino)
            if cookies is None:
                cookies = self._cookies[node.ino] = Cookies.numbering([name for name, _ in entries])
                replies = ListingReplies(entries, list(cookies.by_name.values()), [None] * len(entries), entries)
            else:
                numbered = sorted((cookies.of(name), name, resolved) for name, resolved in entries)
                replies = ListingReplies(
                    [(name, resolved) for _, name, resolved in numbered], [c for c, _, _ in numbered],
                    [None] * len(numbered), entries,
                )  # fmt: skip
        self._replies[node.ino] = replies
        while len(self._replies) > KEPT_LISTINGS:  # as the tree bounds the listings themselves
            del self._replies[next(iter(self._replies))]
        return replies

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # fh 0 is never a handle of ours: no-opendir mode, where the token says which directory.
        node = self._dirs[fh].node if fh else self.tree.directory(binding.readdir_inode(token))[0]
        asked = start_id
        # Offsets: 1 and 2 follow "." and "..", then each name's cookie (see `Cookies`). Each call
        # answers from the listing as it is now: a name deleted since the last call is not sent.
        # The kernel takes only the inode number and type from "." and "..": no stat for them.
        if start_id == 0:
            if not pyfuse3.readdir_reply(token, b".", _dot_attributes(node.ino), 1):
                return
            start_id = 1
        if start_id == 1:
            if not pyfuse3.readdir_reply(token, b"..", _dot_attributes(node.parent), 2):
                return
            start_id = 2
        replies = await self._replies_now(node)
        entries, lower, cookies = replies.entries, replies.lower, replies.cookies
        for index in range(bisect.bisect_right(cookies, start_id), len(entries)):
            name, resolved = entries[index]
            reply = lower[index]
            if reply is None:
                st = resolved.stat
                if resolved.layer.writable:
                    now = _lstat_now(resolved)
                    if now is None:
                        continue  # gone since the listing was read: never send a stale pairing
                    st = now
                number = self.tree.number_for(resolved)
                reply = (os.fsencode(name), self._attributes(number, resolved, st), number)
                if not resolved.layer.writable:
                    lower[index] = reply
            if not pyfuse3.readdir_reply(token, reply[0], reply[1], cookies[index]):
                return
            # An accepted readdirplus entry counts as a lookup ("." and ".." do not).
            self.tree.remember_listed(node, name, resolved, reply[2])
        if self.binding.readdir_inode and asked >= (cookies[-1] if cookies else 2):
            # The end of the listing, asked for after its last entry went out: with kernel-cached
            # listings the kernel now holds it, so ours (a Resolved and a reply per entry, about a
            # kilobyte) is freed; it is read again only when the kernel refills its cache.
            self._replies.pop(node.ino, None)
            self.tree.drop_listing(node)

    @_boundary
    async def releasedir(self, fh: int) -> None:
        del self._dirs[fh]

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        """Around a request that changes the upper dir: the freeze gate (see `control`), and, if the
        change showed copies under other names (`MergedTree.listing_epoch`), every listing the
        kernel holds dropped before the reply."""
        async with self.gate:
            epoch = self.tree.listing_epoch
            try:
                yield
            finally:
                if self.tree.listing_epoch != epoch:
                    await self._invalidate_listings(list(self._cookies))

    async def _invalidate_listings(self, inodes: Sequence[int]) -> None:
        """Make the kernel drop its cached listings of INODES (those it has listed, at least).

        The kernel drops a cached listing itself when it changes the directory (create, unlink,
        rename, ... through it: its i_version moves) or sees a new mtime in a GETATTR reply
        (fs/fuse/readdir.c). A change it makes through *another* directory may still alter what
        this one lists: a hardlinked lower file copied up or indexed shows its copy, with that
        copy's inode number, under every name (`MergedTree.listing_epoch`); a directory moved to
        another parent has a new "..". Those are told here, before the request is answered.
        Only with kernel-cached listings (the binding's no-opendir mode); otherwise every
        readdir reaches the daemon and answers from the directory as it is.
        """
        if not self.binding.readdir_inode:
            return
        listed = [ino for ino in inodes if ino in self._cookies]
        if listed:
            await self.workers.run(_invalidate_inodes, listed)

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """fsync(2) of a directory writes out its upper dir, as the kernel's overlay does
        (``ovl_dir_fsync``): a name created or renamed, then made durable by an fsync of its
        directory, survives a crash. A directory with nothing in upper has nothing to write.

        In no-opendir mode (the patched binding) the kernel sends FSYNCDIR with no handle of ours,
        and pyfuse3 does not say which directory: then the upper filesystem is written out whole
        (syncfs), more than was asked, never less. fsync=0 and volatile: ENOSYS, and the kernel
        stops asking, as it does for files."""
        if not self.view.fsync:
            raise _fuse_error(errno.ENOSYS)
        if self.tree.upper_dir is None:
            return  # read-only: nothing of this mount's is waiting to be written
        if fh:
            resolved = self._dirs[fh].node.resolved
            if resolved.layer.writable:
                await self.workers.run(_sync_directory, resolved.path, False)
            return
        upper_root = self.tree.node(pyfuse3.ROOT_INODE).resolved
        await self.workers.run(_sync_directory, upper_root.path, True)

    # -- namespace changes ------------------------------------------------------------------------

    async def _create(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext, *,
        rdev: int = 0, symlink_target: str = "",
    ) -> pyfuse3.EntryAttributes:  # fmt: skip
        """mkdir, mknod and symlink: MODE carries the type; RDEV is a device's, SYMLINK_TARGET a link's."""
        self._check_writable()
        node, _ = await self.tree.create(parent_inode, os.fsdecode(name), mode, self._caller(ctx),
                                         rdev=rdev, symlink_target=symlink_target)
        return await self._node_attributes(node)

    @_boundary
    @_change
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._create(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)

    @_boundary
    @_change
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._create(parent_inode, name, mode, ctx, rdev=rdev)

    @_boundary
    @_change
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._create(
            parent_inode, name, stat.S_IFLNK | 0o777, ctx, symlink_target=os.fsdecode(target)
        )

    @_boundary
    @_change
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_writable()
        node = await self.tree.link(inode, new_parent_inode, os.fsdecode(new_name))
        return await self._node_attributes(node)

    @_boundary
    @_change
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        await self.tree.remove(parent_inode, os.fsdecode(name), directory=False)

    @_boundary
    @_change
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        await self.tree.remove(parent_inode, os.fsdecode(name), directory=True)

    @_boundary
    @_change
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
        flags: int, ctx: pyfuse3.RequestContext,
    ) -> None:  # fmt: skip
        self._check_writable()
        await self.tree.rename(
            parent_inode_old, os.fsdecode(name_old), parent_inode_new, os.fsdecode(name_new), flags
        )
        if parent_inode_old != parent_inode_new:  # a directory moved has a new ".."
            moved = {(parent_inode_new, name_new), (parent_inode_old, name_old)}
            await self._invalidate_listings([
                ino for ino in self._cookies
                if (node := self.tree.find_node(ino)) is not None and (node.parent, os.fsencode(node.name)) in moved
            ])  # fmt: skip


def _opens_to_write(flags: int) -> bool:
    """Whether an open with FLAGS changes the file (copy-up, truncation)."""
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


def _xattr_target(node: Node) -> tuple[str, bool]:
    """Where NODE's xattrs are read, as (path, follow_symlinks) for ``os.getxattr``'s path and
    keyword: its object by its name, a symlink's own (not followed); or, once its last name went
    while the kernel still holds it (open and unlinked, or renamed over), the object itself,
    through the /proc link of the descriptor that holds it (followed: it leads to the object),
    as the kernel's overlay reads the real inode. By the name, that one would be another file's."""
    if node.detached is not None and not node.names:
        return node.detached.proc, True
    return node.resolved.path, False


def _fsync_held(held: Fd) -> None:
    """fsync the object HELD holds (in a worker thread): opened to read through it."""
    fd = _reopen(held, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(path: str, whole_filesystem: bool) -> None:
    """fsync the directory PATH, or with WHOLE_FILESYSTEM syncfs the filesystem it is on (in a
    worker thread). Opened to read: neither call takes the O_PATH descriptors the tree holds."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if whole_filesystem:
            syscalls.syncfs(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def _invalidate_inodes(inodes: Sequence[int]) -> None:
    """`pyfuse3.invalidate_inode` each of INODES (in a worker thread: it writes to /dev/fuse)."""
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel has already let the inode go
                log.warning("could not invalidate the kernel's cache of inode %d: %s", ino, exc)


def _missing_entry() -> pyfuse3.EntryAttributes:
    """"No such name", which the kernel may remember (a negative dentry) as it does on its own overlay.

    An ENOENT reply is never cached, so every `stat` of a missing path (a shell searching $PATH, an
    interpreter probing import paths) would reach the daemon again. A name can only appear through
    this mount (create, mkdir, mknod, symlink, link, rename), and the kernel replaces the negative
    entry itself when one of those succeeds.
    """
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = 0  # inode 0 in a lookup reply means "no such entry"
    attrs.entry_timeout = CACHE_TIMEOUT
    return attrs


def _dot_attributes(ino: int) -> pyfuse3.EntryAttributes:
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = ino
    attrs.st_mode = stat.S_IFDIR
    return attrs


def _changes_nothing(fields: pyfuse3.SetattrFields) -> bool:
    return not (fields.update_uid or fields.update_gid or fields.update_mode or fields.update_size
                or fields.update_atime or fields.update_mtime or fields.update_ctime)  # fmt: skip


def _metadata_changes(
    attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, owner: DiskOwner | None = None
) -> MetadataChange | None:
    """The chown/chmod/utimens part of a setattr (None if none). OWNER: chown and chmod go through
    it (override xattrs, squashed ids: see `ownership`)."""
    if not (fields.update_uid or fields.update_gid or fields.update_mode or fields.update_atime
            or fields.update_mtime):  # fmt: skip
        return None
    return MetadataChange(
        uid=attr.st_uid if fields.update_uid else -1,
        gid=attr.st_gid if fields.update_gid else -1,
        mode=stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
        atime_ns=attr.st_atime_ns if fields.update_atime else None,
        mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        owner=owner,
    )


def _open_real(resolved: Resolved, flags: int, opener: Callable[[str, int, int], _FD]) -> _FD:
    """Open the real file behind RESOLVED with OPENER (path, flags, dir_fd): ``os.open`` in a worker
    thread, or first `nowait.open_cached` inline, which gives None where it would wait for the disk."""
    # O_NONBLOCK: if a change just put a fifo at the name, the open must fail (it is checked against
    # the object afterwards), not wait for a writer; on a regular file it changes nothing.
    real_flags = (flags & ~_STRIP_FLAGS) | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    fd, rel = resolved.at()
    if not resolved.layer.writable:
        # Like the kernel: reading through the overlay does not touch lower atimes. O_NOATIME needs
        # file ownership or CAP_FOWNER; without them, open normally.
        try:
            return opener(rel, real_flags | os.O_NOATIME, fd.fd)
        except PermissionError:
            pass
    return opener(rel, real_flags, fd.fd)


def _open_plain(path: str, flags: int, dir_fd: int) -> int:
    return os.open(path, flags, dir_fd=dir_fd)


def _open_blocking(resolved: Resolved, flags: int) -> int:
    """`_open_real` with plain ``os.open``, which may wait for the disk: for a worker thread."""
    return _open_real(resolved, flags, _open_plain)


def _reopen(detached: Fd, flags: int) -> int:
    """Open a file through a descriptor that holds it (its name is gone, or was just raced). The
    /proc link must be followed (no O_NOFOLLOW): it leads to the object itself, checked already."""
    return os.open(detached.proc, (flags & ~_STRIP_FLAGS & ~os.O_TRUNC & ~os.O_NOFOLLOW) | os.O_CLOEXEC)


def _lstat_now(resolved: Resolved) -> os.stat_result | None:
    """RESOLVED's lstat now, if its name still leads to the same object."""
    try:
        st = os.fstat(resolved.branches[0].fd.fd) if resolved.branches and resolved.branches[0].fd \
            else resolved.dir.lstat(resolved.name) if resolved.dir is not None else os.lstat(resolved.path)
    except FileNotFoundError:
        return None
    return st if resolved.same_object(st) else None


def _requester(ctx: pyfuse3.RequestContext) -> Peer:
    """The request's caller: who the kernel's set-id rules judge (`killpriv`)."""
    return Peer(ctx.pid, ctx.uid, ctx.gid)


def _clearing_set_id(ctx: pyfuse3.RequestContext) -> Callable[[str], bool]:
    """`killpriv.clear_set_id` by the request's caller, for a path of the object (`MergedTree.on_object`)."""
    return functools.partial(killpriv.clear_set_id, requester=_requester(ctx))


def _read_fileattr(path: str, *, cmd: int, size: int, protattr: str) -> bytes:
    """`fileattr.get` of PATH (a held object's /proc/self/fd path), with the append-only and
    immutable flags the kernel's overlay keeps in the xattr PROTATTR ("" for none) set."""
    data = fileattr.get(path, cmd, size)
    if not protattr:
        return data
    try:
        kept = os.getxattr(path, protattr)  # the /proc link is followed to the held object itself
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return data
        raise
    return fileattr.with_protected(cmd, data, append=b"a" in kept, immutable=b"i" in kept)


def _invalidate_attributes(ino: int) -> None:
    """Make the kernel ask for INO's attributes again (in a worker thread: it writes to /dev/fuse)."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except OSError as exc:  # ENOENT: the kernel has forgotten it, nothing is cached
        log.debug("invalidating the attributes of inode %d: %s", ino, exc)


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


__all__ = ["CACHE_TIMEOUT", "OverlayOperations"]
