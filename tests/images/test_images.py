"""``overlayctl image``: import, ls, inspect, tag, rm, export, on images umoci and skopeo made.

The oracle for an import is ``umoci unpack`` of the same image: the store's layer directories,
stacked as lowerdirs under kernel overlayfs and under overlayfuse, must show the same tree as
umoci's rootfs. Bad inputs are a table; each must fail with one ``overlayctl: error:`` line and
leave the store byte for byte as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pty
import select
import signal
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from overlayfuse.errors import ImageError
from overlayfuse.images import oci
from overlayfuse.images.importer import familiar, split_path_ref
from overlayfuse.images.inherit import inherit_implicit_dirs
from overlayfuse.images.store import ContainerRecord, Store
from tests.conftest import skip_or_fail
from tests.support import imagebuild as ib
from tests.support.compare import Snapshot, diff_views, take_snapshot
from tests.support.mounts import overlayctl_binary
from tests.support.trees import Dir, File, Opaque, Whiteout, make_tree

CTL_TIMEOUT = 60.0  # one command on a tiny image takes well under a second


# --- running overlayctl ----------------------------------------------------------------------------


def ctl(root: Path, *args: str | os.PathLike[str], timeout: float = CTL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    binary = overlayctl_binary()
    if binary is None:
        skip_or_fail("overlayctl is not installed in this venv nor on PATH")
    argv = [str(binary), "--root", str(root), *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def ok(root: Path, *args: str | os.PathLike[str]) -> str:
    proc = ctl(root, *args)
    assert proc.returncode == 0, f"overlayctl {' '.join(map(str, args))} failed: {proc.stderr}"
    return proc.stdout


def image_id(output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("Loaded image ID: "))
    return line.split(": ", 1)[1]


def inspect(root: Path, ref: str) -> dict[str, Any]:
    [described] = json.loads(ok(root, "image", "inspect", ref))
    return described


def lowers(described: dict[str, Any]) -> list[Path]:
    """The image's layer dirs as lowerdirs: topmost first."""
    return [Path(layer["Path"]) for layer in reversed(described["Layers"])]


# --- the store's state, byte for byte --------------------------------------------------------------


def store_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under ROOT with type, mode, owner, content hash or link target, xattrs.
    Times are left out: a failed command may touch a directory's mtime, not its content."""
    state: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                content: Any = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = st.st_rdev
            xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                  for n in os.listxattr(path, follow_symlinks=False)))
            state[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, content, xattrs)
    return state


