"""Layer blobs in: streaming (de)compression with digests, and safe extraction of layer tars.

Tars are built with Python's tarfile at test time, hostile ones included; each hostile tar must be
refused with an ImageError and leave no destination directory behind. A layer umoci made is
unpacked too, and the kernel's overlay of our unpacked layers compared with `umoci unpack`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import zstandard

from overlayfuse.containers.layertar import write_layer_tar
from overlayfuse.errors import ImageError
from overlayfuse.images import oci
from overlayfuse.images.compression import (
    CHUNK,
    COMPRESSIONS,
    HashingReader,
    open_decompressed,
    write_layer_blob,
)
from overlayfuse.images.unpack import UnpackedLayer, unpack_layer
from tests.conftest import MountFactory, skip_or_fail
from tests.support import imagebuild
from tests.support.compare import Snapshot, assert_same_view, take_snapshot
from tests.support.imagebuild import sha256_digest
from tests.support.mounts import FuseMount
from tests.support.trees import Dir, File, OciWhiteout, Opaque, make_tree

MEDIA = {"": oci.MEDIA_LAYER_TAR, "gzip": oci.MEDIA_LAYER_GZIP, "zstd": oci.MEDIA_LAYER_ZSTD}
MTIME = 1_600_000_000
MTIME_NS_TEXT = "1600000000.123456789"  # PAX keeps nanoseconds; a float would not


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
    """PAX records for xattrs (keyword `user_x_y` is the xattr ``user.x.y``)."""
    return {"SCHILY.xattr." + k.replace("_", "."): v.decode("utf-8", "surrogateescape")
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


def unpack_bytes(blob: bytes, dest: Path, compression: str = "", **kw: object) -> UnpackedLayer:
    return unpack_layer(io.BytesIO(blob), MEDIA[compression], dest, **kw)  # type: ignore[arg-type]


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
    assert raw.digest == sha256_digest(blob)


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
    raw = io.BytesIO(blob)
    reader = open_decompressed(raw, "gzip")
    # Whatever a caller asks for, one read inflates at most one CHUNK: a request of 64 MiB
    # gets no more than a small one would have made the decoder hold.
    for size in (1, 4096, 1 << 16, CHUNK, 1 << 26, 1 << 26):
        out = reader.read(size)
        assert 0 < len(out) <= min(size, CHUNK), (size, len(out))
        assert out == bytes(len(out))


def test_hashing_reader_tees_reports_progress_and_enforces_its_limit() -> None:
    copy, seen = io.BytesIO(), []
    reader = HashingReader(io.BytesIO(PAYLOAD), copy_to=copy, progress=seen.append)
    assert reader.read(10) == PAYLOAD[:10]
    assert reader.drain() == len(PAYLOAD) - 10
    assert (copy.getvalue(), sum(seen), reader.digest) == (PAYLOAD, len(PAYLOAD), sha256_digest(PAYLOAD))
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
    assert (info.digest, info.size, info.diff_id) == (sha256_digest(written), len(written), sha256_digest(PAYLOAD))
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


# --- hostile layers -----------------------------------------------------------------------------

GOOD = make_tar(dir_("etc"), reg("etc/hosts", b"127.0.0.1 localhost\n"))
GOOD_GZ = compress(GOOD, "gzip")


@dataclass(frozen=True, slots=True)
class Hostile:
    """A layer blob that must be refused: BLOB, how it is declared, and what the error must say."""

    blob: bytes
    error: str
    compression: str = ""
    media_type: str | None = None
    digest: str | None = None
    size: int | None = None
    diff_id: str | None = None


def _hostile_table(outside: str) -> dict[str, Hostile]:
    """OUTSIDE: an absolute directory outside the layer, holding only the file `CANARY_NAME`, which
    every escape aims at and which must stay as it is."""
    canary = f"{outside}/{CANARY_NAME}"
    corrupt_zstd = bytearray(compress(GOOD + bytes(4096), "zstd"))
    corrupt_zstd[len(corrupt_zstd) // 2] ^= 0xFF
    garbage_header = bytearray(GOOD)
    garbage_header[1536:2048] = b"\x7f" * 512  # where a third header would start
    return {
        "dotdot": Hostile(make_tar(reg("../x", b"out")), "climbs out of the layer"),
        "dotdot-inside": Hostile(make_tar(dir_("a"), reg("a/../../x", b"out")), "climbs out"),
        "absolute-dotdot": Hostile(make_tar(reg(f"/../..{outside}/x", b"out")), "climbs out"),
        "symlinked-parent": Hostile(make_tar(sym("link", outside), reg("link/x", b"out")),
                                    "'link' is a symlink"),
        "symlinked-dir-then-file": Hostile(
            make_tar(dir_("real"), sym("out", outside), sym("d", "real"), reg("d/f", b"x")),
            "'d' is a symlink"),
        "file-as-parent": Hostile(make_tar(reg("f", b"x"), reg("f/g", b"y")), "not a directory"),
        "hardlink-dotdot": Hostile(make_tar(hard("canary", "../" * 64 + canary)), "outside the layer"),
        "hardlink-absolute": Hostile(make_tar(hard("canary", canary)), "does not contain"),
        "hardlink-not-in-layer": Hostile(make_tar(reg("a", b"x"), hard("b", "missing")),
                                         "does not contain"),
        "hardlink-to-dir": Hostile(make_tar(dir_("d"), hard("b", "d")), "does not contain"),
        "hardlink-through-symlink": Hostile(
            make_tar(dir_("d"), reg("d/f", b"x"), sym("s", "d"), hard("b", "s/f")),
            "does not contain"),
        "whiteout-as-dir": Hostile(make_tar(reg(".wh.x/y", b"")), "used as a directory"),
        "whiteout-of-dotdot": Hostile(make_tar(reg("d/.wh...", b"")), "whiteout of '..'"),
        "root-as-file": Hostile(make_tar(reg("./", b"")), "only be a directory"),
        "truncated-gzip": Hostile(GOOD_GZ[: len(GOOD_GZ) - 9], "truncated gzip", "gzip"),
        "corrupt-zstd": Hostile(bytes(corrupt_zstd), "corrupt zstd|Unknown frame|does not match",
                                "zstd"),
        "truncated-tar-data": Hostile(GOOD[:1024 + 5], "unexpected end of data"),
        "tar-without-end": Hostile(GOOD[:1536], "end-of-archive"),
        "garbage-after-entries": Hostile(bytes(garbage_header), "corrupt tar header"),
        "not-a-tar": Hostile(os.urandom(4096), "invalid tar"),
        "wrong-digest": Hostile(GOOD_GZ, "does not match its digest", "gzip",
                                digest=sha256_digest(b"something else")),
        "wrong-size": Hostile(GOOD_GZ, f"the blob is {len(GOOD_GZ)} bytes, its descriptor says",
                              "gzip", size=len(GOOD_GZ) + 1),
        "longer-than-size": Hostile(GOOD_GZ, "longer than the 100 bytes", "gzip", size=100),
        "wrong-diff-id": Hostile(GOOD_GZ, "diff_id is sha256:0000", "gzip",
                                 digest=sha256_digest(GOOD_GZ), diff_id="sha256:" + "0" * 64),
        "unknown-media-type": Hostile(GOOD, "unsupported layer media type 'application/x-rar'",
                                      media_type="application/x-rar"),
        "docker-foreign-layer": Hostile(
            GOOD, "unsupported layer media type",
            media_type="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
    }


CANARY_NAME = "canary"
CANARY = b"canary: must stay as it is\n"
HOSTILE_NAMES = sorted(_hostile_table("/x"))


def _make_canary(outside: Path) -> Path:
    outside.mkdir()
    canary = outside / CANARY_NAME
    canary.write_bytes(CANARY)
    return canary


def _assert_canary_untouched(canary: Path) -> None:
    """CANARY still alone in its dir, a regular file with one link and its content."""
    assert os.listdir(canary.parent) == [canary.name]
    st = os.lstat(canary)
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    assert canary.read_bytes() == CANARY


@pytest.mark.parametrize("case", HOSTILE_NAMES)
def test_hostile_layer_is_refused_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    canary = _make_canary(outside)
    hostile = _hostile_table(str(outside))[case]
    dest = tmp_path / "layer"
    media_type = hostile.media_type or MEDIA[hostile.compression]
    with pytest.raises(ImageError, match=hostile.error) as caught:
        unpack_layer(io.BytesIO(hostile.blob), media_type, dest, digest=hostile.digest,
                     size=hostile.size, diff_id=hostile.diff_id)
    assert "\n" not in str(caught.value)
    assert not dest.exists()
    _assert_canary_untouched(canary)


def test_errors_name_the_layer_and_the_entry(tmp_path: Path) -> None:
    blob = make_tar(dir_("a"), reg("a/../../x", b"out"))
    with pytest.raises(ImageError) as caught:
        unpack_bytes(blob, tmp_path / "layer", digest=sha256_digest(blob))
    assert str(caught.value) == (f"layer {sha256_digest(blob)}: entry 'a/../../x': "
                                 "'a/../../x' climbs out of the layer")


def test_an_existing_destination_is_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "layer"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(ImageError, match="already exists"):
        unpack_bytes(GOOD, dest)
    assert (dest / "keep").read_text() == "mine"


def test_a_failure_leaves_no_destination_even_with_read_only_dirs(tmp_path: Path) -> None:
    blob = make_tar(dir_("ro", mode=0o555), reg("ro/f", b"x"), dir_("ro/sub", mode=0o500))
    with pytest.raises(ImageError):
        unpack_bytes(compress(blob, "gzip"), tmp_path / "layer", "gzip", diff_id=sha256_digest(b"no"))
    assert not (tmp_path / "layer").exists()


# --- what a good layer unpacks to ---------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_each_compression_unpacks_and_reports_its_digests(tmp_path: Path, compression: str) -> None:
    tar = make_tar(dir_("etc"), reg("etc/hosts", b"hosts\n"), reg("big", PAYLOAD, mode=0o600),
                   sym("etc/link", "hosts"))
    blob = compress(tar, compression)
    copy, seen = io.BytesIO(), []
    result = unpack_bytes(blob, tmp_path / "layer", compression, digest=sha256_digest(blob),
                          size=len(blob), diff_id=sha256_digest(tar), copy_to=copy, progress=seen.append)
    assert result == UnpackedLayer(sha256_digest(blob), len(blob), sha256_digest(tar), len(PAYLOAD) + 6, (".",))
    assert copy.getvalue() == blob and sum(seen) == len(blob)
    layer = tmp_path / "layer"
    assert (layer / "etc/hosts").read_bytes() == b"hosts\n"
    assert (layer / "big").read_bytes() == PAYLOAD
    assert stat.S_IMODE((layer / "big").stat().st_mode) == 0o600
    assert os.readlink(layer / "etc/link") == "hosts"


def test_digests_cover_the_whole_blob_past_the_tar_end(tmp_path: Path) -> None:
    # Record padding after the end-of-archive blocks is part of the diff_id; the result must
    # report the digests of everything, not only of what the tar reader needed.
    tar = make_tar(reg("f", b"x")) + bytes(20 * 512)
    blob = compress(tar, "gzip")
    result = unpack_bytes(blob, tmp_path / "layer", "gzip", digest=sha256_digest(blob), diff_id=sha256_digest(tar))
    assert (result.digest, result.diff_id, result.size) == (sha256_digest(blob), sha256_digest(tar), len(blob))


def test_names_are_kept_inside_the_layer(tmp_path: Path) -> None:
    # Absolute names are relative to the layer root; ".." that stays inside is fine.
    outside = tmp_path / "outside"
    canary = _make_canary(outside)
    tar = make_tar(dir_("./"), reg(f"{outside}/abs", b"a"), reg(str(canary), b"p"),
                   dir_("a"), reg("a/./b/../c", b"c"), sym("s", str(outside)),
                   sym("t", "../../../../"))
    unpack_bytes(tar, tmp_path / "layer")
    layer = tmp_path / "layer"
    assert (layer / str(outside).lstrip("/") / "abs").read_bytes() == b"a"
    assert (layer / str(canary).lstrip("/")).read_bytes() == b"p"
    assert (layer / "a/c").read_bytes() == b"c"
    assert os.readlink(layer / "s") == str(outside)  # kept verbatim, never followed
    _assert_canary_untouched(canary)


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    canary = _make_canary(tmp_path / "outside")
    tar = make_tar(
        reg("f2d", b"file"), dir_("f2d"), reg("f2d/in", b"in"),  # a file replaced by a dir
        dir_("d2f"), reg("d2f/gone", b"x"), reg("d2f", b"now a file"),  # a dir by a file
        sym("s2f", str(canary)), reg("s2f", b"not through the link"),  # a symlink by a file
        dir_("dd", mode=0o700), reg("dd/keep", b"k"), dir_("dd", mode=0o751),  # dir over dir
        reg("implicit/parent/f", b"p"),
    )
    unpack_bytes(tar, tmp_path / "layer")
    layer = tmp_path / "layer"
    assert (layer / "f2d/in").read_bytes() == b"in"
    assert (layer / "d2f").read_bytes() == b"now a file"
    assert (layer / "s2f").read_bytes() == b"not through the link"
    assert not (layer / "s2f").is_symlink()
    _assert_canary_untouched(canary)
    assert (layer / "dd/keep").read_bytes() == b"k"
    assert stat.S_IMODE((layer / "dd").stat().st_mode) == 0o751
    assert stat.S_IMODE((layer / "implicit/parent").stat().st_mode) == 0o755


def test_implicit_directories_are_reported_with_unpacks_defaults(tmp_path: Path) -> None:
    """Parents the tar only implies (and the root, without ``./``) are listed, parents first; one
    given its own entry later, or replaced by a file, is not. They are 0755, root:root when we are
    root, and all carry the time the unpack began: the importer gives them the lower layers'."""
    tar = make_tar(
        reg("a/b/c/f"), dir_("a/b", mode=0o700),  # a/b gets an entry after it was implied
        reg("gone/x/f"), reg("gone", b"a file now"),  # implied, then replaced
        reg("w/.wh.old"), reg("o/.wh..wh..opq"),  # markers imply their dirs too
    )
    before = time.time_ns()
    result = unpack_bytes(tar, tmp_path / "layer")
    after = time.time_ns()
    layer = tmp_path / "layer"
    assert result.implicit_dirs == (".", "a", "o", "w", "a/b/c")
    times = set()
    for rel in result.implicit_dirs:
        st = os.lstat(layer / rel)
        assert stat.S_IMODE(st.st_mode) == 0o755, rel
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (0, 0), rel
        assert before <= st.st_mtime_ns <= after and st.st_atime_ns == st.st_mtime_ns, rel
        times.add(st.st_mtime_ns)
    assert len(times) == 1
    assert stat.S_IMODE(os.lstat(layer / "a/b").st_mode) == 0o700
    assert os.lstat(layer / "a/b").st_mtime_ns == MTIME * 10**9
    explicit = make_tar(dir_("./"), dir_("d"), reg("d/f"))
    assert unpack_bytes(explicit, tmp_path / "explicit").implicit_dirs == ()


