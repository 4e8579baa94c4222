"""OCI image formats: media types, descriptors, and the JSON documents (index, manifest, config).

Plain data and validation only; reading a layout or an archive is `importer`'s business, unpacking
a layer `unpack`'s.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from ..errors import ImageError

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

#: Layer media type -> compression ("", "gzip" or "zstd"): the ones we can unpack.
LAYER_COMPRESSION = {
    MEDIA_LAYER_TAR: "",
    DOCKER_LAYER_TAR: "",
    MEDIA_LAYER_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    MEDIA_LAYER_ZSTD: "zstd",
}

#: Annotation holding a layout's tag (``latest``, or a whole reference) in index.json.
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content descriptor: what a blob is, its digest and its size in bytes."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] | None = None

    def to_json(self) -> dict[str, object]:
        value: dict[str, object] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            value["annotations"] = dict(self.annotations)
        if self.platform:
            value["platform"] = dict(self.platform)
        return value


# -- parsing and validating the JSON documents ----------------------------------------------------
#
# Every document an import reads is checked here before anything trusts a field of it: a layout or
# archive from elsewhere may be truncated, hand-edited or hostile. `WHERE` in each function names the
# document for the error message ("manifest sha256:... in /tmp/img"), so that one line says what to fix.

#: Index and manifest media types that list other manifests.
INDEX_TYPES = frozenset({MEDIA_INDEX, DOCKER_MANIFEST_LIST})
#: Manifest media types we can import (Docker's schema 2 has the same shape as OCI's).
MANIFEST_TYPES = frozenset({MEDIA_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({MEDIA_CONFIG, DOCKER_CONFIG})
#: Annotation that containerd and Docker 25+ put in index.json: the image's whole reference.
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
#: Largest JSON document we read into memory; real ones are a few KiB.
MAX_DOCUMENT_SIZE = 4 << 20

#: `platform.machine()` names -> OCI architecture names (the GOARCH values).
_ARCHITECTURES = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
    "armv6l": "arm", "i386": "386", "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x",
    "riscv64": "riscv64",
}


@dataclass(frozen=True, slots=True)
class Index:
    """An image index (``index.json`` or a nested multi-platform index)."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest: the config blob and the layer blobs, base first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an image config the store uses; `raw` keeps the whole document for inspect."""

    architecture: str
    os: str
    diff_ids: tuple[str, ...]
    created: str | None
    author: str | None
    raw: dict[str, Any]

    @property
    def runtime(self) -> dict[str, Any]:
        """The ``config`` object (Env, Cmd, Entrypoint, WorkingDir, User, Labels, ...)."""
        value = self.raw.get("config")
        return value if isinstance(value, dict) else {}


