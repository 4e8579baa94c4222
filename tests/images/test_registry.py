"""``overlayctl pull``/``push``/``login`` against real registries (Debian's docker-registry, with TLS
and htpasswd or token auth), with skopeo and umoci as the independent clients.

Round trips: skopeo puts a umoci-built image in the registry, overlayctl pulls it, and the mounted
image equals ``umoci unpack`` of the same image; a committed container pushed by overlayctl is
inspected and copied back by skopeo and unpacked by umoci to the same tree. A second image on the
same base downloads only its own layer (counted in the registry's access log). Faults come from a
proxy in front of the registry (500s, wrong bytes, a cut connection, the registry stopped mid-blob,
a redirect to another host): each ends in success or in one clear line with the store unchanged.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayfuse.images import oci
from overlayfuse.images.registry.client import Options, Session, parse_challenge
from overlayfuse.images.registry.credentials import Credentials
from overlayfuse.images.registry.push import push_image
from overlayfuse.images.registry.reference import RegistryError, parse_registry_ref
from overlayfuse.images.store import Store
from tests.conftest import skip_or_fail
from tests.support.compare import assert_same_view
from tests.support.containerctl import Ctl, build_images, change_container, comparable, store_session
from tests.support.imagebuild import (
    INDEX,
    REF_NAME,
    Images,
    LayoutEditor,
    blob_path,
    copy_layout,
    to_uncompressed,
    to_zstd,
    tool,
    unpack_rootfs,
    write_blob,
)
from tests.support.registries import (
    PASSWORD,
    USER,
    FaultProxy,
    Pki,
    RegistryProcess,
    TokenServer,
    htpasswd_auth,
    make_client_cert_dir,
    make_pki,
    run_tool,
)

pytestmark = pytest.mark.mount

CREDS = f"{USER}:{PASSWORD}"
FAST_RETRY = ("--retry", "2", "--retry-delay", "0.05")


def _missing() -> str | None:
    for name in ("docker-registry", "htpasswd", "openssl", "skopeo", "umoci"):
        if shutil.which(name) is None:
            return f"{name} is not installed (scripts/setup installs it)"
    return None


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    missing = _missing()
    if missing:
        skip_or_fail(missing)
    return build_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def private_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the real user's auth files: HOME and XDG_RUNTIME_DIR are the test's."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    return tmp_path / "run" / "containers" / "auth.json"


def seed(images: Images, registry: RegistryProcess, tag: str, repository: str, creds: str = CREDS) -> str:
    """skopeo copies the umoci-built image TAG to REGISTRY as REPOSITORY:1; returns that reference."""
    dest = f"{registry.host}/{repository}:1"
    run_tool("skopeo", "copy", "--dest-cert-dir", registry.pki.cert_dir, "--dest-creds", creds,
             f"oci:{images.layout}:{tag}", f"docker://{dest}")
    return dest


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, pki: Pki, images: Images) -> Iterator[RegistryProcess]:
    """A TLS registry with htpasswd auth holding test/full and test/other (sharing the base layer)."""
    directory = tmp_path_factory.mktemp("registry")
    process = RegistryProcess(directory, pki, htpasswd_auth(directory))
    process.start()
    try:
        seed(images, process, images.full, "test/full")
        seed(images, process, images.other, "test/other")
        yield process
    finally:
        process.stop()


def store_state(root: Path) -> list[tuple[str, int, int]]:
    """Everything in a store but its staging and lock: (path, mode, size), to prove nothing changed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == "tmp" or rel_dir.startswith("tmp/"):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in ("lock", "tmp"):
                continue
            st = os.lstat(os.path.join(dirpath, name))
            found.append((rel, stat.S_IFMT(st.st_mode), st.st_size if stat.S_ISREG(st.st_mode) else 0))
    return sorted(found)


def pull_args(registry: RegistryProcess, ref: str, *extra: str) -> list[str]:
    return ["pull", ref, "--cert-dir", str(registry.pki.cert_dir), "--creds", CREDS, *extra]


