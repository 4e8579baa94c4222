"""OCI image formats: media types, descriptors, and the JSON documents (index, manifest, config).

Plain data and validation only; reading a layout or an archive is `importer`'s business, unpacking
a layer `unpack`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
