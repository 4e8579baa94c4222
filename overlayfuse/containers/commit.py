"""``overlayctl commit`` and ``diff``: a container's upper dir as a new image layer, and as a change list.

A commit writes the upper dir as an OCI layer (whiteouts as ``.wh.`` entries, opaque dirs as
``.wh..wh..opq``: `layertar`), gzip-compressed (`compression.write_layer_blob`, which also gives the
diff_id), then unpacks that very blob into the new layer dir (`unpack.unpack_layer`, which checks
the diff_id): so the layer a new container mounts is what the blob says, not a copy of the upper dir
made some other way. The new image is its parent's config and manifest, extended by one layer:
``rootfs.diff_ids`` and ``history`` get one entry each, ``author`` and ``created`` are set.

Consistency: a mounted container's daemon is frozen (`overlayfuse.daemon.control`) while the upper dir is
read, so the layer holds one moment of the mount: no change lands during the read, and changes in
flight finish before it. Reads through the mount go on meanwhile; writers wait. Only the tar is
written while frozen: compression happens on the fly, the unpack and install after the thaw.
The whole commit holds the store lock, so the container cannot be unmounted or removed under it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..daemon import control
from ..errors import StoreError
from ..images import oci
from ..images.compression import BlobInfo, write_layer_blob
from ..images.refs import parse_reference
from ..images.store import ContainerRecord, ImageRecord, LayerRecord, Store, now_rfc3339, write_file_atomic
from ..images.unpack import unpack_layer
from .changes import Change, list_changes
from .indexlinks import append_to_tar, indexed_names
from .layertar import write_layer_tar
from .lifecycle import RUNNING, control_address, lower_dirs, mount_state, upper_dir, work_dir

log = logging.getLogger(__name__)

CREATED_BY = "overlayctl commit"
CHUNK = 1 << 20  # copying a written tar into the compressor

#: Docker's layer media types name the same bytes as OCI's; a new OCI manifest uses OCI's names.
_OCI_LAYER_TYPE = {oci.DOCKER_LAYER_GZIP: oci.MEDIA_LAYER_GZIP, oci.DOCKER_LAYER_TAR: oci.MEDIA_LAYER_TAR}


def container_changes(store: Store, name: str) -> list[Change]:
    """What container NAME changed, for ``overlayctl diff`` (A/C/D lines, as ``docker diff``)."""
    record = store.container(name)
    return list_changes(lower_dirs(store, record), upper_dir(store, name))


def commit_container(
    store: Store, name: str, ref: str, message: str | None = None, author: str | None = None
) -> ImageRecord:
    """Make an image tagged REF from container NAME: its parent image plus one layer of its changes."""
    tag = parse_reference(ref)  # bad input fails before anything is touched
    with store.locked():
        record = store.container(name)
        parent = _parent_image(store, record)
        parent_config = store.read_blob_json(parent.config)
        parent_manifest = store.read_blob_json(parent.manifest)
        diff_ids = parent_config.get("rootfs", {}).get("diff_ids", [])
        if list(diff_ids) != list(record.layers):
            raise StoreError(f"container {name}: its layers no longer match its image {parent.id}")
        with store.staging("commit") as staged:
            blob_file = staged / "layer.tar.gz"
            blob = _write_layer(store, record, staged, blob_file)
            log.info("container %s: layer %s (diff_id %s, %d bytes)", name, blob.digest, blob.diff_id, blob.size)
            layer_stage = staged / "layer"
            layer_stage.mkdir()
            with open(blob_file, "rb") as raw:  # the blob as written, checked against what we hashed
                unpacked = unpack_layer(
                    raw, oci.MEDIA_LAYER_GZIP, layer_stage / "diff", digest=blob.digest, size=blob.size,
                    diff_id=blob.diff_id,
                )  # fmt: skip

            created = now_rfc3339()
            config = _new_config(parent_config, blob.diff_id, created, message, author)
            config_bytes = _canonical(config)
            config_digest = oci.sha256_of(config_bytes)
            layer_descriptor = oci.Descriptor(oci.MEDIA_LAYER_GZIP, blob.digest, blob.size)
            manifest = _new_manifest(parent_manifest, config_digest, len(config_bytes), layer_descriptor)
            manifest_bytes = _canonical(manifest)
            manifest_digest = oci.sha256_of(manifest_bytes)

            store.install_blob(blob_file, blob.digest)
            write_file_atomic(staged / "config.json", config_bytes)  # fsynced, as install_blob wants
            write_file_atomic(staged / "manifest.json", manifest_bytes)
            store.install_blob(staged / "config.json", config_digest)
            store.install_blob(staged / "manifest.json", manifest_digest)
            store.install_layer(layer_stage, LayerRecord(blob.diff_id, unpacked.unpacked_size))
            # The tag moves to the new image, as docker's does (install_image takes it from the old one).
            image = ImageRecord(id=config_digest, manifest=manifest_digest, config=config_digest, tags=(tag,))
            store.install_image(image)
    log.info("committed container %s as %s (%s)", name, tag, image.id)
    return image


def _write_layer(store: Store, record: ContainerRecord, staged: Path, blob_file: Path) -> BlobInfo:
    """Write the container's changes as a gzipped layer blob, its mount frozen while they are read.

    Usually the tar streams straight into the compressor. When the link index makes lower names
    show an upper copy (`indexlinks`), the tar is written whole first, those names are appended,
    and it is compressed after the thaw.
    """
    upper, work = upper_dir(store, record.name), work_dir(store, record.name)
    lowers = lower_dirs(store, record)
    with _frozen(store, record):
        names = indexed_names(lowers, upper, work)
        if not names:
            return write_layer_blob(lambda out: write_layer_tar(upper, out), blob_file, compression="gzip")
        tar_file = staged / "layer.tar"
        with open(tar_file, "xb") as out:
            write_layer_tar(upper, out)
        append_to_tar(tar_file, names, lowers, upper)
    with open(tar_file, "rb") as tar:
        blob = write_layer_blob(lambda out: shutil.copyfileobj(tar, out, CHUNK), blob_file, compression="gzip")
    tar_file.unlink()
    return blob


def _parent_image(store: Store, record: ContainerRecord) -> ImageRecord:
    for image in store.images():
        if image.id == record.image:
            return image
    raise StoreError(
        f"container {record.name}: its image {record.image} was removed from the store, and a commit "
        "needs its config and manifest"
    )


@contextlib.contextmanager
def _frozen(store: Store, record: ContainerRecord) -> Iterator[None]:
    """Hold a running, writable container's mount frozen; anything else cannot change under us."""
    if record.read_only or mount_state(record.pid, record.mountpoint) != RUNNING:
        yield
        return
    try:
        with control.frozen(control_address(store, record.name)):
            log.info("container %s: frozen", record.name)
            yield
    except control.ControlError as exc:
        raise StoreError(f"container {record.name}: cannot freeze its mount for the commit: {exc}") from None
    log.info("container %s: thawed", record.name)