# -- round trips ---------------------------------------------------------------------------------


def test_pull_mounts_what_umoci_unpacks_and_a_shared_base_is_fetched_once(
        registry: RegistryProcess, images: Images, tmp_path: Path) -> None:
    root = tmp_path / "store"
    with store_session(root, tmp_path) as ctl:
        full = f"{registry.host}/test/full:1"
        out = ctl.ok(*pull_args(registry, full))
        assert "3 layers downloaded, 0 already in the store" in out
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        ctl.ok("mount", full, mnt, "--ro", "--name", "pulled")
        rootfs = unpack_rootfs(images.layout, images.full, tmp_path / "bundle")
        assert_same_view(comparable(rootfs), comparable(mnt))

        inspected = json.loads(ctl.ok("image", "inspect", full))[0]
        remote = json.loads(tool("skopeo", "inspect", "--cert-dir", registry.pki.cert_dir, "--creds", CREDS,
                                 f"docker://{full}"))
        assert inspected["ManifestDigest"] == remote["Digest"]  # the manifest is kept byte for byte

        # test/other shares the base layer: only its config and its own layer are fetched.
        before = len(registry.blob_gets("test/other"))
        out = ctl.ok("image", "pull", f"{registry.host}/test/other:1", "--cert-dir", str(registry.pki.cert_dir),
                     "--creds", CREDS)
        assert "1 layers downloaded, 1 already in the store" in out
        other_gets = registry.blob_gets("test/other")[before:]
        other_manifest = json.loads(tool("skopeo", "inspect", "--raw", "--cert-dir", registry.pki.cert_dir,
                                         "--creds", CREDS, f"docker://{registry.host}/test/other:1"))
        base_digest, own_digest = (layer["digest"] for layer in other_manifest["layers"])
        assert sorted(other_gets) == sorted([other_manifest["config"]["digest"], own_digest])
        assert base_digest not in other_gets

        # Pulled again: nothing is downloaded, and the store is as it was.
        state = store_state(root)
        out = ctl.ok(*pull_args(registry, f"{registry.host}/test/other:1", "--quiet"))
        assert out.strip() == inspected_id(ctl, f"{registry.host}/test/other:1")
        assert registry.blob_gets("test/other")[before + len(other_gets):] == [other_manifest["config"]["digest"]]
        assert store_state(root) == state


