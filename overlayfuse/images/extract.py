"""Extraction of one layer's tar entries into a directory, without ever following a symlink.

Safety, as the mature unpackers do it: every entry is placed through directory fds opened
component by component with ``O_NOFOLLOW``, so no symlink (in the layer or planted by an earlier
entry) is ever followed; ``..`` may not climb above the layer root; absolute names are taken as
relative to it; a hardlink must point at a non-directory this same layer created. Anything else is
refused with `Refused`, which the caller turns into an error naming the layer and the entry.

Whiteouts are written in the form overlayfuse and the kernel read fastest: when we may (root), a
``.wh.NAME`` becomes a 0:0 character device and ``.wh..wh..opq`` the ``trusted.overlay.opaque``
xattr; otherwise the OCI files are kept as they are (the daemon reads those too). Markers are
applied after all entries (`Extractor.finish`), because OCI lets a whiteout appear anywhere in its
directory and a layer's own entries win over its whiteouts; they live here, not in the driver,
because a later entry that replaces a directory must forget the markers recorded under it.

This module knows nothing of compression, digests or the store: `unpack` feeds it tar members.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import stat
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import BinaryIO, cast

from ..overlay import whiteout
from .compression import CHUNK
from .limits import ENV_VARIABLES, UnpackLimits
from .remove import remove_at
from .space import SpaceWatch

log = logging.getLogger(__name__)

_XATTR_PAX = "SCHILY.xattr."
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Implicit directories (named as a parent by an entry, or the layer root, but absent from the
#: tar as entries of their own) get docker's mode, root:root (when we may chown) and, as times, the
#: moment the unpack began. The importer then gives those that exist in the layers below the
#: metadata they have there (`inherit.inherit_implicit_dirs`).
IMPLICIT_DIR_MODE = 0o755
_XATTR_SKIPPABLE = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES)

Parts = tuple[str, ...]


class Refused(Exception):
    """An entry that must not be extracted; the message says why (the caller adds where)."""


class LimitExceeded(Refused):
    """The layer goes past one of its `UnpackLimits` (the message names the limit)."""


def _components(name: str) -> Parts:
    """NAME as components below the layer root: absolute names are relative to it, ``.`` and empty
    components vanish, ``..`` removes one component and may not climb above the root."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise Refused(f"{name!r} climbs out of the layer")
            parts.pop()
        else:
            parts.append(part)
    return tuple(parts)


