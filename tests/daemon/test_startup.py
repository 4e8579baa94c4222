"""What each command imports on its way: start-up is on the path of every container start.

Each case runs a fresh interpreter (the venv's, as the installed commands do), takes one path
through `overlayfuse.daemon.cli` or `overlayfuse.ctl`, and prints the modules that path loaded. The
assertions are on module names, never on time: speed is scripts/bench's business.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mounts import daemon_pids, overlayfuse, run_isolated
from tests.support.trees import File, make_tree

#: A fresh interpreter importing the daemon takes well under a second; this only bounds a hang.
SUBPROCESS_TIMEOUT = 60

#: What the daemon needs and option parsing must not load: ~0.15 s of imports together.
EVENT_LOOP = ("trio", "pyfuse3")
#: Never in the daemon: image store, registry client (httpx), systemd glue.
NOT_IN_DAEMON = ("overlayfuse.images", "overlayfuse.containers", "overlayfuse.service", "overlayfuse.ctl", "httpx")
#: What pyfuse3 imported only to read its own version (patches/pyfuse3 0004 reads it when asked for).
VERSION_LOOKUP = ("importlib.metadata", "email", "zipfile", "pickle")


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


_DAEMON_PROBE = """
import json, sys
import overlayfuse.daemon.cli, overlayfuse.daemon.mount
version_read = "__version__" in vars(sys.modules["pyfuse3._pyfuse3"])
print(json.dumps({"modules": sorted(sys.modules), "pyfuse3_version_read": version_read}))
"""


def test_the_daemon_loads_no_image_or_service_code() -> None:
    """Everything the mounting path imports (the CLI, then `daemon` and all it pulls in); with
    patches/pyfuse3, not the metadata machinery pyfuse3 used to read its version at import."""
    done = subprocess.run([sys.executable, "-c", _DAEMON_PROBE], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    modules = set(result["modules"])
    assert {"trio", "pyfuse3", "overlayfuse.daemon.fs", "overlayfuse.linux.journal"} <= modules
    assert imported(modules, NOT_IN_DAEMON) == []
    if "+overlayfuse." in importlib.metadata.version("pyfuse3"):  # built by scripts/setup with patches/pyfuse3
        assert not result["pyfuse3_version_read"]  # 0004: read when asked for, not at import
        assert imported(modules, VERSION_LOOKUP) == []


def test_pyfuse3_version_still_reads() -> None:
    """The version, read on demand (patch 0004), is the installed distribution's."""
    code = ("import importlib.metadata, pyfuse3, pyfuse3._pyfuse3\n"
            "assert pyfuse3.__version__ == pyfuse3._pyfuse3.__version__ == importlib.metadata.version('pyfuse3')\n"
            "print(pyfuse3.__version__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("3.5.0"), done.stderr


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
    unwanted = ("httpx", "overlayfuse.images.registry", "overlayfuse.images.importer", "overlayfuse.service",
                # the option parser and the union code (ps needs only the mount type's name)
                "overlayfuse.daemon.options", "overlayfuse.overlay")
    assert imported(modules, EVENT_LOOP + unwanted) == []
    assert not store.exists()  # listing a missing store creates nothing


def test_service_install_help_names_the_units_real_default_dir() -> None:
    """ctl.service keeps its own copy of the default so --help does not import the installer."""
    from overlayfuse.ctl.service import DEFAULT_UNIT_DIR
    from overlayfuse.service.install import UNIT_DIR

    assert Path(DEFAULT_UNIT_DIR) == UNIT_DIR


_NO_LDCONFIG_PROBE = """
import json, subprocess
started = []
real_init = subprocess.Popen.__init__
def spy(self, args, *rest, **kwargs):
    started.append(str(args))
    real_init(self, args, *rest, **kwargs)
subprocess.Popen.__init__ = spy
from overlayfuse.linux.libc import pthread_in_libc
with pthread_in_libc():
    import trio
import ctypes.util
print(json.dumps({"started": started, "restored": ctypes.util.find_library.__module__}))
"""


def test_trio_imports_without_running_ldconfig() -> None:
    """linux.libc: trio's find_library("pthread") at import is answered without `ldconfig -p`."""
    from overlayfuse.linux.libc import PTHREAD_IN_LIBC_SINCE, glibc_version

    version = glibc_version()
    if version is None or version < PTHREAD_IN_LIBC_SINCE:
        pytest.skip(f"glibc {version}: pthread is not in libc here, so find_library is asked as usual")
    done = subprocess.run([sys.executable, "-c", _NO_LDCONFIG_PROBE], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"started": [], "restored": "ctypes.util"}


def test_daemon_threads_keep_their_names(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """trio still names its worker threads (pthread_setname_np found in libc, see linux.libc)."""
    lower = make_tree(tmp_path / "lower", File("hello", b"hello\n"))
    with overlayfuse(tmp_path / "mnt", [lower]):
        assert run_isolated(read_file, str(tmp_path / "mnt" / "hello"), timeout=30) == b"hello\n"
        (pid,) = daemon_pids(tmp_path / "mnt")
        names = {(task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()}
    assert any(name.startswith("Trio thread") for name in names), names


_GC_PROBE = """
import contextlib, gc, io, json, sys
seen = {{}}
def on_import(event, args):
    if event == "import" and args[0] == {watch!r}:
        seen["during_import"] = gc.isenabled()
sys.addaudithook(on_import)
from overlayfuse import commands
sys.argv = [{command!r}, "--version"]
with contextlib.redirect_stdout(io.StringIO()):
    try:
        getattr(commands, {command!r})()
    except SystemExit:
        pass
print(json.dumps({{**seen, "after": gc.isenabled()}}))
"""


@pytest.mark.parametrize(("command", "watch"), [("overlayfuse", "overlayfuse.daemon.options"),
                                                ("overlayctl", "overlayfuse.ctl.images")])
def test_commands_import_with_the_collector_off_and_turn_it_on(command: str, watch: str) -> None:
    """overlayfuse.commands: the collector is off while the command imports (WATCH is one of its
    modules) and on again once it ran, whichever way it ended."""
    code = _GC_PROBE.format(command=command, watch=watch)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"during_import": False, "after": True}


def test_importing_the_command_modules_leaves_the_collector_alone() -> None:
    """Tests and tools import daemon.cli and ctl: only the installed commands turn the collector off."""
    code = "import gc, overlayfuse.daemon.cli, overlayfuse.ctl, overlayfuse.ctl.service; print(gc.isenabled())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