def test_progress_on_a_terminal_shows_each_layer_with_its_rate(registry: RegistryProcess, tmp_path: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    ctl.ok(*pull_args(registry, f"{registry.host}/test/other:1"))  # the base is then in the store
    master, slave = pty.openpty()
    try:
        command = ctl.command(*pull_args(registry, f"{registry.host}/test/full:1"))
        proc = subprocess.run(command, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=slave, timeout=60, check=False)
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, shown
    text = shown.decode(errors="replace")
    assert "skipped: already in the store" in text  # the base layer
    assert "/s)" in text and "\x1b[F" in text  # bytes and rate, redrawn in place


def inspected_id(ctl: Ctl, ref: str) -> str:
    return str(json.loads(ctl.ok("image", "inspect", ref))[0]["Id"])


def test_push_of_a_committed_container_reads_back_with_skopeo_and_umoci(
        registry: RegistryProcess, tmp_path: Path) -> None:
    root = tmp_path / "store"
    with store_session(root, tmp_path) as ctl:
        full = f"{registry.host}/test/full:1"
        ctl.ok(*pull_args(registry, full))
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        ctl.ok("mount", full, mnt, "--name", "builder")
        change_container(mnt)
        target = f"{registry.host}/test/committed:v1"
        image_id = ctl.ok("commit", "builder", target, "-m", "changed").strip()

        out = ctl.ok("push", target, "--cert-dir", str(registry.pki.cert_dir), "--creds", CREDS)
        # The base layers are mounted from test/full (the store knows it has them); the new one is sent.
        assert "1 blobs uploaded" not in out and "2 blobs uploaded, 3 mounted, 0 already there" in out, out

        store = Store.open(root)
        config = store.read_blob_json(image_id)
        manifest_digest = store.image(image_id).manifest
        remote = json.loads(tool("skopeo", "inspect", "--cert-dir", registry.pki.cert_dir, "--creds", CREDS,
                                 f"docker://{target}"))
        assert remote["Digest"] == manifest_digest  # every blob and the manifest went byte for byte
        remote_config = json.loads(tool("skopeo", "inspect", "--config", "--cert-dir", registry.pki.cert_dir,
                                        "--creds", CREDS, f"docker://{target}"))
        assert remote_config["rootfs"]["diff_ids"] == config["rootfs"]["diff_ids"]

        layout = tmp_path / "back"
        tool("skopeo", "copy", "--src-cert-dir", registry.pki.cert_dir, "--src-creds", CREDS,
             f"docker://{target}", f"oci:{layout}:v1")
        rootfs = unpack_rootfs(layout, "v1", tmp_path / "bundle")
        assert_same_view(comparable(rootfs), comparable(mnt))

        # A second push finds everything there; pushing under another name mounts what it can.
        out = ctl.ok("image", "push", target, "--cert-dir", str(registry.pki.cert_dir), "--creds", CREDS, "-q")
        assert out == ""
        out = ctl.ok("push", image_id[7:19], f"{registry.host}/test/copy:v2", "--cert-dir",
                     str(registry.pki.cert_dir), "--creds", CREDS)
        assert "0 blobs uploaded, 5 mounted, 0 already there" in out, out


def test_chunked_upload_of_an_imported_image_gives_the_same_digests(
        registry: RegistryProcess, images: Images, tmp_path: Path) -> None:
    """Blobs bigger than the chunk size go up in PATCH chunks; the registry ends with the same bytes."""
    root = tmp_path / "store"
    ctl = Ctl(root)
    ctl.ok("image", "import", images.ref(images.deleted), "--tag", "local/deleted:1")
    options = Options(creds=Credentials(USER, PASSWORD), cert_dir=str(registry.pki.cert_dir))
    result = push_image(Store.open(root), "local/deleted:1", f"{registry.host}/test/chunked:1",
                        options, chunk_size=256)
    assert (result.uploaded, result.mounted) == (3, 0)  # no tag of the store names a repository there
    remote = json.loads(tool("skopeo", "inspect", "--cert-dir", registry.pki.cert_dir, "--creds", CREDS,
                             f"docker://{registry.host}/test/chunked:1"))
    assert remote["Digest"] == result.manifest_digest
    patches = [line for line in registry.log_path.read_text().splitlines()
               if '"PATCH /v2/test/chunked/blobs/uploads/' in line and '" 202 ' in line]
    assert len(patches) > 3  # several chunks for the larger blobs
    tool("skopeo", "copy", "--src-cert-dir", registry.pki.cert_dir, "--src-creds", CREDS,
         f"docker://{registry.host}/test/chunked:1", f"oci:{tmp_path / 'back'}:1")
    assert_same_view(comparable(unpack_rootfs(tmp_path / "back", "1", tmp_path / "b1")),
                     comparable(unpack_rootfs(images.layout, images.deleted, tmp_path / "b2")))


def test_a_layer_stored_under_another_compression_is_not_downloaded(
        registry: RegistryProcess, images: Images, tmp_path: Path) -> None:
    """The store has full's layers from a zstd import (other blobs, same diff_ids): a pull of the
    gzip image fetches its config only, and mounts what umoci unpacks."""
    root = tmp_path / "store"
    with store_session(root, tmp_path) as ctl:
        zstd = to_zstd(images.layout, images.full, tmp_path / "zstd")
        ctl.ok("image", "import", f"{zstd}:{images.full}", "--tag", "local/zstd:1")
        full = f"{registry.host}/test/full:1"
        before = len(registry.blob_gets("test/full"))
        out = ctl.ok(*pull_args(registry, full))
        assert "0 layers downloaded, 3 already in the store" in out, out
        assert len(registry.blob_gets("test/full")[before:]) == 1  # the config
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        ctl.ok("mount", full, mnt, "--ro", "--name", "pulled")
        rootfs = unpack_rootfs(images.layout, images.full, tmp_path / "bundle")
        assert_same_view(comparable(rootfs), comparable(mnt))
        # Its layer blobs are not in the store, but the registry has them: a push mounts them.
        out = ctl.ok("push", full, f"{registry.host}/test/zfull:1", "--cert-dir", str(registry.pki.cert_dir),
                     "--creds", CREDS)
        assert "0 blobs uploaded, 4 mounted" in out, out


def test_the_platform_is_picked_from_an_index(registry: RegistryProcess, images: Images, tmp_path: Path) -> None:
    layout = copy_layout(images.layout, tmp_path / "multi")
    host_os, host_arch = oci.host_platform()
    entries = []
    for tag, platform in ((images.other, {"os": "linux", "architecture": "s390x"}),
                          (images.full, {"os": host_os, "architecture": host_arch})):
        descriptor = dict(LayoutEditor(layout, tag).descriptor)
        descriptor.pop("annotations", None)
        entries.append(descriptor | {"platform": platform})
    index = json.dumps({"schemaVersion": 2, "mediaType": oci.MEDIA_INDEX, "manifests": entries}).encode()
    top = json.loads((layout / INDEX).read_text())
    top["manifests"].append({"mediaType": oci.MEDIA_INDEX, "digest": write_blob(layout, index),
                             "size": len(index), "annotations": {REF_NAME: "multi"}})
    (layout / INDEX).write_text(json.dumps(top))
    run_tool("skopeo", "copy", "--all", "--dest-cert-dir", registry.pki.cert_dir, "--dest-creds", CREDS,
             f"oci:{layout}:multi", f"docker://{registry.host}/test/multi:1")

    ctl = Ctl(tmp_path / "store")
    ref = f"{registry.host}/test/multi:1"
    host_id = ctl.ok(*pull_args(registry, ref, "-q")).strip()
    s390x_id = ctl.ok(*pull_args(registry, ref, "-q", "--platform", "linux/s390x")).strip()
    assert host_id == LayoutEditor(layout, images.full).manifest["config"]["digest"]
    assert s390x_id == LayoutEditor(layout, images.other).manifest["config"]["digest"]
    line = ctl.fails(*pull_args(registry, ref, "-q", "--platform", "windows/amd64"))
    assert "no image for windows/amd64" in line and "linux/s390x" in line


def _put_verbatim(registry: RegistryProcess, layout: Path, tag: str, repository: str) -> str:
    """Put LAYOUT:TAG in REGISTRY as REPOSITORY:1 blob for blob, plain tar layers and all (skopeo
    gzips what it sends to a registry, so our own session uploads, monolithic: POST then PUT)."""
    editor = LayoutEditor(layout, tag)
    options = Options(creds=Credentials(USER, PASSWORD), cert_dir=str(registry.pki.cert_dir))
    scope = [f"repository:{repository}:pull,push"]
    with Session(registry.host, options) as session:
        for blob in (editor.manifest["config"], *editor.manifest["layers"]):
            started = session.request("POST", f"/v2/{repository}/blobs/uploads/", scope, "seed")
            assert started.status_code == 202, started.text
            done = session.request("PUT", started.headers["location"], scope, "seed", params={"digest": blob["digest"]},
                                   headers={"Content-Type": "application/octet-stream"},
                                   content=blob_path(layout, blob["digest"]).read_bytes())
            assert done.status_code == 201, done.text
        manifest = blob_path(layout, editor.descriptor["digest"]).read_bytes()
        put = session.request("PUT", f"/v2/{repository}/manifests/1", scope, "seed",
                              headers={"Content-Type": oci.MEDIA_MANIFEST}, content=manifest)
        assert put.status_code == 201, put.text
    return f"{registry.host}/{repository}:1"


def test_a_pulled_plain_tar_layer_is_stored_once_and_pulled_again_names_the_same_blob(
        registry: RegistryProcess, images: Images, tmp_path: Path) -> None:
    """An image whose layers the registry serves as plain tars: the pull stores them gzipped (one
    copy) under a restated manifest; pulled again (its layers in the store, their plain blobs not),
    the manifest still names the stored gzip blobs, so export gives an image skopeo copies."""
    plain = to_uncompressed(images.layout, images.full, tmp_path, tmp_path / "plain")
    remote = _put_verbatim(registry, plain, images.full, "test/plain")
    root = tmp_path / "store"
    with store_session(root, tmp_path) as ctl:
        ctl.ok(*pull_args(registry, remote))
        first = json.loads(ctl.ok("image", "inspect", remote))[0]
        assert first["Id"] == LayoutEditor(plain, images.full).manifest["config"]["digest"]
        for layer in first["Layers"]:
            assert (root / "blobs" / "sha256" / layer["Digest"][7:]).read_bytes()[:2] == b"\x1f\x8b"
        out = ctl.ok(*pull_args(registry, remote))
        assert "0 layers downloaded, 3 already in the store" in out, out
        again = json.loads(ctl.ok("image", "inspect", remote))[0]
        assert again["ManifestDigest"] == first["ManifestDigest"]
        ctl.ok("image", "export", remote, tmp_path / "out")
        tool("skopeo", "copy", "--quiet", f"oci:{tmp_path / 'out'}:1", f"dir:{tmp_path / 'copied'}")


# -- auth ----------------------------------------------------------------------------------------


def test_wrong_password_and_missing_tag_are_one_line_each(registry: RegistryProcess, tmp_path: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    ctl.ok("image", "ls")
    state = store_state(ctl.root)
    line = ctl.fails("pull", f"{registry.host}/test/full:1", "--cert-dir", str(registry.pki.cert_dir),
                     "--creds", f"{USER}:wrong")
    assert f"{registry.host}: " in line and "unauthorized" in line and "test/full" in line
    line = ctl.fails("pull", f"{registry.host}/test/full:1", "--cert-dir", str(registry.pki.cert_dir))
    assert "unauthorized" in line and "login" in line
    line = ctl.fails(*pull_args(registry, f"{registry.host}/test/full:nope"))
    assert "manifest test/full:nope: not found" in line
    line = ctl.fails(*pull_args(registry, f"{registry.host}/test/absent:1"))
    assert "test/absent" in line and "not found" in line
    # TLS is verified: without the test's CA the registry is not trusted.
    line = ctl.fails("pull", f"{registry.host}/test/full:1", "--creds", CREDS, "--retry", "0")
    assert "CERTIFICATE_VERIFY_FAILED" in line or "certificate" in line.lower()
    assert store_state(ctl.root) == state


def test_login_writes_the_file_skopeo_reads_and_logout_removes_it(
        registry: RegistryProcess, tmp_path: Path, private_credentials: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    proc = ctl_run_stdin(ctl, f"{PASSWORD}\n", "login", registry.host, "-u", USER, "--password-stdin",
                         "--cert-dir", str(registry.pki.cert_dir))
    assert proc.returncode == 0, proc.stderr
    auth = private_credentials
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    entry = json.loads(auth.read_text())["auths"][registry.host]
    assert base64.b64decode(entry["auth"]).decode() == CREDS
    # skopeo reads what login wrote; and a pull needs no --creds now.
    tool("skopeo", "inspect", "--authfile", auth, "--cert-dir", registry.pki.cert_dir,
         f"docker://{registry.host}/test/full:1")
    ctl.ok("pull", f"{registry.host}/test/other:1", "--cert-dir", str(registry.pki.cert_dir))

    proc = ctl_run_stdin(ctl, "bad\n", "login", registry.host, "-u", USER, "--password-stdin",
                         "--cert-dir", str(registry.pki.cert_dir))
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "unauthorized" in proc.stderr
    assert base64.b64decode(json.loads(auth.read_text())["auths"][registry.host]["auth"]).decode() == CREDS

    ctl.ok("logout", registry.host)
    assert registry.host not in json.loads(auth.read_text())["auths"]
    ctl.fails("logout", registry.host)

    # docker's file is read too.
    docker = Path(os.environ["HOME"]) / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {f"https://{registry.host}": {
        "auth": base64.b64encode(CREDS.encode()).decode()}}}))
    ctl.ok("pull", f"{registry.host}/test/full:1", "--cert-dir", str(registry.pki.cert_dir), "-q")


