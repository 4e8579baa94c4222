"""``overlayctl image pull``: fetch an image from a registry and install it as an import would.

1. The manifest is asked for with ``Accept`` listing the OCI index and manifest and Docker's list and
   schema 2; its bytes are checked against the digest asked for and ``Docker-Content-Digest``. An
   index gives the manifest for the platform (``--platform``, default this machine's).
2. The config (small) is fetched and checked; its diff_ids say which layers the store already has.
3. Layer blobs are downloaded a few at a time into a staging OCI layout under the store's ``tmp/``,
   hashed while they stream (a wrong byte fails the pull); a broken connection resumes with a
   ``Range`` request. A blob the store has (same digest) is linked, not fetched; a layer the store
   has under another blob (same diff_id, other compression) is not fetched at all.
4. The staged layout goes through `importer.import_image`, which verifies and unpacks it and installs
   it under the store's lock, records last. Any failure before that leaves the store as it was;
   the staging goes with the command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import httpx

from ...errors import ImageError
from .. import oci
from ..importer import ImportResult, import_image
from ..progress import Progress
from ..store import Store, digest_hex
from .client import Options, Session
from .progress import Transfers
from .reference import RegistryError, RegistryRef, parse_registry_ref

log = logging.getLogger(__name__)

ACCEPT = ", ".join((oci.MEDIA_INDEX, oci.MEDIA_MANIFEST, oci.DOCKER_MANIFEST_LIST, oci.DOCKER_MANIFEST))
#: Layer downloads at once: enough to hide latency, few enough not to swamp a small registry.
PARALLEL_DOWNLOADS = 3
#: How often one blob download may restart after its connection broke (each resumes with Range).
MAX_RESUMES = 5


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


def parse_platform(text: str | None) -> Platform:
    """``os/arch[/variant]``; None means this machine."""
    if not text:
        os_name, arch = oci.host_platform()
        return Platform(os_name, arch)
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise RegistryError(f"--platform {text!r}: expected OS/ARCH[/VARIANT], like linux/amd64")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


@dataclass(frozen=True, slots=True)
class PullResult:
    ref: RegistryRef
    manifest_digest: str
    imported: ImportResult
    downloaded: int  # layer blobs fetched
    present: int  # layer blobs (or layers) the store had


def _pull_scope(ref: RegistryRef) -> str:
    return f"repository:{ref.repository}:pull"


def fetch_manifest(session: Session, ref: RegistryRef, reference: str) -> tuple[bytes, str, str]:
    """(bytes, media type, digest) of the manifest or index REFERENCE (a tag or a digest), verified."""
    what = f"manifest {ref.repository}:{reference}" if ":" not in reference else \
        f"manifest {ref.repository}@{reference}"
    response = session.request("GET", f"/v2/{ref.repository}/manifests/{reference}", [_pull_scope(ref)], what,
                               headers={"Accept": ACCEPT}, stream=True)
    try:
        if response.status_code != 200:
            raise session.fail(what, response)
        data = b""
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > oci.MAX_DOCUMENT_SIZE:
                raise RegistryError(f"{session.label}: {what}: larger than {oci.MAX_DOCUMENT_SIZE} bytes")
    except httpx.TransportError as exc:
        raise RegistryError(f"{session.label}: {what}: connection broke: {exc}") from None
    finally:
        response.close()
    digest = oci.sha256_of(data)
    claimed = response.headers.get("docker-content-digest")
    if reference.startswith("sha256:") and digest != reference:
        raise RegistryError(f"{session.label}: {what}: bad digest: the registry sent content with digest {digest}")
    if claimed and claimed.startswith("sha256:") and claimed != digest:
        raise RegistryError(f"{session.label}: {what}: bad digest: content has {digest}, "
                            f"Docker-Content-Digest says {claimed}")
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    if media_type not in oci.MANIFEST_TYPES | oci.INDEX_TYPES:
        try:
            declared = json.loads(data).get("mediaType")
        except (ValueError, AttributeError):
            declared = None
        if declared in oci.MANIFEST_TYPES | oci.INDEX_TYPES:
            media_type = declared
        else:
            raise RegistryError(f"{session.label}: {what}: unsupported manifest type {media_type!r} "
                                "(schema 1 and other old formats are not pulled)")
    return data, media_type, digest


def _matches(platform: dict[str, str] | None, wanted: Platform) -> bool:
    if not platform:
        return False
    if platform.get("os") != wanted.os or platform.get("architecture") != wanted.architecture:
        return False
    return wanted.variant is None or platform.get("variant") == wanted.variant


def resolve_manifest(session: Session, ref: RegistryRef, platform: Platform) -> tuple[bytes, str, str]:
    """The image manifest REF names for PLATFORM, through an index if there is one."""
    data, media_type, digest = fetch_manifest(session, ref, ref.reference)
    if media_type in oci.INDEX_TYPES:
        index = oci.parse_index(data, f"{session.label}: index {ref}", media_type)
        candidates = [m for m in index.manifests
                      if m.media_type in oci.MANIFEST_TYPES and _matches(m.platform, platform)]
        if not candidates:
            keys = ("os", "architecture", "variant")
            offered = sorted({"/".join(filter(None, ((m.platform or {}).get(key) for key in keys)))
                              for m in index.manifests})
            raise RegistryError(f"{session.label}: {ref}: no image for {platform} (it has {', '.join(offered)})")
        chosen = candidates[0]
        data, media_type, digest = fetch_manifest(session, ref, chosen.digest)
        if media_type not in oci.MANIFEST_TYPES:
            raise RegistryError(f"{session.label}: {ref}: the index entry for {platform} is not an image manifest")
    return data, media_type, digest


def fetch_small_blob(session: Session, ref: RegistryRef, descriptor: oci.Descriptor, what: str) -> bytes:
    """A JSON blob (the config), checked against DESCRIPTOR."""
    if descriptor.size > oci.MAX_DOCUMENT_SIZE:
        raise RegistryError(f"{session.label}: {ref.repository}: {what} {descriptor.digest} is too large")
    where = f"{what} {descriptor.digest}"
    response = session.request("GET", f"/v2/{ref.repository}/blobs/{descriptor.digest}", [_pull_scope(ref)],
                               f"{ref.repository}: {where}", stream=True)
    try:
        if response.status_code != 200:
            raise session.fail(f"{ref.repository}: {where}", response)
        data = b""
        for chunk in response.iter_raw():
            data += chunk
            if len(data) > descriptor.size:
                break  # more than it should be: verify_blob says so
    except httpx.TransportError as exc:
        raise RegistryError(f"{session.label}: {ref.repository}: {where}: connection broke: {exc}") from None
    finally:
        response.close()
    try:
        oci.verify_blob(data, descriptor, f"{session.label}: {ref.repository}: {where}")
    except ImageError as exc:
        raise RegistryError(f"bad digest: {exc}") from None
    return data


def download_blob(session: Session, ref: RegistryRef, descriptor: oci.Descriptor, dest: Path,
                  transfers: Transfers) -> None:
    """Stream one blob into DEST, hashing as it comes; resume with Range when the connection breaks."""
    what = f"{ref.repository}: blob {descriptor.digest}"
    advance = transfers.start(descriptor.digest)
    hasher = hashlib.sha256()
    done = 0
    resumes = 0
    with open(dest, "wb") as out:
        while True:
            headers = {"Range": f"bytes={done}-"} if done else {}
            try:
                response = session.request("GET", f"/v2/{ref.repository}/blobs/{descriptor.digest}",
                                           [_pull_scope(ref)], what, headers=headers, stream=True)
                try:
                    claimed = response.headers.get("docker-content-digest")
                    if claimed and claimed.startswith("sha256:") and claimed != descriptor.digest:
                        raise RegistryError(f"{session.label}: {what}: bad digest: the registry says it sends "
                                            f"{claimed}")
                    if done and response.status_code == 206 and \
                            not response.headers.get("content-range", "").startswith(f"bytes {done}-"):
                        raise RegistryError(f"{session.label}: {what}: the registry resumed at the wrong offset "
                                            f"({response.headers.get('content-range')!r}, wanted {done})")
                    if done and response.status_code == 200:  # the server ignored Range: start over
                        log.info("%s: no range support, downloading %s again", session.label, descriptor.digest)
                        advance(-done)
                        out.seek(0)
                        out.truncate()
                        hasher, done = hashlib.sha256(), 0
                    elif response.status_code not in ((206,) if done else (200,)):
                        raise session.fail(what, response)
                    for chunk in response.iter_raw():  # as it arrives (a resume starts after the last byte)
                        done += len(chunk)
                        if done > descriptor.size:
                            raise RegistryError(f"{session.label}: {what}: bad digest: more bytes than the "
                                                f"{descriptor.size} its descriptor says")
                        hasher.update(chunk)
                        out.write(chunk)
                        advance(len(chunk))
                finally:
                    response.close()
            except httpx.TransportError as exc:  # broke mid-body (the request itself was retried already)
                if resumes >= MAX_RESUMES:
                    raise RegistryError(f"{session.label}: {what}: connection broke after {done} bytes: {exc}") \
                        from None
                resumes += 1
                log.info("%s: %s: connection broke after %d bytes (%s); resuming", session.label, what, done, exc)
                time.sleep(min(session.options.retry_delay * resumes, 5.0))
                continue
            if done < descriptor.size:  # the server closed cleanly but early
                resumes += 1
                if resumes > MAX_RESUMES:
                    raise RegistryError(f"{session.label}: {what}: only {done} of {descriptor.size} bytes came")
                log.info("%s: %s: stream ended after %d bytes; resuming", session.label, what, done)
                continue
            break
        out.flush()
        os.fsync(out.fileno())
    actual = f"sha256:{hasher.hexdigest()}"
    if actual != descriptor.digest:
        raise RegistryError(f"{session.label}: {what}: bad digest: the bytes sent hash to {actual}")
    transfers.done(descriptor.digest)


def _write_layout(layout: Path, manifest: bytes, media_type: str, digest: str) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "blobs" / "sha256" / digest_hex(digest)).write_bytes(manifest)
    index = {"schemaVersion": 2, "mediaType": oci.MEDIA_INDEX,
             "manifests": [{"mediaType": media_type, "digest": digest, "size": len(manifest)}]}
    (layout / "index.json").write_text(json.dumps(index))


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        with open(src, "rb") as inp, open(dest, "wb") as out:
            while chunk := inp.read(1 << 20):
                out.write(chunk)


def pull_image(store: Store, text: str, options: Options, platform: Platform | None = None,
               transfers: Transfers | None = None, import_progress: Progress | None = None,
               parallel: int = PARALLEL_DOWNLOADS) -> PullResult:
    """Pull TEXT (a registry reference) into STORE; see the module docstring."""
    ref = parse_registry_ref(text)
    platform = platform or parse_platform(None)
    transfers = transfers or Transfers(quiet=True)
    with Session(ref.api_host, options) as session, store.staging("pull") as staging:
        data, media_type, digest = resolve_manifest(session, ref, platform)
        manifest = oci.parse_manifest(data, f"{session.label}: manifest {ref}", media_type)
        if manifest.config.media_type not in oci.CONFIG_TYPES:
            raise RegistryError(f"{session.label}: {ref} is not a container image "
                                f"(config media type {manifest.config.media_type!r})")
        config_bytes = fetch_small_blob(session, ref, manifest.config, "config")
        config = oci.parse_config(config_bytes, f"{session.label}: config of {ref}")
        if len(config.diff_ids) != len(manifest.layers):
            raise RegistryError(f"{session.label}: {ref}: the manifest lists {len(manifest.layers)} layers, "
                                f"the config {len(config.diff_ids)} diff_ids")
        layout = staging / "layout"
        _write_layout(layout, data, media_type, digest)
        blobs = layout / "blobs" / "sha256"
        (blobs / digest_hex(manifest.config.digest)).write_bytes(config_bytes)
        wanted: list[oci.Descriptor] = []
        reuse_without_blob: set[str] = set()
        present = 0
        for number, (layer, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True), 1):
            if layer.media_type not in oci.LAYER_COMPRESSION:
                raise RegistryError(f"{session.label}: {ref}: layer {number} has unsupported media type "
                                    f"{layer.media_type!r}")
            target = blobs / digest_hex(layer.digest)
            if target.exists():
                continue  # the same blob twice in one manifest
            transfers.add(layer.digest, f"layer {layer.digest[7:19]}", layer.size)
            if store.has_blob(layer.digest):
                _link_or_copy(store.blob_path(layer.digest), target)
                transfers.skip(layer.digest, "already in the store")
                present += 1
            elif store.has_layer(diff_id):
                reuse_without_blob.add(diff_id)
                transfers.skip(layer.digest, "its layer is in the store (same diff_id)")
                present += 1
            else:
                wanted.append(layer)
        _download_all(session, ref, wanted, blobs, transfers, parallel)
        transfers.close()
        result = import_image(store, str(layout), [ref.store_tag] if ref.store_tag else None,
                              import_progress or Progress(enabled=False), frozenset(reuse_without_blob))
    log.info("pulled %s (%s): %d layer blobs downloaded, %d present", ref, digest, len(wanted), present)
    return PullResult(ref, digest, result, len(wanted), present)


def _download_all(session: Session, ref: RegistryRef, layers: list[oci.Descriptor], blobs: Path,
                  transfers: Transfers, parallel: int) -> None:
    """Download LAYERS, PARALLEL at a time; the first failure cancels what has not started."""
    if not layers:
        return

    def one(layer: oci.Descriptor) -> None:
        partial = blobs / f"{digest_hex(layer.digest)}.partial"
        download_blob(session, ref, layer, partial, transfers)
        os.rename(partial, blobs / digest_hex(layer.digest))

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="pull") as pool:
        futures = [pool.submit(one, layer) for layer in layers]
        _finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            future.cancel()
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        for future in futures:
            future.result()