def _new_config(
    parent: dict[str, Any], diff_id: str, created: str, message: str | None, author: str | None
) -> dict[str, Any]:
    config = copy.deepcopy(parent)
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs.setdefault("type", "layers")
    parent_layers = list(rootfs.get("diff_ids", []))
    rootfs["diff_ids"] = [*parent_layers, diff_id]
    history = config.get("history")
    if history is None:
        # Tools pair history entries (those without empty_layer) with layers: a parent that kept no
        # history gets one placeholder per layer, so that ours lines up with the new layer.
        history = [{"created_by": "(history not recorded)"} for _ in parent_layers]
    entry: dict[str, Any] = {"created": created, "created_by": CREATED_BY}
    if author:
        entry["author"] = author
    if message:
        entry["comment"] = message
    config["history"] = [*history, entry]
    config["created"] = created
    if author:
        config["author"] = author
    else:
        config.pop("author", None)  # the parent's author did not make this layer
    return config


def _new_manifest(
    parent: dict[str, Any], config_digest: str, config_size: int, layer: oci.Descriptor
) -> dict[str, Any]:
    layers = []
    for descriptor in parent.get("layers", []):
        descriptor = dict(descriptor)
        descriptor["mediaType"] = _OCI_LAYER_TYPE.get(descriptor.get("mediaType", ""), descriptor.get("mediaType"))
        layers.append(descriptor)
    layers.append(layer.to_json())
    return {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_MANIFEST,
        "config": oci.Descriptor(oci.MEDIA_CONFIG, config_digest, config_size).to_json(),
        "layers": layers,
    }


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