def assert_state_unchanged(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> None:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert not (added or removed or changed), f"store changed: added={added} removed={removed} changed={changed}"


# --- comparing a view with umoci's rootfs ----------------------------------------------------------


def _without_dir_nlink(snap: Snapshot) -> Snapshot:
    """Overlayfs reports nlink 1 for merged dirs (as find(1) understands); a plain tree counts
    subdirs. Directory link counts are not what an unpacker decides, so they are not compared."""
    entries = {path: replace(info, nlink=0) if info.kind == "dir" else info for path, info in snap.entries.items()}
    return Snapshot(entries, snap.inodes, snap.d_inos, snap.vanished, snap.errors)


def assert_same_tree(reference: Path, view: Path) -> None:
    problems = diff_views(_without_dir_nlink(take_snapshot(reference)), _without_dir_nlink(take_snapshot(view)))
    assert not problems, f"{len(problems)} difference(s) from umoci's rootfs:\n  " + "\n  ".join(problems[:60])


# --- fixtures: the images ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> None:
    missing = ib.missing_tools()
    if missing:
        skip_or_fail(missing)


@pytest.fixture(scope="module")
def images(tools: None, tmp_path_factory: pytest.TempPathFactory) -> ib.Images:
    base = tmp_path_factory.mktemp("images")
    return ib.standard_images(base / "layout", base / "work")


@pytest.fixture(scope="module")
def rootfs(images: ib.Images, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """umoci's rootfs of a tag of the standard layout, unpacked once per tag."""
    base = tmp_path_factory.mktemp("rootfs")
    done: dict[str, Path] = {}

    def get(tag: str) -> Path:
        if tag not in done:
            done[tag] = ib.unpack_rootfs(images.layout, tag, base / tag)
        return done[tag]
    return get


@dataclass(frozen=True, slots=True)
class Kind:
    """One way the same image can reach the importer."""

    name: str
    make: Callable[[ib.Images, Path], str]  # -> the PATH[:REF] argument
    tag: str  # the tag the import should give it


def _oci_gzip(images: ib.Images, work: Path) -> str:
    return images.ref("full")


def _oci_zstd(images: ib.Images, work: Path) -> str:
    return f"{ib.to_zstd(images.layout, 'full', work / 'zstd-layout')}:full"


def _oci_tar(images: ib.Images, work: Path) -> str:
    return f"{ib.to_uncompressed(images.layout, 'full', work, work / 'plain-layout')}:full"


def _skopeo_mislabeled(images: ib.Images, work: Path) -> str:
    """skopeo 1.9's uncompressed OCI copy of a docker archive: plain tar labelled tar+gzip."""
    return f"{ib.to_uncompressed(images.layout, 'full', work, work / 'mislabeled', relabel=False)}:full"


def _docker_archive(images: ib.Images, work: Path) -> str:
    return str(ib.to_docker_archive(images.layout, "full", work / "full.tar", "test/full:v1"))


def _legacy_archive(images: ib.Images, work: Path) -> str:
    archive = ib.to_docker_archive(images.layout, "full", work / "skopeo.tar", "docker.io/library/legacy:v2")
    return str(ib.to_legacy_docker_archive(archive, work / "legacy.tar"))


def _docker25_gz(images: ib.Images, work: Path) -> str:
    return str(ib.to_docker25_archive(images.layout, "full", work, work / "d25.tar.gz", "test/d25:v3", gzip_it=True))


KINDS = [
    Kind("oci-gzip", _oci_gzip, "layout:full"),
    Kind("oci-zstd", _oci_zstd, "zstd-layout:full"),
    Kind("oci-tar", _oci_tar, "plain-layout:full"),
    Kind("skopeo-mislabeled", _skopeo_mislabeled, "mislabeled:full"),
    Kind("docker-archive", _docker_archive, "test/full:v1"),
    Kind("docker-legacy", _legacy_archive, "legacy:v2"),
    Kind("docker25-gzip", _docker25_gz, "test/d25:v3"),
]


# --- import: the view equals umoci's ---------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.mount
@pytest.mark.parametrize("kind", KINDS, ids=[kind.name for kind in KINDS])
def test_import_matches_umoci_unpack(kind: Kind, images: ib.Images, rootfs: Callable[[str], Path],
                                     tmp_path: Path, kernel_mount: Any, fuse_mount: Any) -> None:
    root = tmp_path / "store"
    argument = kind.make(images, tmp_path)
    out = ok(root, "image", "import", argument)
    assert f"Loaded image: {kind.tag}" in out.splitlines()
    described = inspect(root, kind.tag)
    assert described["Id"] == image_id(out)
    assert len(described["Layers"]) == 3
    if kind.name == "oci-zstd":
        assert {layer["MediaType"] for layer in described["Layers"]} == {oci.MEDIA_LAYER_ZSTD}
    reference = rootfs("full")
    kernel = kernel_mount(tmp_path / "kernel", lowers(described))
    assert_same_tree(reference, kernel)
    fuse = fuse_mount(tmp_path / "fuse", lowers(described))
    assert_same_tree(reference, fuse.mnt)


@pytest.mark.kernel
@pytest.mark.parametrize("tag", ["base", "deleted"])
def test_each_layer_prefix_matches_umoci(tag: str, images: ib.Images, rootfs: Callable[[str], Path],
                                         tmp_path: Path, kernel_mount: Any) -> None:
    """base alone, and base + the delete layer: whiteouts and the opaque dir at the top of a stack.
    The delete layer's tar has no ``./`` entry: the root it implies must show base's root, as in
    umoci's rootfs, not the time it was unpacked."""
    root = tmp_path / "store"
    empty = tmp_path / "empty"  # the kernel wants two lowerdirs when there is no upperdir
    empty.mkdir()
    ok(root, "image", "import", images.ref(tag))
    stack = [*lowers(inspect(root, f"layout:{tag}")), empty]
    view = kernel_mount(tmp_path / "mnt", stack)
    assert_same_tree(rootfs(tag), view)


def _implied_layers(layout: Path, work: Path) -> None:
    """Two crafted layers over base, tagged ``implied``: A has ``./`` and a new ``srv/x`` (owner,
    setgid mode, xattr, its own mtime) but leaves ``srv`` implied; B has no ``./`` and implies
    directories that A has (``srv/x``), that only base has through A (``srv``, ``home/user``,
    ``tmp``), one made opaque (``opt/app``), one holding a whiteout (``var/cache``) and one that
    exists nowhere below (``home/user/.cache``)."""
    def dated(entry: tuple[tarfile.TarInfo, bytes | None], offset: int) -> tuple[tarfile.TarInfo, bytes | None]:
        entry[0].mtime = ib.MTIME + offset
        return entry
    new_dir = dated(ib.tar_dir("srv/x", mode=0o2750, uid=7, gid=8), 200)
    new_dir[0].pax_headers = {"SCHILY.xattr.user.kind": "x"}
    layer_a = ib.make_tar([dated(ib.tar_dir("./", mode=0o711), 100), new_dir, ib.tar_file("srv/x/f", b"f")])
    layer_b = ib.make_tar([
        ib.tar_file("srv/x/g", b"g"), ib.tar_file("home/user/.cache/new", b"new"), ib.tar_file("tmp/new"),
        ib.tar_opaque("opt/app"), ib.tar_file("opt/app/only", b"only"), ib.tar_whiteout("var/cache/stuff"),
    ])
    ib.add_tar_layer(layout, "base", "implied-a", layer_a, work)
    ib.add_tar_layer(layout, "implied-a", "implied", layer_b, work)


@pytest.mark.kernel
@pytest.mark.mount
def test_implied_directories_take_the_metadata_of_the_layers_below(
        images: ib.Images, tmp_path: Path, kernel_mount: Any, fuse_mount: Any) -> None:
    """Directories a layer tar only implies show what umoci's rootfs shows (the lower layer's
    mode, owner, xattrs and times), under the kernel and overlayfuse; one that exists nowhere below
    keeps unpack's defaults (0755, root:root, the import's time)."""
    layout = ib.copy_layout(images.layout, tmp_path / "layout")
    _implied_layers(layout, tmp_path)
    reference = ib.unpack_rootfs(layout, "implied", tmp_path / "bundle")
    root = tmp_path / "store"
    started = time.time_ns()
    ok(root, "image", "import", f"{layout}:implied")
    finished = time.time_ns()
    layer_dirs = lowers(inspect(root, "layout:implied"))
    top = layer_dirs[0]
    st = os.lstat(top / "srv/x")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2750, 7, 8)
    assert os.getxattr(top / "srv/x", "user.kind") == b"x"
    nowhere = os.lstat(top / "home/user/.cache")
    assert (stat.S_IMODE(nowhere.st_mode), nowhere.st_uid, nowhere.st_gid) == (0o755, 0, 0)
    assert started <= nowhere.st_mtime_ns <= finished
    assert nowhere.st_atime_ns == nowhere.st_mtime_ns
    for view in (kernel_mount(tmp_path / "kernel", layer_dirs), fuse_mount(tmp_path / "fuse", layer_dirs).mnt):
        problems = diff_views(_without_dir_nlink(take_snapshot(reference)), _without_dir_nlink(take_snapshot(view)))
        # umoci made home/user/.cache at its own unpack time, and making it there (MkdirAll, never
        # undone) moved home/user's mtime too; ours keeps base's, as any directory that gains an
        # entry does in umoci's rootfs. Nothing else may differ.
        unexpected = [p for p in problems if not p.startswith(("'home/user/.cache': mtime_ns ",
                                                               "'home/user': mtime_ns "))]
        assert unexpected == [], problems
    assert os.lstat(top / "home/user").st_mtime_ns == ib.MTIME * 1_000_000_000


def test_shared_base_is_stored_once(images: ib.Images, tmp_path: Path) -> None:
    root = tmp_path / "store"
    ok(root, "image", "import", images.ref("full"))
    base_dir = Path(inspect(root, "layout:full")["Layers"][0]["Path"])
    before = os.stat(base_dir)
    ok(root, "image", "import", images.ref("other"), "--tag", "other:1")
    other = inspect(root, "other:1")
    assert Path(other["Layers"][0]["Path"]) == base_dir
    after = os.stat(base_dir)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns), "base was unpacked again"
    assert len(list((root / "layers").iterdir())) == 4  # base, delete, links, other
    # Both manifests' blobs are all there: each image can be exported.
    for ref in ("layout:full", "other:1"):
        for layer in inspect(root, ref)["Layers"]:
            assert (root / "blobs" / "sha256" / layer["Digest"][7:]).is_file()


