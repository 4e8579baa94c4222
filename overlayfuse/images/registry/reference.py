"""Registry references: ``[host[:port]/]path[:tag][@sha256:...]``, normalised as docker does.

A first component with a dot or a colon, or ``localhost``, is a registry host; anything else is a
path on Docker Hub (``alpine`` -> ``docker.io/library/alpine:latest``). Docker Hub's API lives on
another host than its name (``registry-1.docker.io``). The pulled image is named in the store by
the whole normalised reference, so the same text works for ``mount`` and ``push``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from ...errors import UserError

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
#: Where Docker Hub's API answers (``docker.io`` itself does not speak /v2/).
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                   r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class RegistryError(UserError):
    """A registry refused or broke a pull, push or login; the text names registry, repository and what."""


@dataclass(frozen=True, slots=True)
class RegistryRef:
    """One image in one registry: ``registry`` as written (``127.0.0.1:5000``), ``repository``
    (``team/app``), and a tag, a digest or both."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        """The host:port to talk to (Docker Hub's API is elsewhere than its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What to ask the manifests endpoint for: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def store_tag(self) -> str | None:
        """The name the store gives the pulled image (``name:tag``); None for a digest-only pull."""
        return f"{self.name}:{self.tag}" if self.tag else None

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def split_host(text: str) -> tuple[str, str]:
    """(registry, rest) of TEXT, docker's rule for whether the first component is a host."""
    first, slash, rest = text.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return DOCKER_HUB, text


def normalize_registry(host: str) -> str:
    """A registry as the auth file and messages name it (Docker Hub's aliases become docker.io)."""
    host = host.removeprefix("https://").removeprefix("http://").rstrip("/")
    host = host.split("/", 1)[0]
    return DOCKER_HUB if host in _HUB_ALIASES else host


def parse_registry_ref(text: str) -> RegistryRef:
    """TEXT (``alpine``, ``host:5000/team/app:1.2``, ``...@sha256:...``; ``docker://`` allowed) parsed."""
    original = text
    text = text.removeprefix("docker://")
    digest = None
    if "@" in text:
        text, _, digest = text.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise RegistryError(f"invalid reference {original!r}: the digest must be sha256:<64 hex digits>")
    registry, path = split_host(text)
    registry = normalize_registry(registry)
    tag = None
    colon = path.rfind(":")
    if colon > path.rfind("/"):
        path, tag = path[:colon], path[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise RegistryError(f"invalid reference {original!r}: a tag is up to 128 letters, digits, '_', '.', '-'")
    if not _HOST.fullmatch(registry):
        raise RegistryError(f"invalid reference {original!r}: {registry!r} is not a registry host")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_COMPONENT.fullmatch(part) for part in path.split("/")) or len(path) > 255:
        raise RegistryError(f"invalid reference {original!r}: a repository is lower-case letters, digits "
                            "and separators (. _ - /)")
    if tag is None and digest is None:
        tag = "latest"
    return RegistryRef(registry, path, tag, digest)
