"""``overlayctl`` off the documented path (issue 21): the habits people bring from podman and docker,
and the mistakes a newcomer makes, each as the exact command with the line it must print.

Images are the standard ones (umoci, `tests.support.imagebuild`); every mount is torn down by `store_session`.
"""

from __future__ import annotations

import gzip
import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayfuse.images import oci
from tests.support.containerctl import Ctl, build_images, store_session, store_with_images
from tests.support.imagebuild import Images, skopeo_inspect, to_docker_archive
from tests.support.mounts import overlayctl_binary, overlayfuse, run

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return build_images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def ctl(images: Images, tmp_path: Path) -> Iterator[Ctl]:
    store_with_images(tmp_path / "store", images, images.base)
    with store_session(tmp_path / "store", tmp_path) as ctl:
        yield ctl


def _mnt(tmp_path: Path, name: str = "mnt") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def _error(ctl: Ctl, *args: str | os.PathLike[str]) -> str:
    return ctl.fails(*args).removeprefix("overlayctl: error: ")


# -- 2. a busy mountpoint, seen by check and service run ---------------------------------------------


def test_check_and_service_run_notice_a_busy_mountpoint(ctl: Ctl, tmp_path: Path) -> None:
    mnt = _mnt(tmp_path)
    ctl.ok("mount", "test/base", mnt, "--name", "web")
    lower, conf_dir = tmp_path / "lower", tmp_path / "conf"
    lower.mkdir()
    conf_dir.mkdir()
    (conf_dir / "web.conf").write_text(f'mountpoint = "{mnt}"\nlowerdirs = ["{lower}"]\n')
    line = (f"{conf_dir}/web.conf: mountpoint: {mnt} is already in use (fuse.overlayfuse from overlayctl:web): "
            "unmount it first")
    assert _error(ctl, "check", "web", "--config-dir", conf_dir) == line
    proc = ctl.run("service", "run", "web", "--config-dir", conf_dir)
    assert proc.returncode == 78 and proc.stderr.strip().splitlines() == [f"overlayctl: error: {line}"], proc.stderr


def test_check_notices_a_busy_workdir(tmp_path: Path) -> None:
    lower, upper, work, mnt, other = (tmp_path / n for n in ("lower", "upper", "work", "by-hand", "target"))
    for path in (lower, upper, work, mnt, other):
        path.mkdir()
    conf = tmp_path / "web.conf"
    conf.write_text(f'mountpoint = "{other}"\nlowerdirs = ["{lower}"]\nupperdir = "{upper}"\nworkdir = "{work}"\n')
    with overlayfuse(mnt, [lower], upper, work):
        line = Ctl(tmp_path / "unused").fails("check", conf)
    assert line.startswith(f"overlayctl: error: {conf}: workdir {work} is in use by the mount on {mnt} (pid ")


# -- 5. service install, wherever it installs ---------------------------------------------------------


