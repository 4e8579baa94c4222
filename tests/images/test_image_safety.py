"""Hostile images against the store (issue 16): none may fill the disk, hang the importer or brick
the store.

Each hostile input is built here, by hand (tarfile, a GNU sparse header written byte by byte,
gzip, zstd, an OCI layout of a few JSON files). Imports go through the real ``overlayctl`` into a
store on a small tmpfs this module mounts (and unmounts in teardown), so running out of space is
real and cheap. After each case the store must be as it was (or hold exactly the good result), the
tmpfs nearly empty, nothing outside the store written (canaries in the test's own tmp dir), and
``image ls``, ``image rm`` and a good import must still work in the same store.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import resource
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from overlayfuse.images import oci
from tests.conftest import skip_or_fail
from tests.support.mounts import overlayctl_binary

#: Generous: guards hangs only (a good import here takes well under a second; on today's main the
#: deep chain took minutes).
CTL_TIMEOUT = 120.0
#: The store's tmpfs: small, so a layer that writes what it claims fails at once.
TMPFS_SIZE = 64 << 20
#: What the store may use on its tmpfs after any of these cases (records, small blobs, metadata).
SMALL = 4 << 20
CANARY = b"canary: must stay as it is\n"
MEDIA = {"": oci.MEDIA_LAYER_TAR, "gzip": oci.MEDIA_LAYER_GZIP, "zstd": oci.MEDIA_LAYER_ZSTD}
MTIME = 1_600_000_000


# --- the store, on a small tmpfs --------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    """A store root on a TMPFS_SIZE tmpfs mounted for this test, unmounted in teardown."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root")
    mnt = tmp_path / "storefs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    try:
        yield mnt / "store"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


