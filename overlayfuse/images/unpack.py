"""Unpack one layer blob into a new directory, safely, verifying its digest and diff_id on the way.

One pass over the blob: the raw bytes are hashed (and teed to the caller's store file), decompressed,
hashed again (the diff_id) and extracted. The tar is read to its very end, so both digests cover
every byte. This module knows nothing about manifests or the store (umoci's split): the caller
passes what the descriptors say and gets back what the blob really was.

The entries themselves are placed by `extract.Extractor`: through directory fds, never following a
symlink, hostile entries refused, whiteouts converted to the kernel's markers when we may (its
docstring says how). Anything refused raises an `ImageError` naming the layer and the entry, and the
half-built directory is removed.
"""

from __future__ import annotations

import errno
import logging
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import ImageError
from ..linux.syscalls import syncfs
from ..overlay import whiteout
from . import oci
from .compression import HashingReader, open_decompressed
from .extract import DIR_FLAGS, IMPLICIT_DIR_MODE, Extractor, Refused
from .limits import UnpackLimits
from .remove import remove_tree
from .space import NoSpace, SpaceWatch

log = logging.getLogger(__name__)

#: The largest PAX or GNU long-name header we read: tarfile reads one whole into memory, so a
#: bomb could claim gigabytes. Real ones hold a long name and some xattrs: a few KiB (xattr values
#: are at most 64 KiB each on Linux).
MAX_HEADER_SIZE = 16 << 20

#: tarfile's stream buffer: each small read copies what is left of it, so it must stay small
#: (see `tarfile._Stream.__read`); 64 KiB keeps headers cheap and large files at full speed.
TAR_BUFSIZE = 1 << 16


@dataclass(frozen=True, slots=True)
class UnpackedLayer:
    """What a layer blob turned out to be: digest and size of the blob, diff_id of its tar, and the
    bytes of regular-file data it unpacked to (each hardlinked file once).

    IMPLICIT_DIRS: the directories the tar names only as parents (no entry of their own), and
    ``.`` when it has no ``./`` entry; relative to DEST, parents first. They were given 0755,
    root:root (when unpacking as root) and the unpack's start time; the caller, which knows the
    layers below, may give them the metadata they have there."""

    digest: str
    size: int
    diff_id: str
    unpacked_size: int
    implicit_dirs: tuple[str, ...] = ()


def unpack_layer(raw: BinaryIO, media_type: str, dest: Path, *, digest: str | None = None,
                 size: int | None = None, diff_id: str | None = None,
                 copy_to: BinaryIO | None = None,
                 progress: Callable[[int], None] | None = None,
                 limits: UnpackLimits | None = None) -> UnpackedLayer:
    """Unpack the layer blob read from RAW into DEST, which must not exist and is created here.

    DIGEST, SIZE (the descriptor's) and DIFF_ID (the config's) are checked when given. COPY_TO
    receives every raw byte as it is read. PROGRESS is called with the number of raw bytes each
    read consumed (an increment, for a progress bar's update). LIMITS bound depth, entries and
    file data (`UnpackLimits.from_env` when not given); the free space of DEST's filesystem is
    checked before and while unpacking (`space.SpaceWatch`). Any failure raises ImageError and
    leaves no DEST.
    """
    compression = oci.LAYER_COMPRESSION.get(media_type)
    label = f"layer {digest}" if digest else "layer"
    if compression is None:
        known = ", ".join(sorted(oci.LAYER_COMPRESSION))
        raise ImageError(f"{label}: unsupported layer media type {media_type!r} (known: {known})")
    for what, value in (("digest", digest), ("diff_id", diff_id)):
        if value is not None and not value.startswith("sha256:"):
            raise ImageError(f"{label}: unsupported {what} algorithm in {value!r} (only sha256)")
    dest = Path(dest)
    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        raise ImageError(f"{label}: cannot unpack into {dest}: it already exists") from None
    blob = HashingReader(raw, copy_to=copy_to, progress=progress, limit=size, what="the blob")
    try:
        result = _unpack(blob, compression, dest, label, digest, size, diff_id,
                         limits or UnpackLimits.from_env(), copy_to is not None)
    except BaseException as exc:
        remove_tree(dest)
        if isinstance(exc, ImageError) and digest is not None:
            _raise_if_digest_wrong(blob, digest, label, exc)
        raise
    log.debug("unpacked %s: %d bytes of blob, %d bytes of files", label, result.size,
              result.unpacked_size)
    return result


def _raise_if_digest_wrong(blob: HashingReader, digest: str, label: str, exc: ImageError) -> None:
    """A blob that fails to unpack because it is not the blob the manifest names is reported as
    that (the root cause), not as whatever its wrong bytes happened to trip over."""
    try:
        blob.drain()
    except (ImageError, OSError):
        return  # longer than its descriptor (the size error says so), or unreadable
    if blob.digest != digest:
        raise ImageError(f"{label}: the blob does not match its digest (its content is "
                         f"{blob.digest})") from exc


