"""Build small OCI images at test time with the real tools (umoci, skopeo), and edit them.

The image tests import what umoci and skopeo write, then compare the store's view of an image
with `umoci unpack`'s rootfs of the same image; so the images must come from those tools, not
from our own code. Three layers cover what an unpacker must get right:

- `BASE`: files, directories, modes (setuid, sticky), owners, an xattr, symlinks;
- `DELETE` (crafted with tarfile, added with ``umoci raw add-layer``, because ``umoci repack``
  writes plain whiteouts and never ``.wh..wh..opq``): deletes a file and a directory, replaces a
  directory wholesale (opaque) and a file by a directory;
- `LINKS` (``umoci repack`` of a changed rootfs): hardlinks, symlinks, a fifo and a device node.

`standard_images` builds them once into one layout with the tags ``base``, ``deleted``,
``full`` and ``other`` (base plus a different layer: two images sharing a base). Conversions
(`to_docker_archive`, `to_zstd`, `to_docker25_archive`, ...) go through skopeo where skopeo can
write the format. `LayoutEditor` rewrites a layout's documents with consistent digests, for the
tests that feed the importer broken input on purpose.

Everything is tiny (a few dozen entries) so that building takes well under a second per image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.trees import DEFAULT_MTIME_NS, CharDev, Dir, Fifo, File, HardLink, Symlink, make_tree

TOOL_TIMEOUT = 60.0  # one umoci/skopeo call on a tiny image takes well under a second
MTIME = DEFAULT_MTIME_NS // 1_000_000_000  # tar stores whole seconds

INDEX = "index.json"
REF_NAME = "org.opencontainers.image.ref.name"


class ToolError(RuntimeError):
    """An external tool failed; the message has the command line and its stderr."""


def tool(*cmd: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """Run CMD, return its stdout; raise `ToolError` with its stderr if it fails."""
    argv = [os.fspath(part) for part in cmd]
    proc = subprocess.run(argv, capture_output=True, timeout=TOOL_TIMEOUT, check=False, cwd=cwd)
    if proc.returncode != 0:
        raise ToolError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode(errors="replace")


def missing_tools() -> str | None:
    """Why the image tools cannot run here, or None when umoci and skopeo are both there."""
    for name in ("umoci", "skopeo"):
        if shutil.which(name) is None:
            return f"{name} is not installed"
    if os.geteuid() != 0:
        return "building images with owners and device nodes needs root"
    return None


# --- the trees --------------------------------------------------------------------------------

BASE = (
    Dir("bin"), Dir("etc"), Dir("home"), Dir("opt"), Dir("srv"), Dir("usr"), Dir("usr/bin"),
    Dir("usr/lib"), Dir("var"), Dir("var/log"), Dir("var/cache"),
    Dir("tmp", mode=0o1777),
    File("etc/hosts", b"127.0.0.1 localhost\n"),
    File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
    File("etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42),
    File("etc/motd", b"welcome\n"),
    File("etc/empty"),
    File("bin/sh", b"#!/bin/true\n" + bytes(range(256)), mode=0o755),
    Symlink("bin/sh2", "sh"),
    File("usr/bin/su", b"setuid\n", mode=0o4755),
    File("usr/bin/wall", b"setgid\n", mode=0o2755, gid=5),
    File("usr/lib/libc.so", b"\x7fELF" + b"\0" * 1000),
    Symlink("lib", "usr/lib"),
    Symlink("usr/lib/libc.so.6", "/usr/lib/libc.so"),
    Dir("home/user", mode=0o700, uid=1000, gid=1000),
    File("home/user/.profile", b"export PS1='$ '\n", mode=0o600, uid=1000, gid=1000),
    File("home/user/notes", b"tagged", uid=1000, gid=1000, xattrs={"user.origin": b"base"}),
    Dir("opt/app"), Dir("opt/app/conf"),
    File("opt/app/run", b"#!/bin/sh\n", mode=0o755),
    File("opt/app/conf/a.conf", b"a=1\n"),
    File("opt/app/conf/b.conf", b"b=2\n"),
    File("srv/data", b"a file in base, a directory later\n"),
    File("var/log/old.log", b"old\n"),
    File("var/log/keep.log", b"keep\n"),
    Dir("var/cache/stuff"), File("var/cache/stuff/x", b"x"), File("var/cache/stuff/y", b"y"),
)

#: An image sharing BASE: one small layer of its own.
OTHER = (File("etc/other-release", b"other 1\n"),)

LINKS = (
    Dir("data"),
    File("data/original", b"linked content\n", mode=0o640, uid=7, gid=7),
    HardLink("data/second", "data/original"),
    HardLink("data/third", "data/original"),
    Symlink("data/rel", "original"),
    Symlink("data/abs", "/etc/hosts"),
    Symlink("data/dangling", "../nowhere"),
    Fifo("data/fifo", mode=0o600),
    CharDev("data/null", 1, 3, mode=0o666),
)


# --- tar entries, for layers umoci cannot make -----------------------------------------------


def tar_dir(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, mode, uid, gid, MTIME
    return info, None


def tar_file(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0
             ) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, gid, MTIME
    return info, data


def tar_symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, MTIME
    return info, None


def tar_hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.LNKTYPE, target, 0o644, MTIME
    return info, None


def tar_whiteout(path: str) -> tuple[tarfile.TarInfo, bytes | None]:
    """The OCI whiteout that deletes PATH from the layers below."""
    parent, _, name = path.rpartition("/")
    return tar_file(f"{parent}/.wh.{name}" if parent else f".wh.{name}")


def tar_opaque(directory: str) -> tuple[tarfile.TarInfo, bytes | None]:
    """The OCI marker that hides everything the layers below have in DIRECTORY."""
    return tar_file(f"{directory}/.wh..wh..opq")


def make_tar(entries: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """An uncompressed PAX tar of ENTRIES, in the order given."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def delete_layer_tar() -> bytes:
    """Layer 2: deletions, an opaque directory and a file replaced by a directory.

    Each touched directory is listed with BASE's metadata: an unpacker must take a directory's
    metadata from the topmost layer that has it, and this layer means to change none.
    The opaque marker comes after a sibling on purpose: it applies to the whole directory wherever
    it appears in the tar.
    """
    return make_tar([
        tar_dir("var"), tar_dir("var/log"), tar_whiteout("var/log/old.log"),
        tar_dir("var/cache"), tar_whiteout("var/cache/stuff"),
        tar_dir("opt"), tar_dir("opt/app"),
        tar_file("opt/app/run", b"#!/bin/sh\necho replaced\n", mode=0o755),
        tar_opaque("opt/app"),
        tar_dir("opt/app/lib"), tar_file("opt/app/lib/new.conf", b"new=1\n"),
        tar_dir("srv"), tar_dir("srv/data", mode=0o750), tar_file("srv/data/inside", b"now a dir\n"),
        tar_dir("etc"), tar_whiteout("etc/motd"), tar_file("etc/added", b"added in layer 2\n"),
    ])


