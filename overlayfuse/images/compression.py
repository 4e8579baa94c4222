"""Streaming compression for layer blobs: decompress while reading, compress while writing, hash both.

A layer is named twice: its blob digest covers the compressed bytes (the manifest's descriptor), its
diff_id covers the uncompressed tar (the config's ``rootfs.diff_ids``). Both are computed in the one
pass that reads or writes the layer, so a blob is never read twice and never held in memory.

The decoders are written on ``zlib``/``zstandard`` decompress objects rather than `gzip.GzipFile` or
``zstandard``'s stream reader because those accept a stream cut short at a frame boundary, or end of
input in the middle of a frame, as a clean end of file; a truncated blob must be an error.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast

import zstandard

from ..errors import ImageError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

log = logging.getLogger(__name__)

COMPRESSIONS = ("", "gzip", "zstd")

#: Bytes asked of the raw stream per read: large enough that Python overhead per call is noise.
CHUNK = 1 << 20
#: gzip level for committed layers: zlib's default, the usual speed/size balance (docker uses it too).
GZIP_LEVEL = 6
#: zstd level for committed layers: zstd's own default.
ZSTD_LEVEL = 3
#: zlib's wbits for a gzip wrapper (16 + a 32 KiB window).
_GZIP_WBITS = 31


def _sha256_digest(hasher: hashlib._Hash) -> str:
    return "sha256:" + hasher.hexdigest()


def check_compression(compression: str) -> str:
    if compression not in COMPRESSIONS:
        raise ImageError(f"unknown layer compression {compression!r} (known: none, gzip, zstd)")
    return compression


class _Reader(io.RawIOBase):
    """A raw reader whose subclasses implement ``read(n)`` for n >= 0; readinto and reading
    everything are derived from it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def readall(self) -> bytes:
        """Everything left, as bytes (only for small remainders: a blob is read in chunks)."""
        parts = []
        while chunk := self.read(CHUNK):
            parts.append(chunk)
        return b"".join(parts)


