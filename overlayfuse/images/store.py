"""The image store on disk: content-addressed blobs, unpacked layers, image and container records.

Layout under the root (default ``/var/lib/overlayfuse``)::

    lock                          flock(2) held by every command that changes the store
    tmp/<op>-<pid>-<random>/      staging for one operation; whatever a dead process left is removed
    blobs/sha256/<hex>            manifests, configs and layer blobs, by digest (as imported or committed)
    layers/<hex>/diff/            one unpacked layer, <hex> = its diff_id: a lowerdir for the daemon
    layers/<hex>/layer.json       its record (`LayerRecord`)
    images/<hex>.json             one image (`ImageRecord`), <hex> = image id = its config's digest
    containers/<name>/            container.json (`ContainerRecord`), upper/, work/

Every change is made in ``tmp/`` and renamed into place, records last, so a failed or killed command
leaves only unreferenced staging behind, which the next locked command clears. Layers are shared:
an image names its layers by diff_id, so two images on one base store the base once. Nothing is
reference-counted on disk; `collect_garbage` removes whatever no image and no container names.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import StoreError
from .remove import remove_tree

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)

#: A record class of the store (`LayerRecord`, `ImageRecord`, `ContainerRecord`).
RecordT = TypeVar("RecordT", bound="DataclassInstance")

DEFAULT_ROOT = Path("/var/lib/overlayfuse")
ROOT_ENV = "OVERLAYFUSE_ROOT"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
#: Container names as docker allows them: they become directory names, so no slash and no dot first.
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")


def is_digest(value: str) -> bool:
    """True for a well-formed ``sha256:<64 hex>`` digest (the only algorithm the store keeps)."""
    return _DIGEST.fullmatch(value) is not None


def digest_hex(digest: str) -> str:
    """The hex part of DIGEST, which names files in the store; refuses anything malformed."""
    if not is_digest(digest):
        raise StoreError(f"not a sha256 digest: {digest!r}")
    return digest.split(":", 1)[1]


def check_container_name(name: str) -> str:
    if not _CONTAINER_NAME.fullmatch(name):
        raise StoreError(f"invalid container name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def now_rfc3339() -> str:
    """The current time as the OCI config's ``created`` field writes it (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """One unpacked layer: its diff_id and its unpacked size in bytes (file data, as ``du -b`` would)."""

    diff_id: str
    size: int
    created: str = field(default_factory=now_rfc3339)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image: its manifest and config blobs, and the tags that name it (``name:tag``)."""

    id: str  # the config's digest, as docker's image id
    manifest: str  # digest of the OCI manifest blob
    config: str  # digest of the config blob (== id)
    tags: tuple[str, ...] = ()
    imported: str = field(default_factory=now_rfc3339)


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    """One container: the image it came from, the layers it stacks (base first) and its mount, if any."""

    name: str
    image: str  # image id at creation; the layers below are what the container uses, even if the image goes
    layers: tuple[str, ...]  # diff_ids, base first
    created: str = field(default_factory=now_rfc3339)
    mountpoint: str | None = None
    pid: int | None = None
    read_only: bool = False


def _read_record(cls: type[RecordT], path: Path) -> RecordT:
    """The record of class CLS that the JSON file PATH holds (fields it does not know are ignored)."""
    data = json.loads(path.read_text())
    known = {f.name: data[f.name] for f in fields(cls) if f.name in data}
    for name, value in known.items():
        if isinstance(value, list):
            known[name] = tuple(value)
    return cls(**known)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside PATH for the block to fill: renamed over PATH when the block ends,
    removed if it fails. The caller fsyncs the directory (once, after several, if it likes)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace PATH with DATA so that a crash leaves either the old or the new content, never a part."""
    with replacing(path) as tmp, open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    write_file_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MissingStoreError(StoreError):
    """There is no store where one was looked for (and none was made: the command only reads)."""

    def __init__(self, message: str, root: Path) -> None:
        super().__init__(message)
        self.root = root


