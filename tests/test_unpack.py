"""Layer blobs in: streaming (de)compression with digests, and safe extraction of layer tars.

Tars are built with Python's tarfile at test time, hostile ones included; each hostile tar must be
refused with an ImageError and leave no destination directory behind. A layer umoci made is
unpacked too, and the kernel's overlay of our unpacked layers compared with `umoci unpack`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from overlayfuse.errors import ImageError
from overlayfuse.images import oci
from overlayfuse.images.compression import (
    COMPRESSIONS,
    HashingReader,
    open_decompressed,
    write_layer_blob,
)
from tests.conftest import skip_or_fail

MEDIA = {"": oci.MEDIA_LAYER_TAR, "gzip": oci.MEDIA_LAYER_GZIP, "zstd": oci.MEDIA_LAYER_ZSTD}
MTIME = 1_600_000_000
MTIME_NS_TEXT = "1600000000.123456789"  # PAX keeps nanoseconds; a float would not


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    return data


def require_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (owners, device nodes, trusted xattrs)")


# --- building tars ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class T:
    """One tar entry to write: TYPE is a tarfile type; DATA only for regular files."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    pax: dict[str, str] = field(default_factory=dict)


def reg(name: str, data: bytes = b"", **kw: object) -> T:
    return T(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def dir_(name: str, mode: int = 0o755, **kw: object) -> T:
    return T(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str, **kw: object) -> T:
    return T(name, tarfile.SYMTYPE, link=target, mode=0o777, **kw)  # type: ignore[arg-type]


def hard(name: str, target: str) -> T:
    return T(name, tarfile.LNKTYPE, link=target)


def xattrs(**values: bytes) -> dict[str, str]:
    """PAX records for xattrs (keyword `user_x` is the xattr ``user.x``)."""
    return {"SCHILY.xattr." + k.replace("_", ".", 1): v.decode("utf-8", "surrogateescape")
            for k, v in values.items()}


def make_tar(*entries: T) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.type
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.mtime = MTIME
            info.linkname = e.link
            info.devmajor, info.devminor = e.dev
            info.pax_headers = dict(e.pax)
            info.size = len(e.data) if e.type == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(e.data) if info.size else None)
    return out.getvalue()


# --- compression ------------------------------------------------------------------------------

PAYLOAD = os.urandom(300_000) + bytes(3_000_000) + b"the end"


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_decompress_reads_every_frame_and_hashes_the_raw_bytes(compression: str) -> None:
    # Two frames (pigz and zstd write several), and gzip's tolerated trailing NUL padding.
    blob = compress(PAYLOAD, compression) + compress(b"+more", compression)
    if compression == "gzip":
        blob += bytes(100)
    raw = HashingReader(io.BytesIO(blob))
    assert open_decompressed(raw, compression).read() == PAYLOAD + b"+more"
    assert raw.size == len(blob)
    assert raw.digest == sha256(blob)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("cut", [10, 1000, -4])
def test_truncated_stream_is_an_error(compression: str, cut: int) -> None:
    blob = compress(PAYLOAD, compression)
    with pytest.raises(ImageError, match=f"truncated {compression} stream"):
        open_decompressed(io.BytesIO(blob[:cut]), compression).read()


@pytest.mark.parametrize("compression,offset", [("gzip", 0), ("gzip", 5000), ("zstd", 0),
                                                ("zstd", 9)])
def test_corrupt_stream_is_an_error(compression: str, offset: int) -> None:
    blob = bytearray(compress(bytes(1_000_000) + PAYLOAD, compression))
    blob[offset] ^= 0x55
    with pytest.raises(ImageError, match=f"(corrupt|truncated) {compression} stream"):
        open_decompressed(io.BytesIO(bytes(blob)), compression).read()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_empty_or_garbage_after_the_stream_is_an_error(compression: str) -> None:
    with pytest.raises(ImageError, match="empty"):
        open_decompressed(io.BytesIO(b""), compression).read()
    with pytest.raises(ImageError, match=f"(corrupt|truncated) {compression}"):
        open_decompressed(io.BytesIO(compress(b"x", compression) + b"garbage!"), compression).read()


def test_decompressed_output_per_read_is_bounded() -> None:
    # 256 MiB of zeros is ~256 KiB of gzip: a read must not try to inflate it all at once.
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = b"".join([bomb.compress(bytes(1 << 24)) for _ in range(16)] + [bomb.flush()])
    reader = open_decompressed(io.BytesIO(blob), "gzip")
    assert len(reader.read(1 << 16)) == 1 << 16


def test_hashing_reader_tees_reports_progress_and_enforces_its_limit() -> None:
    copy, seen = io.BytesIO(), []
    reader = HashingReader(io.BytesIO(PAYLOAD), copy_to=copy, progress=seen.append)
    assert reader.read(10) == PAYLOAD[:10]
    assert reader.drain() == len(PAYLOAD) - 10
    assert (copy.getvalue(), sum(seen), reader.digest) == (PAYLOAD, len(PAYLOAD), sha256(PAYLOAD))
    limited = HashingReader(io.BytesIO(PAYLOAD), limit=100)
    with pytest.raises(ImageError, match="longer than the 100 bytes"):
        limited.drain()


def test_unknown_compression_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="unknown layer compression 'bzip2'"):
        open_decompressed(io.BytesIO(b""), "bzip2")
    with pytest.raises(ImageError, match="bzip2"):
        write_layer_blob(lambda out: None, tmp_path / "blob", "bzip2")
    assert not (tmp_path / "blob").exists()


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_write_layer_blob_digests_what_it_wrote(tmp_path: Path, compression: str) -> None:
    def produce(out):  # type: ignore[no-untyped-def]
        for i in range(0, len(PAYLOAD), 7777):  # many small writes, as tarfile makes
            out.write(PAYLOAD[i:i + 7777])

    info = write_layer_blob(produce, tmp_path / "blob", compression)
    written = (tmp_path / "blob").read_bytes()
    assert (info.digest, info.size, info.diff_id) == (sha256(written), len(written), sha256(PAYLOAD))
    assert open_decompressed(io.BytesIO(written), compression).read() == PAYLOAD
    if compression:
        assert len(written) < len(PAYLOAD) // 2


def test_write_layer_blob_removes_its_file_when_the_producer_fails(tmp_path: Path) -> None:
    def produce(out):  # type: ignore[no-untyped-def]
        out.write(b"partial")
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        write_layer_blob(produce, tmp_path / "blob")
    assert not (tmp_path / "blob").exists()