def test_reused_layer_blob_is_still_verified(images: ib.Images, tmp_path: Path) -> None:
    """A layer the store has is not unpacked again, but a broken blob for it is still refused."""
    root = tmp_path / "store"
    ok(root, "image", "import", images.ref("base"))
    zstd = ib.to_zstd(images.layout, "deleted", tmp_path / "zstd")
    editor = ib.LayoutEditor(zstd, "deleted")
    blob = editor.layer_path(0)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = store_state(root)
    proc = ctl(root, "image", "import", f"{zstd}:deleted")
    assert proc.returncode != 0 and proc.stderr.startswith("overlayctl: error:"), proc.stderr
    assert_state_unchanged(before, store_state(root))


def test_zstd_import_of_stored_image_keeps_both_blobs(images: ib.Images, tmp_path: Path) -> None:
    """Same image id (same config), other compression: the store keeps the last import's blobs."""
    root = tmp_path / "store"
    first = image_id(ok(root, "image", "import", images.ref("base")))
    zstd = ib.to_zstd(images.layout, "base", tmp_path / "zstd")
    second = image_id(ok(root, "image", "import", f"{zstd}:base"))
    assert first == second
    described = inspect(root, first)
    assert described["Layers"][0]["MediaType"] == oci.MEDIA_LAYER_ZSTD
    assert sorted(described["RepoTags"]) == ["layout:base", "zstd:base"]
    assert (root / "blobs" / "sha256" / described["Layers"][0]["Digest"][7:]).is_file()


