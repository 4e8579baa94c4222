"""``overlayctl image export``: write one stored image as an OCI image layout.

The result is what skopeo and umoci read (``oci:DIR:TAG``, ``umoci unpack --image DIR:TAG``): an
``oci-layout`` file, ``index.json`` and ``blobs/sha256/``. The blobs are the ones imported or
committed, byte for byte, so the export has the image's own manifest digest and re-importing it
gives the same image. Blobs are hardlinked from the store when DIR is on the same filesystem
(instant, no space; the store never writes to a blob file once it is in place), copied otherwise.

DIR may be new, empty, or an existing layout: the image is added to it, replacing an entry of the
same ref.name, as ``skopeo copy`` does. In index.json the image's ``org.opencontainers.image.ref.name``
is the tag alone (``3.19``: the form umoci and skopeo expect after ``DIR:``), and
``io.containerd.image.name`` holds the whole reference, so that importing the export brings the
same name back. index.json is written last and atomically: an interrupted export leaves at most
some unreferenced blobs behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, StoreError
from . import oci
from .oci import Descriptor
from .store import ImageRecord, Store, digest_hex, fsync_dir, replacing, write_json_atomic

log = logging.getLogger(__name__)

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}


@dataclass(frozen=True, slots=True)
class ExportResult:
    descriptor: Descriptor  # the manifest's entry in index.json
    blobs: int  # blobs written (the rest were in DIR already)
    linked: bool  # hardlinked from the store, rather than copied


def _check_destination(dest: Path) -> bool:
    """Whether DEST is an existing layout to add to; refuse anything that is neither new nor empty."""
    if not dest.exists():
        return False
    if not dest.is_dir():
        raise ImageError(f"{dest} exists and is not a directory")
    if (dest / LAYOUT_FILE).is_file():
        return True
    if any(dest.iterdir()):
        raise ImageError(f"{dest} is neither empty nor an OCI image layout: give a new or empty directory")
    return False


def _existing_index(dest: Path) -> dict[str, object]:
    path = dest / "index.json"
    if not path.exists():
        return {"schemaVersion": 2, "manifests": []}
    data = path.read_bytes()
    oci.parse_index(data, f"{path}")  # validates; we keep the document as it is otherwise
    value = json.loads(data)
    assert isinstance(value, dict)
    return value


def _place_blob(store: Store, digest: str, dest: Path) -> tuple[bool, bool]:
    """Put blob DIGEST into DEST's blobs; returns (written, linked)."""
    source = store.blob_path(digest)
    if not source.is_file():
        raise StoreError(f"blob {digest} is missing from the store {store.root}: the image cannot be exported")
    target = dest / "blobs" / "sha256" / digest_hex(digest)
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        return False, False
    with replacing(target) as tmp:
        try:
            os.link(source, tmp)
            linked = True
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            with open(source, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            linked = False
    return True, linked


def export_image(store: Store, record: ImageRecord, dest: Path, tag: str | None) -> ExportResult:
    """Write RECORD into the layout DEST, named TAG (``name:tag``) if given. Call it locked, so that
    no garbage collection takes a blob away mid-way."""
    adding = _check_destination(dest)
    manifest_bytes = store.read_blob(record.manifest)
    manifest = oci.parse_manifest(manifest_bytes, f"manifest {record.manifest} in the store")
    index = _existing_index(dest) if adding else {"schemaVersion": 2, "manifests": []}
    try:
        (dest / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create {dest}/blobs/sha256: {exc.strerror}") from None
    written = 0
    linked = True
    for digest in (manifest.config.digest, *(layer.digest for layer in manifest.layers), record.manifest):
        new, was_linked = _place_blob(store, digest, dest)
        written += new
        linked = linked and (was_linked or not new)
    fsync_dir(dest / "blobs" / "sha256")
    annotations = {}
    if tag is not None:
        annotations = {oci.ANNOTATION_REF_NAME: tag.rsplit(":", 1)[1], oci.ANNOTATION_IMAGE_NAME: tag}
    config = store.read_blob_json(record.config)
    platform = {"architecture": config.get("architecture", ""), "os": config.get("os", "")}
    descriptor = Descriptor(manifest.media_type, record.manifest, len(manifest_bytes), annotations,
                            platform if all(platform.values()) else None)
    entries = index.get("manifests")
    assert isinstance(entries, list)
    if tag is not None:
        name = annotations[oci.ANNOTATION_REF_NAME]
        entries[:] = [entry for entry in entries if entry.get("annotations", {}).get(oci.ANNOTATION_REF_NAME) != name]
    else:
        entries[:] = [entry for entry in entries
                      if entry.get("digest") != record.manifest or entry.get("annotations")]
    entries.append(descriptor.to_json())
    index.setdefault("mediaType", oci.MEDIA_INDEX)
    if not (dest / LAYOUT_FILE).exists():
        write_json_atomic(dest / LAYOUT_FILE, LAYOUT_VERSION)
    write_json_atomic(dest / "index.json", index)
    log.info("exported %s to %s (%d blobs written)", record.id, dest, written)
    return ExportResult(descriptor, written, linked)