def _unpack(blob: HashingReader, compression: str, dest: Path, label: str, digest: str | None,
            size: int | None, diff_id: str | None, limits: UnpackLimits,
            copying: bool) -> UnpackedLayer:
    tar_stream = _TarStream(open_decompressed(blob, compression))
    root_fd = os.open(dest, DIR_FLAGS)
    try:
        os.fchmod(root_fd, IMPLICIT_DIR_MODE)
        try:
            space = SpaceWatch.of(root_fd)
            if copying and size is not None:  # the blob's copy lands on the same filesystem
                space.claim(size, 0)
        except NoSpace as exc:
            raise ImageError(f"{label}: before unpacking: {exc}") from None
        style = whiteout.probe_marker_style(str(dest))
        kernel_markers = style.device_whiteouts and style.opaque_xattr == whiteout.TRUSTED_OPAQUE
        extractor = Extractor(root_fd, kernel_markers=kernel_markers, chown=os.geteuid() == 0,
                              limits=limits, space=space)
        try:
            _extract_all(tar_stream, extractor, label)
            _check(blob, tar_stream, label, digest, size, diff_id)
            try:
                extractor.finish()
            except Refused as exc:  # a marker under a name the layer made a non-directory
                raise ImageError(f"{label}: {exc}") from None
            except OSError as exc:
                if exc.errno not in _NO_SPACE:
                    raise
                raise ImageError(f"{label}: {_no_space(extractor, root_fd)}") from None
        finally:
            extractor.close()
        syncfs(root_fd)  # one for the layer, not one fsync per file: a crash must not leave it half-written
    finally:
        os.close(root_fd)
    return UnpackedLayer(blob.digest, blob.size, tar_stream.digest, extractor.unpacked_size,
                         extractor.implicit_dirs)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _no_space(extractor: Extractor, root_fd: int) -> str:
    st = os.fstatvfs(root_fd)
    return (f"no space left on the store's filesystem after {extractor.unpacked_size} bytes of file "
            f"data ({st.f_bavail * st.f_frsize} bytes free)")


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an extended header (PAX, GNU long name or link) larger than
    `MAX_HEADER_SIZE` before tarfile reads it into memory. `tarfile.open(tarinfo=...)` is the
    documented hook; ``_proc_member`` is where tarfile dispatches on the header type (CPython
    3.8 to 3.13), the one place to look at the size before the read."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_HEADERS and self.size > MAX_HEADER_SIZE:
            raise Refused(f"a {self.size}-byte extended header (the most accepted is {MAX_HEADER_SIZE})")
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member


_EXTENDED_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                     tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


def _extract_all(tar_stream: _TarStream, extractor: Extractor, label: str) -> None:
    where = "at the start of the tar"
    try:
        with tarfile.open(fileobj=tar_stream, mode="r|", bufsize=TAR_BUFSIZE, encoding="utf-8",
                          errors="surrogateescape", tarinfo=_BoundedTarInfo) as tf:
            while (member := tf.next()) is not None:
                where = f"entry {member.name!r}"
                extractor.add(member, tf)
                where = f"after entry {member.name!r}"
            end = tf.offset
        tar_stream.drain()
        if tar_stream.last_data > end:
            raise Refused(f"data after the end of the archive (offset {end}): corrupt tar header?")
        if tar_stream.size < end + tarfile.BLOCKSIZE:
            raise Refused("the tar ends without its end-of-archive blocks (truncated?)")
    except (Refused, ImageError, NoSpace) as exc:
        raise ImageError(f"{label}: {where}: {exc}") from None
    except tarfile.TarError as exc:
        raise ImageError(f"{label}: {where}: invalid tar: {exc}") from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise ImageError(f"{label}: {where}: {_no_space(extractor, extractor.root_fd)}") from None
        raise ImageError(f"{label}: {where}: {_describe(exc)}") from None


def _check(blob: HashingReader, tar_stream: _TarStream, label: str, digest: str | None,
           size: int | None, diff_id: str | None) -> None:
    """Both digests, once every byte has been read (the tar's end is not the blob's end)."""
    blob.drain()
    if size is not None and blob.size != size:
        raise ImageError(f"{label}: the blob is {blob.size} bytes, its descriptor says {size}")
    if digest is not None and blob.digest != digest:
        raise ImageError(f"{label}: the blob does not match its digest (its content is {blob.digest})")
    if diff_id is not None and tar_stream.digest != diff_id:
        raise ImageError(f"{label}: the uncompressed tar is {tar_stream.digest}, "
                         f"but the image config says its diff_id is {diff_id}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class _TarStream(HashingReader):
    """The uncompressed tar: hashed for the diff_id, and watched for the offset just past its last
    non-zero byte, so that an archive tarfile stopped reading early (it treats a corrupt header
    after the first as the end) is caught."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__(raw, what="the tar")
        self.last_data = 0

    def read(self, n: int = -1) -> bytes:
        start = self.size
        chunk = super().read(n)
        if chunk:
            kept = len(chunk.rstrip(b"\0"))
            if kept:
                self.last_data = start + kept
        return chunk