def test_nested_index_picks_the_host_platform(images: ib.Images, tmp_path: Path) -> None:
    layout = ib.copy_layout(images.layout, tmp_path / "multi")
    index = json.loads((layout / "index.json").read_text())
    base = next(e for e in index["manifests"] if e["annotations"][ib.REF_NAME] == "base")
    host_os, host_arch = oci.host_platform()
    foreign = {"mediaType": oci.MEDIA_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 10,
               "platform": {"os": "linux", "architecture": "s390x" if host_arch != "s390x" else "arm64"}}
    native = dict(base, platform={"os": host_os, "architecture": host_arch})
    native.pop("annotations")
    nested = json.dumps({"schemaVersion": 2, "mediaType": oci.MEDIA_INDEX, "manifests": [foreign, native]}).encode()
    digest = ib.write_blob(layout, nested)
    index["manifests"] = [{"mediaType": oci.MEDIA_INDEX, "digest": digest, "size": len(nested),
                           "annotations": {ib.REF_NAME: "example.com/multi:2"}}]
    (layout / "index.json").write_text(json.dumps(index))
    root = tmp_path / "store"
    out = ok(root, "image", "import", layout)  # one image: no :REF needed
    assert "Loaded image: example.com/multi:2" in out
    assert inspect(root, "example.com/multi:2")["ManifestDigest"] == base["digest"]


# --- ls, inspect, tag, rm ----------------------------------------------------------------------------


def test_ls_and_inspect(images: ib.Images, tmp_path: Path) -> None:
    root = tmp_path / "store"
    full = image_id(ok(root, "image", "import", images.ref("full"), "--tag", "app:1", "--tag", "app:latest"))
    table = ok(root, "image", "ls").splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    rows = [line.split() for line in table[1:]]
    assert sorted(row[:3] for row in rows) == [["app", "1", full[7:19]], ["app", "latest", full[7:19]]]
    listed = json.loads(ok(root, "image", "ls", "--json"))
    rows = {(row["Repository"], row["Tag"], row["ID"]) for row in listed}
    assert rows == {("app", "1", full), ("app", "latest", full)}

    described = inspect(root, "app:1")
    assert described["Id"] == full and described["RepoTags"] == ["app:1", "app:latest"]
    assert described["RepoDigests"] == [f"app@{described['ManifestDigest']}"]
    assert described["Author"] == "imagebuild"
    assert (described["Architecture"], described["Os"]) == oci.host_platform()[::-1]
    config = described["Config"]
    assert config["Env"] == ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]
    assert config["Cmd"] == ["/bin/sh"] and config["Entrypoint"] == ["/usr/bin/env"]
    assert config["WorkingDir"] == "/home/user" and config["User"] == "1000:1000"
    assert config["Labels"] == {"org.example.kind": "base"}
    assert described["RootFS"]["Type"] == "layers" and len(described["RootFS"]["Layers"]) == 3
    for layer, diff_id in zip(described["Layers"], described["RootFS"]["Layers"], strict=True):
        assert layer["DiffID"] == diff_id
        assert Path(layer["Path"]).is_dir() and Path(layer["Path"]) == root / "layers" / diff_id[7:] / "diff"
        assert layer["UnpackedSize"] > 0 or layer is described["Layers"][1]
    assert described["Size"] == sum(layer["UnpackedSize"] for layer in described["Layers"])
    assert described["Created"]
    assert json.loads(ok(root, "image", "inspect", full[7:15]))[0]["Id"] == full  # by id prefix


def test_tag_moves_between_images(images: ib.Images, tmp_path: Path) -> None:
    root = tmp_path / "store"
    full = image_id(ok(root, "image", "import", images.ref("full"), "--tag", "app:1"))
    other = image_id(ok(root, "image", "import", images.ref("other"), "--tag", "app:2"))
    ok(root, "image", "tag", "app:1", "app:stable")
    assert inspect(root, "app:stable")["Id"] == full
    ok(root, "image", "tag", "app:2", "app:stable")  # moves, like docker
    assert inspect(root, "app:stable")["Id"] == other
    assert inspect(root, full)["RepoTags"] == ["app:1"]
    ok(root, "image", "tag", "app:2", "app:1")  # the last tag of full: it becomes untagged
    assert inspect(root, full)["RepoTags"] == []
    rows = json.loads(ok(root, "image", "ls", "--json"))
    assert {"Repository": "<none>", "Tag": "<none>", "ID": full} in [
        {key: row[key] for key in ("Repository", "Tag", "ID")} for row in rows]
    # Importing with a tag that another image holds moves it too.
    ok(root, "image", "import", images.ref("full"), "--tag", "app:2")
    assert inspect(root, "app:2")["Id"] == full
    proc = ctl(root, "image", "tag", "app:2", "Not A Tag")
    assert proc.returncode != 0 and proc.stderr.startswith("overlayctl: error: invalid reference")


