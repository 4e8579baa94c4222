"""overlayctl's own start-up: ``image ls`` and ``ps -a`` on a store of CTL_IMAGES images.

Listing is what scripts and humans run most, and each run is a fresh interpreter, so the time is
nearly all start-up (imports). The store is real: CTL_IMAGES images built by umoci, each with a
small layer of its own, imported by overlayctl; two containers, mounted once and unmounted, give
``ps -a`` rows to list.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path

from .errors import BenchError
from .mounting import fstype_at
from .processes import run, timed
from .settings import CTL_IMAGES, CTL_RUNS, TOOL_TIMEOUT, VENV_BIN

CTL = str(VENV_BIN / "overlayctl")
CONTAINERS = 2  # stopped containers in the store, listed by ps -a


def _layer(n: int) -> bytes:
    """A tiny layer tar of its own for image N: a directory and one file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        data = f"image {n}\n".encode()
        info = tarfile.TarInfo(f"etc/bench-{n}")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_store(work: Path) -> Path:
    """A store under WORK holding CTL_IMAGES images and CONTAINERS stopped containers."""
    layout, store = work / "ctl-layout", work / "ctl-store"
    run(["umoci", "init", "--layout", layout], TOOL_TIMEOUT)
    run(["umoci", "new", "--image", f"{layout}:empty"], TOOL_TIMEOUT)
    for n in range(CTL_IMAGES):
        tar = work / f"ctl-layer-{n}.tar"
        tar.write_bytes(_layer(n))
        run(["umoci", "raw", "add-layer", "--image", f"{layout}:empty", "--tag", f"img{n}", tar], TOOL_TIMEOUT)
        tar.unlink()
        run([CTL, "--root", store, "image", "import", f"{layout}:img{n}", "--tag", f"bench/img{n}:latest"],
            TOOL_TIMEOUT)
    for n in range(CONTAINERS):
        mnt = work / f"ctl-mnt-{n}"
        mnt.mkdir()
        name = f"bench-{n}"
        try:
            run([CTL, "--root", store, "mount", "--name", name, f"bench/img{n}:latest", mnt], TOOL_TIMEOUT)
        finally:
            if fstype_at(mnt) is not None:
                run([CTL, "--root", store, "umount", name], TOOL_TIMEOUT, check=False)
            if fstype_at(mnt) is not None:
                with contextlib.suppress(BenchError):
                    run(["fusermount3", "-u", "-z", mnt], TOOL_TIMEOUT, check=False)
    return store


def measure(store: Path, timeout: float) -> dict[str, list[float]]:
    """CTL_RUNS timings of each listing command."""
    commands = {"ctl-image-ls": [CTL, "--root", str(store), "image", "ls"],
                "ctl-ps": [CTL, "--root", str(store), "ps", "-a"]}
    return {name: [timed(cmd, timeout) for _ in range(CTL_RUNS)] for name, cmd in commands.items()}
