"""Copy-up: moving a lower object into the upper dir before its first change.

The rules are kernel overlayfs's (Documentation/filesystems/overlayfs.rst): the caller copies parents
first; here each object gets its data, then its metadata, then its xattrs, then its timestamps.
Every object is built where nothing shows it and published in one step, so a crash or a kill -9 at
any moment leaves either nothing or the complete object in upper:
- a regular file, as the kernel's ``ovl_copy_up_tmpfile``, in an unnamed file (O_TMPFILE) in the
  staging dir, linked into place: a kill leaves nothing at all, and the link is one directory
  change where a rename out of staging is two (the bare syscalls of a metacopy copy-up take a
  quarter less time for it on ext4: docs/performance.md);
- anything else, or a file where the upper filesystem makes no unnamed files, under a name in a
  private staging dir in the workdir (``WORKDIR/work``, as the kernel names it), renamed into
  place. Leftovers stay in staging, where `Workspace.prepare` removes them at the next mount.

Synchronous and blocking: the FUSE layer runs these functions in worker threads. Errors are OSError,
mapped to errno at the FUSE boundary.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import secrets
import shutil
import stat
from dataclasses import dataclass, field

from ..linux import fileattr, ownwrite
from ..linux.syscalls import link_open_file, rename_noreplace, start_writeback
from . import origin, unnamed, whiteout
from .metachange import MetadataChange
from .ownership import DiskOwner, source_override

log = logging.getLogger(__name__)

#: The kernel's name for the staging dir inside workdir; it may keep ``index/`` etc. beside it.
STAGING_NAME = "work"

#: ioctl(dst, FICLONE, src): share the source's extents (btrfs, xfs, bcachefs); ext4 says EOPNOTSUPP.
FICLONE = 0x40049409

#: Why a clone or copy_file_range can fail while a plainer copy would still work: no support in this
#: filesystem or kernel, or the two files are on different filesystems.
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS})

#: Chunk of the last-resort pread/pwrite copy: big enough that the Python loop costs nothing.
_FALLBACK_CHUNK = 1 << 20

#: How much a copy-up copies before it hands that part to the disk (see `_copy_range`).
_WRITEBACK_CHUNK = 32 << 20

#: xattrs that carry access control: losing them would widen access, so a target that cannot store them
#: fails the copy-up (the kernel's ovl_must_copy_xattr); any other unsupported xattr is skipped.
_MUST_COPY_XATTRS = ("system.posix_acl_access", "system.posix_acl_default", "security.capability")

_serial = itertools.count()  # next() on a count is atomic in CPython: safe across worker threads


def _staging_prefix() -> str:
    """This process's part of a staging name: its pid and a random token, made once (not two
    syscalls per copy-up) and made again in a forked child, which has a pid of its own."""
    return f"#{os.getpid()}-{secrets.token_hex(4)}-"


_prefix = _staging_prefix()


def _new_prefix_after_fork() -> None:
    global _prefix
    _prefix = _staging_prefix()


os.register_at_fork(after_in_child=_new_prefix_after_fork)


@dataclass(frozen=True, slots=True)
class Workspace:
    """Where copy-ups are built: a staging dir on the same filesystem as upper."""

    upper: str
    staging: str
    owner: DiskOwner | None = None
    """How copies and new objects get owner and mode when not by plain chown/chmod (see `ownership`)."""
    durable: bool = True
    """False with ``fsync=0``/``volatile``: no fsync after a copy-up of data either (a copy-up
    of metadata alone is never fsynced, see `_build`)."""
    origin_xattr: str = ""
    """Where a copy records its lower object (``trusted.overlay.origin``...; see `origin`), or ""."""
    tmpfile: bool = False
    """The staging dir's filesystem makes unnamed files (O_TMPFILE): a regular file's copy is
    built in one and linked into place (`_new_file`)."""
    ahead: unnamed.UnnamedFiles | None = field(default=None, compare=False, repr=False)
    """Unnamed files made ahead (`unnamed`), where `tmpfile`; shared by the copies
    ``dataclasses.replace`` makes of this workspace."""

    @classmethod
    def prepare(cls, upperdir: str, workdir: str) -> Workspace:
        """Use ``WORKDIR/work`` as staging, creating it (mode 0, as the kernel does) if missing.

        Anything left inside it is an interrupted copy-up from an earlier mount and is removed; nothing
        else in workdir is touched, and symlinks found there are removed, never followed.
        """
        staging = os.path.join(workdir, STAGING_NAME)
        try:
            os.mkdir(staging, 0o000)
        except FileExistsError:
            _make_usable(staging)  # mode 0 from an earlier version: unusable without root
            removed = _empty_dir(staging)
            if removed:
                log.info("removed %d interrupted copy-up(s) from %s", removed, staging)
        else:
            os.chmod(staging, 0o000)  # mkdir's mode is masked by umask; make it exact
            log.debug("created staging dir %s", staging)
            _make_usable(staging)
        if os.stat(staging).st_dev != os.stat(upperdir).st_dev:
            raise OSError(errno.EXDEV, f"staging dir is not on the filesystem of upperdir {upperdir}",
                          staging)
        tmpfile = _makes_unnamed_files(staging)
        ahead = unnamed.UnnamedFiles(staging) if tmpfile else None
        return cls(upper=upperdir, staging=staging, tmpfile=tmpfile, ahead=ahead)

    def open_unnamed(self, access: int = os.O_WRONLY, *, new: bool = False) -> int:
        """A new regular file with no name in the staging dir (O_TMPFILE: only where `tmpfile`),
        mode 0600 until its builder sets the final one, open with ACCESS (and O_APPEND if given);
        `syscalls.link_open_file` names it. Write-only ones come made ahead where one is ready
        (`unnamed`); NEW: a new file, whose times are its creation's, so a made-ahead one gets
        its times set to now (a copy sets them to its source's itself)."""
        if self.ahead is None or access & ~os.O_APPEND != os.O_WRONLY:
            return os.open(self.staging, os.O_TMPFILE | os.O_CLOEXEC | access, 0o600)
        fd, made_ahead = self.ahead.new()
        try:
            if access & os.O_APPEND:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            if new and made_ahead:
                os.utime(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        """Release what the workspace holds (its files made ahead); it still works after."""
        if self.ahead is not None:
            self.ahead.close()


def _makes_unnamed_files(staging: str) -> bool:
    """Whether STAGING's filesystem makes O_TMPFILE files (ext4, xfs, btrfs, tmpfs do; some FUSE and
    network filesystems do not, and say so with EOPNOTSUPP, or EISDIR from kernels older than it)."""
    try:
        os.close(unnamed.make(staging))
    except OSError as exc:
        log.debug("staging dir %s: no unnamed files (%s): copies are built under a name", staging, exc)
        return False
    return True


def _make_usable(staging: str) -> None:
    """Open STAGING to its owner when mode 0 locks us out.

    Mode 0 keeps everyone else out, and root (as the kernel, which works there with the mounter's
    capabilities) passes it by CAP_DAC_OVERRIDE. An unprivileged daemon has no such capability: it
    must own and use the dir by its mode, so it gets 0700 (as fuse-overlayfs's work dir has).
    """
    if os.access(staging, os.R_OK | os.W_OK | os.X_OK):
        return
    os.chmod(staging, 0o700)
    log.debug("staging dir %s: mode 0700 (no capability to pass mode 0)", staging)


def copy_up(ws: Workspace, source: str, target: str) -> os.stat_result:
    """Copy the lower object SOURCE to TARGET in upper, atomically; return TARGET's lstat.

    TARGET's parent must already exist in upper and TARGET itself must not exist: if it appears
    meanwhile (a concurrent copy-up of the same name), FileExistsError and the winner's copy is kept.
    A directory is copied alone, without its contents. Hard links are not preserved: the copy is a
    new inode (the kernel's behaviour without ``index=on``).
    """
    return _copy_up(ws, source, target, None)


def copy_up_size(ws: Workspace, source: str, target: str, size: int) -> os.stat_result:
    """`copy_up` a regular file whose copy is SIZE bytes long, for ``open(O_TRUNC)`` and ``truncate``.

    Only data below SIZE is copied, so truncating a huge lower file to 0 costs nothing; growing it adds
    a hole. Timestamps are still the source's: the caller applies the truncate's own mtime/ctime change.
    """
    if size < 0:
        raise OSError(errno.EINVAL, "negative size", source)
    return _copy_up(ws, source, target, size)


def copy_up_metadata(
    ws: Workspace, source: str, target: str, metacopy_xattr: str, change: MetadataChange | None = None
) -> tuple[os.stat_result, bool]:
    """Copy the lower regular file SOURCE to TARGET without its data (the kernel's ``metacopy=on``):
    a sparse file of the same size (no blocks) with owner, mode, xattrs and times, marked with
    METACOPY_XATTR; reads go on to SOURCE until `fill_metacopy`. Atomic like `copy_up`, and not
    fsynced: there is no data to wait for (see `_build`).

    CHANGE: the chown/chmod this copy-up is for; where it gives the same result (see
    `MetadataChange.folded`), the copy is created with the new owner and mode, and the second
    value returned is True: the change is made. Returns the published copy's stat."""
    src = _open_source(source)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ESTALE, "source changed during copy-up", source)
        dst, staged = _new_file(ws)
        try:
            os.ftruncate(dst, st.st_size)
            folded = _copy_metadata(src, dst, st, ws, change)
            ownwrite.setxattr(dst, metacopy_xattr, b"", follow_symlinks=True)
            _publish_file(dst, staged, target)
            published = os.fstat(dst)  # after the link or rename, which sets its ctime
        except BaseException:
            if staged is not None:
                _remove_staged(staged)
            raise
        finally:
            os.close(dst)
    finally:
        os.close(src)
    log.debug("copied up the metadata of %s to %s%s", source, target, " with its change" if folded else "")
    return published, folded


def fill_metacopy(ws: Workspace, path: str, data: str, size: int | None) -> os.stat_result:
    """Copy the data of the metacopy file PATH in from DATA (its lower file), in place, as the
    kernel does: the metacopy marker is removed only once the data is durable, so a crash or kill
    -9 in between leaves a metacopy file that still reads DATA. SIZE: it is about to be truncated
    to SIZE (only that much is copied). The file keeps its times: copying in is no visible change."""
    dst = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        before = os.fstat(dst)
        src = _open_source(data)
        try:
            src_size = os.fstat(src).st_size
            end = src_size if size is None else size
            if min(end, src_size) > 0 and not _reflink(src, dst):
                _copy_segments(src, dst, min(end, src_size), ws.durable)
            os.ftruncate(dst, end)
        finally:
            os.close(src)
        if ws.durable:
            os.fsync(dst)
        # only the marker goes: a redirect stays, as the kernel's ovl_copy_up_meta_inode_data
        # leaves it (neither reads one on a file that holds its data)
        for name in whiteout.METACOPY_XATTRS:
            try:
                os.removexattr(dst, name)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    raise
        os.utime(dst, ns=(before.st_atime_ns, before.st_mtime_ns))
        return os.fstat(dst)
    finally:
        os.close(dst)


def staging_path(ws: Workspace) -> str:
    """A fresh, unused name in the staging dir."""
    return os.path.join(ws.staging, f"{_prefix}{next(_serial)}")


def _copy_up(ws: Workspace, source: str, target: str, size: int | None) -> os.stat_result:
    st = os.lstat(source)
    if size is not None and not stat.S_ISREG(st.st_mode):
        code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
        raise OSError(code, "only a regular file can be copied up to a size", source)
    if stat.S_ISREG(st.st_mode):
        copied = _copy_up_file(ws, source, target, size)
        log.debug("copied up %s to %s", source, target)
        return copied
    staged = staging_path(ws)
    try:
        _build(source, staged, st, ws)
        _publish(staged, target)
    except BaseException:
        _remove_staged(staged)
        raise
    log.debug("copied up %s to %s", source, target)
    return os.lstat(target)


def _build(source: str, staged: str, st: os.stat_result, ws: Workspace) -> None:
    """Create STAGED as a complete copy of SOURCE (already lstat'ed as ST), anything but a regular
    file (`_copy_up_file`)."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        os.mkdir(staged, 0o700)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), staged)
    elif stat.S_ISFIFO(mode):
        os.mkfifo(staged, 0o600)
    elif stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        os.mknod(staged, stat.S_IFMT(mode) | 0o600, st.st_rdev)
    else:
        raise OSError(errno.EINVAL, f"cannot copy up file type {stat.S_IFMT(mode):#o}", source)
    _copy_metadata(source, staged, st, ws)
    # No fsync for an object without data (a directory, a symlink, a device, a metacopy file), as
    # the kernel's ovl_copy_up_one without fsync=strict: "we want to avoid fsync on all meta
    # copyup, because that will hurt performance of workloads such as chown -R". It stays atomic:
    # the upper filesystem journals the object's creation, owner, xattrs and times before the
    # rename that publishes it (ext4, xfs and btrfs keep metadata changes in order), so a crash
    # shows it complete or not at all; what a crash may lose is the change itself, as with a chown
    # on any filesystem. A directory's fsync is a whole journal commit: it cost chown -R and mv
    # of a lower directory ~3x the kernel's time.


def _copy_up_file(ws: Workspace, source: str, target: str, size: int | None) -> os.stat_result:
    """Copy the regular file SOURCE (its first SIZE bytes, or all) to TARGET: data, metadata, and
    an fsync where the mount is durable, before it is published. Returns the published copy's
    stat, taken from its descriptor (no second walk of TARGET's path)."""
    src = _open_source(source)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):  # replaced between lstat and open: not worth guessing
            raise OSError(errno.ESTALE, "source changed during copy-up", source)
        dst, staged = _new_file(ws)
        try:
            _copy_data(src, dst, st.st_size if size is None else size, st.st_size, ws.durable)
            _copy_metadata(src, dst, st, ws)
            if ws.durable:
                os.fsync(dst)
            _publish_file(dst, staged, target)
            return os.fstat(dst)  # after the link or rename, which sets its ctime
        except BaseException:
            if staged is not None:
                _remove_staged(staged)
            raise
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _new_file(ws: Workspace) -> tuple[int, str | None]:
    """A new empty file, open for writing, to build a copy in, and its name in the staging dir:
    None where it has none (O_TMPFILE, `Workspace.tmpfile`), so that nothing is left of it if the
    daemon dies before `_publish_file`."""
    if ws.tmpfile:
        return ws.open_unnamed(), None
    staged = staging_path(ws)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(staged, flags, 0o600), staged


def _publish_file(fd: int, staged: str | None, target: str) -> None:
    """Give the finished copy open as FD (`_new_file`) the name TARGET, never over an object that
    appeared there meanwhile: a link of an unnamed file (which refuses an existing name by itself),
    or the rename of STAGED."""
    if staged is None:
        link_open_file(fd, target)
    else:
        _publish(staged, target)


def _open_source(source: str) -> int:
    """Open a lower file without bumping its atime (lower layers are not ours to change)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(source, flags | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
        return os.open(source, flags)


def _copy_data(src: int, dst: int, size: int, src_size: int, durable: bool) -> None:
    """Copy the first SIZE bytes of SRC into the empty DST: reflink, else data segments only.
    DURABLE: an fsync will follow (see `_copy_range`)."""
    end = min(size, src_size)
    if end > 0 and not _reflink(src, dst):
        _copy_segments(src, dst, end, durable)
    # Sets the length past the last segment too, so a trailing hole stays a hole; after a reflink
    # it cuts the clone down to SIZE. Only where the length is not SIZE already (nearly every file
    # ends in data): ext4 truncating to the same length still zeroes the last page's tail, waiting
    # for the writeback `_copy_range` started on it (375 µs of a small file's copy-up, traced).
    if os.fstat(dst).st_size != size:
        os.ftruncate(dst, size)


def _reflink(src: int, dst: int) -> bool:
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


def _copy_segments(src: int, dst: int, end: int, durable: bool) -> None:
    """Copy each data segment of SRC below END to the same offset in DST, leaving holes as holes.
    DURABLE: an fsync will follow (see `_copy_range`)."""
    offset = 0
    while offset < end:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from OFFSET to EOF
                return
            if exc.errno not in _UNSUPPORTED:
                raise
            data, hole = offset, end  # no hole detection here: everything is data
        else:
            if data >= end:
                return
            hole = min(os.lseek(src, data, os.SEEK_HOLE), end)
        _copy_range(src, dst, data, hole - data, durable)
        offset = hole


def _copy_range(src: int, dst: int, offset: int, count: int, durable: bool) -> None:
    """Copy COUNT bytes at OFFSET, one writeback chunk at a time.

    DURABLE (an fsync will follow): each chunk is handed to the disk as soon as it is copied
    (sync_file_range), so the disk writes it while the next one is copied, and the fsync that makes
    the copy durable has only the last chunk left to wait for: a 1 GiB copy-up took ~0.38 s this way
    against ~0.56 s (and up to 1.1 s) with one fsync at the end, on this project's ext4 VM. Without
    an fsync (``fsync=0``, ``volatile``) the copy is left in the page cache for the kernel's own
    writeback, as fuse-overlayfs and the kernel's ``volatile`` leave theirs: starting the writes
    early would only make this copy wait for the disk queue (README, Performance, copyup-big).
    """
    end = offset + count
    while offset < end:
        step = min(_WRITEBACK_CHUNK, end - offset)
        copied = _copy_chunk(src, dst, offset, step)
        if durable:
            start_writeback(dst, offset, copied)
        if copied < step:  # the source shrank under us; the final ftruncate zero-fills the rest
            return
        offset += step


def _copy_chunk(src: int, dst: int, offset: int, count: int) -> int:
    """Copy COUNT bytes at OFFSET in the kernel (copy_file_range), else sendfile, else pread/pwrite;
    returns how many were copied (fewer only at the source's end)."""
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src, dst, count - done, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            log.debug("copy_file_range unsupported (%s), falling back", exc)
            return done + _copy_chunk_fallback(src, dst, offset + done, count - done)
        if n == 0:
            break
        done += n
    return done


def _copy_chunk_fallback(src: int, dst: int, offset: int, count: int) -> int:
    start, end = offset, offset + count
    try:
        os.lseek(dst, offset, os.SEEK_SET)  # sendfile writes at DST's file offset
        while offset < end:
            n = os.sendfile(dst, src, offset, end - offset)
            if n == 0:
                break
            offset += n
        return offset - start
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    while offset < end:
        chunk = os.pread(src, min(_FALLBACK_CHUNK, end - offset), offset)
        if not chunk:
            break
        offset += os.pwrite(dst, chunk, offset)
    return offset - start


def _copy_metadata(
    src: int | str, dst: int | str, st: os.stat_result, ws: Workspace, change: MetadataChange | None = None
) -> bool:
    """Owner, then mode, then xattrs (the origin last, as the kernel's ovl_copy_up_metadata), then
    times: each step would undo parts of an earlier order.

    chown clears setuid/setgid and security.capability, so it goes first; times go last because
    every other change touches ctime and some (xattrs) may touch mtime on some filesystems.
    SRC/DST are both fds (regular files) or both paths (never followed). CHANGE: a chown/chmod to
    fold in where that gives the same result (`MetadataChange.folded`); returns whether it was.
    """
    owner = ws.owner
    is_link = stat.S_ISLNK(st.st_mode)
    names = _xattr_names(src)  # once, for the override and the copy
    # A lower's override_stat xattr (fuse-overlayfs's, containers-storage's force_mask) is the owner
    # and mode the mount showed: the copy keeps them, in its own override or for real (as the peer).
    found = source_override(src, st, names)
    folded = change.folded(st, found, names) if change is not None else None
    if folded is not None:
        found = folded
    if owner is not None:  # override xattrs or squashed ids (see `ownership`)
        owner.apply(dst, found.uid, found.gid, stat.S_IFMT(st.st_mode) | found.mode)
    else:
        os.chown(dst, found.uid, found.gid, follow_symlinks=isinstance(dst, int))
    if not is_link and owner is None:  # a symlink's mode is fixed at 0777 and Linux cannot change it
        os.chmod(dst, found.mode)
    _copy_xattrs(src, dst, is_link, names)
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        fileattr.copy_kept_flags(src, dst)  # sync and noatime, as the kernel's ovl_copy_fileattr
    if ws.origin_xattr and origin.wanted(st):
        origin.set_origin(dst, ws.origin_xattr, origin.encode(src, st))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=isinstance(dst, int))
    return folded is not None


def _xattr_names(src: int | str) -> list[str]:
    """SRC's xattr names (an fd, or a path never followed); none where its filesystem has no xattrs."""
    try:
        return os.listxattr(src, follow_symlinks=isinstance(src, int))
    except OSError as exc:
        if exc.errno == errno.ENOTSUP:  # the lower filesystem has no xattrs at all
            return []
        raise


def _copy_xattrs(src: int | str, dst: int | str, is_link: bool, names: list[str]) -> None:
    """Copy every xattr of NAMES (SRC's) except the overlay's own (an opaque marker copied up would
    hide lower names)."""
    follow = isinstance(src, int)  # fds need follow_symlinks=True; paths are never followed
    for name in names:
        if whiteout.is_private_xattr(name):
            continue
        try:
            value = os.getxattr(src, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # removed since listxattr
                continue
            raise
        try:
            ownwrite.setxattr(dst, name, value, follow_symlinks=isinstance(dst, int))
        except OSError as exc:
            if is_link and name.startswith("user.") and exc.errno in (errno.ENOTSUP, errno.EPERM):
                log.debug("skipping xattr %s on symlink %s: %s", name, dst, exc)
            elif exc.errno == errno.ENOTSUP and not name.startswith(_MUST_COPY_XATTRS):
                log.debug("skipping xattr %s: upper cannot store it (%s)", name, exc)
            else:
                raise


def _publish(staged: str, target: str) -> None:
    """Rename the finished copy into place, never over an object that appeared there meanwhile."""
    try:
        # a read-only directory leaving the staging dir needs its owner's write bit (`ownwrite`)
        ownwrite.retry(lambda: rename_noreplace(staged, target), staged, False, moved_to=target)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        # The upper filesystem cannot refuse a replace in one step: check, then rename (racy, but
        # only against another copy-up of the same name, which the FUSE layer serialises).
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target) from exc
        os.rename(staged, target)


def _remove_staged(staged: str) -> None:
    """Remove a half-built copy; never lets a cleanup error hide the error that caused it."""
    try:
        if stat.S_ISDIR(os.lstat(staged).st_mode):
            os.rmdir(staged)  # a staged directory is always empty
        else:
            os.unlink(staged)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove staged copy-up %s (removed at next mount): %s", staged, exc)


def _empty_dir(path: str) -> int:
    """Remove everything inside PATH without following symlinks; return how many entries it held."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in it]
        for name, is_dir in entries:
            if is_dir:
                shutil.rmtree(name, dir_fd=fd)  # fd-based on Linux: never follows a symlink
            else:
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    return len(entries)
