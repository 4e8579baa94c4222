"""Declarative builders for layer trees.

A test describes a layer as a flat list of entries (``File("etc/hosts", b"...")``,
``Whiteout("x")``, ``Opaque("d")``) and `make_tree` turns it into a real directory.
Describing layers as data lets the same description be built twice: once in the form
overlayfuse is asked to read, and once as its `kernel_equivalent`, the form kernel
overlayfs understands, so that the two mounts can be compared name for name.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# A fixed timestamp for every built object, so that two builds of the same description
# (ours and the kernel's) carry identical mtimes and compare equal.  It is not a round
# number, so an implementation that truncates nanoseconds shows up in the comparison.
DEFAULT_MTIME_NS = 1_600_000_000_123_456_789

OCI_WHITEOUT_PREFIX = ".wh."
OCI_OPAQUE_MARKER = ".wh..wh..opq"
TRUSTED_OPAQUE = "trusted.overlay.opaque"
USER_OPAQUE = "user.overlay.opaque"

Xattrs = Mapping[str, bytes]


def _no_xattrs() -> dict[str, bytes]:
    return {}


@dataclass(frozen=True, slots=True)
class File:
    """A regular file with contents, ownership, mode and xattrs."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: Xattrs = field(default_factory=_no_xattrs)


@dataclass(frozen=True, slots=True)
class Dir:
    """A directory; created if absent, else its metadata is (re)applied."""

    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    xattrs: Xattrs = field(default_factory=_no_xattrs)


@dataclass(frozen=True, slots=True)
class Symlink:
    """A symbolic link; the target is stored verbatim and may dangle."""

    path: str
    target: str
    uid: int = 0
    gid: int = 0
    xattrs: Xattrs = field(default_factory=_no_xattrs)


@dataclass(frozen=True, slots=True)
class HardLink:
    """A second name for an object already built in the same layer (target is layer-relative)."""

    path: str
    target: str


@dataclass(frozen=True, slots=True)
class Fifo:
    path: str
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Socket:
    """A unix socket node: bound, then the socket is closed, leaving the inode behind."""

    path: str


@dataclass(frozen=True, slots=True)
class CharDev:
    path: str
    major: int
    minor: int
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class BlockDev:
    path: str
    major: int
    minor: int
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Sparse:
    """A file of `size` bytes that is all hole except `chunks` ({offset: bytes})."""

    path: str
    size: int
    chunks: Mapping[int, bytes] = field(default_factory=dict)
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Whiteout:
    """Kernel-form whiteout: a character device 0:0 with the hidden name."""

    path: str


@dataclass(frozen=True, slots=True)
class OciWhiteout:
    """OCI-form whiteout: an empty file `.wh.NAME` next to where NAME would be."""

    path: str


OPAQUE_FORMS = ("trusted", "user", "oci")


@dataclass(frozen=True, slots=True)
class Opaque:
    """Marks a directory opaque: `trusted`/`user` xattr, or an OCI `.wh..wh..opq` file."""

    path: str
    form: str = "trusted"

    def __post_init__(self) -> None:
        if self.form not in OPAQUE_FORMS:
            raise ValueError(f"unknown opaque form {self.form!r}")


Entry = (
    File | Dir | Symlink | HardLink | Fifo | Socket | CharDev | BlockDev | Sparse
    | Whiteout | OciWhiteout | Opaque
)


def make_tree(root: Path, *entries: Entry, mtime_ns: int = DEFAULT_MTIME_NS) -> Path:
    """Build `entries` under `root` and give every object the same fixed atime/mtime.

    Timestamps are set last and bottom-up: creating a child changes its parent's mtime,
    so only a final deepest-first pass leaves directory mtimes deterministic.
    """
    root.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        _build(root, entry)
    _set_times(root, mtime_ns)
    return root


def kernel_equivalent(entries: Iterable[Entry]) -> list[Entry]:
    """Map each entry to the form kernel overlayfs (without `userxattr`) understands.

    `.wh.NAME` becomes a 0:0 character device NAME; `.wh..wh..opq` and
    `user.overlay.opaque` become `trusted.overlay.opaque=y`.  A `user.overlay.opaque`
    written straight into a Dir's xattrs is translated too, so a description may use either.
    """
    out: list[Entry] = []
    for entry in entries:
        if isinstance(entry, OciWhiteout):
            out.append(Whiteout(entry.path))
        elif isinstance(entry, Opaque):
            out.append(Opaque(entry.path, "trusted"))
        elif isinstance(entry, Dir) and USER_OPAQUE in entry.xattrs:
            xattrs = {k: v for k, v in entry.xattrs.items() if k != USER_OPAQUE}
            xattrs[TRUSTED_OPAQUE] = entry.xattrs[USER_OPAQUE]
            out.append(Dir(entry.path, entry.mode, entry.uid, entry.gid, xattrs))
        else:
            out.append(entry)
    return out


def oci_whiteout_name(path: str) -> str:
    """The layer-relative path of the `.wh.` file that whites out `path`."""
    parent, _, name = path.rpartition("/")
    return f"{parent}/{OCI_WHITEOUT_PREFIX}{name}" if parent else OCI_WHITEOUT_PREFIX + name


