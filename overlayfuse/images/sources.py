"""Where an import reads from: an OCI layout directory, or a tar archive (``docker save``, possibly
gzipped), behind one small interface of relative paths.

An import names files by paths relative to the top of the layout or archive (``index.json``,
``blobs/sha256/<hex>``, ``manifest.json``, and whatever manifest.json's ``Config``/``Layers`` say).
Those paths come from the input itself, so each is checked to stay inside it: a manifest.json that
says ``../../etc/shadow`` is refused, never read.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import ImageError
from .oci import MAX_DOCUMENT_SIZE

log = logging.getLogger(__name__)

#: Symlinks followed inside an archive before giving up (docker's ``<id>/layer.tar`` links are one).
MAX_LINK_DEPTH = 8
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Non-blocking: opening a fifo planted in a layout must not wait for a writer.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class Source(Protocol):
    """Files of one layout or archive, by relative path."""

    label: str  # for messages: the path the user gave

    def exists(self, rel: str) -> bool: ...

    def size(self, rel: str) -> int: ...

    def open(self, rel: str) -> BinaryIO: ...


def clean_path(rel: str, label: str) -> str:
    """REL normalized (no ``./``, no double slashes), or `ImageError` if it leaves the top."""
    norm = posixpath.normpath(rel.lstrip("/") if rel.startswith("./") else rel)
    if rel.startswith("/") or norm == ".." or norm.startswith("../") or norm == ".":
        raise ImageError(f"{label}: path {rel!r} points outside the image")
    return norm


def read_document(source: Source, rel: str, what: str) -> bytes:
    """A small file (JSON document) read whole; refuses a missing or huge one with context."""
    if not source.exists(rel):
        raise ImageError(f"{source.label}: {what} {rel} is missing")
    size = source.size(rel)
    if size > MAX_DOCUMENT_SIZE:
        raise ImageError(f"{source.label}: {what} {rel} is {size} bytes, too large for a JSON document")
    with source.open(rel) as stream:
        return stream.read(MAX_DOCUMENT_SIZE + 1)


class DirSource:
    """An OCI layout (or an unpacked ``docker save``) on disk.

    Files are opened component by component from the layout's own fd with ``O_NOFOLLOW``: a
    symlink under ``blobs/`` is refused (a blob is a regular file in the layout, nothing else), and
    any other symlink (docker's ``<id>/layer.tar``) is resolved by hand like the archive's, and
    only while it stays inside. What is found must be a regular file: a fifo, a device or a
    directory is refused by name, never read (opened non-blocking, so a fifo cannot hang us)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)

    def _open(self, rel: str) -> int | None:
        """An fd of REL's regular file (the caller closes it), None if there is none."""
        name = clean_path(rel, self.label)
        for _ in range(MAX_LINK_DEPTH):
            opened = self._walk(name)
            if isinstance(opened, int) or opened is None:
                return opened
            link_at, target = opened
            if link_at.split("/", 1)[0] == "blobs":
                raise ImageError(f"{self.label}: {link_at} is a symlink, not a blob file: refused")
            name = clean_path(posixpath.join(posixpath.dirname(link_at), target)
                              + name[len(link_at):], self.label)
        raise ImageError(f"{self.label}: {rel} is a chain of more than {MAX_LINK_DEPTH} links")

    def _walk(self, name: str) -> int | tuple[str, str] | None:
        """NAME's file opened without following anything: an fd, None if missing, or (the prefix
        of NAME that is a symlink, its target)."""
        parts = name.split("/")
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            raise ImageError(f"{self.label}: {exc.strerror}") from None
        try:
            for depth, part in enumerate(parts, 1):
                last = depth == len(parts)
                try:
                    child = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    return None
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise ImageError(f"{self.label}: cannot read {name}: {exc.strerror}") from None
                    prefix = "/".join(parts[:depth])
                    st = os.lstat(part, dir_fd=fd)
                    if stat.S_ISLNK(st.st_mode):
                        return prefix, os.readlink(part, dir_fd=fd)
                    if last:
                        raise
                    return None  # a file used as a directory: nothing there
                os.close(fd)
                fd = child
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"{self.label}: {name} is not a regular file: refused")
            result, fd = fd, -1
            return result
        finally:
            if fd >= 0:
                os.close(fd)

    def exists(self, rel: str) -> bool:
        fd = self._open(rel)
        if fd is None:
            return False
        os.close(fd)
        return True

    def size(self, rel: str) -> int:
        fd = self._open(rel)
        if fd is None:
            raise ImageError(f"{self.label}: {rel} is missing")
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def open(self, rel: str) -> BinaryIO:
        fd = self._open(rel)
        if fd is None:
            raise ImageError(f"{self.label}: {rel} is missing")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")


class TarSource:
    """A tar archive (plain, gzip, bzip2 or xz), read in place: members are opened where they lie."""

    def __init__(self, path: Path, tar: tarfile.TarFile) -> None:
        self.label = str(path)
        self._tar = tar
        self._members: dict[str, tarfile.TarInfo] = {}
        for member in tar.getmembers():
            with contextlib.suppress(ImageError):
                self._members[clean_path(member.name, self.label)] = member

    def _resolve(self, rel: str) -> tarfile.TarInfo | None:
        name = clean_path(rel, self.label)
        for _ in range(MAX_LINK_DEPTH):
            member = self._members.get(name)
            if member is None:
                return None
            if member.issym():
                name = clean_path(posixpath.join(posixpath.dirname(name), member.linkname), self.label)
            elif member.islnk():
                name = clean_path(member.linkname, self.label)
            elif member.isfile():
                return member
            else:
                return None
        raise ImageError(f"{self.label}: {rel} is a chain of more than {MAX_LINK_DEPTH} links")

    def exists(self, rel: str) -> bool:
        return self._resolve(rel) is not None

    def size(self, rel: str) -> int:
        member = self._resolve(rel)
        if member is None:
            raise ImageError(f"{self.label}: {rel} is missing")
        return member.size

    def open(self, rel: str) -> BinaryIO:
        member = self._resolve(rel)
        if member is None:
            raise ImageError(f"{self.label}: {rel} is missing from the archive")
        stream = self._tar.extractfile(member)
        assert stream is not None  # a regular file always has a stream
        return stream  # type: ignore[return-value]


@contextlib.contextmanager
def open_source(path: Path) -> Iterator[Source]:
    """PATH as a `Source`: a directory with index.json or manifest.json, or a tar archive."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}") from None
    neither = f"{path} is neither an OCI image layout (no index.json) nor a docker save archive"
    if os.path.isdir(path):
        source = DirSource(path)
        if not (source.exists("index.json") or source.exists("manifest.json")):
            raise ImageError(neither)
        yield source
        return
    if not st.st_size:
        raise ImageError(neither + " (it is empty)")
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the `with` below; only opening means "not a tar"
    except (tarfile.TarError, EOFError, OSError) as exc:
        log.debug("%s is not a tar archive: %s", path, exc)
        raise ImageError(neither) from None
    with tar:
        try:
            archive = TarSource(path, tar)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ImageError(f"{path}: unreadable archive: {exc}") from None
        if not (archive.exists("index.json") or archive.exists("manifest.json")):
            raise ImageError(neither + " (no index.json or manifest.json inside)")
        yield archive