def ctl_run_stdin(ctl: Ctl, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ctl.command(*args), input=text, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory, pki: Pki,
                   images: Images) -> Iterator[tuple[RegistryProcess, TokenServer]]:
    directory = tmp_path_factory.mktemp("token-registry")
    with TokenServer(pki) as tokens:
        process = RegistryProcess(directory, pki, tokens.auth_config())
        process.start()
        try:
            seed(images, process, images.full, "team/app")
            yield process, tokens
        finally:
            process.stop()


def test_bearer_tokens_per_scope_anonymous_and_with_credentials(
        token_registry: tuple[RegistryProcess, TokenServer], tmp_path: Path) -> None:
    registry, tokens = token_registry
    ctl = Ctl(tmp_path / "store")
    tokens.requests.clear()
    ref = f"{registry.host}/team/app:1"
    ctl.ok("pull", ref, "--cert-dir", str(registry.pki.cert_dir))  # anonymous: a pull-only token
    assert tokens.requests == [{"user": "", "scopes": ["repository:team/app:pull"]}]  # one, cached for 5 requests

    # Pushing needs a push token, which the anonymous user does not get: one clear line.
    line = ctl.fails("push", ref, f"{registry.host}/team/copy:1", "--cert-dir", str(registry.pki.cert_dir))
    assert "team/copy" in line and ("unauthorized" in line or "denied" in line)

    tokens.requests.clear()
    out = ctl.ok("push", ref, f"{registry.host}/team/copy:1", "--cert-dir", str(registry.pki.cert_dir),
                 "--creds", CREDS)
    assert "0 blobs uploaded, 4 mounted" in out, out
    assert all(r["user"] == USER for r in tokens.requests)
    assert ["repository:team/copy:pull,push"] in [r["scopes"] for r in tokens.requests]

    line = ctl.fails("pull", ref, "--cert-dir", str(registry.pki.cert_dir), "--creds", f"{USER}:nope")
    assert "token" in line and "unauthorized" in line