def test_rm_untags_then_deletes_and_frees_only_unused_layers(images: ib.Images, tmp_path: Path) -> None:
    root = tmp_path / "store"
    ok(root, "image", "import", images.ref("full"), "--tag", "full:1", "--tag", "full:2", "--tag", "full:3")
    ok(root, "image", "import", images.ref("other"), "--tag", "other:1")
    full = inspect(root, "full:1")
    other = inspect(root, "other:1")
    out = ok(root, "image", "rm", "full:1")
    assert out.splitlines() == ["Untagged: full:1"]
    proc = ctl(root, "image", "rm", full["Id"])  # by id, with several tags: docker asks for -f
    assert proc.returncode != 0 and "tagged full:2, full:3" in proc.stderr
    assert ok(root, "image", "rm", "full:3").splitlines() == ["Untagged: full:3"]
    out = ok(root, "image", "rm", "full:2")
    assert f"Deleted: {full['Id']}" in out
    gone = {layer["DiffID"] for layer in full["Layers"]} - {layer["DiffID"] for layer in other["Layers"]}
    for layer in full["Layers"]:
        assert Path(layer["Path"]).exists() == (layer["DiffID"] not in gone)
        assert (root / "blobs" / "sha256" / layer["Digest"][7:]).exists() == (layer["DiffID"] not in gone)
    assert not (root / "blobs" / "sha256" / full["ManifestDigest"][7:]).exists()
    assert all(Path(layer["Path"]).is_dir() for layer in inspect(root, "other:1")["Layers"])
    proc = ctl(root, "image", "inspect", "full:2")
    assert proc.returncode != 0 and proc.stderr.strip() == "overlayctl: error: no such image: full:2"


def test_rm_refuses_an_image_a_container_uses(images: ib.Images, tmp_path: Path) -> None:
    root = tmp_path / "store"
    ok(root, "image", "import", images.ref("other"), "--tag", "other:1")
    ok(root, "image", "import", images.ref("base"), "--tag", "base:1")
    described = inspect(root, "other:1")
    store = Store.open(root)
    store.container_path("box").mkdir()
    layers = tuple(described["RootFS"]["Layers"])
    store.save_container(ContainerRecord(name="box", image=described["Id"], layers=layers))
    before = store_state(root)
    proc = ctl(root, "image", "rm", "base:1", "other:1")  # all or nothing: base stays too
    assert proc.returncode != 0 and "used by container(s) box" in proc.stderr
    assert_state_unchanged(before, store_state(root))
    ok(root, "image", "rm", "--force", "other:1", "base:1")
    assert not list((root / "images").iterdir())
    assert all(Path(layer["Path"]).is_dir() for layer in described["Layers"]), "the container's layers must stay"


# --- export -------------------------------------------------------------------------------------------


def test_export_round_trip(images: ib.Images, rootfs: Callable[[str], Path], tmp_path: Path) -> None:
    root = tmp_path / "store"
    full = image_id(ok(root, "image", "import", images.ref("full"), "--tag", "example.com/app:1.0"))
    out_dir = tmp_path / "export"
    ok(root, "image", "export", "example.com/app:1.0", out_dir)
    assert json.loads((out_dir / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    inspected = ib.skopeo_inspect(f"oci:{out_dir}:1.0")
    assert inspected["Digest"] == inspect(root, full)["ManifestDigest"]
    assert len(inspected["Layers"]) == 3
    unpacked = ib.unpack_rootfs(out_dir, "1.0", tmp_path / "bundle")
    assert_same_tree(rootfs("full"), unpacked)
    # Re-import, into a fresh store and into the same one: the same image, the same name.
    for store in (tmp_path / "fresh", root):
        again = ok(store, "image", "import", out_dir)
        assert image_id(again) == full and "Loaded image: example.com/app:1.0" in again
    # Add a second image to the same layout; the first stays.
    ok(root, "image", "import", images.ref("other"), "--tag", "other:2")
    ok(root, "image", "export", "other:2", out_dir)
    assert sorted(ib.layout_tags(out_dir)) == ["1.0", "2"]
    ib.skopeo_inspect(f"oci:{out_dir}:1.0")
    ib.skopeo_inspect(f"oci:{out_dir}:2")


def test_export_refuses_a_non_empty_directory(images: ib.Images, tmp_path: Path) -> None:
    root = tmp_path / "store"
    ok(root, "image", "import", images.ref("base"))
    target = tmp_path / "busy"
    target.mkdir()
    (target / "file").write_text("mine")
    proc = ctl(root, "image", "export", "layout:base", target)
    assert proc.returncode != 0 and "neither empty nor an OCI image layout" in proc.stderr
    assert [p.name for p in target.iterdir()] == ["file"]


# --- bad input ----------------------------------------------------------------------------------------


def _deleted_copy(images: ib.Images, work: Path) -> ib.LayoutEditor:
    return ib.LayoutEditor(ib.copy_layout(images.layout, work / "broken"), "deleted")


def _wrong_digest(editor: ib.LayoutEditor) -> None:
    """The manifest names the new layer by a digest its content does not have."""
    blob = editor.layer_path(1)
    data = blob.read_bytes()
    fake = ib.sha256_digest(b"something else")
    ib.blob_path(editor.layout, fake).write_bytes(data)
    editor.manifest["layers"][1]["digest"] = fake
    editor.save()


def _wrong_diff_id(editor: ib.LayoutEditor) -> None:
    editor.config["rootfs"]["diff_ids"][1] = ib.sha256_digest(b"other")
    editor.save()


def _truncated(editor: ib.LayoutEditor) -> None:
    blob = editor.layer_path(1)
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])


