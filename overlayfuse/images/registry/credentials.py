"""Registry credentials in the files podman, skopeo and docker share.

Read in this order, first match wins: ``--authfile``, ``$REGISTRY_AUTH_FILE``,
``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.config/containers/auth.json``,
``~/.docker/config.json``. Each is ``{"auths": {"HOST[:PORT]": {"auth": base64("user:pass")}}}``;
a key may also be a URL or ``HOST/path`` (docker writes ``https://index.docker.io/v1/``), so keys
are compared after normalising. ``login`` writes the first containers file of that list (the one
podman writes), mode 0600, atomically; other registries' entries are kept.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..store import replacing
from .reference import RegistryError, normalize_registry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str


def parse_creds(text: str) -> Credentials:
    """``USER:PASS`` (``--creds``) as podman takes it; the password may hold colons."""
    username, colon, password = text.partition(":")
    if not username or not colon:
        raise RegistryError("--creds must be USER:PASSWORD")
    return Credentials(username, password)


def auth_files(authfile: str | None = None) -> list[Path]:
    """Where to look for credentials, in order (files that do not exist are skipped when read)."""
    if authfile:
        return [Path(authfile)]
    found: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        found.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        found.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    home = Path(os.path.expanduser("~"))
    found.append(home / ".config" / "containers" / "auth.json")
    found.append(home / ".docker" / "config.json")
    return found


def write_target(authfile: str | None = None) -> Path:
    """The file ``login`` writes: --authfile, else the first containers auth file podman would use."""
    return auth_files(authfile)[0]


def _load(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RegistryError(f"credentials file {path}: unreadable: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("auths", {}), dict):
        raise RegistryError(f"credentials file {path}: expected {{\"auths\": {{...}}}}")
    return value


def _decode(entry: Any, path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict) or not entry.get("auth"):
        return None
    try:
        text = base64.b64decode(entry["auth"], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, TypeError):
        raise RegistryError(f"credentials file {path}: the entry for {key} is not base64 of USER:PASSWORD") from None
    username, _, password = text.partition(":")
    return Credentials(username, password)


def find_credentials(registry: str, authfile: str | None = None) -> Credentials | None:
    """The stored credentials for REGISTRY (``host:port``), or None (anonymous)."""
    wanted = normalize_registry(registry)
    for path in auth_files(authfile):
        auths = _load(path).get("auths", {})
        for key, entry in auths.items():
            if normalize_registry(key) == wanted:
                creds = _decode(entry, path, key)
                if creds is not None:
                    log.debug("credentials for %s from %s", wanted, path)
                    return creds
    return None


def _save(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(value, out, indent="\t")
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())


def store_credentials(registry: str, creds: Credentials, authfile: str | None = None) -> Path:
    """Record CREDS for REGISTRY in the login file; returns that file."""
    path = write_target(authfile)
    value = _load(path)
    auths = value.setdefault("auths", {})
    key = normalize_registry(registry)
    for other in [k for k in auths if normalize_registry(k) == key]:
        del auths[other]
    auths[key] = {"auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()}
    _save(path, value)
    return path


def remove_credentials(registry: str, authfile: str | None = None) -> Path | None:
    """Forget REGISTRY's credentials in the login file; returns the file, or None if it had none."""
    path = write_target(authfile)
    value = _load(path)
    auths = value.get("auths", {})
    key = normalize_registry(registry)
    doomed = [k for k in auths if normalize_registry(k) == key]
    if not doomed:
        return None
    for other in doomed:
        del auths[other]
    _save(path, value)
    return path