def test_tokens_are_kept_per_scope_until_they_expire(token_registry: tuple[RegistryProcess, TokenServer]) -> None:
    registry, tokens = token_registry
    tokens.lifetime = 2  # kept for 1 s (renewed before the registry would refuse it)
    try:
        with Session(registry.host, Options(cert_dir=str(registry.pki.cert_dir))) as session:
            def manifest(repository: str) -> int:
                response = session.request("GET", f"/v2/{repository}/manifests/1", [f"repository:{repository}:pull"],
                                           "manifest", headers={"Accept": oci.MEDIA_MANIFEST})
                return response.status_code
            assert manifest("team/app") == 200 and manifest("team/app") == 200
            assert session.token_requests == 1
            assert manifest("team/other") == 404  # another scope, another token
            assert session.token_requests == 2
            time.sleep(1.2)
            assert manifest("team/app") == 200
            assert session.token_requests == 3
    finally:
        tokens.lifetime = 300


def test_mutual_tls_with_a_client_certificate_from_the_cert_dir(
        pki: Pki, images: Images, tmp_path: Path) -> None:
    directory = tmp_path / "mtls"
    directory.mkdir()
    client = make_client_cert_dir(pki, directory / "client")
    process = RegistryProcess(directory, pki, htpasswd_auth(directory), client_certs=client)
    process.start()
    try:
        run_tool("skopeo", "copy", "--dest-cert-dir", client, "--dest-creds", CREDS,
                 f"oci:{images.layout}:{images.other}", f"docker://{process.host}/test/other:1")
        ctl = Ctl(tmp_path / "store")
        ref = f"{process.host}/test/other:1"
        line = ctl.fails("pull", ref, "--cert-dir", str(pki.cert_dir), "--creds", CREDS, "--retry", "0")
        assert process.host in line  # the CA alone is not enough: the registry wants a client certificate
        ctl.ok("pull", ref, "--cert-dir", str(client), "--creds", CREDS)
        ctl.ok("push", ref, f"{process.host}/test/again:1", "--cert-dir", str(client), "--creds", CREDS)
    finally:
        process.stop()