def _corrupt(number: int) -> Callable[[ib.LayoutEditor], None]:
    def corrupt(editor: ib.LayoutEditor) -> None:
        blob = editor.layer_path(number)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x55
        blob.write_bytes(bytes(data))
    return corrupt


def _unknown_media_type(editor: ib.LayoutEditor) -> None:
    editor.manifest["layers"][1]["mediaType"] = "application/vnd.example.layer.v1.tar+lz4"
    editor.save()


def _missing_blob(editor: ib.LayoutEditor) -> None:
    editor.layer_path(1).unlink()


def _manifest_not_json(editor: ib.LayoutEditor) -> None:
    editor.save(manifest_bytes=b"{\"schemaVersion\": 2, \"layers\": [")


def _config_not_json(editor: ib.LayoutEditor) -> None:
    data = b"not a config"
    editor.manifest["config"]["digest"] = ib.write_blob(editor.layout, data)
    editor.manifest["config"]["size"] = len(data)
    manifest = json.dumps(editor.manifest).encode()
    editor.descriptor["digest"] = ib.write_blob(editor.layout, manifest)
    editor.descriptor["size"] = len(manifest)
    (editor.layout / "index.json").write_text(json.dumps(editor.index))


#: The dir (beside the broken layout, in the test's own tmp dir) the escaping layers aim at: it
#: holds one canary file, which must be there untouched, alone, after the import is refused.
CANARY_DIR = "canary"
CANARY = b"canary: must stay as it is\n"


def _canary_dir(editor: ib.LayoutEditor) -> Path:
    return editor.layout.parent / CANARY_DIR


def _escaping(entries: Callable[[Path], tuple[Any, ...]]) -> Callable[[ib.LayoutEditor], None]:
    """A layer whose ENTRIES (made from the canary dir's absolute path) try to write outside it."""
    def add(editor: ib.LayoutEditor) -> None:
        editor.append_layer(ib.make_tar(entries(_canary_dir(editor))))
        editor.save()
    return add


BROKEN_LAYOUTS: dict[str, Callable[[ib.LayoutEditor], None]] = {
    "wrong-digest": _wrong_digest,
    "wrong-diff-id": _wrong_diff_id,
    "truncated-blob": _truncated,
    "corrupt-new-layer": _corrupt(1),
    "corrupt-stored-layer": _corrupt(0),
    "unknown-media-type": _unknown_media_type,
    "missing-blob": _missing_blob,
    "manifest-not-json": _manifest_not_json,
    "config-not-json": _config_not_json,
    "dotdot-entry": _escaping(lambda canary: (ib.tar_file("../" * 64 + f"{canary}/escaped", b"out"),)),
    "symlinked-parent": _escaping(lambda canary: (ib.tar_symlink("link", str(canary)),
                                                  ib.tar_file("link/escaped", b"out"))),
    "hardlink-out": _escaping(lambda canary: (ib.tar_hardlink("passwd", "../" * 64 + f"{canary}/file"),)),
}


@pytest.fixture
def populated(images: ib.Images, tmp_path: Path) -> Path:
    """A store holding the base image (so the broken images share a stored layer) and its state."""
    root = tmp_path / "store"
    ok(root, "image", "import", images.ref("base"))
    return root


def _assert_refused(root: Path, *args: str | os.PathLike[str], expect: str = "") -> str:
    before = store_state(root)
    proc = ctl(root, *args)
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    assert len(lines) == 1 and lines[0].startswith("overlayctl: error: "), proc.stderr
    assert expect in lines[0], lines[0]
    assert_state_unchanged(before, store_state(root))
    assert not list((root / "tmp").iterdir())
    return lines[0]


@pytest.mark.parametrize("case", sorted(BROKEN_LAYOUTS))
def test_broken_layout_is_refused(case: str, images: ib.Images, populated: Path, tmp_path: Path) -> None:
    editor = _deleted_copy(images, tmp_path)
    canary = _canary_dir(editor)
    canary.mkdir()
    (canary / "file").write_bytes(CANARY)
    BROKEN_LAYOUTS[case](editor)
    line = _assert_refused(populated, "image", "import", f"{editor.layout}:deleted")
    assert str(editor.layout) in line, f"the message does not say which input: {line}"
    assert os.listdir(canary) == ["file"]
    st = os.lstat(canary / "file")
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    assert (canary / "file").read_bytes() == CANARY