def _build(root: Path, entry: Entry) -> None:
    """Create one entry, its parents first (mode 0755), refusing to clobber anything.

    Nothing is ever written, chowned or chmodded through a symlink: parents must be real
    directories (a symlinked parent is an error, not a detour out of `root`), files are
    created with O_EXCL|O_NOFOLLOW and their metadata set through that descriptor.
    """
    target = _parent_dirs(root, entry.path) / Path(entry.path).name
    match entry:
        case File():
            _write_new(target, entry.data, entry.uid, entry.gid, entry.mode, entry.xattrs)
        case Dir():
            _real_dir(target, create=True)
            _own_mode_xattrs(target, entry.uid, entry.gid, entry.mode, entry.xattrs)
        case Symlink():
            os.symlink(entry.target, target)
            os.chown(target, entry.uid, entry.gid, follow_symlinks=False)
            _set_xattrs(target, entry.xattrs)
        case HardLink():
            os.link(root / entry.target, target, follow_symlinks=False)
        case Fifo():
            os.mkfifo(target, entry.mode)  # EEXIST on anything there, a symlink included
            os.chmod(target, entry.mode)
        case Socket():
            _make_socket(target)
        case CharDev():
            _mknod(target, stat.S_IFCHR | entry.mode, entry.major, entry.minor)
        case BlockDev():
            _mknod(target, stat.S_IFBLK | entry.mode, entry.major, entry.minor)
        case Sparse():
            _make_sparse(target, entry)
        case Whiteout():
            _mknod(target, stat.S_IFCHR | 0o000, 0, 0)
        case OciWhiteout():
            _write_new(_parent_dirs(root, oci_whiteout_name(entry.path)).joinpath(
                Path(oci_whiteout_name(entry.path)).name), b"")
        case Opaque():
            _make_opaque(target, entry.form)
        case _:
            raise TypeError(f"not a tree entry: {entry!r}")


def _real_dir(path: Path, *, create: bool) -> None:
    """`path` is a directory and not a symlink to one (made, mode 0755, if `create`)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
        os.mkdir(path, 0o755)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a directory (never followed)")


def _parent_dirs(root: Path, rel: str) -> Path:
    """Make the parents of `rel` under `root`, each a real directory; return the last."""
    here = root
    for part in Path(rel).parent.parts:
        here = here / part
        _real_dir(here, create=True)
    return here


def _opened(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def _write_new(path: Path, data: bytes, uid: int = 0, gid: int = 0, mode: int = 0o644,
               xattrs: Xattrs | None = None) -> None:
    fd = _opened(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        _fd_own_mode_xattrs(fd, uid, gid, mode, xattrs or {})
    finally:
        os.close(fd)


def _fd_own_mode_xattrs(fd: int, uid: int, gid: int, mode: int, xattrs: Xattrs) -> None:
    # chown before chmod: chown clears set-user-ID/set-group-ID bits.
    os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)
    for name, value in xattrs.items():
        os.setxattr(fd, name, value)


def _own_mode_xattrs(path: Path, uid: int, gid: int, mode: int, xattrs: Xattrs) -> None:
    """Through a descriptor opened with O_NOFOLLOW: a symlink at `path` is an error."""
    fd = _opened(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _fd_own_mode_xattrs(fd, uid, gid, mode, xattrs)
    finally:
        os.close(fd)


def _set_xattrs(path: Path, xattrs: Xattrs) -> None:
    for name, value in xattrs.items():
        os.setxattr(path, name, value, follow_symlinks=False)


def _mknod(path: Path, mode: int, major: int, minor: int) -> None:
    os.mknod(path, mode, os.makedev(major, minor))
    os.chmod(path, stat.S_IMODE(mode))  # umask must not decide the mode


def _make_socket(path: Path) -> None:
    """Bind through /proc/self/fd so deep paths fit in sun_path's 108 bytes."""
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(f"/proc/self/fd/{dirfd}/{path.name}")
    finally:
        os.close(dirfd)


def _make_sparse(path: Path, entry: Sparse) -> None:
    fd = _opened(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.ftruncate(fd, entry.size)
        for offset, chunk in entry.chunks.items():
            os.pwrite(fd, chunk, offset)
        os.fchmod(fd, entry.mode)
    finally:
        os.close(fd)


def _make_opaque(path: Path, form: str) -> None:
    _real_dir(path, create=True)
    if form == "oci":
        _write_new(path / OCI_OPAQUE_MARKER, b"")
    else:
        os.setxattr(path, f"{form}.overlay.opaque", b"y", follow_symlinks=False)


def _set_times(root: Path, mtime_ns: int) -> None:
    """Set atime/mtime on every object, each directory after everything inside it."""
    times = (mtime_ns, mtime_ns)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        # Subdirectories were already visited (bottom-up); symlinks to directories are
        # listed in dirnames but never descended into, so they are stamped here.
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isdir(path):
                os.utime(path, ns=times, follow_symlinks=False)
        os.utime(dirpath, ns=times, follow_symlinks=False)


def has_data(path: Path) -> bool:
    """Whether the regular file PATH holds any data (st_blocks may count an ext4 xattr block, as a
    metacopy file's origin and metacopy xattrs can need: ask SEEK_DATA)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise
    finally:
        os.close(fd)
    return True
