"""The ``podman-run`` row: ``podman run --rm IMAGE true`` with each target as containers-storage's
overlay backend, as root with runc.

podman starts one mount per container, so a container's start pays for the mount program's
start-up. Each target gets a throwaway containers-storage of its own (its graphroot under the
bench's scratch dir, its runroot and podman's tmp dir, with file locks and conmon's sockets, on a
short path under /run; ``CONTAINERS_STORAGE_CONF`` and ``CONTAINERS_CONF`` point podman there): the
kernel's overlay driver, and the overlay driver with fuse-overlayfs or overlayfuse as
``mount_program``. The image is a static busybox in one layer, built with umoci into
a local OCI layout and loaded from there (``podman load``): no network. The container gets no network
either (``--network none``), so the row is storage and runtime, not CNI or netavark.

Nothing is left behind, even on failure: every container and image is removed with
``podman system reset``, then any mount still under the storage is detached (deepest first), then
the directory goes.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import BenchError
from .forkserver import environment
from .mounts import mounts_under
from .processes import run, timed
from .settings import PODMAN_RUNS, PODMAN_TIMEOUT, TOOL_TIMEOUT, VENV_BIN

TAG = "bench"
#: The busybox applets the image has; `true` is the one the row runs.
APPLETS = ("sh", "true")
#: Where each storage's runroot and tmp dir go: a short path (conmon's socket paths must fit).
_SHORT_BASE = "/run" if Path("/run").is_dir() else None

#: The container's nofile and nproc limits (see `run_true`): what a shell gets by default.
CONTAINER_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class Storage:
    """One target's containers-storage: where it lives and the environment that points podman at it."""

    target: str
    root: Path
    env: dict[str, str]
    run_root: Path
    """podman's runroot and tmp dir, on a short path of their own (see `configure`)."""


def mount_program(target: str) -> str | None:
    """containers-storage's ``mount_program`` for TARGET (None: the kernel's overlay driver)."""
    if target == "kernel":
        return None
    if target == "fuse-overlayfs":  # overlayfuse and overlayfuse-fs: one program, with and without the server
        found = shutil.which("fuse-overlayfs")
        if found is None:
            raise BenchError("fuse-overlayfs is not installed")
        return found
    return str(VENV_BIN / "overlayfuse")


def _layer_tar(busybox: Path) -> bytes:
    """One layer: /bin/busybox (static) and its applets as symlinks, owned by 0:0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "tmp"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    return buf.getvalue()


def build_layout(work: Path) -> Path:
    """An OCI layout under WORK with one busybox image tagged TAG."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise BenchError("busybox is not installed (apt-get install busybox-static)")
    layout = work / "podman-layout"
    tar = work / "podman-layer.tar"
    tar.write_bytes(_layer_tar(Path(busybox)))
    run(["umoci", "init", "--layout", layout], TOOL_TIMEOUT)
    run(["umoci", "new", "--image", f"{layout}:{TAG}"], TOOL_TIMEOUT)
    run(["umoci", "raw", "add-layer", "--image", f"{layout}:{TAG}", tar], TOOL_TIMEOUT)
    tar.unlink()
    return layout


def configure(work: Path, target: str, fork_socket: str | None = None) -> Storage:
    """TARGET's storage under WORK/podman/TARGET, with its storage.conf and containers.conf."""
    root = work / "podman" / target
    (root / "graph").mkdir(parents=True)
    # The runroot and tmp dir hold conmon's sockets, whose paths must fit sockaddr_un (108 bytes):
    # under a long scratch dir (pytest's tmp_path) every `podman run` waited 20 s for conmon.
    run_root = Path(tempfile.mkdtemp(prefix="ofb-", dir=_SHORT_BASE))
    for sub in ("run", "tmp"):
        (run_root / sub).mkdir()
    program = mount_program(target)
    storage = (f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "graph"}"\nrunroot = "{run_root / "run"}"\n'
               "[storage.options.overlay]\n" + (f'mount_program = "{program}"\n' if program else ""))
    # runc and cgroupfs: crun refuses this machine's hybrid cgroup layout, and no systemd may run.
    # File locks in the tmp dir: podman's default shared-memory locks are one segment per machine.
    engine = ('[containers]\nnetns = "none"\n'
              '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\nruntime = "runc"\n'
              f'lock_type = "file"\ntmp_dir = "{run_root / "tmp"}"\nvolume_path = "{root / "volumes"}"\n'
              f'[network]\nnetwork_config_dir = "{root / "networks"}"\n')
    (root / "storage.conf").write_text(storage)
    (root / "containers.conf").write_text(engine)
    env = {"CONTAINERS_STORAGE_CONF": str(root / "storage.conf"), "CONTAINERS_CONF": str(root / "containers.conf"),
           **environment(target, fork_socket)}  # podman's mount program inherits its environment
    return Storage(target, root, env, run_root)