def test_bad_arguments_are_refused(images: ib.Images, populated: Path, tmp_path: Path) -> None:
    _assert_refused(populated, "image", "import", images.ref("full"), "--tag", "Upper:x", expect="invalid reference")
    _assert_refused(populated, "image", "import", images.ref("full"), "--tag", "a b", expect="invalid reference")
    _assert_refused(populated, "image", "import", images.ref("full"), "--tag", "a:b@c", expect="invalid reference")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    _assert_refused(populated, "image", "import", text, expect="neither an OCI image layout")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_refused(populated, "image", "import", empty, expect="neither an OCI image layout")
    gz = tmp_path / "random.tar.gz"
    gz.write_bytes(gzip.compress(os.urandom(3000)))
    _assert_refused(populated, "image", "import", gz, expect="neither an OCI image layout")
    _assert_refused(populated, "image", "import", tmp_path / "nowhere", expect="no such file")
    _assert_refused(populated, "image", "import", images.layout, expect="holds 4 images")
    _assert_refused(populated, "image", "import", f"{images.layout}:nope", expect="no image named 'nope'")


def test_docker_archive_with_hostile_paths_is_refused(images: ib.Images, populated: Path, tmp_path: Path) -> None:
    archive = ib.to_docker_archive(images.layout, "base", tmp_path / "a.tar", "x/y:z")
    legacy = ib.to_legacy_docker_archive(archive, tmp_path / "legacy.tar")
    # A manifest.json whose Layers point outside the archive.
    with tarfile.open(legacy) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]  # type: ignore[union-attr]
    entries = []
    for member, data in members:
        if member.name == "manifest.json":
            manifest = json.loads(data or b"")
            manifest[0]["Layers"] = ["../../etc/passwd"]
            data = json.dumps(manifest).encode()
            member.size = len(data)
        entries.append((member, data))
    hostile = tmp_path / "hostile.tar"
    hostile.write_bytes(ib.make_tar(entries))
    _assert_refused(populated, "image", "import", hostile, expect="outside the image")


