"""Gzip a layer that arrived uncompressed while it is imported, so the store keeps one copy of it.

``docker save`` archives (old style, and Docker 25+'s OCI layout inside) and OCI layouts written with
uncompressed layers carry plain tars. Kept as they came, each layer would take its full size twice:
the tar as a blob (for export) and its unpacked files (for mounts). The import instead stores the tar
gzipped, as it streams by; the image's config, diff_ids and id are the same (they name the
uncompressed tar), and the manifest stored with the image names the gzip blob, as ``docker push``
would (for an archive without a manifest, the one the import writes; for a layout, its manifest with
those layer descriptors replaced, so its digest differs from the source's).

Why not keep the tar's headers only and rebuild the tar on export (containers/storage's tar-split)?
That keeps the source's manifest digest, but makes every export, save and push a tar writer that must
reproduce the source byte for byte from the unpacked files, and a layer whose files were damaged
unexportable; the gzip blob is a plain file, hardlinked by export, and a small fraction of the tar.

Deterministic: the gzip header carries no name and no time, so importing the same archive again
gives the same blob digest and the same manifest (with the same zlib).
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from typing import BinaryIO

log = logging.getLogger(__name__)

#: Level 1: about 5x faster than the default 6 and within a few percent of its size on layer tars;
#: the import is bound by the disk and the unpacking, and this keeps the CPU out of the way.
GZIP_LEVEL = 1
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer, not raw deflate


class GzipCopy:
    """A write-only sink that gzips what it is given into OUT and hashes the gzip bytes."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._emit(self._deflate.compress(data))
        return len(data)

    def finish(self) -> str:
        """End the gzip stream; returns the blob's digest (``sha256:...``)."""
        self._emit(self._deflate.flush())
        return f"sha256:{self._hash.hexdigest()}"

    def _emit(self, chunk: bytes) -> None:
        if chunk:
            self._out.write(chunk)
            self._hash.update(chunk)
            self.size += len(chunk)