# --- building with umoci -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Images:
    """One OCI layout holding the standard images, by tag."""

    layout: Path
    base: str = "base"  # BASE only
    deleted: str = "deleted"  # BASE + delete layer
    full: str = "full"  # BASE + delete layer + LINKS
    other: str = "other"  # BASE + OTHER

    def ref(self, tag: str) -> str:
        """``LAYOUT:TAG``, as umoci, skopeo (after ``oci:``) and ``overlayctl image import`` take it."""
        return f"{self.layout}:{tag}"


def new_image(layout: Path, tag: str) -> None:
    """An empty image TAG (no layers) in LAYOUT, creating the layout if needed."""
    if not (layout / INDEX).exists():
        tool("umoci", "init", "--layout", layout)
    tool("umoci", "new", "--image", f"{layout}:{tag}")


def repack_layer(layout: Path, src_tag: str, dst_tag: str, work: Path,
                 change: Callable[[Path], None]) -> None:
    """DST_TAG = SRC_TAG plus one layer that umoci computes from CHANGE(rootfs)."""
    bundle = work / f"bundle-{dst_tag}"
    tool("umoci", "unpack", "--image", f"{layout}:{src_tag}", bundle)
    change(bundle / "rootfs")
    tool("umoci", "repack", "--image", f"{layout}:{dst_tag}", bundle)
    shutil.rmtree(bundle)


def add_tar_layer(layout: Path, src_tag: str, dst_tag: str, tar: bytes, work: Path) -> None:
    """DST_TAG = SRC_TAG plus the uncompressed layer TAR, verbatim (umoci gzips it)."""
    path = work / f"layer-{dst_tag}.tar"
    path.write_bytes(tar)
    tool("umoci", "raw", "add-layer", "--image", f"{layout}:{src_tag}", "--tag", dst_tag, path)
    path.unlink()


def set_config(layout: Path, tag: str, *options: str) -> None:
    """``umoci config`` on TAG in place, e.g. ``"--config.env=A=1"``, ``"--author=me"``."""
    tool("umoci", "config", "--image", f"{layout}:{tag}", *options)