def test_service_install_elsewhere_says_where(ctl: Ctl, tmp_path: Path) -> None:
    units, configs = tmp_path / "units", tmp_path / "my configs"
    out = ctl.ok("service", "install", "web", "--unit-dir", units, "--config-dir", configs).splitlines()
    conf = configs / "web.conf"
    check = f"overlayctl check web --config-dir {shlex.quote(str(configs))}"
    assert out[2:] == [
        f"edit {conf}, then check it with: {check}",
        f"{units} is not where systemd looks for units: make it known with: "
        f"systemctl link {units}/overlayfuse@.service",
        "start it now and at every boot with: systemctl enable --now overlayfuse@web",
    ]
    text = conf.read_text()
    assert text.splitlines()[:2] == [
        f"# {conf}: the mount that overlayfuse@web.service serves.",
        f"# Check it with `{check}`; paths must be absolute.",
    ]
    assert "overlayctl images" not in text and "`overlayctl image ls`" in text
    unit = (units / "overlayfuse@.service").read_text()
    assert f'service run --config-dir "{configs}" %i' in unit
    assert f'service cleanup --config-dir "{configs}" %i' in unit
    # The suggested command, run as printed, finds the config (and judges its example paths).
    proc = subprocess.run([str(overlayctl_binary()), *shlex.split(check)[1:]], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.stderr.startswith(f"overlayctl: error: {conf}: mountpoint: /mnt/web"), proc.stderr


# -- 6. a mountpoint that is not empty ----------------------------------------------------------------


def test_mount_refuses_a_non_empty_directory(ctl: Ctl, tmp_path: Path) -> None:
    mnt = _mnt(tmp_path)
    (mnt / "precious").write_text("keep me\n")
    assert _error(ctl, "mount", "test/base", mnt, "--name", "web") == (
        f"mountpoint {mnt} is not empty (it has 'precious'): the mount would hide what is there; "
        "give an empty directory"
    )
    assert _names(ctl) == [], "a refused mount leaves no container behind"
    assert (mnt / "precious").read_text() == "keep me\n"


# -- 7. which store ----------------------------------------------------------------------------------


def test_a_mistyped_root_creates_no_store(tmp_path: Path, images: Images) -> None:
    typo = Ctl(tmp_path / "stroe")
    note = (f"overlayctl: note: no image store at {typo.root} "
            "(image import creates one; check --root and $OVERLAYFUSE_ROOT)")
    proc = typo.run("image", "ls")
    assert proc.returncode == 0 and proc.stderr.splitlines() == [note], proc.stderr
    assert proc.stdout.splitlines() == ["REPOSITORY   TAG   IMAGE ID   CREATED   SIZE"]
    assert typo.run("ps").stderr.splitlines() == [note]
    assert _error(typo, "image", "inspect", "demo:1.0") == note.removeprefix("overlayctl: note: ")
    assert _error(typo, "system", "df") == note.removeprefix("overlayctl: note: ")
    assert not typo.root.exists()
    typo.ok("image", "import", images.ref("base"))  # import is what makes a store
    assert (typo.root / "images").is_dir()


def test_root_after_the_subcommand(ctl: Ctl) -> None:
    binary = str(overlayctl_binary())
    for argv in (["image", "ls", "--root", str(ctl.root)], ["image", "--root", str(ctl.root), "ls"]):
        proc = subprocess.run([binary, *argv], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "test/base" in proc.stdout
    # Given in both places, the later one (after the subcommand) wins.
    proc = subprocess.run([binary, "--root", "/nonexistent", "image", "ls", "--root", str(ctl.root), "-q"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and len(proc.stdout.split()) == 1, proc.stderr


# -- 8. podman's and docker's habits ------------------------------------------------------------------


def test_rm_takes_several_names_all_or_nothing(ctl: Ctl, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        mnt = _mnt(tmp_path, f"mnt-{name}")
        ctl.ok("mount", "test/base", mnt, "--name", name)
    ctl.ok("umount", "a")
    ctl.ok("umount", "b")
    assert _error(ctl, "rm", "a", "c") == f"container c is mounted on {tmp_path}/mnt-c: umount it first, or use --force"
    assert _names(ctl) == ["a", "b", "c"], "nothing removed when one cannot go"
    ctl.ok("rm", "a", "b")
    assert _names(ctl) == ["c"]


def _names(ctl: Ctl) -> list[str]:
    """This store's containers (ps also lists other overlayfuse mounts on the machine, unnamed)."""
    return sorted(state["name"] for state in ctl.ps("-a") if state["name"])


def test_image_and_container_prune(ctl: Ctl, tmp_path: Path) -> None:
    mnt = _mnt(tmp_path)
    ctl.ok("mount", "test/base", mnt, "--name", "web")
    (mnt / "one").write_text("1\n")
    first = ctl.ok("commit", "web", "mine:1").strip()
    (mnt / "two").write_text("2\n")
    second = ctl.ok("commit", "web", "mine:1").strip()
    ls = json.loads(ctl.ok("image", "ls", "--json"))
    assert {(row["Repository"], row["Tag"]) for row in ls if row["ID"] == first} == {("<none>", "<none>")}
    out = ctl.ok("image", "prune").splitlines()
    assert out == [f"Deleted: {first}", "Removed 1 image(s)"]
    assert {row["ID"] for row in json.loads(ctl.ok("image", "ls", "--json"))} >= {second}
    assert first not in ctl.ok("image", "ls", "--json")

    assert ctl.ok("container", "prune").splitlines() == ["Removed 0 container(s)"], "a mounted one stays"
    ctl.ok("umount", "web")
    assert ctl.ok("container", "prune").splitlines() == ["Deleted: web", "Removed 1 container(s)"]
    assert _names(ctl) == []


def test_image_save_and_load(ctl: Ctl, tmp_path: Path) -> None:
    archive = tmp_path / "base.tar"
    described = json.loads(ctl.ok("image", "inspect", "test/base"))[0]
    out = ctl.ok("image", "save", "test/base", "-o", archive)
    assert out.startswith(f"Saved {described['Id']} to {archive} as test/base:latest (")
    # docker's and the OCI tools' readers both take it, and see the same image.
    assert skopeo_inspect(f"oci-archive:{archive}")["Layers"] == [layer["Digest"] for layer in described["Layers"]]
    # skopeo names a docker archive's layers by their uncompressed digests.
    assert skopeo_inspect(f"docker-archive:{archive}")["Layers"] == [layer["DiffID"] for layer in described["Layers"]]
    other = Ctl(tmp_path / "other-store")
    loaded = other.ok("image", "load", "-i", archive).splitlines()
    assert loaded == [f"Loaded image ID: {described['Id']}", "Loaded image: test/base:latest"]
    again = json.loads(other.ok("image", "inspect", "test/base"))[0]
    assert (again["Id"], again["ManifestDigest"]) == (described["Id"], described["ManifestDigest"])
    assert _error(other, "image", "load", "-i", tmp_path / "missing.tar") == (
        f"{tmp_path}/missing.tar: no such file (image load reads a tar; image import also takes a layout dir)"
    )


# -- 9. ps after a clean stop -----------------------------------------------------------------------


def test_ps_after_a_plain_umount_says_stopped(ctl: Ctl, tmp_path: Path) -> None:
    mnt = _mnt(tmp_path)
    ctl.ok("mount", "test/base", mnt, "--name", "web")
    assert ctl.state("web")["state"] == "running"
    proc = run(["umount", mnt], timeout=30)
    assert proc.returncode == 0, proc.stderr
    for _ in range(200):  # the daemon exits once its mount is gone
        if ctl.state("web")["pid"] is None:
            break
        run(["sleep", "0.05"], timeout=5)
    assert ctl.state("web") | {"image": ""} == {
        "name": "web", "image": "", "mountpoint": None, "pid": None, "state": "stopped", "read_only": False,
        "source": "",
    }
    assert "web" not in ctl.ok("ps"), "a stopped container is listed with -a only"
    # (A daemon that died, its mount left behind, is still "dead": test_containers checks that.)


# -- 10. one copy of each layer's bytes, and the store's disk use -----------------------------------


def test_docker_archive_layers_are_stored_once(ctl: Ctl, images: Images, tmp_path: Path) -> None:
    archive = to_docker_archive(images.layout, images.full, tmp_path / "full.tar", "docker/full:1")
    ctl.ok("image", "import", archive)
    described = json.loads(ctl.ok("image", "inspect", "docker/full:1"))[0]
    for layer in described["Layers"]:
        assert layer["MediaType"] == oci.MEDIA_LAYER_GZIP
        blob = ctl.root / "blobs" / "sha256" / layer["Digest"][7:]
        with gzip.open(blob) as unpacked:  # the blob is the layer's tar, gzipped: the diff_id is its hash
            assert oci.sha256_of(unpacked.read()) == layer["DiffID"]
    # The same archive again: the same manifest (the gzip is deterministic).
    ctl.ok("image", "import", archive)
    assert json.loads(ctl.ok("image", "inspect", "docker/full:1"))[0]["ManifestDigest"] == described["ManifestDigest"]
    # And it exports as an image skopeo reads, its layers the stored gzip blobs.
    ctl.ok("image", "export", "docker/full:1", tmp_path / "out")
    assert skopeo_inspect(f"oci:{tmp_path / 'out'}:1")["Layers"] == [layer["Digest"] for layer in described["Layers"]]


def test_system_df(ctl: Ctl) -> None:
    rows = {row["kind"]: row for row in json.loads(ctl.ok("system", "df", "--json"))}
    assert list(rows) == ["Images", "Blobs", "Layers", "Containers", "Total"]
    blob_files = [p for p in (ctl.root / "blobs" / "sha256").iterdir()]
    assert rows["Blobs"]["count"] == len(blob_files)
    assert rows["Blobs"]["size"] == sum(p.stat().st_blocks * 512 for p in blob_files)
    assert rows["Images"]["count"] == 1
    assert rows["Total"]["size"] >= rows["Blobs"]["size"] + rows["Layers"]["size"] > 0
    table = ctl.ok("system", "df").splitlines()
    assert table[0].split() == ["TYPE", "COUNT", "SIZE"] and table[-1].startswith("Total")


# -- 12. small things ------------------------------------------------------------------------------


def test_import_of_one_tag_reports_that_tag(ctl: Ctl, images: Images) -> None:
    ctl.ok("image", "tag", "test/base", "extra:1")
    out = ctl.ok("image", "import", images.ref(images.base), "--tag", "again:2").splitlines()
    assert out[1:] == ["Loaded image: again:2"]


def test_check_of_a_missing_store_says_imported(tmp_path: Path) -> None:
    conf = tmp_path / "web.conf"
    mnt = _mnt(tmp_path)
    conf.write_text(f'mountpoint = "{mnt}"\nimage = "demo:1"\nstore = "{tmp_path}/nostore"\n')
    line = Ctl(tmp_path / "unused").fails("check", conf)
    assert line == (f"overlayctl: error: {conf}: store: the image store {tmp_path}/nostore does not exist "
                    "(no image was ever imported there)")


def test_config_key_typos_are_named(tmp_path: Path) -> None:
    conf = tmp_path / "web.conf"
    conf.write_text('mountpoint = "/mnt"\nlowerdir = "/a:/b"\n')
    line = Ctl(tmp_path / "unused").fails("check", conf)
    assert line.startswith(f"overlayctl: error: {conf}: unknown key 'lowerdir' (did you mean lowerdirs? it takes "
                           'a list, top first: lowerdirs = ["/top", "/base"]; known keys: ')