class HashingReader(_Reader):
    """Reads through to RAW, hashing (sha256) and counting every byte that passes.

    COPY_TO, if given, receives each chunk as it is read (the importer stores the compressed blob in
    the same pass that unpacks it). PROGRESS, if given, is called with the number of new bytes after
    each read. LIMIT, if given, is the most bytes the stream may hold: reading past it is an error,
    so a blob longer than its descriptor says is caught before it fills the disk.
    """

    def __init__(self, raw: BinaryIO, *, copy_to: BinaryIO | None = None,
                 progress: Callable[[int], None] | None = None, limit: int | None = None,
                 what: str = "blob") -> None:
        super().__init__()
        self._raw = raw
        self._copy_to = copy_to
        self._progress = progress
        self._limit = limit
        self._what = what
        self._hasher = hashlib.sha256()
        self.size = 0
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        chunk = self._raw.read(n)
        if not chunk:
            self.eof = True
            return b""
        self.size += len(chunk)
        if self._limit is not None and self.size > self._limit:
            raise ImageError(f"{self._what} is longer than the {self._limit} bytes its descriptor says")
        self._hasher.update(chunk)
        if self._copy_to is not None:
            self._copy_to.write(chunk)
        if self._progress is not None:
            self._progress(len(chunk))
        return chunk

    def drain(self) -> int:
        """Read (and hash) to the end of the stream; return how many bytes that took."""
        drained = 0
        while chunk := self.read(CHUNK):
            drained += len(chunk)
        return drained

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of every byte read so far (the whole stream once `eof` is set)."""
        return _sha256_digest(self._hasher)


class _Decoder(_Reader):
    """A decompressing reader over a stream of one or more concatenated frames (gzip members or
    zstd frames), which is what ``pigz``/``zstd`` and registries produce. It refuses a stream that
    ends inside a frame, and anything after the last frame that is not zero padding.

    Output per step is bounded (a small blob may expand enormously): gzip through zlib's
    ``max_length``, zstd by feeding at most `_ZSTD_FEED` input bytes per step.
    """

    name = ""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._obj = self._new()
        self._fed = False  # the current decoder has been given input
        self._frames = 0  # frames completed
        self._pending = b""  # decompressed; returned from _offset on (slicing it whole per read
        self._offset = 0  # would copy up to a CHUNK for every small read tarfile makes)
        self._input: bytes | memoryview = b""  # compressed, not yet given to a decoder
        self._done = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        while self._offset >= len(self._pending) and not self._done:
            self._pending, self._offset = b"", 0
            self._step()
        out = self._pending[self._offset:self._offset + n]
        self._offset += len(out)
        return out

    def _step(self) -> None:
        if not self._input:
            self._input = self._raw.read(CHUNK)
        if not self._input:
            self._at_end()
            return
        if self._fed and self._eof():
            # Between frames: padding (trailing NULs, as gzip(1) accepts) or the next frame.
            if not bytes(self._input).strip(b"\0"):
                self._input = b""
                return
            self._obj = self._new()
            self._fed = False
        try:
            self._pending, self._input = self._decode(self._input)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise ImageError(f"corrupt {self.name} stream: {exc}") from None
        self._fed = True
        if self._eof():
            self._frames += 1

    def _at_end(self) -> None:
        """The raw stream is exhausted: fine between frames, an error inside one."""
        if self._fed and not self._eof():
            self._pending = self._flush()
            if self._pending:
                return
            raise ImageError(f"truncated {self.name} stream: it ends inside a compressed frame")
        if not self._frames:
            raise ImageError(f"empty {self.name} stream")
        self._done = True

    # per format
    def _new(self) -> Any:
        raise NotImplementedError

    def _decode(self, data: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
        """Decompress some of DATA: (output, input not consumed yet)."""
        raise NotImplementedError

    def _eof(self) -> bool:
        return bool(self._obj.eof)

    def _flush(self) -> bytes:
        return b""


class _GzipDecoder(_Decoder):
    name = "gzip"

    def _new(self) -> Any:
        return zlib.decompressobj(_GZIP_WBITS)

    def _decode(self, data: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
        out = self._obj.decompress(data, CHUNK)
        return out, (self._obj.unused_data if self._obj.eof else self._obj.unconsumed_tail)

    def _flush(self) -> bytes:
        # Output zlib still holds after max_length stopped it with all input consumed.
        return bytes(self._obj.flush()) if not self._obj.eof else b""


#: zstd input per step: zstd expands at most ~32768:1, so 8 KiB in gives at most 256 MiB out.
_ZSTD_FEED = 1 << 13


class _ZstdDecoder(_Decoder):
    name = "zstd"

    def _new(self) -> Any:
        return zstandard.ZstdDecompressor().decompressobj()

    def _decode(self, data: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
        view = memoryview(data)  # slices of a view copy nothing; the input is a whole CHUNK
        out = self._obj.decompress(view[:_ZSTD_FEED])
        rest = view[_ZSTD_FEED:]
        return out, (self._obj.unused_data + bytes(rest) if self._obj.eof else rest)


def open_decompressed(raw: BinaryIO | io.RawIOBase, compression: str) -> BinaryIO:
    """A reader of RAW's uncompressed bytes; COMPRESSION is "", "gzip" or "zstd".

    Corrupt or truncated input raises ImageError from `read`.
    """
    check_compression(compression)
    # Only read(n) is ever called on RAW and on what this returns: a raw reader (our own hashing
    # readers) serves as well as a buffered file.
    stream = cast(BinaryIO, raw)
    if compression == "":
        return stream
    decoder: _Decoder = _GzipDecoder(stream) if compression == "gzip" else _ZstdDecoder(stream)
    return cast(BinaryIO, decoder)


# -- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A layer blob as written: its digest and size (compressed) and its diff_id (uncompressed)."""

    digest: str
    size: int
    diff_id: str


class _Compressor(Protocol):
    """What zlib's and zstandard's compression objects share."""

    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _HashingWriter(io.RawIOBase):
    """Hashes and counts what is written, then passes it on to SINK (a callable taking bytes)."""

    def __init__(self, sink: Callable[[bytes], object]) -> None:
        super().__init__()
        self._sink = sink
        self._hasher = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, buffer: ReadableBuffer, /) -> int:
        data = bytes(buffer)
        self._hasher.update(data)
        self.size += len(data)
        self._sink(data)
        return len(data)

    @property
    def digest(self) -> str:
        return _sha256_digest(self._hasher)


def write_layer_blob(produce: Callable[[BinaryIO], None], out_path: Path,
                     compression: str = "gzip") -> BlobInfo:
    """Write a layer blob to OUT_PATH: PRODUCE writes the uncompressed tar to the stream it is given.

    The diff_id hashes what PRODUCE writes, the digest what lands in the file; the file is fsynced
    before returning (the caller renames it into the store). On failure OUT_PATH is removed.
    """
    check_compression(compression)
    out_path = Path(out_path)
    try:
        with open(out_path, "xb") as out:
            blob = _HashingWriter(out.write)
            compressor: _Compressor | None
            if compression == "gzip":
                compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
            elif compression == "zstd":
                compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj()
            else:
                compressor = None
            if compressor is None:
                tar = _HashingWriter(blob.write)
            else:
                def sink(data: bytes) -> None:
                    if chunk := compressor.compress(data):
                        blob.write(chunk)
                tar = _HashingWriter(sink)
            buffered = io.BufferedWriter(tar, CHUNK)
            produce(buffered)
            buffered.flush()
            if compressor is not None:
                blob.write(compressor.flush())
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    info = BlobInfo(digest=blob.digest, size=blob.size, diff_id=tar.digest)
    log.debug("wrote layer blob %s (%d bytes, diff_id %s)", info.digest, info.size, info.diff_id)
    return info
