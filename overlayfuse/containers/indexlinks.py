"""Names a commit must add to a container's layer because of the daemon's hardlink index.

Changing a hardlinked lower file through one of its names copies it up under that name only; its
other lower names show the upper copy too, through the index in the container's workdir (the
kernel's ``index=on`` behaves the same; see `overlayfuse.overlay.links`). The upper dir alone does not say
so: a layer made of it would show those other names with their old lower content. So a commit asks
this module for the lower names that currently show an upper copy and adds them to the layer tar as
hardlinks to it (or, when the copy has no upper name left, as the file itself, then hardlinks).

Found by walking the image's layers for hardlinked files whose index entry (named by the file's
handle, or by device and inode in the earlier format) has lower names left, then resolving each name
through the container's stack (upper dir included): a name that a later layer, a whiteout or an
upper object hides does not count. The walk happens only when the index has a copy with lower
names left, which is rare: most containers never change a hardlinked lower file.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreError
from ..overlay import layers, whiteout
from ..overlay.layers import Layer, LayerStack, Resolved
from ..overlay.links import INDEX_NAME, LEGACY_INDEX_NAME, LinkIndex

log = logging.getLogger(__name__)

_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class IndexedName:
    """A lower name (a tar name, relative to the root) showing the upper copy SOURCE."""

    path: str
    source: str
    """The copy's real path (its entry in the index): the data when no upper name is left."""
    target: str | None
    """An upper name of the copy (a tar name), to link PATH to; None if it has none."""


def indexed_names(lowers: Sequence[Path], upper: Path, workdir: Path) -> list[IndexedName]:
    """The lower names that show an upper copy through the index, sorted by path."""
    # The counter's xattr is trusted.* when the daemon may write it, user.* otherwise.
    upper_layer = Layer(0, os.fspath(upper), True)
    indexes = [
        LinkIndex.prepare(os.fspath(workdir), opaque_xattr, upper_layer) for opaque_xattr in whiteout.OPAQUE_XATTRS
    ]
    wanted: dict[str, str] = {}  # an index entry's name -> its path, for copies with lower names left
    for directory in (workdir / INDEX_NAME, workdir / LEGACY_INDEX_NAME):
        try:
            entries = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            path = os.path.join(directory, entry)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            left = next((n for n in (c.lower_names(path) for c in indexes) if n is not None), None)
            if left:
                wanted.setdefault(entry, path)
    if not wanted:
        return []
    copies = {os.lstat(path).st_ino: path for path in wanted.values()}
    upper_names = _names_of(os.fspath(upper), set(copies))
    stack = LayerStack.from_dirs([os.fspath(p) for p in lowers], os.fspath(upper))
    found: dict[str, IndexedName] = {}
    for layer in lowers:
        for rel, st in _hardlinked_files(os.fspath(layer)):
            if rel in found:
                continue
            real = os.path.join(layer, rel)
            entry_name = next((n for n in indexes[0].entry_names(real, st) if n in wanted), None)
            if entry_name is None:
                continue
            shown = _resolve(stack, rel)
            if shown is None or shown.layer.writable or not shown.same_object(st):
                continue  # hidden: a whiteout, an upper object or a higher layer has this name
            source = wanted[entry_name]
            found[rel] = IndexedName(rel, source, upper_names.get(os.lstat(source).st_ino))
    names = sorted(found.values(), key=lambda name: name.path)
    if names:
        log.info("%d lower name(s) show a copied-up hardlinked file: added to the layer", len(names))
    return names


def _names_of(root: str, inodes: set[int]) -> dict[int, str]:
    """The first name (in sorted walk order) of each of INODES under ROOT."""
    names: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino in inodes and st.st_ino not in names and stat.S_ISREG(st.st_mode):
                names[st.st_ino] = os.path.relpath(os.path.join(dirpath, name), root)
    return names


def _hardlinked_files(root: str) -> list[tuple[str, os.stat_result]]:
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                found.append((os.path.relpath(path, root), st))
    return found


def _resolve(stack: LayerStack, rel: str) -> Resolved | None:
    resolved: Resolved | None = stack.resolve_root()
    for part in rel.split("/"):
        if resolved is None or not resolved.is_dir:
            return None
        resolved = layers.lookup(resolved.branches, part)
    return resolved


def append_to_tar(tar_path: Path, names: Sequence[IndexedName], lowers: Sequence[Path], upper: Path) -> None:
    """Add NAMES to the uncompressed layer tar at TAR_PATH (written from UPPER), after its entries.

    A name whose directory the tar lacks (the upper dir never had it) gets that directory first,
    with the metadata the container's view shows for it.
    """
    stack = LayerStack.from_dirs([os.fspath(p) for p in lowers], os.fspath(upper))
    try:
        with tarfile.open(tar_path, "a", format=tarfile.PAX_FORMAT, encoding="utf-8",
                          errors="surrogateescape") as tf:  # fmt: skip
            present = set(tf.getnames())
            written: dict[str, str] = {}  # index entry -> the tar name its data went under
            for name in names:
                _add_parents(tf, stack, name.path, present)
                target = name.target or written.get(name.source)
                if target is not None:
                    info = tarfile.TarInfo(name.path)
                    info.type, info.linkname = tarfile.LNKTYPE, target
                    tf.addfile(info)
                else:
                    info = _info(tf, name.source, name.path)
                    with open(name.source, "rb") as data:
                        tf.addfile(info, data)
                    written[name.source] = name.path
                present.add(name.path)
    except OSError as exc:
        raise StoreError(f"cannot add hardlinked names to the layer {tar_path}: {exc.strerror or exc}") from exc


def _add_parents(tf: tarfile.TarFile, stack: LayerStack, rel: str, present: set[str]) -> None:
    parts = rel.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        directory = "/".join(parts[:depth])
        if directory in present:
            continue
        shown = _resolve(stack, directory)
        if shown is None or not shown.is_dir:
            raise StoreError(f"/{rel}: its directory /{directory} is not in the container")
        tf.addfile(_info(tf, shown.path, directory))
        present.add(directory)


def _info(tf: tarfile.TarFile, real: str, name: str) -> tarfile.TarInfo:
    info = tf.gettarinfo(real, arcname=name)
    info.uname = info.gname = ""
    seconds, ns = divmod(os.lstat(real).st_mtime_ns, _NS)
    info.mtime = seconds
    if ns:
        info.pax_headers = {**info.pax_headers, "mtime": f"{seconds}.{ns:09d}".rstrip("0")}
    return info
