"""Where an import reads from: an OCI layout directory, or a tar archive (``docker save``, possibly
gzipped), behind one small interface of relative paths.

An import names files by paths relative to the top of the layout or archive (``index.json``,
``blobs/sha256/<hex>``, ``manifest.json``, and whatever manifest.json's ``Config``/``Layers`` say).
Those paths come from the input itself, so each is checked to stay inside it: a manifest.json that
says ``../../etc/shadow`` is refused, never read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import ImageError
from .oci import MAX_DOCUMENT_SIZE

log = logging.getLogger(__name__)

#: Symlinks followed inside an archive before giving up (docker's ``<id>/layer.tar`` links are one).
MAX_LINK_DEPTH = 8


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
    """An OCI layout (or an unpacked ``docker save``) on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)

    def _path(self, rel: str) -> Path:
        return self.root / clean_path(rel, self.label)

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def size(self, rel: str) -> int:
        return self._path(rel).stat().st_size

    def open(self, rel: str) -> BinaryIO:
        try:
            return open(self._path(rel), "rb")
        except FileNotFoundError:
            raise ImageError(f"{self.label}: {rel} is missing") from None
        except OSError as exc:
            raise ImageError(f"{self.label}: cannot read {rel}: {exc.strerror}") from None


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
        tar = tarfile.open(path, "r:*")
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
