"""``overlayctl image push``: send a stored image (imported, pulled or committed) to a registry.

For each blob (config, then layers): ``HEAD`` it and skip it when the registry has it; else try a
cross-repository mount when another repository of the same registry is known to have it (an image in
the store tagged from that repository lists the blob); else upload: ``POST`` for a session, then one
``PUT ...?digest=`` with the whole blob, or ``PATCH`` chunks and a final ``PUT`` for a blob larger
than the chunk size. Last, the manifest is ``PUT`` under the tag with its own media type. The blobs
sent are the stored ones byte for byte, so the manifest's digest is the one the store has.
Nothing in the store changes.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import oci
from ..refs import reference_or_none, resolve_image
from ..store import ImageRecord, Store
from .client import Options, Session
from .progress import Transfers
from .reference import RegistryError, RegistryRef, parse_registry_ref, split_host

log = logging.getLogger(__name__)

#: Blobs larger than this go up in PATCH chunks of this size (a proxy or registry may cap one request).
CHUNK_SIZE = 32 << 20
#: Bytes read from the stored blob per write to the socket.
READ_SIZE = 1 << 16


@dataclass(frozen=True, slots=True)
class PushResult:
    ref: RegistryRef
    manifest_digest: str
    uploaded: int
    mounted: int
    skipped: int


def _manifest_media_type(manifest: dict[str, object], config_type: str) -> str:
    declared = manifest.get("mediaType")
    if isinstance(declared, str) and declared in oci.MANIFEST_TYPES:
        return declared
    return oci.DOCKER_MANIFEST if config_type == oci.DOCKER_CONFIG else oci.MEDIA_MANIFEST


def _file_chunks(path: Path, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    with open(path, "rb") as stream:
        stream.seek(start)
        left = length
        while left is None or left > 0:
            chunk = stream.read(READ_SIZE if left is None else min(READ_SIZE, left))
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            yield chunk


def _mount_sources(store: Store, ref: RegistryRef, digest: str) -> list[str]:
    """Other repositories of REF's registry that hold DIGEST, as far as the store's tags tell."""
    found: list[str] = []
    for record in store.images():
        try:
            layers = store.read_blob_json(record.manifest).get("layers", [])
        except (OSError, ValueError, AttributeError):
            continue
        if digest not in {layer.get("digest") for layer in layers if isinstance(layer, dict)} | {record.config}:
            continue
        for tag in record.tags:
            registry, path = split_host(tag.rpartition(":")[0])
            if registry == ref.registry and path != ref.repository and path not in found:
                found.append(path)
    return found


def _location(response_location: str | None, session: Session, what: str) -> str:
    if not response_location:
        raise RegistryError(f"{session.label}: {what}: the registry gave no upload Location")
    return response_location


def upload_blob(session: Session, ref: RegistryRef, store: Store, digest: str, size: int,
                transfers: Transfers, chunk_size: int) -> str:
    """Put one stored blob in REF's repository; returns how: ``skipped``, ``mounted`` or ``uploaded``."""
    repo = ref.repository
    push_scope = f"repository:{repo}:pull,push"
    what = f"{repo}: blob {digest}"
    head = session.request("HEAD", f"/v2/{repo}/blobs/{digest}", [push_scope], what)
    if head.status_code == 200:
        transfers.skip(digest, "already in the registry")
        return "skipped"
    if head.status_code not in (404,):
        raise session.fail(what, head)
    location = None
    for source in _mount_sources(store, ref, digest):
        response = session.request("POST", f"/v2/{repo}/blobs/uploads/",
                                   [push_scope, f"repository:{source}:pull"], what,
                                   params={"mount": digest, "from": source})
        if response.status_code == 201:
            transfers.skip(digest, f"mounted from {source}")
            return "mounted"
        if response.status_code == 202:  # the registry opened an upload instead
            location = response.headers.get("location")
            break
    path = store.blob_path(digest)
    if not path.is_file():
        raise RegistryError(f"{session.label}: {what}: the store does not have this blob (its layer came "
                            "in under another blob with the same content), and the registry has no copy of it")
    if location is None:
        response = session.request("POST", f"/v2/{repo}/blobs/uploads/", [push_scope], what)
        if response.status_code != 202:
            raise session.fail(f"{what}: starting the upload", response)
        location = _location(response.headers.get("location"), session, what)
    advance = transfers.start(digest)
    if size <= chunk_size:
        response = session.request(
            "PUT", location, [push_scope], what, params={"digest": digest},
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            content=lambda: _counted(_file_chunks(path), advance))
    else:
        offset = 0
        while offset < size:
            length = min(chunk_size, size - offset)
            response = session.request(
                "PATCH", location, [push_scope], what,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(length),
                         "Content-Range": f"{offset}-{offset + length - 1}"},
                content=functools.partial(_counted_chunks, path, offset, length, advance))
            if response.status_code != 202:
                raise session.fail(f"{what}: uploading bytes {offset}-{offset + length - 1}", response)
            location = _location(response.headers.get("location"), session, what)
            offset += length
        response = session.request("PUT", location, [push_scope], what, params={"digest": digest},
                                   headers={"Content-Length": "0"}, content=b"")
    if response.status_code != 201:
        raise session.fail(f"{what}: finishing the upload", response)
    transfers.done(digest, "pushed")
    return "uploaded"