def test_sigkill_mid_import_leaves_the_store_as_it_was(images: ib.Images, populated: Path, tmp_path: Path) -> None:
    """Kill the import while it streams a big layer; the next command clears what it left."""
    layout = ib.copy_layout(images.layout, tmp_path / "big")
    editor = ib.LayoutEditor(layout, "deleted")
    editor.append_layer(ib.make_tar([ib.tar_file("big", os.urandom(24 << 20))]), compress=False)
    editor.save()
    before = store_state(populated)
    binary = overlayctl_binary()
    assert binary is not None
    proc = subprocess.Popen([str(binary), "--root", str(populated), "image", "import", f"{layout}:deleted"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith("layer-3") and p.stat().st_size > 0
                   for p in (populated / "tmp").glob("import-*/blobs/*")):
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"the import ended before it could be killed: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert list((populated / "tmp").iterdir()), "nothing was staged: the kill came too late to test anything"
    ok(populated, "image", "ls")
    assert_state_unchanged(before, store_state(populated))


# --- progress -----------------------------------------------------------------------------------------


def _run_on_terminal(argv: list[str]) -> tuple[int, str]:
    """Run ARGV with stderr on a pseudo-terminal; return its status and what the terminal got."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            ready, _, _ = select.select([master], [], [], CTL_TIMEOUT)
            if not ready:
                proc.kill()
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        return proc.wait(timeout=CTL_TIMEOUT), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)


def test_progress_only_on_a_terminal(images: ib.Images, tmp_path: Path) -> None:
    binary = overlayctl_binary()
    assert binary is not None
    command = [str(binary), "--root", str(tmp_path / "a"), "image", "import", images.ref("full")]
    status, shown = _run_on_terminal(command)
    assert status == 0
    assert "layer 1/3" in shown and "layer 3/3" in shown and "[" + "#" * 30 + "]" in shown, shown
    proc = ctl(tmp_path / "b", "image", "import", images.ref("full"))
    assert proc.returncode == 0 and proc.stderr == ""


# --- units: names and documents -------------------------------------------------------------------


def test_path_and_reference_parsing(tmp_path: Path) -> None:
    assert split_path_ref("/x/layout:latest") == (Path("/x/layout"), "latest")
    assert split_path_ref("/x/layout") == (Path("/x/layout"), None)
    odd = tmp_path / "with:colon"
    odd.mkdir()
    assert split_path_ref(str(odd)) == (odd, None)
    assert split_path_ref("/x/a:b/c") == (Path("/x/a:b/c"), None)
    assert familiar("docker.io/library/alpine:3.19") == "alpine:3.19"
    assert familiar("docker.io/test/base") == "test/base:latest"
    assert familiar("example.com:5000/a/b:c") == "example.com:5000/a/b:c"


@pytest.mark.parametrize("document, message", [
    (b"[]", "expected a JSON object"),
    (b"{\"schemaVersion\": 1, \"layers\": []}", "schemaVersion"),
    (b"{\"layers\": [], \"config\": {\"mediaType\": \"x\", \"digest\": \"md5:00\", \"size\": 1}}", "only sha256"),
    (b'{"layers": [], "config": {"mediaType": "x", "digest": "sha256:00", "size": 1}}', "malformed digest"),
    (b"{\"layers\": [], \"config\": {\"mediaType\": \"x\", \"digest\": \"sha256:" + b"0" * 64 + b"\", \"size\": -1}}",
     "invalid size"),
    (b"{\"layers\": {}, \"config\": {}}", "'layers' must be a list"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_manifest_validation(document: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        oci.parse_manifest(document, "manifest")


def test_config_validation() -> None:
    with pytest.raises(ImageError, match=r"no rootfs\.diff_ids"):
        oci.parse_config(b"{}", "config")
    with pytest.raises(ImageError, match="malformed digest"):
        oci.parse_config(b"{\"rootfs\": {\"type\": \"layers\", \"diff_ids\": [\"sha256:1\"]}}", "config")
    config = oci.parse_config(b"{\"architecture\": \"arm64\", \"os\": \"linux\", \"rootfs\": {\"type\": \"layers\", "
                              b"\"diff_ids\": []}, \"config\": {\"Env\": [\"A=1\"]}}", "config")
    assert (config.architecture, config.os, config.diff_ids, config.runtime) == ("arm64", "linux", (), {"Env": ["A=1"]})


def test_progress_bar_text() -> None:
    from overlayfuse.images.progress import Progress, human_size

    class Terminal:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress = Progress(terminal)  # type: ignore[arg-type]
    advance = progress.start("layer 1/1 abc", 2048)
    advance(1024)
    progress.finish()
    assert "layer 1/1 abc [" in terminal.text and "2.0 KiB / 2.0 KiB" in terminal.text
    assert terminal.text.endswith("\n")
    assert human_size(1536) == "1.5 KiB" and human_size(12_300_000, binary=False) == "12.3MB"
    silent = Terminal()
    quiet = Progress(silent, enabled=False)  # type: ignore[arg-type]
    quiet.start("x", 1)(1)
    quiet.finish()
    assert silent.text == "", "a disabled progress bar wrote to the terminal"


# --- units: implied directories ---------------------------------------------------------------------


def test_implied_directories_resolve_through_the_merged_view_below(tmp_path: Path) -> None:
    """Through two layers: the topmost directory wins, whiteouts and opaque dirs hide, a file below
    is no directory, overlay xattrs below are not copied and the new layer's own markers stay."""
    if os.geteuid() != 0:
        skip_or_fail("needs root (owners, trusted xattrs)")
    bottom_ns, middle_ns, new_ns = 1_500_000_000 * 10**9, 1_550_000_000 * 10**9, 1_700_000_000 * 10**9
    bottom = make_tree(tmp_path / "bottom", Dir("a", mode=0o2750, uid=7, gid=8, xattrs={"user.kind": b"a"}),
                       Dir("a/b"), Opaque("a/b"), Dir("gone"), File("file"), Dir("hidden/inner"),
                       mtime_ns=bottom_ns)
    middle = tmp_path / "middle"
    middle.mkdir(mode=0o700)
    make_tree(middle, Whiteout("gone"), Dir("hidden", mode=0o750), Opaque("hidden"), mtime_ns=middle_ns)
    new = tmp_path / "new"
    implied = [".", "a", "a/b", "gone", "file", "hidden", "hidden/inner", "new"]
    for rel in implied[1:]:
        (new / rel).mkdir(parents=True)
    os.setxattr(new / "a/b", "trusted.overlay.opaque", b"y")  # the new layer's own opaque marker
    for rel in reversed(implied):
        os.utime(new / rel, ns=(new_ns, new_ns))
    untouched = {rel: os.lstat(new / rel) for rel in implied}

    assert inherit_implicit_dirs(new, implied, [middle, bottom]) == 4

    def meta(path: Path) -> tuple[int, int, int, int, int]:
        st = os.lstat(path)
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns
    assert meta(new) == (0o700, 0, 0, middle_ns, middle_ns)  # the topmost root below
    assert meta(new / "a") == (0o2750, 7, 8, bottom_ns, bottom_ns)  # only the bottom has it
    assert os.getxattr(new / "a", "user.kind") == b"a"
    assert meta(new / "a/b")[4] == bottom_ns
    assert sorted(os.listxattr(new / "a/b")) == ["trusted.overlay.opaque"]  # ours, not copied
    assert meta(new / "hidden") == (0o750, 0, 0, middle_ns, middle_ns)
    for rel in ("gone", "file", "hidden/inner", "new"):  # whited out, a file, under opaque, nowhere
        st = os.lstat(new / rel)
        assert (st.st_mode, st.st_uid, st.st_mtime_ns) == (untouched[rel].st_mode, untouched[rel].st_uid,
                                                          untouched[rel].st_mtime_ns), rel
    assert inherit_implicit_dirs(new, implied, []) == 0  # a base layer: nothing below