#: Address space an overlayctl run may have (RLIMIT_AS), so that reading a bomb into memory fails
#: at once in that process instead of pressing on the machine.
MEMORY_LIMIT = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def ctl(root: Path, *args: str | os.PathLike[str], env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    binary = overlayctl_binary()
    if binary is None:
        skip_or_fail("overlayctl is not installed in this venv nor on PATH")
    argv = [str(binary), "--root", str(root), *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=CTL_TIMEOUT, check=False,
                          env={**os.environ, **(env or {})}, preexec_fn=_limit_memory)


def ok(root: Path, *args: str | os.PathLike[str]) -> str:
    proc = ctl(root, *args)
    assert proc.returncode == 0, f"overlayctl {' '.join(map(str, args))} failed: {proc.stderr}"
    return proc.stdout


def refused(root: Path, *args: str | os.PathLike[str], expect: str,
            env: dict[str, str] | None = None) -> str:
    """ARGS fail with one line of error saying EXPECT, and the store is left as it was."""
    before = _state(root)
    proc = ctl(root, *args, env=env)
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    errors = [line for line in lines if line.startswith("overlayctl: error: ")]
    assert len(errors) == 1, proc.stderr
    assert expect in errors[0], errors[0]
    assert _state(root) == before
    assert not root.exists() or not os.listdir(root / "tmp")  # no store made, or nothing staged left
    return errors[0]


def _state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path in the store with its type and size (the records and blobs, not times)."""
    state = {}
    if not root.exists():
        return state
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            state[os.path.relpath(os.path.join(dirpath, name), root)] = (
                stat.S_IFMT(st.st_mode), st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return state


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def still_works(root: Path, good: Path) -> None:
    """``image ls``, a good import and ``image rm`` all work in ROOT."""
    ok(root, "image", "ls")
    ok(root, "image", "import", f"{good}:good")
    ok(root, "image", "inspect", "good:good")
    assert len(ok(root, "image", "ls", "--quiet").split()) == 1
    ok(root, "image", "rm", "good:good")
    assert not os.listdir(root / "tmp")


# --- building inputs --------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def reg(name: str, data: bytes = b"") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, MTIME
    return info, data


def gnu_sparse_member(name: str, apparent: int, pieces: list[tuple[int, bytes]]) -> bytes:
    """One GNU sparse (type 'S') member, as ``tar --sparse`` writes it: a header whose map says
    where PIECES' data lies in a file of APPARENT bytes; only the pieces follow in the archive."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.GNUTYPE_SPARSE, 0o644, MTIME
    stored = b"".join(data for _, data in pieces)
    info.size = len(stored)
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    assert len(header) == tarfile.BLOCKSIZE and len(pieces) <= 4
    for n, (offset, data) in enumerate(pieces):
        at = 386 + 24 * n
        header[at:at + 12] = tarfile.itn(offset, 12, tarfile.GNU_FORMAT)
        header[at + 12:at + 24] = tarfile.itn(len(data), 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(apparent, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + stored + bytes(-len(stored) % tarfile.BLOCKSIZE)


def end_of_archive() -> bytes:
    return bytes(2 * tarfile.BLOCKSIZE)


@dataclass(frozen=True, slots=True)
class Layer:
    diff_id: str  # of the uncompressed tar
    blob: bytes  # as stored
    media_type: str


def layer(tar: bytes, compression: str = "gzip") -> Layer:
    return Layer(sha256(tar), compress(tar, compression), MEDIA[compression])


def write_blob(layout: Path, data: bytes) -> str:
    digest = sha256(data)
    path = layout / "blobs" / "sha256" / digest[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def write_layout(layout: Path, layers: list[Layer], tag: str) -> Path:
    """An OCI layout holding one image of LAYERS (base first), named TAG."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config = json.dumps({"architecture": oci.host_platform()[1], "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": oci.MEDIA_MANIFEST,
        "config": {"mediaType": oci.MEDIA_CONFIG, "digest": write_blob(layout, config), "size": len(config)},
        "layers": [{"mediaType": layer.media_type, "digest": write_blob(layout, layer.blob), "size": len(layer.blob)}
                   for layer in layers],
    }).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": oci.MEDIA_MANIFEST, "digest": write_blob(layout, manifest), "size": len(manifest),
        "annotations": {oci.ANNOTATION_REF_NAME: tag}}]}
    (layout / "index.json").write_text(json.dumps(index))
    return layout


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_layout(tmp_path / "good", [layer(tar_of(reg("etc/hostname", b"good\n")))], "good")


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A dir outside the store holding one file, which escapes aim at."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_bytes(CANARY)
    return outside


def assert_canary(outside: Path) -> None:
    assert os.listdir(outside) == ["canary"]
    st = os.lstat(outside / "canary")
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and stat.S_IMODE(st.st_mode) == 0o644
    assert (outside / "canary").read_bytes() == CANARY


# --- 1. sparse members ------------------------------------------------------------------------

TIB = 1 << 40


def test_a_sparse_member_claiming_a_terabyte_unpacks_as_a_sparse_file(store: Path, good: Path,
                                                                       tmp_path: Path) -> None:
    tar = gnu_sparse_member("big", TIB, [(0, b"head"), (TIB - 4, b"tail")]) + end_of_archive()
    assert len(tar) < 4096
    hostile = write_layout(tmp_path / "sparse", [layer(tar)], "sparse")
    ok(store, "image", "import", f"{hostile}:sparse")
    [diff] = sorted((store / "layers").glob("*/diff"))
    st = os.lstat(diff / "big")
    assert stat.S_ISREG(st.st_mode) and st.st_size == TIB
    assert st.st_blocks * 512 < 1 << 20  # holes, not written zeros
    with open(diff / "big", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(TIB - 4)
        assert f.read() == b"tail"
    assert used_bytes(store.parent) < SMALL
    ok(store, "image", "rm", "sparse:sparse")
    assert not list((store / "layers").iterdir())
    still_works(store, good)


def test_sparse_data_outside_its_file_is_refused(store: Path, good: Path, tmp_path: Path) -> None:
    tar = gnu_sparse_member("big", 100, [(200, b"past the end")]) + end_of_archive()
    hostile = write_layout(tmp_path / "sparse", [layer(tar)], "sparse")
    ok(store, "image", "ls")
    refused(store, "image", "import", f"{hostile}:sparse", expect="lies outside its 100-byte file")
    still_works(store, good)


# --- 2. deep trees and leftovers --------------------------------------------------------------

DEPTH = 10_000


def test_a_chain_ten_thousand_deep_imports_and_is_removed(store: Path, good: Path, tmp_path: Path) -> None:
    # Over a base that has d/ itself: the chain's implied directories are looked up below too.
    base_dir = tarfile.TarInfo("d")
    base_dir.type, base_dir.mode, base_dir.mtime = tarfile.DIRTYPE, 0o750, MTIME
    base = layer(tar_of((base_dir, None), reg("etc/hostname", b"base\n")))
    deep = layer(tar_of(reg("d/" * DEPTH + "f", b"deep")))
    hostile = write_layout(tmp_path / "deep", [base, deep], "deep")
    ok(store, "image", "import", f"{hostile}:deep")
    diff = store / "layers" / deep.diff_id[7:] / "diff"
    assert stat.S_IMODE(os.lstat(diff / "d").st_mode) == 0o750  # inherited from the base
    fd = os.open(diff, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("f", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        assert os.read(leaf, 10) == b"deep"
        os.close(leaf)
    finally:
        os.close(fd)
    ok(store, "image", "rm", "deep:deep")
    assert not list((store / "layers").iterdir())
    assert not os.listdir(store / "tmp")
    still_works(store, good)


def test_a_layer_deeper_than_the_limit_is_refused(store: Path, good: Path, tmp_path: Path) -> None:
    hostile = write_layout(tmp_path / "deep", [layer(tar_of(reg("d/" * 50 + "f", b"x")))], "deep")
    ok(store, "image", "ls")
    refused(store, "image", "import", f"{hostile}:deep", expect="more than the limit of 20",
            env={"OVERLAYFUSE_MAX_LAYER_DEPTH": "20"})
    still_works(store, good)


def _deep_leftover(top: Path, depth: int, outside: Path) -> None:
    """A tree as a killed ``image rm`` leaves it: DEPTH deep, with a read-only dir, an unlistable
    one and symlinks to OUTSIDE along the way."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            if level % 1000 == 0:
                os.symlink(str(outside), "to-outside", dir_fd=fd)
                os.symlink(str(outside / "canary"), "to-canary", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            if level == depth // 2:
                os.fchmod(fd, 0o500)
            os.close(fd)
            fd = child
        os.mkdir("locked", 0, dir_fd=fd)
    finally:
        os.close(fd)


def test_a_deep_leftover_discard_tree_never_bricks_the_store(store: Path, good: Path, canary: Path) -> None:
    ok(store, "image", "import", f"{good}:good")  # makes the store (only commands that add images do)
    ok(store, "image", "rm", "good:good")
    _deep_leftover(store / "tmp" / "discard-999999999-0badcafe", DEPTH, canary)
    (store / "tmp" / "import-999999998-deadbeef").symlink_to(canary)
    proc = ctl(store, "image", "ls")
    assert proc.returncode == 0, proc.stderr
    assert "leftover" in proc.stderr
    assert not os.listdir(store / "tmp")
    assert_canary(canary)
    still_works(store, good)


# --- 3. decompression bombs and free space ----------------------------------------------------


class _Compressing(io.RawIOBase):
    """A tar stream hashed (the diff_id) and compressed as it is written, never held whole."""

    def __init__(self, compression: str) -> None:
        self.hasher = hashlib.sha256()
        self.out = io.BytesIO()
        self.compressor = (zlib.compressobj(6, zlib.DEFLATED, 31) if compression == "gzip"
                           else zstandard.ZstdCompressor().compressobj())

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.hasher.update(data)
        self.out.write(self.compressor.compress(bytes(data)))
        return len(data)


def zeros_layer(files: int, size: int, compression: str = "gzip") -> Layer:
    """FILES entries of SIZE zero bytes each: a small blob that expands to FILES * SIZE bytes."""
    stream = _Compressing(compression)
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[arg-type]
        for n in range(files):
            info, _ = reg(f"zeros/{n}")
            info.size = size
            tf.addfile(info, _Zeros(size))
    stream.out.write(stream.compressor.flush())
    return Layer("sha256:" + stream.hasher.hexdigest(), stream.out.getvalue(), MEDIA[compression])


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        n = self.left if n is None or n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("shape", ["one-huge-file", "many-files"])
def test_a_decompression_bomb_is_refused_for_lack_of_space(store: Path, good: Path, tmp_path: Path,
                                                           compression: str, shape: str) -> None:
    files, size = (1, 256 << 20) if shape == "one-huge-file" else (64, 4 << 20)
    bomb = zeros_layer(files, size, compression)
    assert len(bomb.blob) < 1 << 20
    hostile = write_layout(tmp_path / "bomb", [bomb], "bomb")
    ok(store, "image", "ls")
    line = refused(store, "image", "import", f"{hostile}:bomb", expect="bytes free")
    assert "layer 1 of 1" in line
    assert used_bytes(store.parent) < SMALL
    still_works(store, good)


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_a_huge_extended_header_is_refused_before_it_is_read(store: Path, good: Path, tmp_path: Path,
                                                            kind: bytes) -> None:
    # tarfile reads a PAX or long-name header whole into memory: one of MEMORY_LIMIT bytes must
    # be refused from its size, before a byte of it is read.
    size = MEMORY_LIMIT
    header = tarfile.TarInfo("././@PaxHeader" if kind == tarfile.XHDTYPE else "././@LongLink")
    header.type, header.size = kind, size
    stream = _Compressing("gzip")
    stream.write(header.tobuf(format=tarfile.GNU_FORMAT if kind != tarfile.XHDTYPE else tarfile.USTAR_FORMAT))
    zeros = bytes(16 << 20)
    for _ in range(size // len(zeros)):
        stream.write(zeros)
    stream.write(bytes(2 * tarfile.BLOCKSIZE))
    stream.out.write(stream.compressor.flush())
    bomb = Layer("sha256:" + stream.hasher.hexdigest(), stream.out.getvalue(), MEDIA["gzip"])
    hostile = write_layout(tmp_path / "header", [bomb], "header")
    ok(store, "image", "ls")
    refused(store, "image", "import", f"{hostile}:header", expect=f"a {size}-byte extended header")
    still_works(store, good)


def test_the_unpacked_bytes_limit_is_enforced(store: Path, good: Path, tmp_path: Path) -> None:
    hostile = write_layout(tmp_path / "big", [zeros_layer(3, 1 << 20)], "big")
    ok(store, "image", "ls")
    refused(store, "image", "import", f"{hostile}:big", expect="OVERLAYFUSE_MAX_LAYER_BYTES",
            env={"OVERLAYFUSE_MAX_LAYER_BYTES": str(2 << 20)})
    refused(store, "image", "import", f"{hostile}:big", expect="OVERLAYFUSE_MAX_LAYER_ENTRIES",
            env={"OVERLAYFUSE_MAX_LAYER_ENTRIES": "2"})
    refused(store, "image", "import", f"{hostile}:big", expect="expected a positive integer",
            env={"OVERLAYFUSE_MAX_LAYER_BYTES": "lots"})
    still_works(store, good)


# --- 4. symlinked and odd blobs ---------------------------------------------------------------


def test_a_symlinked_layout_blob_is_refused(store: Path, good: Path, tmp_path: Path, canary: Path) -> None:
    hostile = write_layout(tmp_path / "linked", [layer(tar_of(reg("f", b"x")))], "linked")
    manifest = _manifest(hostile)
    blob = hostile / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
    elsewhere = tmp_path / "elsewhere-blob"
    os.rename(blob, elsewhere)
    blob.symlink_to(elsewhere)
    ok(store, "image", "ls")
    refused(store, "image", "import", f"{hostile}:linked",
            expect=f"blobs/sha256/{blob.name} is a symlink")
    still_works(store, good)


def test_a_fifo_as_layout_blob_is_refused_without_hanging(store: Path, good: Path, tmp_path: Path) -> None:
    hostile = write_layout(tmp_path / "fifo", [layer(tar_of(reg("f", b"x")))], "fifo")
    blob = hostile / "blobs" / "sha256" / _manifest(hostile)["layers"][0]["digest"][7:]
    blob.unlink()
    os.mkfifo(blob)
    ok(store, "image", "ls")
    refused(store, "image", "import", f"{hostile}:fifo", expect="is not a regular file")
    still_works(store, good)


def _manifest(layout: Path) -> dict:  # type: ignore[type-arg]
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    return json.loads((layout / "blobs" / "sha256" / digest[7:]).read_bytes())


def _docker_save_dir(where: Path, layer_tar: bytes) -> Path:
    """An unpacked ``docker save`` (manifest.json, config, ``<id>/layer.tar``)."""
    where.mkdir()
    config = json.dumps({"architecture": oci.host_platform()[1], "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]}}).encode()
    config_name = f"{sha256(config)[7:]}.json"
    (where / config_name).write_bytes(config)
    (where / "abc").mkdir()
    (where / "abc" / "layer.tar").write_bytes(layer_tar)
    (where / "manifest.json").write_text(json.dumps(
        [{"Config": config_name, "RepoTags": ["saved:latest"], "Layers": ["abc/layer.tar"]}]))
    return where


def test_an_unpacked_docker_save_whose_layer_links_outside_is_refused(
        store: Path, good: Path, tmp_path: Path, canary: Path) -> None:
    layer_tar = tar_of(reg("f", b"x"))
    saved = _docker_save_dir(tmp_path / "saved", layer_tar)
    outside_layer = canary.parent / "outside-layer.tar"
    outside_layer.write_bytes(layer_tar)
    (saved / "abc" / "layer.tar").unlink()
    (saved / "abc" / "layer.tar").symlink_to(outside_layer)  # absolute: out of the dir
    ok(store, "image", "ls")
    refused(store, "image", "import", saved, expect="points outside the image")
    (saved / "abc" / "layer.tar").unlink()
    (saved / "abc" / "layer.tar").symlink_to("../../outside-layer.tar")  # relative, climbing out
    refused(store, "image", "import", saved, expect="points outside the image")
    (saved / "abc" / "layer.tar").unlink()
    (saved / "blob").write_bytes(layer_tar)
    (saved / "abc" / "layer.tar").symlink_to("../blob")  # inside: docker's own shape, fine
    ok(store, "image", "import", saved)
    ok(store, "image", "rm", "saved:latest")
    assert_canary(canary)
    still_works(store, good)


def _docker_save_archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
                         layers: list[str], layer_tar: bytes) -> Path:
    config = json.dumps({"architecture": oci.host_platform()[1], "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]}}).encode()
    config_name = f"{sha256(config)[7:]}.json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["saved:latest"], "Layers": layers}]).encode()
    path.write_bytes(tar_of(reg("manifest.json", manifest), reg(config_name, config), *members))
    return path


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, MTIME
    return info, None


@pytest.mark.parametrize("case", ["absolute-symlink", "climbing-symlink", "manifest-outside"])
def test_a_docker_save_archive_cannot_point_outside_itself(store: Path, good: Path, tmp_path: Path,
                                                           canary: Path, case: str) -> None:
    layer_tar = tar_of(reg("f", b"x"))
    (canary.parent / "outside-layer.tar").write_bytes(layer_tar)
    target = str(canary.parent / "outside-layer.tar")
    members, layers = {
        "absolute-symlink": ([_symlink("abc/layer.tar", target)], ["abc/layer.tar"]),
        "climbing-symlink": ([_symlink("abc/layer.tar", "../" * 40 + target.lstrip("/"))], ["abc/layer.tar"]),
        "manifest-outside": ([], ["../" * 40 + target.lstrip("/")]),
    }[case]
    archive = _docker_save_archive(tmp_path / "saved.tar", members, layers, layer_tar)
    ok(store, "image", "ls")
    refused(store, "image", "import", archive, expect="points outside the image")
    assert_canary(canary)
    still_works(store, good)