def _counted_chunks(path: Path, start: int, length: int, advance: Callable[[int], None]) -> Iterator[bytes]:
    """LENGTH bytes of PATH from START, counted by ADVANCE as they go out."""
    return _counted(_file_chunks(path, start, length), advance)


def _counted(chunks: Iterator[bytes], advance: Callable[[int], None]) -> Iterator[bytes]:
    for chunk in chunks:
        advance(len(chunk))
        yield chunk


def push_image(store: Store, image: str, dest: str | None, options: Options,
               transfers: Transfers | None = None, chunk_size: int = CHUNK_SIZE) -> PushResult:
    """Push IMAGE (a name, id or id prefix in STORE) to DEST (default: the name IMAGE was given)."""
    transfers = transfers or Transfers(quiet=True)
    with store.locked():  # resolved under the lock; the blobs are then read without it (never rewritten)
        record = resolve_image(store, image)
        manifest_bytes = store.read_blob(record.manifest)
    ref = parse_registry_ref(dest or _default_dest(image, record))
    if ref.digest is not None or ref.tag is None:
        raise RegistryError(f"push destination {dest!r}: name a tag, not a digest")
    manifest_json = json.loads(manifest_bytes)
    manifest = oci.parse_manifest(manifest_bytes, f"manifest {record.manifest}",
                                  _manifest_media_type(manifest_json, ""))
    media_type = _manifest_media_type(manifest_json, manifest.config.media_type)
    counts = {"skipped": 0, "mounted": 0, "uploaded": 0}
    with Session(ref.api_host, options) as session:
        seen: set[str] = set()
        for blob in (manifest.config, *manifest.layers):
            if blob.digest in seen:
                continue
            seen.add(blob.digest)
            label = "config" if blob is manifest.config else "layer"
            transfers.add(blob.digest, f"{label} {blob.digest[7:19]}", blob.size)
            counts[upload_blob(session, ref, store, blob.digest, blob.size, transfers, chunk_size)] += 1
        what = f"{ref.repository}: manifest {ref.tag}"
        response = session.request("PUT", f"/v2/{ref.repository}/manifests/{ref.tag}",
                                   [f"repository:{ref.repository}:pull,push"], what,
                                   headers={"Content-Type": media_type}, content=manifest_bytes)
        if response.status_code != 201:
            raise session.fail(what, response)
        claimed = response.headers.get("docker-content-digest")
        if claimed and claimed != record.manifest:
            raise RegistryError(f"{session.label}: {what}: the registry stored digest {claimed}, "
                                f"we sent {record.manifest}")
    transfers.close()
    log.info("pushed %s as %s (%s)", record.id, ref, counts)
    return PushResult(ref, record.manifest, counts["uploaded"], counts["mounted"], counts["skipped"])


def _default_dest(image: str, record: ImageRecord) -> str:
    """The name IMAGE was given as, or the image's first tag when IMAGE was an id."""
    named = reference_or_none(image)
    if named and named in record.tags:
        return named
    if record.tags:
        return record.tags[0]
    raise RegistryError(f"image {image} has no name to push it as: give a destination")
