"""One copy of each layer's bytes in the store (issue 21 item 10), whatever form the image came in.

Images with plain tar layers (an OCI layout written with uncompressed layers, a Docker 25+ ``docker
save`` archive, plain and gzipped, skopeo 1.9's mislabelled copy) are built by umoci and skopeo from
the standard images plus one big, compressible layer, so that two copies of it (the tar beside its
unpacked files) would show in ``overlayctl system df`` far beyond any rounding. After an import the
store must hold the layer unpacked plus gzipped, the image id and diff_ids must be the source's, and
export and save must give images skopeo reads and verifies, which import back as the same image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from overlayfuse.images import oci
from overlayfuse.images.importer import LayerPlan, gzip_media_type, restate_manifest
from tests.conftest import skip_or_fail
from tests.support import imagebuild as ib
from tests.support.containerctl import Ctl

#: The big layer's one file: text of a small vocabulary, so gzip makes it several times smaller.
BIG_FILE = "srv/big.txt"
BIG_SIZE = 6 << 20
#: What the store may hold besides blobs, layers and containers (records, the lock, empty dirs).
OTHER_SLACK = 256 << 10


def _big_text() -> bytes:
    words = [b"overlay", b"layer", b"whiteout", b"opaque", b"copy-up", b"upper", b"lower", b"merged"]
    rng = random.Random(21)
    out = bytearray()
    line = 0
    while len(out) < BIG_SIZE:
        out += b"%08d " % line + b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
        line += 1
    return bytes(out[:BIG_SIZE])


@dataclass(frozen=True, slots=True)
class Source:
    """One form of the big image: the import argument, the tag it gets, and the source's own
    config digest (the image id) and diff_ids, read from its bytes, not from the store."""

    argument: str
    tag: str
    config_digest: str
    diff_ids: list[str]
    tar_bytes: int  # the uncompressed layer tars, summed: what a second copy would cost


@dataclass(frozen=True, slots=True)
class Built:
    layout: Path  # the standard images plus "big" (gzip layers, as umoci writes them)
    work: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    missing = ib.missing_tools()
    if missing:
        skip_or_fail(missing)
    base = tmp_path_factory.mktemp("one-copy")
    images = ib.standard_images(base / "layout", base / "work")
    text = _big_text()

    def add_big(rootfs: Path) -> None:
        (rootfs / "srv").mkdir(exist_ok=True)
        (rootfs / BIG_FILE).write_bytes(text)
    ib.repack_layer(images.layout, images.full, "big", base / "work", add_big)
    return Built(images.layout, base / "work")


def _layout_source(layout: Path, tag: str, store_tag: str) -> Source:
    editor = ib.LayoutEditor(layout, tag)
    sizes = [ib.blob_path(layout, layer["digest"]).stat().st_size for layer in editor.manifest["layers"]]
    assert all(layer["mediaType"] in (oci.MEDIA_LAYER_TAR, oci.MEDIA_LAYER_GZIP) for layer in editor.manifest["layers"])
    plain = [ib.blob_path(layout, layer["digest"]).read_bytes()[:2] != b"\x1f\x8b"
             for layer in editor.manifest["layers"]]
    assert all(plain), "the source's layers must be plain tars, else there is nothing to test"
    return Source(f"{layout}:{tag}", store_tag, editor.manifest["config"]["digest"],
                  list(editor.config["rootfs"]["diff_ids"]), sum(sizes))


def _archive_source(archive: Path, store_tag: str) -> Source:
    """The image of a ``docker save`` archive, read through its manifest.json as docker would."""
    raw = archive.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        def read(name: str) -> bytes:
            member = tar.extractfile(name)
            assert member is not None
            return member.read()
        [entry] = json.loads(read("manifest.json"))
        config = read(entry["Config"])
        layers = [read(name) for name in entry["Layers"]]
    assert all(layer[:2] != b"\x1f\x8b" for layer in layers), "the archive's layers must be plain tars"
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    assert diff_ids == [ib.sha256_digest(layer) for layer in layers]
    return Source(str(archive), store_tag, ib.sha256_digest(config), diff_ids, sum(len(layer) for layer in layers))


def _oci_tar(built: Built, work: Path) -> Source:
    return _layout_source(ib.to_uncompressed(built.layout, "big", work, work / "plain"), "big", "plain:big")


def _skopeo_mislabeled(built: Built, work: Path) -> Source:
    layout = ib.to_uncompressed(built.layout, "big", work, work / "mislabeled", relabel=False)
    return _layout_source(layout, "big", "mislabeled:big")


def _docker25(built: Built, work: Path) -> Source:
    return _archive_source(ib.to_docker25_archive(built.layout, "big", work, work / "d25.tar", "test/d25:v1"),
                           "test/d25:v1")


def _docker25_gzip(built: Built, work: Path) -> Source:
    archive = ib.to_docker25_archive(built.layout, "big", work, work / "d25.tar.gz", "test/d25gz:v1", gzip_it=True)
    return _archive_source(archive, "test/d25gz:v1")


def _docker_legacy(built: Built, work: Path) -> Source:
    archive = ib.to_docker_archive(built.layout, "big", work / "skopeo.tar", "docker.io/library/legacy:v2")
    return _archive_source(ib.to_legacy_docker_archive(archive, work / "legacy.tar"), "legacy:v2")


SOURCES: dict[str, Callable[[Built, Path], Source]] = {
    "oci-tar": _oci_tar,
    "skopeo-mislabeled": _skopeo_mislabeled,
    "docker25": _docker25,
    "docker25-gzip": _docker25_gzip,
    "docker-legacy": _docker_legacy,
}


def _inspect(ctl: Ctl, ref: str) -> dict[str, Any]:
    [described] = json.loads(ctl.ok("image", "inspect", ref))
    return described


def _df(ctl: Ctl) -> dict[str, int]:
    return {row["kind"]: row["size"] for row in json.loads(ctl.ok("system", "df", "--json"))}


def _assert_stored_gzipped(ctl: Ctl, described: dict[str, Any], source: Source) -> None:
    """Each layer's blob is gzip, gunzips to the tar the diff_id names, and is what the manifest says."""
    assert described["Id"] == source.config_digest, "the image id changed"
    assert [layer["DiffID"] for layer in described["Layers"]] == source.diff_ids, "the diff_ids changed"
    manifest = json.loads((ctl.root / "blobs" / "sha256" / described["ManifestDigest"][7:]).read_bytes())
    assert manifest["config"]["digest"] == source.config_digest
    for layer, descriptor in zip(described["Layers"], manifest["layers"], strict=True):
        blob = ctl.root / "blobs" / "sha256" / layer["Digest"][7:]
        data = blob.read_bytes()
        assert data[:2] == b"\x1f\x8b", f"layer {layer['DiffID']} is stored as it came, not gzipped"
        assert oci.sha256_of(gzip.decompress(data)) == layer["DiffID"]
        assert descriptor["digest"] == layer["Digest"] == oci.sha256_of(data)
        assert descriptor["size"] == len(data)
        assert oci.LAYER_COMPRESSION[descriptor["mediaType"]] == "gzip"


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_plain_tar_layers_are_stored_once(kind: str, built: Built, tmp_path: Path) -> None:
    source = SOURCES[kind](built, tmp_path)
    ctl = Ctl(tmp_path / "store")
    ctl.ok("image", "import", source.argument)
    described = _inspect(ctl, source.tag)
    _assert_stored_gzipped(ctl, described, source)
    df = _df(ctl)
    # One copy: the unpacked files plus the gzip blobs (a fraction of the tars), not plus the tars.
    assert df["Blobs"] < source.tar_bytes / 2, f"blobs take {df['Blobs']} bytes for {source.tar_bytes} of tar"
    assert df["Layers"] > BIG_SIZE
    assert df["Total"] <= df["Blobs"] + df["Layers"] + OTHER_SLACK
    assert df["Total"] < df["Layers"] + source.tar_bytes
    # The same source again: the same manifest (the gzip is deterministic) and nothing more on disk.
    ctl.ok("image", "import", source.argument)
    assert _inspect(ctl, source.tag)["ManifestDigest"] == described["ManifestDigest"]
    assert _df(ctl)["Blobs"] == df["Blobs"]