def standard_images(layout: Path, work: Path) -> Images:
    """Build base, deleted, full and other into LAYOUT (see the module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    new_image(layout, "empty")
    repack_layer(layout, "empty", "base", work, lambda rootfs: make_tree(rootfs, *BASE))
    set_config(layout, "base", "--author=imagebuild", "--config.env=PATH=/usr/bin:/bin",
               "--config.env=LANG=C.UTF-8", "--config.cmd=/bin/sh", "--config.workingdir=/home/user",
               "--config.user=1000:1000", "--config.label=org.example.kind=base",
               "--config.entrypoint=/usr/bin/env")
    add_tar_layer(layout, "base", "deleted", delete_layer_tar(), work)
    repack_layer(layout, "deleted", "full", work, lambda rootfs: _add_links(rootfs))
    repack_layer(layout, "base", "other", work, lambda rootfs: _add_other(rootfs))
    remove_tag(layout, "empty")
    return Images(layout)


def _add_links(rootfs: Path) -> None:
    make_tree(rootfs, *LINKS)


def _add_other(rootfs: Path) -> None:
    make_tree(rootfs, *OTHER)


def remove_tag(layout: Path, tag: str) -> None:
    tool("umoci", "rm", "--image", f"{layout}:{tag}")
    tool("umoci", "gc", "--layout", layout)


def unpack_rootfs(layout: Path, tag: str, bundle: Path) -> Path:
    """``umoci unpack`` of LAYOUT:TAG into BUNDLE; returns the rootfs, the reference view."""
    tool("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
    return bundle / "rootfs"


# --- conversions with skopeo -----------------------------------------------------------------


def to_docker_archive(layout: Path, tag: str, archive: Path, repo_tag: str) -> Path:
    """What ``docker save`` wrote before Docker 25 (skopeo's flavour: ``<diff_id>.tar`` layers,
    ``<id>/layer.tar`` symlinks to them, manifest.json with RepoTags)."""
    tool("skopeo", "copy", "--quiet", f"oci:{layout}:{tag}", f"docker-archive:{archive}:{repo_tag}")
    return archive


def to_legacy_docker_archive(archive: Path, dest: Path) -> Path:
    """Rewrite a skopeo docker-archive the way old ``docker save`` lays it out: manifest.json's
    Layers name ``<id>/layer.tar`` files, which are real files (no symlinks)."""
    with tarfile.open(archive) as src:
        members = {member.name: member for member in src.getmembers()}
        data = {name: src.extractfile(member).read()  # type: ignore[union-attr]
                for name, member in members.items() if member.isfile() or member.issym()}
    manifest = json.loads(data["manifest.json"])
    by_target = {os.path.normpath(os.path.join(os.path.dirname(name), member.linkname)): name
                 for name, member in members.items() if member.issym()}
    for image in manifest:
        image["Layers"] = [by_target[layer] for layer in image["Layers"]]
    data["manifest.json"] = json.dumps(manifest).encode()
    keep = {name: blob for name, blob in data.items() if name in by_target.values() or not name.endswith(".tar")}
    entries = []
    for name in sorted({os.path.dirname(name) for name in keep if "/" in name}):
        entries.append(tar_dir(name))
    entries += [tar_file(name, blob, mode=0o444) for name, blob in sorted(keep.items())]
    dest.write_bytes(make_tar(entries))
    return dest


def to_zstd(layout: Path, tag: str, dest: Path, dest_tag: str | None = None) -> Path:
    """A copy of LAYOUT:TAG into the layout DEST whose layers are tar+zstd (skopeo recompresses)."""
    tool("skopeo", "copy", "--quiet", "--dest-compress-format", "zstd",
         f"oci:{layout}:{tag}", f"oci:{dest}:{dest_tag or tag}")
    return dest


def to_uncompressed(layout: Path, tag: str, work: Path, dest: Path, dest_tag: str | None = None,
                    relabel: bool = True) -> Path:
    """A copy of LAYOUT:TAG into DEST whose layers are plain tar: through a docker archive, whose
    layers are uncompressed, and skopeo's flag to keep them so.

    skopeo 1.9 labels those layers ``tar+gzip`` all the same (it keeps the docker-archive's
    ``rootfs.diff.tar.gzip``); RELABEL gives them the media type they have, ``...layer.v1.tar``.
    """
    archive = to_docker_archive(layout, tag, work / f"uncompressed-{tag}.tar", f"tmp/{tag}:latest")
    tool("skopeo", "copy", "--quiet", "--dest-oci-accept-uncompressed-layers",
         f"docker-archive:{archive}", f"oci:{dest}:{dest_tag or tag}")
    archive.unlink()
    if relabel:
        editor = LayoutEditor(dest, dest_tag or tag)
        for layer in editor.manifest["layers"]:
            layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
        editor.save()
    return dest


def to_docker25_archive(layout: Path, tag: str, work: Path, archive: Path, repo_tag: str,
                        gzip_it: bool = False) -> Path:
    """What ``docker save`` writes since Docker 25: an OCI layout (uncompressed layers, index.json
    annotated with ``io.containerd.image.name``) with the old manifest.json beside it; gzipped
    like ``docker save | gzip`` when GZIP_IT."""
    tree = to_uncompressed(layout, tag, work, work / f"docker25-{tag}", "latest")
    index = json.loads((tree / INDEX).read_text())
    descriptor = index["manifests"][0]
    full = repo_tag if "/" in repo_tag.split(":")[0] else f"docker.io/library/{repo_tag}"
    descriptor["annotations"] = {"io.containerd.image.name": full, REF_NAME: repo_tag.rsplit(":", 1)[1]}
    (tree / INDEX).write_text(json.dumps(index))
    manifest = json.loads(blob_path(tree, descriptor["digest"]).read_bytes())
    (tree / "manifest.json").write_text(json.dumps([{
        "Config": f"blobs/sha256/{manifest['config']['digest'][7:]}",
        "RepoTags": [repo_tag],
        "Layers": [f"blobs/sha256/{layer['digest'][7:]}" for layer in manifest["layers"]],
    }]))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
    archive.write_bytes(gzip.compress(raw.getvalue()) if gzip_it else raw.getvalue())
    shutil.rmtree(tree)
    return archive


def skopeo_inspect(ref: str) -> dict[str, Any]:
    """``skopeo inspect`` of REF (``oci:DIR:TAG``, ``docker-archive:FILE``), parsed."""
    return json.loads(tool("skopeo", "inspect", ref))


# --- editing a layout ---------------------------------------------------------------------


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def write_blob(layout: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


class LayoutEditor:
    """Load one image of a layout (by tag), change its documents, and write them back with every
    descriptor above a change updated, so that only the breakage a test means is left."""

    def __init__(self, layout: Path, tag: str) -> None:
        self.layout = layout
        self.tag = tag
        self.index = json.loads((layout / INDEX).read_text())
        self.position = next(i for i, entry in enumerate(self.index["manifests"])
                             if entry.get("annotations", {}).get(REF_NAME) == tag)
        self.manifest = json.loads(blob_path(layout, self.descriptor["digest"]).read_bytes())
        self.config = json.loads(blob_path(layout, self.manifest["config"]["digest"]).read_bytes())
        self._config_as_read = json.loads(blob_path(layout, self.manifest["config"]["digest"]).read_bytes())

    @property
    def descriptor(self) -> dict[str, Any]:
        return self.index["manifests"][self.position]

    def layer_path(self, number: int) -> Path:
        return blob_path(self.layout, self.manifest["layers"][number]["digest"])

    def append_layer(self, tar: bytes, *, compress: bool = True) -> None:
        """Add TAR (uncompressed) on top, gzipped unless told not to, with its diff_id."""
        blob = gzip.compress(tar, mtime=0) if compress else tar
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        self.manifest["layers"].append({"mediaType": media, "digest": write_blob(self.layout, blob),
                                        "size": len(blob)})
        self.config["rootfs"]["diff_ids"].append(sha256_digest(tar))

    def save(self, manifest_bytes: bytes | None = None) -> None:
        """Write config (if changed), manifest (or MANIFEST_BYTES verbatim) and index.json, with
        each descriptor updated to what it now points at."""
        if self.config != self._config_as_read:  # untouched, it keeps its bytes and so the image id
            config = json.dumps(self.config).encode()
            self.manifest["config"]["digest"] = write_blob(self.layout, config)
            self.manifest["config"]["size"] = len(config)
        manifest = manifest_bytes if manifest_bytes is not None else json.dumps(self.manifest).encode()
        self.descriptor["digest"] = write_blob(self.layout, manifest)
        self.descriptor["size"] = len(manifest)
        (self.layout / INDEX).write_text(json.dumps(self.index))


def copy_layout(src: Path, dest: Path) -> Path:
    """A private copy of the layout SRC, to break without touching the shared one."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def layout_tags(layout: Path) -> Sequence[str]:
    index = json.loads((layout / INDEX).read_text())
    return [entry.get("annotations", {}).get(REF_NAME, "") for entry in index["manifests"]]