# -- faults --------------------------------------------------------------------------------------


@pytest.fixture
def proxy(registry: RegistryProcess) -> Iterator[FaultProxy]:
    basic = "Basic " + base64.b64encode(CREDS.encode()).decode()
    with FaultProxy(registry, upstream_auth=basic) as running:
        yield running


def proxied_pull(proxy: FaultProxy, repository: str = "test/full", *extra: str) -> list[str]:
    return ["pull", f"{proxy.host}/{repository}:1", "--tls-verify=false", "--creds", CREDS, "-q", *FAST_RETRY, *extra]


def blob_digests(registry: RegistryProcess, repository: str) -> list[str]:
    raw = json.loads(tool("skopeo", "inspect", "--raw", "--cert-dir", registry.pki.cert_dir, "--creds", CREDS,
                          f"docker://{registry.host}/{repository}:1"))
    return [layer["digest"] for layer in raw["layers"]]


def test_500s_are_retried_and_too_many_fail_with_the_store_unchanged(proxy: FaultProxy, tmp_path: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    ctl.ok("image", "ls")
    state = store_state(ctl.root)
    proxy.faults.status_500 = 50
    line = ctl.fails(*proxied_pull(proxy))
    assert "HTTP 500" in line and proxy.host in line
    assert store_state(ctl.root) == state
    proxy.faults.status_500 = 2  # fewer than --retry 2 allows on the first request
    ctl.ok(*proxied_pull(proxy))
    assert proxy.faults.status_500 == 0


def test_429_waits_as_told_and_then_succeeds(proxy: FaultProxy, tmp_path: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    proxy.faults.status_429 = 1
    ctl.ok(*proxied_pull(proxy))
    assert proxy.faults.status_429 == 0
    proxy.faults.status_429 = 100
    line = Ctl(tmp_path / "store2").fails(*proxied_pull(proxy, "test/other", "--retry", "1"))
    assert "HTTP 429" in line


def test_wrong_bytes_are_refused_with_the_store_unchanged(proxy: FaultProxy, registry: RegistryProcess,
                                                          tmp_path: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    ctl.ok("image", "ls")
    state = store_state(ctl.root)
    proxy.faults.corrupt_blob = blob_digests(registry, "test/full")[1]
    line = ctl.fails(*proxied_pull(proxy))
    assert "bad digest" in line and proxy.faults.corrupt_blob in line
    assert store_state(ctl.root) == state


def test_a_cut_download_resumes_with_a_range_request(proxy: FaultProxy, registry: RegistryProcess,
                                                     tmp_path: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    digest = blob_digests(registry, "test/full")[0]
    proxy.faults.cut_blob = digest
    ctl.ok(*proxied_pull(proxy))
    ranges = [headers.get("Range") for method, path, headers in proxy.requests if path.endswith(digest)]
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1].startswith("bytes="), ranges
    assert int(ranges[-1][6:].rstrip("-")) > 0


def test_registry_stopped_mid_pull_then_a_rerun_completes(proxy: FaultProxy, registry: RegistryProcess,
                                                          tmp_path: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    ctl.ok("image", "ls")
    state = store_state(ctl.root)
    proxy.faults.cut_blob = blob_digests(registry, "test/full")[0]
    proxy.faults.on_cut = registry.stop
    try:
        line = ctl.fails(*proxied_pull(proxy, "test/full", "--retry", "1"))
    finally:
        registry.start()
    assert proxy.host in line and ("HTTP 502" in line or "connect" in line or "broke" in line), line
    assert store_state(ctl.root) == state
    # staging went with the failed command
    assert not (ctl.root / "tmp").exists() or list((ctl.root / "tmp").iterdir()) == []
    ctl.ok(*proxied_pull(proxy))
    assert json.loads(ctl.ok("image", "inspect", f"{proxy.host}/test/full:1"))[0]["RepoTags"]


def test_push_retries_500s_and_too_many_fail_in_one_line(proxy: FaultProxy, registry: RegistryProcess,
                                                         images: Images, tmp_path: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    ctl.ok("image", "import", images.ref(images.full), "--tag", "local/full:1")
    state = store_state(ctl.root)
    push = ("push", "local/full:1", f"{proxy.host}/test/via-proxy:1", "--tls-verify=false", "--creds", CREDS,
            "-q", *FAST_RETRY)
    proxy.faults.status_500 = 100
    line = ctl.fails(*push)
    assert "HTTP 500" in line and proxy.host in line
    proxy.faults.status_500 = 2
    ctl.ok(*push)
    remote = json.loads(tool("skopeo", "inspect", "--cert-dir", registry.pki.cert_dir, "--creds", CREDS,
                             f"docker://{registry.host}/test/via-proxy:1"))
    assert remote["Digest"] == json.loads(ctl.ok("image", "inspect", "local/full:1"))[0]["ManifestDigest"]
    assert store_state(ctl.root) == state  # a push never changes the store


def test_redirects_are_followed_without_the_authorization_header(proxy: FaultProxy, tmp_path: Path) -> None:
    ctl = Ctl(tmp_path / "store")
    proxy.faults.redirect_blobs = True
    ctl.ok(*proxied_pull(proxy))
    redirected = [headers for method, path, headers in proxy.requests if path.startswith("/redirected/")]
    direct = [headers for method, path, headers in proxy.requests
              if "/blobs/" in path and not path.startswith("/redirected/")]
    assert len(redirected) == 4 and all("Authorization" in h for h in direct)
    assert not any("Authorization" in h or "authorization" in h for h in redirected)


# -- units ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("alpine", ("docker.io", "library/alpine", "latest", None)),
    ("docker.io/alpine:3", ("docker.io", "library/alpine", "3", None)),
    ("user/app", ("docker.io", "user/app", "latest", None)),
    ("localhost/app:1", ("localhost", "app", "1", None)),
    ("127.0.0.1:5000/team/app:1.2", ("127.0.0.1:5000", "team/app", "1.2", None)),
    ("docker://quay.io/x/y@sha256:" + "a" * 64, ("quay.io", "x/y", None, "sha256:" + "a" * 64)),
])
def test_references_are_normalised_as_docker_does(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = parse_registry_ref(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize("text", ["Alpine", "host:5000/App", "x@sha256:12", "x:bad tag", "a//b", ""])
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(RegistryError):
        parse_registry_ref(text)


def test_challenges_are_parsed() -> None:
    challenge = parse_challenge('Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"')
    assert challenge is not None and challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://auth.example/token", "service": "reg",
                                "scope": "repository:a/b:pull"}
    basic = parse_challenge('Basic realm="x"')
    assert basic is not None and basic.scheme == "basic"
    assert parse_challenge("Negotiate abc") is None