def load_json(data: bytes, where: str) -> Any:
    """DATA parsed as JSON, or `ImageError` naming WHERE."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImageError(f"{where} is not valid JSON: {exc}") from None


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_blob(data: bytes, descriptor: Descriptor, where: str) -> None:
    """Refuse DATA unless its size and sha256 are the ones DESCRIPTOR promises."""
    if len(data) != descriptor.size:
        raise ImageError(f"{where}: size {len(data)} does not match its descriptor's {descriptor.size}")
    actual = sha256_of(data)
    if actual != descriptor.digest:
        raise ImageError(f"{where}: content has digest {actual}, its descriptor says {descriptor.digest}")


def check_digest(value: Any, where: str) -> str:
    """VALUE if it is a ``sha256:<64 hex>`` digest; other algorithms are refused by name."""
    if not isinstance(value, str):
        raise ImageError(f"{where}: digest must be a string, not {type(value).__name__}")
    algorithm, _, encoded = value.partition(":")
    if algorithm != "sha256":
        raise ImageError(f"{where}: unsupported digest {value!r} (only sha256 is supported)")
    if len(encoded) != 64 or any(c not in "0123456789abcdef" for c in encoded):
        raise ImageError(f"{where}: malformed digest {value!r}")
    return value


def _string_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ImageError(f"{where}: annotations must map strings to strings")
    return dict(value)


def parse_descriptor(value: Any, where: str) -> Descriptor:
    """A descriptor object from a document, validated (media type, digest, non-negative size)."""
    if not isinstance(value, dict):
        raise ImageError(f"{where}: a descriptor must be an object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ImageError(f"{where}: descriptor has no mediaType")
    digest = check_digest(value.get("digest"), where)
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{where}: descriptor {digest} has an invalid size {size!r}")
    platform = value.get("platform")
    if platform is not None and not isinstance(platform, dict):
        raise ImageError(f"{where}: descriptor {digest} has an invalid platform")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        annotations=_string_map(value.get("annotations"), where),
        platform={k: v for k, v in platform.items() if isinstance(v, str)} if platform else None,
    )


def _object(data: bytes, where: str) -> dict[str, Any]:
    value = load_json(data, where)
    if not isinstance(value, dict):
        raise ImageError(f"{where}: expected a JSON object")
    if value.get("schemaVersion", 2) != 2:
        raise ImageError(f"{where}: unsupported schemaVersion {value.get('schemaVersion')!r}")
    return value


def parse_index(data: bytes, where: str, media_type: str = MEDIA_INDEX) -> Index:
    """An image index; MEDIA_TYPE is what its descriptor said (index.json has none)."""
    value = _object(data, where)
    entries = value.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{where}: 'manifests' must be a list")
    return Index(
        media_type=value.get("mediaType") or media_type,
        manifests=tuple(parse_descriptor(entry, f"{where}, manifests[{n}]") for n, entry in enumerate(entries)),
        annotations=_string_map(value.get("annotations"), where),
    )


def parse_manifest(data: bytes, where: str, media_type: str = MEDIA_MANIFEST) -> Manifest:
    """An image manifest with a config and a list of layers."""
    value = _object(data, where)
    declared = value.get("mediaType") or media_type
    if declared not in MANIFEST_TYPES:
        raise ImageError(f"{where}: unsupported manifest media type {declared!r}")
    layers = value.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{where}: 'layers' must be a list")
    return Manifest(
        media_type=declared,
        config=parse_descriptor(value.get("config"), f"{where}, config"),
        layers=tuple(parse_descriptor(layer, f"{where}, layers[{n}]") for n, layer in enumerate(layers)),
        annotations=_string_map(value.get("annotations"), where),
    )


def parse_config(data: bytes, where: str) -> ImageConfig:
    """An image config: only ``rootfs.diff_ids`` is required (and must be sha256 digests)."""
    value = load_json(data, where)
    if not isinstance(value, dict):
        raise ImageError(f"{where}: expected a JSON object")
    rootfs = value.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise ImageError(f"{where}: no rootfs.diff_ids")
    if rootfs.get("type", "layers") != "layers":
        raise ImageError(f"{where}: unsupported rootfs type {rootfs.get('type')!r}")
    diff_ids = tuple(check_digest(d, f"{where}, rootfs.diff_ids[{n}]") for n, d in enumerate(rootfs["diff_ids"]))
    config = value.get("config")
    if config is not None and not isinstance(config, dict):
        raise ImageError(f"{where}: 'config' must be an object")

    def text(key: str) -> str | None:
        item = value.get(key)
        return item if isinstance(item, str) else None

    return ImageConfig(
        architecture=text("architecture") or "",
        os=text("os") or "",
        diff_ids=diff_ids,
        created=text("created"),
        author=text("author"),
        raw=value,
    )


def host_platform() -> tuple[str, str]:
    """(os, architecture) of this machine, in OCI's words: ("linux", "amd64")."""
    machine = _platform.machine()
    return "linux", _ARCHITECTURES.get(machine, machine)


def matches_host(platform: dict[str, str] | None) -> bool:
    """True when PLATFORM (a descriptor's) runs here; a descriptor without one matches anything."""
    if not platform:
        return True
    os_name, arch = host_platform()
    return platform.get("os") == os_name and platform.get("architecture") == arch
