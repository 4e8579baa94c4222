"""What each command imports on its way: start-up is on the path of every container start.

Each case runs a fresh interpreter (the venv's, as the installed commands do), takes one path
through `overlayfuse.daemon.cli` or `overlayfuse.ctl`, and prints the modules that path loaded. The
assertions are on module names, never on time: speed is scripts/bench's business.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: A fresh interpreter importing the daemon takes well under a second; this only bounds a hang.
SUBPROCESS_TIMEOUT = 60

#: What the daemon needs and option parsing must not load: ~0.15 s of imports together.
EVENT_LOOP = ("trio", "pyfuse3")
#: Never in the daemon: image store, registry client (httpx), systemd glue.
NOT_IN_DAEMON = ("overlayfuse.images", "overlayfuse.containers", "overlayfuse.service", "overlayfuse.ctl", "httpx")

_PROBE = """
import contextlib, io, json, sys
from {module} import main
status = None
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        status = main({argv!r})
    except SystemExit as exc:
        status = exc.code
print(json.dumps({{"status": status, "modules": sorted(sys.modules)}}))
"""


def loaded_by(module: str, argv: list[str]) -> tuple[object, set[str]]:
    """Run MODULE's ``main(ARGV)`` in a fresh interpreter: its exit status and every module loaded."""
    code = _PROBE.format(module=module, argv=argv)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    return result["status"], set(result["modules"])


def imported(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    """The modules in MODULES that are PACKAGES or inside them."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_overlayfuse_version_and_help_load_no_event_loop(flag: str) -> None:
    status, modules = loaded_by("overlayfuse.daemon.cli", [flag])
    assert status == 0
    assert "overlayfuse.daemon.options" in modules  # the probe did take the option-parsing path
    assert imported(modules, EVENT_LOOP + NOT_IN_DAEMON) == []


def test_overlayfuse_bad_input_fails_before_loading_the_event_loop(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    missing_lower = tmp_path / "no-such-lower"
    for argv in (
        ["-o", "upperdir=/x", str(tmp_path / "mnt")],  # malformed: no lowerdir
        ["-o", f"lowerdir={missing_lower}", str(tmp_path / "mnt")],  # parsed, then refused by validate
    ):
        status, modules = loaded_by("overlayfuse.daemon.cli", argv)
        assert status in (1, 2), argv
        assert imported(modules, EVENT_LOOP + NOT_IN_DAEMON) == [], argv
    assert not missing_lower.exists()


def test_the_daemon_loads_no_image_or_service_code() -> None:
    """Everything the mounting path imports (the CLI, then `daemon` and all it pulls in)."""
    code = "import json, sys, overlayfuse.daemon.cli, overlayfuse.daemon.mount; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout))
    assert {"trio", "pyfuse3", "overlayfuse.daemon.fs", "overlayfuse.linux.journal"} <= modules
    assert imported(modules, NOT_IN_DAEMON) == []


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["image", "--help"], ["service", "install", "--help"]])
def test_overlayctl_parsing_loads_argparse_only(argv: list[str]) -> None:
    status, modules = loaded_by("overlayfuse.ctl", argv)
    assert status == 0
    unwanted = (*EVENT_LOOP, "overlayfuse.images", "overlayfuse.containers", "overlayfuse.service", "httpx")
    assert imported(modules, unwanted) == []


@pytest.mark.parametrize("argv", [["image", "ls"], ["ps", "-a"]])
def test_overlayctl_listing_loads_no_registry_client_or_importer(tmp_path: Path, argv: list[str]) -> None:
    store = tmp_path / "store"
    status, modules = loaded_by("overlayfuse.ctl", ["--root", str(store), *argv])
    assert status == 0
    assert "overlayfuse.images.store" in modules  # it did list, from the store
    unwanted = ("httpx", "overlayfuse.images.registry", "overlayfuse.images.importer", "overlayfuse.service")
    assert imported(modules, EVENT_LOOP + unwanted) == []
    assert not store.exists()  # listing a missing store creates nothing


def test_service_install_help_names_the_units_real_default_dir() -> None:
    """ctl.service keeps its own copy of the default so --help does not import the installer."""
    from overlayfuse.ctl.service import DEFAULT_UNIT_DIR
    from overlayfuse.service.install import UNIT_DIR

    assert Path(DEFAULT_UNIT_DIR) == UNIT_DIR