@pytest.mark.parametrize("kind", ["oci-tar", "docker25"])
def test_export_and_save_of_a_restated_image_are_valid(kind: str, built: Built, tmp_path: Path) -> None:
    source = SOURCES[kind](built, tmp_path)
    ctl = Ctl(tmp_path / "store")
    ctl.ok("image", "import", source.argument, "--tag", "one/copy:1")
    described = _inspect(ctl, "one/copy:1")
    digests = [layer["Digest"] for layer in described["Layers"]]
    out = tmp_path / "export"
    ctl.ok("image", "export", "one/copy:1", out)
    inspected = ib.skopeo_inspect(f"oci:{out}:1")
    assert (inspected["Digest"], inspected["Layers"]) == (described["ManifestDigest"], digests)
    assert all(ib.blob_path(out, digest).read_bytes()[:2] == b"\x1f\x8b" for digest in digests), \
        "the export's layers are not the gzip blobs the store keeps"
    # skopeo copy checks every blob against its descriptor as it reads it.
    ib.tool("skopeo", "copy", "--quiet", f"oci:{out}:1", f"dir:{tmp_path / 'copied'}")
    saved = tmp_path / "saved.tar"
    ctl.ok("image", "save", "one/copy:1", "-o", saved)
    assert ib.skopeo_inspect(f"oci-archive:{saved}")["Layers"] == digests
    assert ib.skopeo_inspect(f"docker-archive:{saved}")["Layers"] == source.diff_ids
    ib.tool("skopeo", "copy", "--quiet", f"docker-archive:{saved}", f"dir:{tmp_path / 'from-save'}")
    # Both come back as the same image, manifest included, in a fresh store.
    for number, argument in enumerate((out, saved)):
        fresh = Ctl(tmp_path / f"fresh-{number}")
        fresh.ok("image", "import", argument)
        again = _inspect(fresh, "one/copy:1")
        assert (again["Id"], again["ManifestDigest"]) == (described["Id"], described["ManifestDigest"])
        assert [layer["DiffID"] for layer in again["Layers"]] == source.diff_ids
    # The layer files are the source's: umoci unpacks the export to the source's tree.
    exported = ib.unpack_rootfs(out, "1", tmp_path / "bundle")
    st = os.lstat(exported / BIG_FILE)
    assert stat.S_ISREG(st.st_mode) and hashlib.sha256((exported / BIG_FILE).read_bytes()).digest() == \
        hashlib.sha256(_big_text()).digest()