def test_a_layer_tar_written_from_an_upper_dir_implies_nothing(tmp_path: Path) -> None:
    """Committed layers go through unpack_layer too: write_layer_tar lists ``./`` and every
    directory, so nothing is made up for the importer to fix."""
    upper = make_tree(tmp_path / "upper", Dir("etc"), Dir("etc/deep/er"), File("etc/deep/er/f", b"f"),
                      OciWhiteout("etc/gone"), Dir("opq"), Opaque("opq", form="user"))
    out = io.BytesIO()
    write_layer_tar(upper, out)
    assert unpack_bytes(out.getvalue(), tmp_path / "layer").implicit_dirs == ()


@pytest.mark.parametrize("marker", ["a/b/.wh.c", "a/b/.wh..wh..opq", "a/b/c/.wh.d"])
def test_an_entry_wins_over_markers_recorded_under_its_name(tmp_path: Path, marker: str) -> None:
    """A marker under ``a/b``, then ``a/b`` as a file: the file wins, in either marker form (as root
    the kernel markers are written at the end, and must not trip over the file)."""
    unpack_bytes(make_tar(reg(marker), reg("a/b", b"file")), tmp_path / "layer")
    assert (tmp_path / "layer/a/b").read_bytes() == b"file"
    # The other order names a directory inside a file: refused, as an ImageError.
    with pytest.raises(ImageError, match="'a/b' is not a directory"):
        unpack_bytes(make_tar(reg("a/b", b"file"), reg(marker)), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_hardlinks_share_an_inode(tmp_path: Path) -> None:
    tar = make_tar(dir_("d"), reg("d/a", b"data"), hard("d/b", "d/a"), hard("c", "./d/a"),
                   sym("s", "d/a"), hard("s2", "s"))
    result = unpack_bytes(tar, tmp_path / "layer")
    layer = tmp_path / "layer"
    a, b, c = ((layer / n).stat() for n in ("d/a", "d/b", "c"))
    assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3
    assert os.lstat(layer / "s").st_ino == os.lstat(layer / "s2").st_ino  # a link to a symlink
    assert result.unpacked_size == 4


def test_times_are_exact_and_directory_times_are_set_last(tmp_path: Path) -> None:
    ns = {"mtime": MTIME_NS_TEXT}
    tar = make_tar(dir_("./", mode=0o711, pax=ns), dir_("d", pax=ns), reg("d/f", b"x", pax=ns),
                   sym("d/s", "f", pax=ns), T("d/p", tarfile.FIFOTYPE, pax=ns),
                   reg("plain", b"x"))
    unpack_bytes(tar, tmp_path / "layer")
    layer = tmp_path / "layer"
    want = 1_600_000_000_123_456_789
    for name in ("", "d", "d/f", "d/s", "d/p"):
        assert os.lstat(layer / name).st_mtime_ns == want, name
    assert os.lstat(layer / "plain").st_mtime_ns == MTIME * 10**9
    assert stat.S_IMODE(os.lstat(layer).st_mode) == 0o711  # "./" is the layer root


def test_owners_modes_devices_and_xattrs_as_root(tmp_path: Path) -> None:
    require_root()
    tar = make_tar(
        dir_("d", mode=0o1777, uid=1234, gid=5678, pax=xattrs(user_dir=b"dir")),
        reg("d/suid", b"x", mode=0o4755, uid=1000, gid=1000,
            pax=xattrs(user_bin=b"\xff\x00binary", security_capability=b"\x01\x00\x00\x02" + bytes(16))),
        sym("d/link", "suid", uid=42, gid=43),
        T("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        T("dev/loop0", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(7, 0)),
        T("fifo", tarfile.FIFOTYPE, mode=0o640, uid=7),
    )
    unpack_bytes(tar, tmp_path / "layer")
    layer = tmp_path / "layer"
    d, suid, link = (os.lstat(layer / n) for n in ("d", "d/suid", "d/link"))
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (1234, 5678, 0o1777)
    assert (suid.st_uid, suid.st_gid, stat.S_IMODE(suid.st_mode)) == (1000, 1000, 0o4755)
    assert (link.st_uid, link.st_gid) == (42, 43)
    assert os.getxattr(layer / "d", "user.dir") == b"dir"
    assert os.getxattr(layer / "d/suid", "user.bin") == b"\xff\x00binary"
    assert os.getxattr(layer / "d/suid", "security.capability")[:4] == b"\x01\x00\x00\x02"
    null, loop = os.lstat(layer / "dev/null"), os.lstat(layer / "dev/loop0")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 0) and loop.st_gid == 6
    fifo = os.lstat(layer / "fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o640 and fifo.st_uid == 7


def test_overlay_xattrs_in_a_tar_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_root()
    fake = xattrs(trusted_overlay_opaque=b"y", user_overlay_redirect=b"/etc", user_ok=b"1")
    tar = make_tar(dir_("d", pax=fake), reg("d/f", b"x", pax=xattrs(trusted_overlay_metacopy=b"")))
    unpack_bytes(tar, tmp_path / "layer")
    layer = tmp_path / "layer"
    assert os.listxattr(layer / "d") == ["user.ok"]
    assert os.listxattr(layer / "d/f") == []
    assert "dropped overlay xattrs" in caplog.text and "trusted.overlay.opaque" in caplog.text


WHITEOUT_TAR = make_tar(
    reg(".wh.gone"),  # a plain whiteout
    dir_("opq"), reg("opq/new", b"n"), reg("opq/.wh..wh..opq"),  # opaque, marker after a sibling
    reg("late/.wh..wh..opq"), dir_("late"),  # the marker before its directory's entry
    reg(".wh.both"), reg("both", b"real"),  # a whiteout and a real entry: the entry wins
    dir_("replaced"), reg("replaced/x", b"x"), reg(".wh.replaced"),  # ... a dir becomes opaque
    dir_("sub"), reg("sub/.wh.deep"),
    reg(".wh..wh.plnk"),  # AUFS metadata: skipped
)


def test_whiteouts_become_kernel_markers_as_root(tmp_path: Path) -> None:
    require_root()
    unpack_bytes(WHITEOUT_TAR, tmp_path / "layer")
    layer = tmp_path / "layer"
    for name in ("gone", "sub/deep"):
        st = os.lstat(layer / name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, name
    for name in ("opq", "late", "replaced"):
        assert os.getxattr(layer / name, "trusted.overlay.opaque") == b"y", name
    assert (layer / "both").read_bytes() == b"real"
    assert (layer / "opq/new").read_bytes() == b"n" and (layer / "replaced/x").exists()
    leftovers = [p for p in layer.rglob("*") if p.name.startswith(".wh.")]
    assert leftovers == []


def _unpack_as_nobody(blob: bytes, dest: Path) -> str:
    """Unpack in a child process running as nobody (no mknod, no trusted xattrs, no chown)."""
    code = (
        "import io, os, sys, logging\n"
        "from pathlib import Path\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from overlayfuse.images.unpack import unpack_layer\n"  # before: /root is not readable
        "os.setgid(65534); os.setuid(65534)\n"
        "unpack_layer(io.BytesIO(sys.stdin.buffer.read()), sys.argv[1], Path(sys.argv[2]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, oci.MEDIA_LAYER_TAR, str(dest)], input=blob,
                          capture_output=True, timeout=60, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stderr.decode()


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory nobody may write in, outside pytest's root-only temp dir."""
    require_root()  # to become nobody
    path = Path(tempfile.mkdtemp(prefix="overlayfuse-unpack-"))
    os.chmod(path, 0o755)
    os.chown(path, 65534, 65534)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_unprivileged_unpack_keeps_oci_whiteouts_and_skips_devices(nobody_dir: Path) -> None:
    tar = make_tar(reg(".wh.gone"), dir_("opq"), reg("opq/.wh..wh..opq"), reg("f", b"x", uid=1234),
                   T("null", tarfile.CHRTYPE, dev=(1, 3)), T("zero", tarfile.CHRTYPE, dev=(1, 5)),
                   dir_("ro", mode=0o555), reg("ro/in", b"i"))
    layer = nobody_dir / "layer"
    log = _unpack_as_nobody(tar, layer)
    assert (layer / ".wh.gone").is_file() and (layer / "opq/.wh..wh..opq").is_file()
    assert not os.path.lexists(layer / "gone")
    assert not os.path.lexists(layer / "null") and not os.path.lexists(layer / "zero")
    assert log.count("skipped 2 device node(s)") == 1
    assert os.lstat(layer / "f").st_uid == 65534
    assert (layer / "ro/in").read_bytes() == b"i"
    assert stat.S_IMODE(os.lstat(layer / "ro").st_mode) == 0o555


def test_unprivileged_unpack_sets_modes_without_search_permission(nobody_dir: Path) -> None:
    # Modes go on children before parents, and the walk leaves a directory before taking away
    # the search permission its way back up ("..") needs.
    tar = make_tar(dir_("nox", mode=0o600), dir_("nox/sub", mode=0o000), reg("nox/sub/f", b"f"),
                   dir_("nox/sub2", mode=0o100), reg("implied/deep/g", b"g"))
    layer = nobody_dir / "layer"
    _unpack_as_nobody(tar, layer)
    modes = {name: stat.S_IMODE(os.lstat(layer / name).st_mode)
             for name in ("nox", "nox/sub", "nox/sub2", "implied", "implied/deep")}
    assert modes == {"nox": 0o600, "nox/sub": 0o000, "nox/sub2": 0o100, "implied": 0o755,
                     "implied/deep": 0o755}


# --- against umoci ------------------------------------------------------------------------------


def _unpack_image_layers(layout: Path, tag: str, into: Path) -> list[Path]:
    """Unpack every layer of LAYOUT:TAG ourselves, checking each against the manifest and config;
    returns the layer dirs top first (lowerdir order)."""
    index = json.loads((layout / imagebuild.INDEX).read_text())
    desc = next(m for m in index["manifests"] if m["annotations"][imagebuild.REF_NAME] == tag)
    manifest = json.loads(imagebuild.blob_path(layout, desc["digest"]).read_bytes())
    config = json.loads(imagebuild.blob_path(layout, manifest["config"]["digest"]).read_bytes())
    into.mkdir()
    dirs = []
    for i, (layer, diff_id) in enumerate(zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True)):
        dest = into / f"layer{i}"
        with open(imagebuild.blob_path(layout, layer["digest"]), "rb") as raw:
            result = unpack_layer(raw, layer["mediaType"], dest, digest=layer["digest"],
                                  size=layer["size"], diff_id=diff_id)
        assert (result.digest, result.diff_id) == (layer["digest"], diff_id)
        dirs.append(dest)
    return dirs[::-1]


@pytest.mark.kernel
def test_umoci_layers_stacked_by_the_kernel_match_umoci_unpack(
        tmp_path: Path, kernel_mount: MountFactory, fuse_mount: Callable[..., FuseMount]) -> None:
    """The standard images (deletions, an opaque dir, a file replaced by a dir, hardlinks, a
    device, a fifo) unpacked by us and stacked as lowers, against umoci's flattened rootfs."""
    missing = imagebuild.missing_tools()
    if missing:
        skip_or_fail(missing)
    images = imagebuild.standard_images(tmp_path / "layout", tmp_path / "work")
    lowers = _unpack_image_layers(images.layout, images.full, tmp_path / "ours")
    assert len(lowers) == 3
    rootfs = imagebuild.unpack_rootfs(images.layout, images.full, tmp_path / "bundle")
    reference = _merged_dir_nlink(take_snapshot(rootfs))
    # The layer dirs hold kernel markers, and no OCI marker files are left for either to show.
    assert not [p for layer in lowers for p in layer.rglob(".wh.*")]
    kernel = take_snapshot(kernel_mount(tmp_path / "kernel", lowers))
    assert_same_view(reference, _merged_dir_nlink(kernel))
    assert_same_view(kernel, fuse_mount(tmp_path / "fuse", lowers).mnt)


def _merged_dir_nlink(snap: Snapshot) -> Snapshot:
    """Overlayfs reports st_nlink 1 for a merged directory (find(1) reads it as "unknown"), where
    a flat tree counts subdirectories: directory link counts are not compared with a flat tree."""
    return replace(snap, entries={path: replace(info, nlink=1) if info.kind == "dir" else info
                                  for path, info in snap.entries.items()})


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_and_non_utf8_names(tmp_path: Path, fmt: int) -> None:
    long_dir = "/".join(["d" * 60] * 5)  # 304 bytes: more than a ustar header holds
    odd = os.fsdecode(b"caf\xe9")  # latin-1 bytes, not UTF-8
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for name, data in ((f"{long_dir}/file", b"long"), (odd, b"odd")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), MTIME
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{long_dir}/link-with-a-long-name-" + "x" * 80)
        link.type, link.linkname = tarfile.LNKTYPE, f"{long_dir}/file"
        tf.addfile(link)
    unpack_bytes(out.getvalue(), tmp_path / "layer")
    layer = os.fsencode(tmp_path / "layer")
    assert _read(layer + b"/" + os.fsencode(long_dir) + b"/file") == b"long"
    assert _read(layer + b"/caf\xe9") == b"odd"
    assert os.stat(layer + b"/" + os.fsencode(long_dir) + b"/file").st_nlink == 2


def _read(path: bytes) -> bytes:
    """The content of PATH, a bytes path (not valid UTF-8, which pathlib cannot name)."""
    with open(path, "rb") as f:
        return f.read()