def _times_ns(member: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns; PAX times are decimal strings, exact to the ns (a float is not)."""
    mtime = _pax_time(member, "mtime")
    if mtime is None:
        mtime = int(member.mtime) * 1_000_000_000
    atime = _pax_time(member, "atime")
    return (mtime if atime is None else atime), mtime


def _pax_time(member: tarfile.TarInfo, key: str) -> int | None:
    value = member.pax_headers.get(key)
    if value is None:
        return None
    try:
        return int(Decimal(value).scaleb(9).to_integral_value())
    except InvalidOperation:
        raise Refused(f"invalid PAX {key} {value!r}") from None


def open_dir_path(root_fd: int, depth: int, open_child: Callable[[int, int], int]) -> int:
    """An fd of its own (the caller closes it) for a directory DEPTH components below ROOT_FD,
    walked one component at a time: OPEN_CHILD(parent_fd, n) opens the nth (from 1) in its parent,
    never following a symlink. Every fd but the last is closed, also when a step fails."""
    fd = os.dup(root_fd)
    try:
        for n in range(1, depth + 1):
            child = open_child(fd, n)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(slots=True, eq=False)
class _Node:
    """A directory of the layer, in a tree of records: keyed by full paths, a chain 10,000 deep
    would hold 50 million components, and dropping a subtree would mean scanning every key."""

    name: str
    parent: _Node | None
    children: dict[str, _Node] = field(default_factory=dict)
    meta: tuple[int, int, int] | None = None  # its own entry's mode, atime, mtime
    made_up: bool = False  # made without an entry (the root until a ./ entry)
    opaque: bool = False  # an opaque marker (kernel form, written at the end)
    whiteouts: set[str] = field(default_factory=set)  # whiteout names recorded in it
    files: set[str] = field(default_factory=set)  # non-directories this layer made in it


class Extractor:
    """Places entries under the root fd; remembers what the end of the layer must still do (markers,
    directory modes and times) and which directories it had to make up (`implicit_dirs`).

    One cursor (the fd of the directory the last entry went into, and its path) moves between
    entries: down by name with ``O_NOFOLLOW``, up through ``..``. Consecutive entries are close in a
    tar, so placing one costs about its own depth, and no more than two fds are open whatever the
    depth; the finishing pass walks the tree the same way, so it is linear too."""

    def __init__(self, root_fd: int, *, kernel_markers: bool, chown: bool,
                 limits: UnpackLimits | None = None, space: SpaceWatch | None = None) -> None:
        self.root_fd = root_fd
        self.kernel_markers = kernel_markers
        self.chown = chown
        self.limits = limits or UnpackLimits()
        self.space = space
        self.unpacked_size = 0
        self.entries = 0
        self._root = _Node("", None, made_up=True)
        self._path: list[str] = []  # where the cursor is, from the root
        self._nodes: list[_Node] = [self._root]  # the nodes along it, the root first
        self._fd = root_fd  # the cursor's directory (never closed while it is the root fd)
        self._started_ns = time.time_ns()
        self._skipped_devices = 0
        self._dropped_xattrs: set[str] = set()
        self._unset_xattrs: set[str] = set()

    # -- the cursor: directories walked without following anything ---------------------------

    def _goto(self, parts: Parts, *, create: bool = True) -> int:
        """The fd of the directory PARTS (created if missing, when CREATE), moving the cursor."""
        common = 0
        limit = min(len(self._path), len(parts))
        while common < limit and self._path[common] == parts[common]:
            common += 1
        while len(self._path) > common:
            self._up()
        for name in parts[common:]:
            self._down(name, create=create)
        return self._fd

    def _up(self, last: Callable[[int], None] | None = None) -> None:
        """Move the cursor to its parent; LAST, if given, is called with the directory's fd once
        its parent is open (so LAST may take away the search permission ``..`` needs)."""
        parent = os.open("..", DIR_FLAGS, dir_fd=self._fd)
        try:
            if last is not None:
                last(self._fd)
        except BaseException:
            os.close(parent)
            raise
        os.close(self._fd)
        self._path.pop()
        self._nodes.pop()
        self._fd = self.root_fd if not self._path else parent
        if not self._path:
            os.close(parent)

    def _down(self, name: str, *, create: bool) -> None:
        node = self._nodes[-1]
        child = node.children.get(name)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=self._fd)
            made = False
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, IMPLICIT_DIR_MODE, dir_fd=self._fd)
            fd = os.open(name, DIR_FLAGS, dir_fd=self._fd)
            os.fchmod(fd, IMPLICIT_DIR_MODE)  # whatever the umask
            made = True
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.lstat(name, dir_fd=self._fd)
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise Refused(f"{'/'.join([*self._path, name])!r} is {what}") from None
        if child is None:
            child = node.children[name] = _Node(name, node)
        if made:
            child.made_up = True
        if self._fd != self.root_fd:
            os.close(self._fd)
        self._fd = fd
        self._path.append(name)
        self._nodes.append(child)

    def _drop_cursor(self) -> None:
        if self._fd != self.root_fd:
            os.close(self._fd)
        self._fd = self.root_fd
        del self._path[:]
        del self._nodes[1:]

    def _record(self, parts: Parts) -> _Node:
        """The record node of directory PARTS, made (as records only, nothing on disk) if missing."""
        node = self._root
        for name in parts:
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = _Node(name, node)
            node = child
        return node

    def _lookup(self, parts: Parts) -> _Node | None:
        node: _Node | None = self._root
        for name in parts:
            node = node.children.get(name) if node is not None else None
        return node

    def _open_path(self, parts: Parts, *, create: bool = False) -> int:
        """An fd of its own for the directory PARTS, walked from the root (the caller closes it)."""
        def open_child(fd: int, depth: int) -> int:
            try:
                return os.open(parts[depth - 1], DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise Refused(f"{'/'.join(parts[:depth])!r} is not a directory") from None
        return open_dir_path(self.root_fd, len(parts), open_child)

    # -- entries ------------------------------------------------------------------------------

    def add(self, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        self.entries += 1
        if self.space is not None:
            self.space.entry()
        if self.entries > self.limits.max_entries:
            raise LimitExceeded(f"more than {self.limits.max_entries} entries "
                                f"(the limit {ENV_VARIABLES['max_entries']})")
        parts = _components(member.name)
        if len(parts) > self.limits.max_depth:
            raise LimitExceeded(f"{len(parts)} components deep, more than the limit of "
                                f"{self.limits.max_depth} ({ENV_VARIABLES['max_depth']})")
        if not parts:
            if not member.isdir():
                raise Refused("the layer root can only be a directory")
            self._apply_dir(self.root_fd, self._root, member)
            return
        parents, leaf = parts[:-1], parts[-1]
        for part in parents:
            if whiteout.is_reserved_name(part):
                raise Refused(f"whiteout name {part!r} used as a directory")
        if whiteout.is_reserved_name(leaf):
            self._add_marker(parents, leaf)
            return
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()
                or member.ischr() or member.isblk() or member.isfifo()):
            raise Refused(f"unsupported tar entry type {member.type!r}")
        parent_fd = self._goto(parents)
        node = self._nodes[-1]
        try:
            existing: os.stat_result | None = os.lstat(leaf, dir_fd=parent_fd)
        except FileNotFoundError:
            existing = None
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                self._remove(parent_fd, node, leaf, existing)
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(leaf, 0o700, dir_fd=parent_fd)
            fd = os.open(leaf, DIR_FLAGS, dir_fd=parent_fd)
            try:
                child = node.children.get(leaf)
                if child is None:
                    child = node.children[leaf] = _Node(leaf, node)
                self._apply_dir(fd, child, member)
            finally:
                os.close(fd)
            return
        if member.islnk():
            self._add_hardlink(parent_fd, node, leaf, parts, member, existing)
            return
        self._clear(parent_fd, node, leaf, existing)
        if member.isreg():
            self._add_file(parent_fd, leaf, member, tf)
        elif member.issym():
            os.symlink(member.linkname, leaf, dir_fd=parent_fd)
            self._apply_meta(parent_fd, leaf, member, chmod=False)
        elif member.isfifo():
            os.mkfifo(leaf, 0o600, dir_fd=parent_fd)
            self._apply_meta(parent_fd, leaf, member)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            try:
                os.mknod(leaf, kind | 0o600, os.makedev(member.devmajor, member.devminor),
                         dir_fd=parent_fd)
            except PermissionError:
                self._skipped_devices += 1
                return
            self._apply_meta(parent_fd, leaf, member)
        node.files.add(leaf)

    def _clear(self, parent_fd: int, node: _Node, leaf: str, existing: os.stat_result | None) -> None:
        """Make room for a non-directory LEAF in NODE. With nothing there yet, kernel-form markers
        may still be recorded under that name (they are written at the end): the entry wins over
        them, as it wins over the OCI marker files `_remove` takes away with their directory."""
        if existing is not None:
            self._remove(parent_fd, node, leaf, existing)
        elif leaf in node.children:
            self._forget(node, leaf)

    def _remove(self, parent_fd: int, node: _Node, leaf: str, existing: os.stat_result) -> None:
        """Clear the way for a new entry: a directory goes with its content (and every record
        under it), anything else is unlinked."""
        if not stat.S_ISDIR(existing.st_mode):
            os.unlink(leaf, dir_fd=parent_fd)
            node.files.discard(leaf)
            return
        # The cursor is at LEAF's parent, never inside it: it stays valid.
        remove_at(parent_fd, leaf)
        self._forget(node, leaf)

    @staticmethod
    def _forget(node: _Node, leaf: str) -> None:
        """Drop every record at or under LEAF in NODE (what was there is gone)."""
        node.children.pop(leaf, None)
        node.whiteouts.discard(leaf)
        node.files.discard(leaf)

    def _add_marker(self, parents: Parts, leaf: str) -> None:
        node = self._record(parents)
        if whiteout.is_oci_opaque_marker(leaf):
            node.opaque = True
        else:
            target = whiteout.oci_whiteout_target(leaf)
            if target is None:
                log.debug("skipping AUFS metadata %r", "/".join((*parents, leaf)))
                return
            if target in ("", ".", ".."):
                raise Refused(f"whiteout of {target!r}")
            node.whiteouts.add(target)
        if not self.kernel_markers:
            parent_fd = self._goto(parents)
            try:
                st = os.lstat(leaf, dir_fd=parent_fd)
                if not stat.S_ISREG(st.st_mode):
                    raise Refused(f"{leaf!r} exists and is not a marker file")
            except FileNotFoundError:
                whiteout.write_oci_marker_at(parent_fd, leaf)

    def _add_hardlink(self, parent_fd: int, node: _Node, leaf: str, parts: Parts,
                      member: tarfile.TarInfo, existing: os.stat_result | None) -> None:
        try:
            target = _components(member.linkname)
        except Refused:
            raise Refused(f"hardlink target {member.linkname!r} is outside the layer") from None
        target_node = self._lookup(target[:-1]) if target else None
        if target_node is None or target[-1] not in target_node.files:
            raise Refused(f"hardlink to {member.linkname!r}, which this layer does not contain")
        if target == parts:
            return
        target_fd = self._open_path(target[:-1])
        try:
            self._clear(parent_fd, node, leaf, existing)
            os.link(target[-1], leaf, src_dir_fd=target_fd, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
        finally:
            os.close(target_fd)
        node.files.add(leaf)

    def _add_file(self, parent_fd: int, leaf: str, member: tarfile.TarInfo,
                  tf: tarfile.TarFile) -> None:
        """Regular file data; a sparse member's holes stay holes (only its data is written, at its
        offsets, and the file is then given its full size), so a member that claims a terabyte in
        a few hundred bytes of archive takes the space of what it really holds."""
        # typeshed says bytes; tarfile keeps a sparse member's map as (offset, size) pairs.
        pieces = cast("list[tuple[int, int]] | None", member.sparse)
        sparse = pieces if pieces is not None else [(0, member.size)]
        data_bytes = sum(size for _, size in sparse)
        if self.unpacked_size + data_bytes > self.limits.max_bytes:
            raise LimitExceeded(f"more than {self.limits.max_bytes} bytes of file data "
                                f"(the limit {ENV_VARIABLES['max_bytes']})")
        if self.space is not None:
            self.space.claim(data_bytes, self.unpacked_size)
        fd = os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=parent_fd)
        try:
            extracted = tf.extractfile(member)
            assert isinstance(extracted, io.BufferedReader)  # tarfile's ExFileObject
            # A sparse member's data is read through the raw member reader, whose seek only moves
            # its position (the buffered one asks a stream tar whether it can seek, and fails);
            # seeking from one data piece to the next never reads a hole.
            source: BinaryIO | io.RawIOBase = extracted.raw if pieces is not None else extracted
            for offset, size in sparse:
                if size == 0:
                    continue
                if offset < 0 or offset + size > member.size:
                    raise Refused(f"sparse data at {offset}+{size} lies outside its "
                                  f"{member.size}-byte file")
                if member.sparse is not None:
                    source.seek(offset)
                left = size
                while left > 0:
                    chunk = source.read(min(left, CHUNK))
                    if not chunk:
                        raise Refused("unexpected end of data (truncated tar?)")
                    view = memoryview(chunk)
                    while view:
                        written = os.pwrite(fd, view, offset)
                        view = view[written:]
                        offset += written
                    left -= len(chunk)
            if member.sparse is not None:
                os.ftruncate(fd, member.size)
            self._apply_meta(fd, None, member)
        finally:
            os.close(fd)
        self.unpacked_size += data_bytes

    # -- metadata -----------------------------------------------------------------------------

    def _apply_meta(self, fd: int, leaf: str | None, member: tarfile.TarInfo, *,
                    chmod: bool = True) -> None:
        """Owner, then mode (chown clears set-id bits), then xattrs (chown clears capabilities),
        then times. FD is the object itself when LEAF is None, else its directory."""
        if self.chown:
            self._lchown(fd, leaf, member.uid, member.gid)
        if chmod:
            if leaf is None:
                os.fchmod(fd, stat.S_IMODE(member.mode))
            else:
                os.chmod(leaf, stat.S_IMODE(member.mode), dir_fd=fd)  # a node we just made
        self._set_xattrs(fd if leaf is None else f"/proc/self/fd/{fd}/{leaf}", member)
        atime, mtime = _times_ns(member)
        if leaf is None:
            os.utime(fd, ns=(atime, mtime))
        else:
            os.utime(leaf, ns=(atime, mtime), dir_fd=fd, follow_symlinks=False)

    def _apply_dir(self, fd: int, node: _Node, member: tarfile.TarInfo) -> None:
        """Owner and xattrs now; mode and times at the end (children would change the times, and a
        read-only mode would stop an unprivileged unpack from filling the directory)."""
        if self.chown:
            self._lchown(fd, None, member.uid, member.gid)
        self._set_xattrs(fd, member)
        node.meta = (stat.S_IMODE(member.mode), *_times_ns(member))

    def _lchown(self, fd: int, leaf: str | None, uid: int, gid: int) -> None:
        try:
            if leaf is None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(leaf, uid, gid, dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM):
                raise
            # Root in a user namespace without a mapping for these ids: keep ours, say so once.
            log.warning("cannot give files their owners (%s); keeping the unpacking user's", exc.strerror)
            self.chown = False

    def _set_xattrs(self, target: int | str, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith(_XATTR_PAX):
                continue
            name = key[len(_XATTR_PAX):]
            if whiteout.is_private_xattr(name):
                # A layer could fake opaque dirs or redirects with these: markers come from
                # whiteout entries only.
                self._dropped_xattrs.add(name)
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value.encode("utf-8", "surrogateescape"))
                else:
                    os.setxattr(target, name, value.encode("utf-8", "surrogateescape"),
                                follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _XATTR_SKIPPABLE:
                    raise
                self._unset_xattrs.add(name)

    # -- the end of the layer -----------------------------------------------------------------

    def finish(self) -> None:
        """Markers (kernel form), then directory modes and times, children before their parents
        (made-up ones included), then warnings. Each is one walk of the record tree with the
        cursor, so linear in the number of directories whatever their depth."""
        self._drop_cursor()
        if self.kernel_markers:
            self._walk(pre=self._write_markers)
        self._walk(post=self._set_dir_meta)
        if self._skipped_devices:
            log.warning("skipped %d device node(s): creating devices needs root",
                        self._skipped_devices)
        if self._dropped_xattrs:
            log.warning("dropped overlay xattrs from the layer tar: %s",
                        ", ".join(sorted(self._dropped_xattrs)))
        if self._unset_xattrs:
            log.warning("could not set xattrs (not permitted or not supported here): %s",
                        ", ".join(sorted(self._unset_xattrs)))

    def _walk(self, *, pre: Callable[[_Node, int], None] | None = None,
              post: Callable[[_Node, int], None] | None = None) -> None:
        """Visit every directory node depth-first with the cursor on it (creating what is only a
        record): PRE before its children, POST after them. Iterative: no depth is too deep."""
        self._drop_cursor()
        if pre is not None:
            pre(self._root, self._fd)
        stack = [iter(sorted(self._root.children))]
        while stack:
            name = next(stack[-1], None)
            if name is None:
                stack.pop()
                node = self._nodes[-1]
                if stack:
                    self._up(None if post is None else functools.partial(post, node))
                elif post is not None:
                    post(node, self._fd)
                continue
            self._down(name, create=True)
            if pre is not None:
                pre(self._nodes[-1], self._fd)
            stack.append(iter(sorted(self._nodes[-1].children)))
        self._drop_cursor()

    def _write_markers(self, node: _Node, fd: int) -> None:
        if node.opaque:
            if node is self._root:
                log.warning("ignoring an opaque marker at the layer root (overlayfs ignores it there)")
            else:
                whiteout.mark_opaque_fd(fd)
        for name in sorted(node.whiteouts):
            self._write_whiteout(fd, name)

    def _set_dir_meta(self, node: _Node, fd: int) -> None:
        if node.meta is not None:
            mode, atime, mtime = node.meta
            os.fchmod(fd, mode)
            os.utime(fd, ns=(atime, mtime))
        elif node.made_up:
            if self.chown:
                self._lchown(fd, None, 0, 0)
            os.fchmod(fd, IMPLICIT_DIR_MODE)
            os.utime(fd, ns=(self._started_ns, self._started_ns))

    @property
    def implicit_dirs(self) -> tuple[str, ...]:
        """The directories this layer made without an entry of their own, once `finish` has run:
        relative paths, ``.`` for the root (a tar without ``./``), parents before children."""
        found: list[str] = []
        level: list[tuple[str, _Node]] = [("", self._root)]
        while level:
            following: list[tuple[str, _Node]] = []
            for path, node in level:
                if node.made_up and node.meta is None:
                    found.append(path or ".")
                for name in sorted(node.children):
                    following.append((f"{path}/{name}" if path else name, node.children[name]))
            level = following
        return tuple(found)

    def _write_whiteout(self, fd: int, name: str) -> None:
        """A 0:0 device, unless this layer has a real entry of that name: the entry wins, and a
        directory becomes opaque (the whiteout deleted what was below it)."""
        try:
            st = os.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            whiteout.write_device_whiteout(name, dir_fd=fd)
            return
        if stat.S_ISDIR(st.st_mode):
            child = os.open(name, DIR_FLAGS, dir_fd=fd)
            try:
                whiteout.mark_opaque_fd(child)
            finally:
                os.close(child)

    def close(self) -> None:
        self._drop_cursor()