def _store_state(root: Path) -> dict[str, tuple[int, str]]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content = hashlib.sha256(Path(path).read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            state[os.path.relpath(path, root)] = (st.st_mode, content)
    return state


def _corrupt_last_layer(archive: Path, dest: Path) -> None:
    """ARCHIVE with one byte of its top layer's tar changed (inside the big file's content), so the
    import fails only after the layers below were unpacked and gzipped into the staging dir."""
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]  # type: ignore[union-attr]
    entry = json.loads(next(data for m, data in members if m.name == "manifest.json") or b"")[0]
    top = entry["Layers"][-1]
    entries = []
    for member, data in members:
        if member.name == top and data is not None:
            at = data.index(_big_text()[:64]) + 4096
            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
        entries.append((member, data))
    dest.write_bytes(ib.make_tar(entries))


def test_a_failed_import_leaves_the_store_as_it_was(built: Built, tmp_path: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    ctl.ok("image", "import", f"{built.layout}:base")
    archive = ib.to_docker25_archive(built.layout, "big", tmp_path, tmp_path / "d25.tar", "test/bad:v1")
    broken = tmp_path / "broken.tar"
    _corrupt_last_layer(archive, broken)
    before = _store_state(ctl.root)
    line = ctl.fails("image", "import", broken)
    assert str(broken) in line and "digest" in line, line
    assert _store_state(ctl.root) == before
    assert not list((ctl.root / "tmp").iterdir())


def test_restate_manifest_keeps_the_family_and_every_other_field() -> None:
    tar_digest, gz_digest = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    config = {"mediaType": oci.DOCKER_CONFIG, "digest": "sha256:" + "c" * 64, "size": 7}
    source = {"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST, "config": config,
              "layers": [{"mediaType": oci.DOCKER_LAYER_TAR, "digest": tar_digest, "size": 10240,
                          "annotations": {"a": "b"}, "data": "AAAA"},
                         {"mediaType": oci.DOCKER_LAYER_GZIP, "digest": gz_digest, "size": 20}]}
    manifest = json.dumps(source, indent=2).encode()
    plan = [LayerPlan(1, "x", oci.DOCKER_LAYER_TAR, 10240, "sha256:" + "d" * 64, tar_digest),
            LayerPlan(2, "y", oci.DOCKER_LAYER_GZIP, 20, "sha256:" + "e" * 64, gz_digest)]
    # Nothing changed (a layer the store had as it came): the very bytes, so the same digest.
    assert restate_manifest(manifest, plan, [tar_digest, gz_digest]) is manifest
    new_digest = "sha256:" + "f" * 64
    stored = [replace(plan[0], media_type=gzip_media_type(oci.DOCKER_LAYER_TAR), size=99, digest=new_digest), plan[1]]
    value = json.loads(restate_manifest(manifest, stored, [new_digest, gz_digest]))
    assert value["layers"][0] == {"mediaType": oci.DOCKER_LAYER_GZIP, "digest": new_digest, "size": 99,
                                  "annotations": {"a": "b"}}
    assert value["layers"][1] == source["layers"][1] and value["config"] == config
    assert value["mediaType"] == oci.DOCKER_MANIFEST
    assert gzip_media_type(oci.MEDIA_LAYER_TAR) == gzip_media_type(oci.MEDIA_LAYER_GZIP) == oci.MEDIA_LAYER_GZIP
