"""``overlayctl image import``: bring an OCI layout or a ``docker save`` archive into the store.

An import is two phases. First, without the store's lock, everything is read, verified and staged
in one ``tmp/`` directory: every JSON document against its descriptor, every layer blob against its
digest and size while it is unpacked (one pass: `unpack_layer` tees the raw bytes into the staged
blob), every layer against its diff_id. Then, under the lock, the staged blobs and layers are renamed
into place and the image record is written last. Any failure before that leaves the store as it was
(the staging dir goes with the process, or with the next locked command if the process was killed).

A layer that comes as a plain tar (an OCI layout's ``tar`` layers, Docker 25+ archives, old-style
``docker save``) is stored gzipped as it streams by (`recompress`), so the store holds its bytes once:
unpacked for mounts, gzipped for export. The manifest stored with the image then names the gzip blobs
(`restate_manifest`); its config, the image id and the diff_ids are the source's.

Layers the store already has (same diff_id) are not unpacked again, but their blob is still read,
verified (digest, size and diff_id) and kept if the store lacks it, so export can give the image back.
The one exception is a registry pull (`registry.pull`), which does not download a blob whose layer
the store has under the same diff_id: it names those layers in ``reuse_without_blob``, and their
blobs may be absent from the staged layout.

A layer tar that names ``etc/foo`` without ``etc/`` (or has no ``./``) makes unpack invent those
directories; each that exists in the layers below (stored, or staged earlier in this import) then
takes the metadata it has there (`inherit.inherit_implicit_dirs`), so the stacked layers show what
``umoci unpack`` shows.

Which image and which tags:
- ``PATH:REF`` picks the index entry whose ``org.opencontainers.image.ref.name`` (or
  ``io.containerd.image.name``, or a docker RepoTag) is REF; with no REF the layout must hold one
  image (platform variants of one image count as one). A nested index picks linux/<host arch>.
- Tags: ``--tag`` if given; else a docker archive's RepoTags; else the layout entry's
  ``io.containerd.image.name``, or its ref.name when that is a whole reference; a ref.name that is
  only a tag (``latest``, as skopeo and umoci write it) is put after the layout directory's name
  (``/tmp/alpine`` + ``latest`` -> ``alpine:latest``). Names from a file are shown the way docker
  shows them: ``docker.io/library/alpine`` becomes ``alpine``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, cast

from ..errors import ImageError, StoreError, UserError
from . import oci
from .compression import HashingReader, open_decompressed
from .inherit import inherit_implicit_dirs
from .oci import Descriptor, ImageConfig, Manifest
from .progress import Progress
from .recompress import GzipCopy
from .refs import InvalidReference, parse_reference
from .sources import Source, clean_path, open_source, read_document
from .store import ImageRecord, LayerRecord, Store, digest_hex, write_file_atomic
from .unpack import unpack_layer

log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CONFIG_NAME = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?")
#: Prefixes docker hides when it shows a name (``docker.io/library/alpine`` is shown ``alpine``).
_FAMILIAR_PREFIXES = ("docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/")
#: How deep nested indexes may go before we call the input broken.
MAX_INDEX_DEPTH = 4


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """One layer to bring in: where its blob is in the source and what it must hash to."""

    number: int  # 1-based, base first, for messages
    path: str  # in the source
    media_type: str
    size: int
    diff_id: str
    digest: str | None  # None for manifest.json archives: computed while reading


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """What an import will bring in, read and checked before any blob is streamed."""

    config_bytes: bytes
    config: ImageConfig
    manifest_bytes: bytes | None  # None for manifest.json archives: written once layer digests are known
    layers: tuple[LayerPlan, ...]
    tags: tuple[str, ...]  # suggested by the source (already normalized); --tag overrides
    description: str  # for messages: which image of the source


@dataclass(frozen=True, slots=True)
class ImportResult:
    image: ImageRecord
    new_layers: int
    reused_layers: int
    tags: tuple[str, ...] = ()  # the tags this import gave (the image may have others from before)


# -- naming ---------------------------------------------------------------------------------------


def familiar(reference: str) -> str:
    """REFERENCE the way docker shows it (without ``docker.io/library/``), normalized with a tag."""
    for prefix in _FAMILIAR_PREFIXES:
        if reference.startswith(prefix):
            reference = reference[len(prefix):]
            break
    return parse_reference(reference)


def _try_familiar(reference: str, where: str) -> str | None:
    try:
        return familiar(reference)
    except InvalidReference as exc:
        log.warning("%s: ignoring the name %r: %s", where, reference, exc)
        return None


def split_path_ref(text: str) -> tuple[Path, str | None]:
    """``PATH[:REF]`` -> (PATH, REF). A path that exists as written is never split."""
    if os.path.lexists(text) or ":" not in text:
        return Path(text), None
    path, _, ref = text.rpartition(":")
    if not path or not ref or "/" in ref:
        return Path(text), None
    return Path(path), ref


# -- planning: reading the documents -------------------------------------------------------------


def _blob_rel(digest: str) -> str:
    return f"blobs/sha256/{digest_hex(digest)}"


def _read_blob(source: Source, descriptor: Descriptor, what: str) -> bytes:
    where = f"{source.label}: {what} {descriptor.digest}"
    if not source.exists(_blob_rel(descriptor.digest)):
        raise ImageError(f"{where} is missing (no {_blob_rel(descriptor.digest)})")
    if descriptor.size > oci.MAX_DOCUMENT_SIZE:
        raise ImageError(f"{where}: its descriptor says {descriptor.size} bytes, too large for a JSON document")
    with source.open(_blob_rel(descriptor.digest)) as stream:
        data = stream.read(descriptor.size + 1)
    oci.verify_blob(data, descriptor, where)
    return data


def _entry_names(descriptor: Descriptor) -> set[str]:
    names = set()
    for key in (oci.ANNOTATION_REF_NAME, oci.ANNOTATION_IMAGE_NAME):
        value = descriptor.annotations.get(key)
        if value:
            names.add(value)
            if key == oci.ANNOTATION_IMAGE_NAME:
                with_tag = _try_familiar(value, "index.json")
                if with_tag:
                    names.add(with_tag)
    return names


def _pick_entry(entries: Sequence[Descriptor], ref: str | None, label: str) -> Descriptor:
    """The one entry of an index that REF names, or the only image there is."""
    if ref is not None:
        wanted = {ref}
        with_tag = _try_familiar(ref, label) if ref else None
        if with_tag:
            wanted.add(with_tag)
        chosen = [entry for entry in entries if _entry_names(entry) & wanted]
        if not chosen:
            known = sorted({entry.annotations.get(oci.ANNOTATION_REF_NAME, "") for entry in entries} - {""})
            raise ImageError(f"{label} has no image named {ref!r} (it has: {', '.join(known) or 'no names'})")
    else:
        chosen = list(entries)
    if not chosen:
        raise ImageError(f"{label}: the index lists no image")
    if len(chosen) == 1:
        return chosen[0]
    names = {entry.annotations.get(oci.ANNOTATION_REF_NAME) for entry in chosen}
    if len(names) == 1 and all(entry.platform for entry in chosen):
        return _pick_platform(chosen, label)  # variants of one image, for several platforms
    shown = sorted(name or entry.digest[:19] for name, entry in
                   ((entry.annotations.get(oci.ANNOTATION_REF_NAME), entry) for entry in chosen))
    raise ImageError(f"{label} holds {len(chosen)} images ({', '.join(shown)}): name one as {label}:NAME")


def _pick_platform(entries: Sequence[Descriptor], label: str) -> Descriptor:
    usable = [entry for entry in entries if oci.matches_host(entry.platform)]
    if not usable:
        os_name, arch = oci.host_platform()
        offered = sorted(f"{(e.platform or {}).get('os')}/{(e.platform or {}).get('architecture')}" for e in entries)
        raise ImageError(f"{label}: no image for {os_name}/{arch} (it has {', '.join(offered)})")
    return usable[0]


def _resolve_manifest(source: Source, entry: Descriptor) -> tuple[Descriptor, bytes, Manifest]:
    """Follow ENTRY through nested indexes down to one manifest for this platform."""
    for _ in range(MAX_INDEX_DEPTH):
        if entry.media_type in oci.INDEX_TYPES:
            data = _read_blob(source, entry, "index")
            nested = oci.parse_index(data, f"{source.label}: index {entry.digest}", entry.media_type)
            candidates = [m for m in nested.manifests if m.media_type in oci.MANIFEST_TYPES | oci.INDEX_TYPES]
            entry = _pick_platform(candidates, f"{source.label}: index {entry.digest}")
            continue
        if entry.media_type not in oci.MANIFEST_TYPES:
            raise ImageError(f"{source.label}: {entry.digest} has unsupported media type {entry.media_type!r}")
        data = _read_blob(source, entry, "manifest")
        return entry, data, oci.parse_manifest(data, f"{source.label}: manifest {entry.digest}", entry.media_type)
    raise ImageError(f"{source.label}: indexes nested more than {MAX_INDEX_DEPTH} deep")


def _check_layers(config: ImageConfig, count: int, where: str) -> None:
    if len(config.diff_ids) != count:
        raise ImageError(f"{where}: the manifest lists {count} layers but the config has "
                         f"{len(config.diff_ids)} diff_ids")


def _plan_layout(source: Source, ref: str | None, dir_name: str,
                 reuse_without_blob: frozenset[str] = frozenset()) -> ImagePlan:
    index_where = f"{source.label}: index.json"
    index = oci.parse_index(read_document(source, "index.json", "index"), index_where)
    entry = _pick_entry(index.manifests, ref, source.label)
    top = entry
    entry, manifest_bytes, manifest = _resolve_manifest(source, entry)
    if manifest.config.media_type not in oci.CONFIG_TYPES:
        raise ImageError(f"{source.label}: manifest {entry.digest} is not an image "
                         f"(config media type {manifest.config.media_type!r})")
    config_bytes = _read_blob(source, manifest.config, "config")
    config = oci.parse_config(config_bytes, f"{source.label}: config {manifest.config.digest}")
    _check_layers(config, len(manifest.layers), f"{source.label}: manifest {entry.digest}")
    layers = []
    for number, (layer, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True), 1):
        if layer.media_type not in oci.LAYER_COMPRESSION:
            raise ImageError(f"{source.label}: layer {number} ({layer.digest}) has unsupported media type "
                             f"{layer.media_type!r}")
        rel = _blob_rel(layer.digest)
        if not source.exists(rel) and diff_id not in reuse_without_blob:
            raise ImageError(f"{source.label}: layer {number} blob {layer.digest} is missing")
        layers.append(LayerPlan(number, rel, layer.media_type, layer.size, diff_id, layer.digest))
    tags: list[str] = []
    image_name = top.annotations.get(oci.ANNOTATION_IMAGE_NAME)
    ref_name = top.annotations.get(oci.ANNOTATION_REF_NAME)
    if image_name:
        tags.append(image_name)
    elif ref_name and (":" in ref_name or "/" in ref_name):
        tags.append(ref_name)
    elif ref_name:
        tags.append(f"{dir_name.lower()}:{ref_name}")
    return ImagePlan(config_bytes, config, manifest_bytes, tuple(layers),
                     _normalized_tags(tags, source.label), f"manifest {entry.digest}")


def _normalized_tags(names: Sequence[str], label: str) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        tag = _try_familiar(name, label)
        if tag and tag not in out:
            out.append(tag)
    return tuple(out)


def _docker_entries(source: Source) -> list[dict[str, object]]:
    where = f"{source.label}: manifest.json"
    value = oci.load_json(read_document(source, "manifest.json", "manifest.json"), where)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ImageError(f"{where}: expected a list of objects")
    return value


def _repo_tags(entry: dict[str, object], where: str) -> list[str]:
    tags = entry.get("RepoTags") or []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise ImageError(f"{where}: RepoTags must be a list of strings")
    return list(tags)


def _plan_docker(source: Source, ref: str | None) -> ImagePlan:
    """A ``docker save`` archive without index.json (before Docker 25, and skopeo's)."""
    where = f"{source.label}: manifest.json"
    entries = _docker_entries(source)
    if ref is not None:
        wanted = {ref, _try_familiar(ref, where)}
        entries = [e for e in entries if wanted & set(_normalized_tags(_repo_tags(e, where), where))
                   or wanted & set(_repo_tags(e, where))]
        if not entries:
            raise ImageError(f"{source.label} has no image tagged {ref!r}")
    if len(entries) != 1:
        if not entries:
            raise ImageError(f"{where} lists no image")
        shown = sorted(", ".join(_repo_tags(e, where)) or "untagged" for e in entries)
        raise ImageError(f"{source.label} holds {len(entries)} images ({'; '.join(shown)}): "
                         f"name one as {source.label}:NAME")
    entry = entries[0]
    config_rel = entry.get("Config")
    layer_rels = entry.get("Layers")
    if not isinstance(config_rel, str) or not isinstance(layer_rels, list) or \
            not all(isinstance(item, str) for item in layer_rels):
        raise ImageError(f"{where}: each image needs a Config path and a list of Layers paths")
    config_rel = clean_path(config_rel, source.label)
    config_bytes = read_document(source, config_rel, "config")
    config_digest = oci.sha256_of(config_bytes)
    named = _named_digest(config_rel)
    if named and named != config_digest:
        raise ImageError(f"{source.label}: config {config_rel} has digest {config_digest}, its name says otherwise")
    config = oci.parse_config(config_bytes, f"{source.label}: config {config_rel}")
    _check_layers(config, len(layer_rels), where)
    layers = []
    for number, (rel, diff_id) in enumerate(zip(layer_rels, config.diff_ids, strict=True), 1):
        rel = clean_path(rel, source.label)
        if not source.exists(rel):
            raise ImageError(f"{source.label}: layer {number} ({rel}) is missing")
        layers.append(LayerPlan(number, rel, _sniff_media_type(source, rel), source.size(rel), diff_id, None))
    return ImagePlan(config_bytes, config, None, tuple(layers),
                     _normalized_tags(_repo_tags(entry, where), where), f"config {config_rel}")


def _named_digest(config_rel: str) -> str | None:
    """The digest a manifest.json Config path names (``<hex>.json``, ``blobs/sha256/<hex>``), if any."""
    named = _CONFIG_NAME.fullmatch(config_rel)
    return f"sha256:{named.group(1)}" if named else None


def _sniff_media_type(source: Source, rel: str) -> str:
    """The layer media type the first bytes of REL show (a manifest.json says nothing of it)."""
    with source.open(rel) as stream:
        head = stream.read(4)
    if head.startswith(_GZIP_MAGIC):
        return oci.MEDIA_LAYER_GZIP
    if head.startswith(_ZSTD_MAGIC):
        return oci.MEDIA_LAYER_ZSTD
    return oci.MEDIA_LAYER_TAR


def _unpack_media_type(source: Source, layer: LayerPlan) -> str:
    """The media type to decompress LAYER by: the declared one, unless the bytes say otherwise.

    skopeo 1.9 copying a docker archive to an OCI layout with uncompressed layers labels them
    ``tar+gzip``; containerd and docker look at the magic bytes too, so such images work there and
    must here. The declared type stays in the stored manifest (its digest covers it)."""
    actual = _sniff_media_type(source, layer.path)
    if oci.LAYER_COMPRESSION[actual] == oci.LAYER_COMPRESSION[layer.media_type]:
        return layer.media_type
    log.warning("layer %d is declared %s but its content is %s: unpacking it as what it is",
                layer.number, layer.media_type, oci.LAYER_COMPRESSION[actual] or "uncompressed tar")
    return actual


def plan_import(source: Source, ref: str | None, dir_name: str,
                reuse_without_blob: frozenset[str] = frozenset()) -> ImagePlan:
    """Read and check every document of the chosen image; no layer is read yet."""
    if source.exists("index.json"):
        plan = _plan_layout(source, ref, dir_name, reuse_without_blob)
        if source.exists("manifest.json"):  # Docker 25+: the RepoTags of the same image win
            config_digest = oci.sha256_of(plan.config_bytes)
            for entry in _docker_entries(source):
                config_rel = entry.get("Config")
                if isinstance(config_rel, str) and _named_digest(config_rel) == config_digest:
                    where = f"{source.label}: manifest.json"
                    tags = _normalized_tags(_repo_tags(entry, where), where)
                    if tags:
                        plan = replace(plan, tags=tags)
        return plan
    return _plan_docker(source, ref)


# -- staging: streaming the layers ----------------------------------------------------------------


@dataclass(slots=True)
class _Staged:
    """What phase one left in the staging dir, to be installed under the lock."""

    blobs: list[tuple[Path, str]] = field(default_factory=list)  # (staged file, digest)
    layers: list[tuple[Path, LayerRecord]] = field(default_factory=list)  # (dir holding diff/, record)
    reused: list[str] = field(default_factory=list)  # diff_ids already in the store
    kept_blobs: list[str] = field(default_factory=list)  # stored blobs the manifest names instead of the source's


def _stage_bytes(staging: Path, name: str, data: bytes) -> Path:
    path = staging / "blobs" / name
    write_file_atomic(path, data)  # fsynced, as install_blob wants
    return path


def _verify_only(raw: BinaryIO, layer: LayerPlan, copy_to: BinaryIO | None,
                 progress: Callable[[int], None] | None) -> str:
    """Check a layer we will not unpack: digest and size of the blob, diff_id of its tar."""
    blob = HashingReader(raw, copy_to=copy_to, progress=progress, limit=layer.size, what="the blob")
    tar = HashingReader(open_decompressed(blob, oci.LAYER_COMPRESSION[layer.media_type]))
    try:
        tar.drain()
    except ImageError as exc:
        # A corrupt blob usually fails to decompress before it ends: say what is wrong with it
        # (its digest) rather than how that showed.
        blob.drain()
        if layer.digest is not None and blob.digest != layer.digest:
            raise ImageError(f"blob has digest {blob.digest}, its descriptor says {layer.digest}") from None
        raise ImageError(f"{exc}") from None
    blob.drain()  # anything after the compressed stream is still part of the blob
    if blob.size != layer.size:
        raise ImageError(f"blob is {blob.size} bytes, its descriptor says {layer.size}")
    if layer.digest is not None and blob.digest != layer.digest:
        raise ImageError(f"blob has digest {blob.digest}, its descriptor says {layer.digest}")
    if tar.digest != layer.diff_id:
        raise ImageError(f"uncompressed content has digest {tar.digest}, the config's diff_id is {layer.diff_id}")
    return blob.digest


def _stage_layer(store: Store, source: Source, layer: LayerPlan, staging: Path, staged: _Staged,
                 progress: Progress, total: int, below: Sequence[Path]) -> tuple[str, Path, LayerPlan]:
    """Verify (and unpack, unless the store has it) one layer over BELOW (the content dirs of the
    layers under it, topmost first); returns its blob digest, its content dir, and the layer as the
    stored blob is (gzipped, if it came as a plain tar)."""
    if layer.digest is not None and not source.exists(layer.path):  # only for reuse_without_blob layers
        if not store.has_layer(layer.diff_id):
            raise ImageError(f"layer {layer.diff_id} was removed from the store during the pull: pull again")
        log.info("layer %s is in the store already: its blob %s is not needed", layer.diff_id, layer.digest)
        staged.reused.append(layer.diff_id)
        gzipped = _stored_gzip_blob(store, layer) if not oci.LAYER_COMPRESSION.get(layer.media_type, "?") else None
        if gzipped is not None:  # the plain tar was stored gzipped: name that blob, as if it had come
            stored = replace(layer, media_type=gzip_media_type(layer.media_type), size=gzipped.size,
                             digest=gzipped.digest)
            staged.kept_blobs.append(gzipped.digest)
            return gzipped.digest, store.layer_dir(layer.diff_id), stored
        return layer.digest, store.layer_dir(layer.diff_id), layer
    keep_blob = layer.digest is None or not store.has_blob(layer.digest)
    blob_path = staging / "blobs" / f"layer-{layer.number}"
    media_type = _unpack_media_type(source, layer)
    # A plain tar is stored gzipped (`recompress`): one copy of its bytes beside the unpacked files.
    # Not when the store holds the plain blob already (from before): the manifest keeps naming it.
    gzip_it = not oci.LAYER_COMPRESSION.get(media_type, "?")
    label = f"layer {layer.number}/{total} {(layer.digest or layer.diff_id)[7:19]}"
    advance = progress.start(label, layer.size)
    with source.open(layer.path) as raw, (open(blob_path, "wb") if keep_blob else contextlib.nullcontext()) as out:
        gzip_copy = GzipCopy(out) if gzip_it and out is not None else None
        copy = cast(BinaryIO, gzip_copy) if gzip_copy is not None else out
        staged_here = {r.diff_id: target / "diff" for target, r in staged.layers}
        if store.has_layer(layer.diff_id) or layer.diff_id in staged_here:
            log.info("layer %s is in the store already: verifying its blob only", layer.diff_id)
            try:
                digest = _verify_only(raw, replace(layer, media_type=media_type), copy, advance)
            except ImageError as exc:
                raise ImageError(f"layer {layer.digest or layer.diff_id}: {exc}") from None
            staged.reused.append(layer.diff_id)
            content = staged_here.get(layer.diff_id) or store.layer_dir(layer.diff_id)
        else:
            target = staging / "layers" / digest_hex(layer.diff_id)
            target.mkdir()
            content = target / "diff"
            unpacked = unpack_layer(raw, media_type, content, digest=layer.digest, size=layer.size,
                                    diff_id=layer.diff_id, copy_to=copy, progress=advance)
            digest = unpacked.digest
            _inherit(content, unpacked.implicit_dirs, below)
            staged.layers.append((target, LayerRecord(diff_id=layer.diff_id, size=unpacked.unpacked_size)))
        stored = layer
        if gzip_copy is not None:
            digest = gzip_copy.finish()
            stored = replace(layer, media_type=gzip_media_type(layer.media_type), size=gzip_copy.size, digest=digest)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    progress.finish()
    if keep_blob:
        staged.blobs.append((blob_path, digest))
    return digest, content, stored


def _stored_gzip_blob(store: Store, layer: LayerPlan) -> Descriptor | None:
    """The gzip blob of LAYER's diff_id that an image in STORE names and the store holds, if any.

    A pull does not fetch a blob whose layer the store has; when that blob is a plain tar, the store
    never kept it (an import stores it gzipped), so the manifest must name the gzip blob it did keep,
    or export, save and push of the pulled image would miss a blob."""
    for image in store.images():
        try:
            diff_ids = store.image_diff_ids(image)
            manifest = oci.parse_manifest(store.read_blob(image.manifest), f"manifest {image.manifest} in the store")
        except (StoreError, ImageError) as exc:
            log.warning("image %s: %s", image.id, exc)
            continue
        for diff_id, descriptor in zip(diff_ids, manifest.layers, strict=False):
            if diff_id == layer.diff_id and oci.LAYER_COMPRESSION.get(descriptor.media_type) == "gzip" \
                    and store.has_blob(descriptor.digest):
                return descriptor
    return None


def _inherit(content: Path, implicit_dirs: Sequence[str], below: Sequence[Path]) -> None:
    try:
        inherit_implicit_dirs(content, implicit_dirs, below)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise ImageError(f"giving the directories the layer implies the metadata of the layers "
                         f"below: {where}{exc.strerror or exc}") from None


def gzip_media_type(declared: str) -> str:
    """The gzip layer media type of DECLARED's family: a Docker schema 2 manifest keeps Docker's
    types (mixing in OCI ones is something registries and docker refuse), anything else gets OCI's."""
    return oci.DOCKER_LAYER_GZIP if declared.startswith("application/vnd.docker.") else oci.MEDIA_LAYER_GZIP


def restate_manifest(manifest_bytes: bytes, stored: Sequence[LayerPlan], digests: Sequence[str]) -> bytes:
    """MANIFEST_BYTES with each layer descriptor naming the blob as the store keeps it (a plain tar
    gzipped on import); the bytes as they were when no layer changed, so their digest stays.

    The config, and so the image id and the diff_ids, are untouched: they name the uncompressed tars.
    Every other field of the manifest and of its descriptors (annotations, urls) is kept; a
    descriptor's embedded ``data`` would no longer match, so it goes."""
    value = json.loads(manifest_bytes)
    layers = value.get("layers")
    assert isinstance(layers, list) and len(layers) == len(stored) == len(digests)  # parse_manifest checked
    changed = False
    for entry, layer, digest in zip(layers, stored, digests, strict=True):
        if (entry.get("mediaType"), entry.get("digest"), entry.get("size")) == (layer.media_type, digest, layer.size):
            continue
        entry.update(mediaType=layer.media_type, digest=digest, size=layer.size)
        entry.pop("data", None)
        changed = True
    return json.dumps(value, separators=(",", ":")).encode() if changed else manifest_bytes


def _docker_manifest(config_bytes: bytes, config_digest: str, layers: Sequence[tuple[LayerPlan, str]]) -> bytes:
    """The OCI manifest a manifest.json archive lacks (deterministic: same archive, same digest)."""
    value = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_MANIFEST,
        "config": {"mediaType": oci.MEDIA_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": layer.media_type, "digest": digest, "size": layer.size} for layer, digest in layers],
    }
    return json.dumps(value, separators=(",", ":")).encode()


# -- the whole import ---------------------------------------------------------------------------


def import_image(store: Store, text: str, tags: Sequence[str] | None = None,
                 progress: Progress | None = None,
                 reuse_without_blob: frozenset[str] = frozenset()) -> ImportResult:
    """Import ``PATH[:REF]`` into STORE, tagged TAGS (already parsed) or as the source suggests.
    REUSE_WITHOUT_BLOB: diff_ids of layers the store has whose blobs the source may lack (a pull)."""
    progress = progress or Progress(enabled=False)
    path, ref = split_path_ref(text)
    with open_source(path) as source, store.staging("import") as staging:
        try:
            return _import(store, source, ref, path, staging, tags, progress, reuse_without_blob)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise ImageError(f"{source.label}: unreadable archive: {exc}") from None
        except UserError:
            raise
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise ImageError(f"{source.label}: import failed:{where} {exc.strerror or exc}") from None
        finally:
            progress.finish()


def _import(store: Store, source: Source, ref: str | None, path: Path, staging: Path,
            tags: Sequence[str] | None, progress: Progress,
            reuse_without_blob: frozenset[str] = frozenset()) -> ImportResult:
    plan = plan_import(source, ref, Path(os.path.abspath(path)).name, reuse_without_blob)
    (staging / "blobs").mkdir()
    (staging / "layers").mkdir()
    staged = _Staged()
    digests = []
    stored_layers = []  # as the blobs are stored (a plain tar layer is gzipped)
    below: list[Path] = []  # content dirs of the layers staged so far, topmost first
    for layer in plan.layers:
        try:
            digest, content, stored = _stage_layer(store, source, layer, staging, staged, progress, len(plan.layers),
                                           below)
        except ImageError as exc:  # say which input and which layer of it, then what
            raise ImageError(f"{source.label}, layer {layer.number} of {len(plan.layers)}: {exc}") from None
        digests.append(digest)
        stored_layers.append(stored)
        below.insert(0, content)
    config_digest = oci.sha256_of(plan.config_bytes)
    if plan.manifest_bytes is None:
        layer_blobs = list(zip(stored_layers, digests, strict=True))
        manifest_bytes = _docker_manifest(plan.config_bytes, config_digest, layer_blobs)
    else:
        manifest_bytes = restate_manifest(plan.manifest_bytes, stored_layers, digests)
        if manifest_bytes != plan.manifest_bytes:
            log.info("%s: plain tar layers are stored gzipped: the stored manifest is %s, not %s", source.label,
                     oci.sha256_of(manifest_bytes), oci.sha256_of(plan.manifest_bytes))
    manifest_digest = oci.sha256_of(manifest_bytes)
    staged.blobs.append((_stage_bytes(staging, "config", plan.config_bytes), config_digest))
    staged.blobs.append((_stage_bytes(staging, "manifest", manifest_bytes), manifest_digest))
    if staged.layers:
        os.sync()  # the unpacked files must be on disk before their directory is renamed into place
    chosen = tuple(tags) if tags else plan.tags
    with store.locked():
        for digest in staged.kept_blobs:  # checked before anything is installed: a refusal changes nothing
            if not store.has_blob(digest):
                raise StoreError(f"blob {digest} was removed from the store during the import: import again")
        for blob, blob_digest in staged.blobs:
            store.install_blob(blob, blob_digest)
        for layer_dir, layer_record in staged.layers:
            store.install_layer(layer_dir, layer_record)
        for diff_id in staged.reused:  # after: a layer may be reused from this very import
            if not store.has_layer(diff_id):
                raise StoreError(f"layer {diff_id} was removed from the store during the import: import again")
        image = _image_record(store, config_digest, manifest_digest, chosen)
        replaced = store.install_image(image)
        if replaced is not None and replaced.manifest != image.manifest:
            store.collect_garbage()  # the blobs only the old manifest named
    log.info("imported %s from %s (%s)", image.id, source.label, plan.description)
    return ImportResult(image, new_layers=len(staged.layers), reused_layers=len(staged.reused), tags=tuple(chosen))


def _image_record(store: Store, config_digest: str, manifest_digest: str, tags: Sequence[str]) -> ImageRecord:
    """The record to save: an image imported again keeps its import time and its other tags."""
    try:
        old = store.image(config_digest)
    except StoreError:
        return ImageRecord(id=config_digest, manifest=manifest_digest, config=config_digest, tags=tuple(tags))
    merged = tuple(dict.fromkeys((*old.tags, *tags)))
    return ImageRecord(id=old.id, manifest=manifest_digest, config=config_digest, tags=merged, imported=old.imported)