def podman(storage: Storage, *args: str, timeout: float = PODMAN_TIMEOUT, check: bool = True) -> str:
    """Run podman on STORAGE; its stdout."""
    done = run(["podman", *args], timeout, check=check, env=storage.env)
    return done.stdout.decode(errors="replace").strip()


def run_true(storage: Storage, image: str) -> float:
    """Seconds for one ``podman run --rm IMAGE true`` on STORAGE."""
    # Unless told, podman asks runc for nofile and nproc limits (1048576) that a root without
    # CAP_SYS_RESOURCE may not set (this VM is itself a container: runc fails with EPERM); a
    # container running `true` needs neither, so it gets small fixed ones, the same for every target.
    limits = ["--ulimit", f"nofile={CONTAINER_LIMIT}:{CONTAINER_LIMIT}",
              "--ulimit", f"nproc={CONTAINER_LIMIT}:{CONTAINER_LIMIT}"]
    cmd = ["podman", "run", "--rm", "--network", "none", *limits, image, "true"]
    return timed(cmd, PODMAN_TIMEOUT, env=storage.env)


def load(storage: Storage, layout: Path) -> str:
    """Store the layout's image in STORAGE; its image id. (``podman load`` of the layout as an
    oci-archive: ``podman pull oci:PATH`` names the image after PATH, which must then be lowercase.)"""
    archive = layout.with_suffix(".tar")
    if not archive.exists():
        run(["tar", "-C", layout, "-cf", archive, "."], TOOL_TIMEOUT)
    podman(storage, "load", "-q", "-i", str(archive))
    ids = podman(storage, "images", "-q", "--no-trunc").split()
    if len(ids) != 1:
        raise BenchError(f"podman load of {archive}: expected one image in the new storage, found {ids}")
    return ids[0]


def remove(storage: Storage) -> None:
    """Every container, image and mount of STORAGE gone, and its directory; never raises."""
    with contextlib.suppress(BenchError):
        podman(storage, "rm", "--all", "--force", check=False)
    with contextlib.suppress(BenchError):
        podman(storage, "system", "reset", "--force", check=False)
    for place in (storage.root, storage.run_root):
        for point in sorted(mounts_under(place), key=len, reverse=True):
            with contextlib.suppress(BenchError):
                run(["umount", "-l", point], TOOL_TIMEOUT, check=False)
        if not mounts_under(place):
            with contextlib.suppress(BenchError):
                run(["rm", "-rf", "--one-file-system", str(place)], TOOL_TIMEOUT, check=False)


@contextlib.contextmanager
def storages(work: Path, targets: list[str], fork_socket: str | None = None
             ) -> Iterator[dict[str, tuple[Storage, str]]]:
    """Each target's storage with the busybox image loaded into it (target -> (storage, image id)),
    one unmeasured run made in each (the first run sets the storage up); all removed at the end."""
    made: list[Storage] = []
    try:
        layout = build_layout(work)
        ready: dict[str, tuple[Storage, str]] = {}
        for target in targets:
            storage = configure(work, target, fork_socket)
            made.append(storage)
            image = load(storage, layout)
            run_true(storage, image)
            ready[target] = (storage, image)
        yield ready
    finally:
        for storage in made:
            remove(storage)


def measure(ready: dict[str, tuple[Storage, str]], order: list[str]) -> dict[str, list[float]]:
    """PODMAN_RUNS timed runs per target, the targets taken in ORDER each round."""
    samples: dict[str, list[float]] = {t: [] for t in order}
    for _ in range(PODMAN_RUNS):
        for target in order:
            storage, image = ready[target]
            samples[target].append(run_true(storage, image))
    return samples