@dataclass(frozen=True, slots=True)
class Store:
    """A store root. Cheap to make; `open` creates the directories on first use."""

    root: Path

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None) -> Store:
        """The store at ROOT, else ``$OVERLAYFUSE_ROOT``, else `DEFAULT_ROOT`; created if missing."""
        chosen = Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).absolute()
        store = cls(chosen)
        try:
            for sub in ("tmp", "blobs/sha256", "layers", "images", "containers"):
                (chosen / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use store {chosen}: {exc.strerror or exc}") from None
        return store

    @classmethod
    @contextlib.contextmanager
    def creating(cls, root: str | os.PathLike[str] | None = None) -> Iterator[Store]:
        """The store at ROOT, made if missing (for the commands that add images: import, load,
        pull). A failed command leaves the store as it was: one it had to make is removed again,
        as long as it is still empty."""
        chosen = Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).absolute()
        existed = (chosen / "images").is_dir()
        store = cls.open(chosen)
        try:
            yield store
        except BaseException:
            if not existed:
                _remove_if_empty(chosen)
            raise

    @classmethod
    def existing(cls, root: str | os.PathLike[str] | None = None) -> Store:
        """The store at ROOT (as `open` chooses it) if there is one; `StoreError` if not.

        Only import (and later pull) makes a store: a command that reads one must not leave an
        empty store behind a mistyped ``--root``, and must say why it sees nothing."""
        chosen = Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).absolute()
        if not (chosen / "images").is_dir():
            raise MissingStoreError(
                f"no image store at {chosen} (image import creates one; check --root and ${ROOT_ENV})", chosen
            )
        return cls.open(chosen)

    # -- paths ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest_hex(digest)

    def layer_path(self, diff_id: str) -> Path:
        """The layer's directory (``diff/`` and ``layer.json`` inside)."""
        return self.root / "layers" / digest_hex(diff_id)

    def layer_dir(self, diff_id: str) -> Path:
        """The unpacked content of a layer: what the daemon gets as a lowerdir."""
        return self.layer_path(diff_id) / "diff"

    def image_path(self, image_id: str) -> Path:
        return self.root / "images" / f"{digest_hex(image_id)}.json"

    def container_path(self, name: str) -> Path:
        return self.root / "containers" / check_container_name(name)

    # -- locking and staging ----------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (blocking), and clear what dead processes left in ``tmp/``."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._clear_dead_staging()
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def staging(self, op: str) -> Iterator[Path]:
        """A fresh directory in ``tmp/`` for OP, removed afterwards whatever happens."""
        path = self.root / "tmp" / f"{op}-{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir()
        try:
            yield path
        finally:
            try:
                remove_tree(path)
            except OSError as exc:  # the next locked command tries again
                log.warning("could not remove staging %s: %s", path, exc.strerror or exc)

    def discard(self, path: Path) -> None:
        """Remove PATH (in this store) if it exists: renamed into ``tmp/`` first, so it vanishes at
        once and a crash half-way through leaves only staging for the next command to clear."""
        if not os.path.lexists(path):
            return
        doomed = self.root / "tmp" / f"discard-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
        try:
            remove_tree(doomed)
        except OSError as exc:  # gone from where it was; the next locked command tries again
            log.warning("could not remove %s (left in %s): %s", path, doomed, exc.strerror or exc)

    def _clear_dead_staging(self) -> None:
        """Remove what dead processes left in ``tmp/``, however deep or odd (modes, symlinks,
        immutable flags): `remove_tree` neither recurses nor follows links. What still cannot
        go is warned about and left, never raised: a leftover must not stop the store working."""
        try:
            entries = sorted(os.listdir(self.root / "tmp"))
        except OSError as exc:
            log.warning("cannot list %s: %s", self.root / "tmp", exc.strerror or exc)
            return
        for name in entries:
            parts = name.rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit() and _pid_alive(int(parts[1])):
                continue
            entry = self.root / "tmp" / name
            log.warning("removing leftover staging %s", entry)
            try:
                remove_tree(entry)
            except OSError as exc:
                log.warning("could not remove leftover staging %s: %s", entry, exc.strerror or exc)

    # -- blobs ------------------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def install_blob(self, staged: Path, digest: str) -> None:
        """Move a verified, fsynced file STAGED (in this store's ``tmp/``) into place as DIGEST."""
        target = self.blob_path(digest)
        if target.exists():
            staged.unlink()
            return
        os.rename(staged, target)
        fsync_dir(target.parent)

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the store {self.root}") from None

    def read_blob_json(self, digest: str) -> Any:
        try:
            return json.loads(self.read_blob(digest))
        except json.JSONDecodeError as exc:
            raise StoreError(f"blob {digest} in the store is not JSON: {exc}") from None

    # -- layers -----------------------------------------------------------------------------

    def has_layer(self, diff_id: str) -> bool:
        return (self.layer_path(diff_id) / "layer.json").is_file()

    def install_layer(self, staged: Path, record: LayerRecord) -> None:
        """Move STAGED (a dir holding ``diff/``, in this store's ``tmp/``) into place as one layer.

        The record is written inside first, so a layer directory without ``layer.json`` was never
        installed; an existing layer wins (the content is the same, by diff_id).
        """
        if self.has_layer(record.diff_id):
            remove_tree(staged)
            return
        write_json_atomic(staged / "layer.json", asdict(record))
        target = self.layer_path(record.diff_id)
        self.discard(target)  # a half-installed leftover without layer.json
        os.rename(staged, target)
        fsync_dir(target.parent)

    def layer_record(self, diff_id: str) -> LayerRecord:
        try:
            return _read_record(LayerRecord, self.layer_path(diff_id) / "layer.json")
        except FileNotFoundError:
            raise StoreError(f"layer {diff_id} is missing from the store {self.root}") from None

    # -- images -----------------------------------------------------------------------------

    def images(self) -> list[ImageRecord]:
        """Every image, oldest import first."""
        records = [_read_record(ImageRecord, path) for path in (self.root / "images").glob("*.json")]
        return sorted(records, key=lambda record: (record.imported, record.id))

    def save_image(self, record: ImageRecord) -> None:
        write_json_atomic(self.image_path(record.id), asdict(record))

    def image(self, image_id: str) -> ImageRecord:
        """The record of IMAGE_ID (a full ``sha256:`` id); `StoreError` if there is none."""
        try:
            return _read_record(ImageRecord, self.image_path(image_id))
        except FileNotFoundError:
            raise StoreError(f"no such image: {image_id}") from None

    def install_image(self, record: ImageRecord) -> ImageRecord | None:
        """Save RECORD, first taking its tags off every other image (docker semantics: a tag names
        one image; the one it leaves keeps its other tags, or is left untagged). Call it locked, as
        the last step of an import, commit or tag. Returns the record RECORD replaced, if any."""
        previous = None
        for other in self.images():
            if other.id == record.id:
                previous = other
                continue
            kept = tuple(tag for tag in other.tags if tag not in record.tags)
            if kept != other.tags:
                log.info("tag(s) %s move from %s to %s", sorted(set(other.tags) - set(kept)), other.id, record.id)
                self.save_image(replace(other, tags=kept))
        self.save_image(record)
        return previous

    def delete_image(self, image_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.image_path(image_id))

    def image_diff_ids(self, record: ImageRecord) -> list[str]:
        """The image's layers, base first, from its config's ``rootfs.diff_ids``."""
        config = self.read_blob_json(record.config)
        return list(config.get("rootfs", {}).get("diff_ids", []))

    # -- containers -------------------------------------------------------------------------

    def containers(self) -> list[ContainerRecord]:
        records = [_read_record(ContainerRecord, path) for path in (self.root / "containers").glob("*/container.json")]
        return sorted(records, key=lambda record: (record.created, record.name))

    def container(self, name: str) -> ContainerRecord:
        try:
            return _read_record(ContainerRecord, self.container_path(name) / "container.json")
        except FileNotFoundError:
            raise StoreError(f"no such container: {name}") from None

    def save_container(self, record: ContainerRecord) -> None:
        write_json_atomic(self.container_path(record.name) / "container.json", asdict(record))

    # -- garbage ----------------------------------------------------------------------------

    def collect_garbage(self) -> list[str]:
        """Remove layers and blobs no image or container names; return what went (call it locked)."""
        images = self.images()
        keep_layers = {diff_id for record in images for diff_id in self.image_diff_ids(record)}
        keep_layers.update(diff_id for record in self.containers() for diff_id in record.layers)
        keep_blobs: set[str] = set()
        for record in images:
            keep_blobs.update((record.manifest, record.config))
            manifest = self.read_blob_json(record.manifest)
            keep_blobs.update(layer["digest"] for layer in manifest.get("layers", []))
        removed = []
        for path in (self.root / "layers").iterdir():
            if path.name.startswith("."):
                continue
            if f"sha256:{path.name}" not in keep_layers:
                self.discard(path)
                removed.append(f"layer sha256:{path.name}")
        for path in (self.root / "blobs" / "sha256").iterdir():
            if path.name.startswith("."):
                continue
            if f"sha256:{path.name}" not in keep_blobs:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(f"blob sha256:{path.name}")
        return removed


def _remove_if_empty(root: Path) -> None:
    """Remove a store skeleton that holds nothing: its directories (empty) and its lock file."""
    for sub in ("tmp", "blobs/sha256", "blobs", "layers", "images", "containers"):
        try:
            (root / sub).rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return  # something is in it: not an empty store any more
    for leftover in ("lock",):
        try:
            (root / leftover).unlink()
        except FileNotFoundError:
            pass
    try:
        root.rmdir()
    except OSError:
        pass
