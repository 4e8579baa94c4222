"""``overlayctl image save``: one image as a single tar that docker, podman, skopeo and we load.

The tar is the image exported as an OCI layout (`exporter`) plus docker's ``manifest.json`` beside
it, which is what ``docker save`` writes since Docker 25: ``skopeo copy oci-archive:FILE`` and
``docker-archive:FILE`` both read it, and so does ``overlayctl image load`` (which is ``image
import`` of the file). The blobs are the store's, byte for byte, so loading the file again gives
the same image, manifest digest included.

The layout is staged in the store's ``tmp/`` (blobs hardlinked, so no copy), the tar is written
beside FILE under a temporary name and renamed over it at the end: an interrupted save leaves no
half-written FILE.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path

from ..errors import ImageError
from .exporter import export_image
from .store import ImageRecord, Store, digest_hex, fsync_dir, replacing

log = logging.getLogger(__name__)

MANIFEST_JSON = "manifest.json"


def save_image(store: Store, record: ImageRecord, tag: str | None, out: Path) -> int:
    """Write RECORD (named TAG, if given) to the tar OUT; returns its size. Call it locked."""
    if out.is_dir():
        raise ImageError(f"{out} is a directory: give the tar file to write (-o FILE.tar)")
    with store.staging("save") as staging:
        layout = staging / "layout"
        export_image(store, record, layout, tag)
        manifest = store.read_blob_json(record.manifest)
        entry = {
            "Config": f"blobs/sha256/{digest_hex(record.config)}",
            "RepoTags": [tag] if tag else [],
            "Layers": [f"blobs/sha256/{digest_hex(layer['digest'])}" for layer in manifest.get("layers", [])],
        }
        (layout / MANIFEST_JSON).write_text(json.dumps([entry], separators=(",", ":")))
        try:
            with replacing(out) as tmp:
                with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                    for path in sorted(layout.rglob("*")):
                        tar.add(path, arcname=path.relative_to(layout).as_posix(), recursive=False,
                                filter=_plain)
                with open(tmp, "rb") as written:
                    os.fsync(written.fileno())
        except OSError as exc:
            raise ImageError(f"cannot write {out}: {exc.strerror or exc}") from None
    fsync_dir(out.parent)
    size = out.stat().st_size
    log.info("saved %s to %s (%d bytes)", record.id, out, size)
    return size


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """An entry that says nothing about this machine: owner root, fixed time, plain modes."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o755 if info.isdir() else 0o644
    return info
