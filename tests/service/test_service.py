"""Mounts as system services: the unit, configs, ``overlayctl check``, ``service run``/``install``, logs.

The unit is checked by ``systemd-analyze verify``. Configs are checked against a table of wrong
ones, each of which must name its key and its problem. ``service run`` is started as systemd
would start it (a notify socket in its environment, stderr to a file standing in for the journal)
and must become the daemon (READY=1 from the pid that was started), refuse a bad config with
EX_CONFIG and one error line, and recover from a ``kill -9`` of its predecessor.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from overlayfuse.ctl.service import EXIT_CONFIG
from overlayfuse.errors import ConfigError
from overlayfuse.linux.journal import JournalFormatter, syslog_priority, under_journal
from overlayfuse.service import install as service_install
from overlayfuse.service.config import daemon_args, load_config, plan_mount
from tests.conftest import skip_or_fail
from tests.support.imagebuild import missing_tools, new_image, repack_layer
from tests.support.mounts import REPO_ROOT, mount_at, mounts, overlayctl_binary, run, run_isolated, wait_mounted
from tests.support.servicetools import NotifyListener, daemon, faultfs
from tests.support.trees import File, make_tree

UNIT = REPO_ROOT / "systemd" / "overlayfuse@.service"
READY_TIMEOUT = 30.0
FUSE_TYPE = "fuse.overlayfuse"


def toml(**keys: Any) -> str:
    """KEYS as TOML (JSON's string escapes are TOML's for the strings used here)."""
    lines = []
    for key, value in keys.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = "[" + ", ".join(json.dumps(str(v)) if isinstance(v, (str, Path)) else json.dumps(v)
                                   for v in value) + "]"
        elif isinstance(value, Path):
            text = json.dumps(str(value))
        else:
            text = json.dumps(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Dirs:
    root: Path
    top: Path
    base: Path
    upper: Path
    work: Path
    mnt: Path
    conf_dir: Path

    def conf(self, text: str, name: str = "web") -> Path:
        path = self.conf_dir / f"{name}.conf"
        path.write_text(text)
        return path

    def good(self, **overrides: Any) -> dict[str, Any]:
        keys: dict[str, Any] = dict(mountpoint=self.mnt, lowerdirs=[self.top, self.base],
                                    upperdir=self.upper, workdir=self.work)
        keys.update(overrides)
        return {k: v for k, v in keys.items() if v is not None}


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    top = make_tree(tmp_path / "top", File("etc/motd", b"top\n"))
    base = make_tree(tmp_path / "base", File("etc/motd", b"base\n"), File("bin/sh", b"#!\n"))
    for name in ("upper", "work", "mnt", "etc"):
        (tmp_path / name).mkdir()
    return Dirs(tmp_path, top, base, tmp_path / "upper", tmp_path / "work", tmp_path / "mnt", tmp_path / "etc")


def ctl(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    binary = overlayctl_binary()
    if binary is None:
        skip_or_fail("overlayctl is not installed")
    return subprocess.run([str(binary), *map(os.fspath, args)], capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL, env=env)


def no_journal_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}


# --- the unit ------------------------------------------------------------------------------------


def _verify(unit: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        skip_or_fail("systemd-analyze missing (scripts/setup installs the systemd package)")
    proc = run(["systemd-analyze", "verify", unit], timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), (
        f"systemd-analyze verify {unit}: {proc.returncode}\n{proc.stdout.decode()}{proc.stderr.decode()}"
    )


def test_fork_server_unit_verifies(tmp_path: Path) -> None:
    """systemd/overlayfuse-fork-server.service (README: "Fork server") is a valid unit, and stopping
    it leaves the daemons it forked (the mounts of running containers) alone."""
    unit = UNIT.with_name("overlayfuse-fork-server.service")
    _verify(unit)
    assert "KillMode=process" in unit.read_text().splitlines()


@pytest.mark.parametrize("instance", ["", "web"], ids=["template", "instance"])
def test_unit_verifies(instance: str, tmp_path: Path) -> None:
    unit = tmp_path / f"overlayfuse@{instance}.service"
    shutil.copy(UNIT, unit)
    _verify(unit)


def _directives(unit: Path) -> dict[str, str]:
    found = {}
    for line in unit.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


#: Settings that run the service in a mount namespace of its own, where its mount would be invisible.
NAMESPACING = ["ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork",
               "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
               "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths",
               "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage",
               "MountAPIVFS", "PrivateUsers", "DynamicUser", "User"]


def test_unit_is_a_notify_service_that_keeps_its_mount_visible() -> None:
    unit = _directives(UNIT)
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert unit["ExecStart"] == "/usr/local/bin/overlayctl service run %i"
    assert unit["Restart"] == "on-failure"
    assert unit["RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert "@mount" in unit["SystemCallFilter"].split()
    assert {"CAP_SYS_ADMIN", "CAP_MKNOD"} <= set(unit["CapabilityBoundingSet"].split())
    assert [key for key in NAMESPACING if key in unit] == []
    assert "DeviceAllow" not in unit and "RestrictSUIDSGID" not in unit


# --- configs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bad:
    name: str
    text: Callable[[Dirs], str]
    expect: str  # a regular expression the message (after "PATH: ") must match at its start
    setup: Callable[[Dirs], None] = lambda d: None


def _file(path: Path) -> None:
    path.write_text("not a directory\n")


BAD = [
    Bad("not TOML", lambda d: "mountpoint = \n", r"not valid TOML: .*line 1"),
    Bad("not UTF-8", lambda d: "mountpoint = '\udcff'\n", r"not UTF-8"),
    Bad("unknown key", lambda d: toml(**d.good(), lowerdir=[d.top]),
        r"unknown key 'lowerdir' \(did you mean lowerdirs\? .*; known keys: "),
    Bad("mountpoint not a string", lambda d: toml(**d.good(mountpoint=5)),
        r"mountpoint: must be a string, not an integer"),
    Bad("lowerdirs a string", lambda d: toml(**d.good(lowerdirs=f"{d.top}:{d.base}")),
        r'lowerdirs: must be a list, not a string, e\.g\. lowerdirs = \["/layers/top"'),
    Bad("lowerdirs item not a string", lambda d: toml(**d.good(lowerdirs=[1])),
        r"lowerdirs\[0\]: must be a non-empty string, not an integer"),
    Bad("lowerdirs item empty", lambda d: toml(**d.good(lowerdirs=[d.top, ""])),
        r"lowerdirs\[1\]: must be a non-empty string"),
    Bad("read_only not a boolean", lambda d: toml(**d.good(read_only="yes")),
        r"read_only: must be true or false, not a string"),
    Bad("options a string", lambda d: toml(**d.good(options="nosuid")), r"options: must be a list, not a string"),
    Bad("options a table", lambda d: toml(**d.good()) + "[options]\nnosuid = true\n",
        r"options: must be a list, not a table"),
    Bad("relative lowerdir", lambda d: toml(**d.good(lowerdirs=["layers/top"])),
        r"lowerdirs\[0\]: 'layers/top' is relative: use an absolute path"),
    Bad("relative mountpoint", lambda d: toml(**d.good(mountpoint="mnt")), r"mountpoint: 'mnt' is relative"),
    Bad("empty upperdir", lambda d: toml(**d.good(upperdir="")), r"upperdir: is empty"),
    Bad("no mountpoint", lambda d: toml(**d.good(mountpoint=None)), r"mountpoint: missing"),
    Bad("nothing to mount", lambda d: toml(mountpoint=d.mnt), r"nothing to mount: give lowerdirs"),
    Bad("no lowerdirs", lambda d: toml(**d.good(lowerdirs=[])), r"lowerdirs: is empty"),
    Bad("lowerdirs and image", lambda d: toml(**d.good(image="debian:12")),
        r"lowerdirs and image are both given"),
    Bad("lowerdirs and container", lambda d: toml(**d.good(container="web")),
        r"lowerdirs and container are both given"),
    Bad("upperdir without workdir", lambda d: toml(**d.good(workdir=None)),
        r"upperdir is given without workdir: they go together"),
    Bad("workdir without upperdir", lambda d: toml(**d.good(upperdir=None)),
        r"workdir is given without upperdir"),
    Bad("upperdir with an image", lambda d: toml(mountpoint=d.mnt, image="debian:12", upperdir=d.upper,
                                                  workdir=d.work), r"upperdir: not used with an image"),
    Bad("store without an image", lambda d: toml(**d.good(store=d.root)), r"store: only used with image"),
    Bad("bad container name", lambda d: toml(mountpoint=d.mnt, image="debian:12", container="../etc"),
        r"container: invalid container name '\.\./etc'"),
    Bad("option with its own key", lambda d: toml(**d.good(options=["ro"])),
        r"options\[0\]: 'ro': say it with the read_only = true key"),
    Bad("lowerdir as an option", lambda d: toml(**d.good(options=[f"lowerdir={d.top}"])),
        r"options\[0\]: 'lowerdir=.*': say it with the lowerdirs key"),
    Bad("two options in one item", lambda d: toml(**d.good(options=["nosuid,nodev"])),
        r"options\[0\]: 'nosuid,nodev' has a comma"),
    Bad("unknown option", lambda d: toml(**d.good(options=["nosuid", "frobnicate=3"])),
        r"options: unknown mount option 'frobnicate=3'"),
    Bad("missing lowerdir", lambda d: toml(**d.good(lowerdirs=[d.top, d.root / "nope"])),
        r"lowerdirs\[1\]: .*/nope: no such directory"),
    Bad("lowerdir is a file", lambda d: toml(**d.good(lowerdirs=[d.root / "file"])),
        r"lowerdirs\[0\]: .*/file is not a directory", lambda d: _file(d.root / "file")),
    Bad("missing upperdir", lambda d: toml(**d.good(upperdir=d.root / "nope")), r"upperdir: .*/nope: no such"),
    Bad("missing mountpoint", lambda d: toml(**d.good(mountpoint=d.root / "nope")),
        r"mountpoint: .*/nope: no such directory"),
    Bad("mountpoint is a file", lambda d: toml(**d.good(mountpoint=d.root / "file")),
        r"mountpoint: .*/file is not a directory", lambda d: _file(d.root / "file")),
    Bad("mountpoint is a lowerdir", lambda d: toml(**d.good(mountpoint=d.base)),
        r"lowerdirs: .*/base is the mountpoint or inside it"),
    Bad("mountpoint inside the upperdir", lambda d: toml(**d.good(mountpoint=d.upper / "m")),
        r"mountpoint: .*/upper/m is inside upperdir", lambda d: (d.upper / "m").mkdir()),
    Bad("workdir inside upperdir (the daemon's rule)", lambda d: toml(**d.good(workdir=d.upper / "w")),
        r"workdir .*/upper/w is inside upperdir", lambda d: (d.upper / "w").mkdir()),
    Bad("no image store", lambda d: toml(mountpoint=d.mnt, image="debian:12", store=d.root / "nostore"),
        r"store: the image store .*/nostore does not exist"),
    Bad("image not in the store", lambda d: toml(mountpoint=d.mnt, image="debian:12", store=d.root / "store"),
        r"store: no such image: debian:12 \(in the store ", lambda d: (d.root / "store").mkdir()),
    Bad("container not in the store", lambda d: toml(mountpoint=d.mnt, container="web", store=d.root / "store"),
        r"container: no container web in the store .*; name an image", lambda d: (d.root / "store").mkdir()),
]


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_bad_config_names_key_and_problem(case: Bad, dirs: Dirs) -> None:
    case.setup(dirs)
    text = case.text(dirs)
    path = dirs.conf_dir / "web.conf"
    if "\udcff" in text:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
    else:
        path.write_text(text)
    with pytest.raises(ConfigError) as failure:
        plan_mount(load_config(path))
    message = str(failure.value)
    assert message.startswith(f"{path}: "), message
    assert re.match(case.expect, message.removeprefix(f"{path}: ")), message
    assert "\n" not in message


def test_missing_config_file_says_how_to_get_one(dirs: Dirs) -> None:
    with pytest.raises(ConfigError, match=r"web\.conf: no such config file \(overlayctl service install web"):
        load_config(dirs.conf_dir / "web.conf")


def test_good_config_becomes_the_daemon_command_line(dirs: Dirs) -> None:
    odd = make_tree(dirs.root / "with:colon,comma", File("x", b"x"))
    path = dirs.conf(toml(**dirs.good(lowerdirs=[odd, dirs.base], options=["nosuid", "noatime"])))
    plan = plan_mount(load_config(path))
    assert plan.read_only is False
    assert daemon_args(plan) == [
        "-f", "-o",
        rf"lowerdir={dirs.root}/with\:colon\,comma:{dirs.base},upperdir={dirs.upper},workdir={dirs.work},"
        "nosuid,noatime",
        "overlayfuse@web", str(dirs.mnt),
    ]  # fmt: skip
    assert plan.describe() == f"2 lowerdirs + upperdir {dirs.upper} on {dirs.mnt}, read-write"


def test_lowerdirs_alone_or_read_only_mount_read_only(dirs: Dirs) -> None:
    alone = plan_mount(load_config(dirs.conf(toml(**dirs.good(upperdir=None, workdir=None)))))
    assert alone.read_only and "ro" in daemon_args(alone)[2].split(",")
    forced = plan_mount(load_config(dirs.conf(toml(**dirs.good(read_only=True, debug=True)))))
    assert forced.read_only and daemon_args(forced)[0] == "-d"
    assert forced.describe().endswith("read-only")


# --- overlayctl check ------------------------------------------------------------------------------


def test_check_by_name_and_by_file(dirs: Dirs) -> None:
    path = dirs.conf(toml(**dirs.good()))
    expected = f"web: ok (2 lowerdirs + upperdir {dirs.upper} on {dirs.mnt}, read-write)\n"
    by_name = ctl("check", "web", "--config-dir", dirs.conf_dir)
    assert (by_name.returncode, by_name.stdout, by_name.stderr) == (0, expected, "")
    by_file = ctl("check", path)
    assert (by_file.returncode, by_file.stdout) == (0, expected)
    by_env = ctl("check", "web", env={**no_journal_env(), "OVERLAYFUSE_CONFIG_DIR": str(dirs.conf_dir)})
    assert (by_env.returncode, by_env.stdout) == (0, expected)


@pytest.mark.parametrize("target, expect", [
    ("web", r"web\.conf: lowerdirs\[1\]: .*/nope: no such directory"),
    ("absent", r"absent\.conf: no such config file"),
    ("bad name!", r"invalid mount name 'bad name!'"),
])  # fmt: skip
def test_check_failure_is_one_line(target: str, expect: str, dirs: Dirs) -> None:
    dirs.conf(toml(**dirs.good(lowerdirs=[dirs.top, dirs.root / "nope"])))
    proc = ctl("check", target, "--config-dir", dirs.conf_dir, env=no_journal_env())
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlayctl: error: "), proc.stderr
    assert re.search(expect, lines[0]), lines[0]


# --- service run ---------------------------------------------------------------------------------


def _service_run(dirs: Dirs, *extra: str) -> list[str]:
    binary = overlayctl_binary()
    if binary is None:
        skip_or_fail("overlayctl is not installed")
    return [str(binary), *extra, "service", "run", "web", "--config-dir", str(dirs.conf_dir)]


@pytest.mark.mount
def test_service_run_becomes_the_daemon(dirs: Dirs, tmp_path: Path, overlayfuse_bin: Path) -> None:
    dirs.conf(toml(**dirs.good(options=["nosuid"])))
    with (
        NotifyListener(path=tmp_path / "notify.sock") as listener,
        daemon(_service_run(dirs), dirs.mnt, env=listener.env()) as d,
    ):
        ready = listener.wait_for("READY=1", READY_TIMEOUT)
        assert ready.pid == d.proc.pid, "overlayctl must exec the daemon: systemd only hears its main pid"
        info = mount_at(dirs.mnt)
        assert info is not None and info.fstype == FUSE_TYPE and info.source == "overlayfuse@web"
        assert "nosuid" in info.mount_options.split(",")
        assert run_isolated(_read, str(dirs.mnt / "etc/motd"), timeout=30) == b"top\n"
        d.proc.send_signal(signal.SIGTERM)
        assert listener.wait_for("STOPPING=1", READY_TIMEOUT).pid == d.proc.pid
        assert d.wait() == 0
        assert mount_at(dirs.mnt) is None
    log = d.log_text()
    assert log.startswith("<6>web: exec "), log
    assert "Traceback" not in log


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.mount
def test_service_run_refuses_a_bad_config(dirs: Dirs, tmp_path: Path, overlayfuse_bin: Path) -> None:
    path = dirs.conf(toml(**dirs.good(upperdir=dirs.root / "nope")))
    with (
        NotifyListener(path=tmp_path / "notify.sock") as listener,
        daemon(_service_run(dirs), dirs.mnt, env=listener.env()) as d,
    ):
        assert d.wait(READY_TIMEOUT) == EXIT_CONFIG
        assert listener.pending() == []  # it has exited: all it ever sent is queued
        assert mount_at(dirs.mnt) is None
    assert d.log_text() == f"<3>{path}: upperdir: {dirs.root}/nope: no such directory\n"


@pytest.mark.mount
def test_service_restarts_over_the_dead_mount_of_a_killed_daemon(dirs: Dirs, tmp_path: Path,
                                                                 overlayfuse_bin: Path) -> None:
    dirs.conf(toml(**dirs.good()))
    with (
        NotifyListener(path=tmp_path / "notify.sock") as listener,
        daemon(_service_run(dirs), dirs.mnt, env=listener.env()) as first,
    ):
        listener.wait_for("READY=1", READY_TIMEOUT)
        first.proc.kill()
        first.wait()
        with pytest.raises(OSError) as dead:
            os.statvfs(dirs.mnt)
        assert dead.value.errno == errno.ENOTCONN
        check = ctl("check", "web", "--config-dir", dirs.conf_dir)
        assert check.returncode == 0 and "the dead mount there will be detached first" in check.stdout
        with daemon(_service_run(dirs), dirs.mnt, env=listener.env(),
                    log=tmp_path / "second.log") as second:
            assert listener.wait_for("READY=1", READY_TIMEOUT).pid == second.proc.pid
            assert sum(1 for m in mounts() if m.mountpoint == str(dirs.mnt)) == 1
            assert run_isolated(_read, str(dirs.mnt / "bin/sh"), timeout=30) == b"#!\n"
            second.proc.send_signal(signal.SIGTERM)
            assert second.wait() == 0
        assert "<4>" + f"{dirs.mnt}: detached a FUSE mount whose daemon had died" in second.log_text()
    assert mount_at(dirs.mnt) is None


# --- image and container configs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding test/svc, a one-layer image made by umoci and imported by our importer."""
    missing = missing_tools()
    if missing:
        skip_or_fail(missing)
    from overlayfuse.images.importer import import_image
    from overlayfuse.images.store import Store

    base = tmp_path_factory.mktemp("svc-image")
    layout, work = base / "layout", base / "work"
    work.mkdir()
    new_image(layout, "empty")
    repack_layer(layout, "empty", "svc", work, lambda rootfs: make_tree(rootfs, File("etc/motd", b"image\n")))
    import_image(Store.open(base / "store"), f"{layout}:svc", tags=["test/svc:latest"])
    return base / "store"


@pytest.mark.mount
def test_image_and_container_config(image_store: Path, dirs: Dirs, tmp_path: Path, overlayfuse_bin: Path) -> None:
    """The container is created on first start, recorded as mounted by the service's daemon (so
    ``ps`` and ``commit`` know), forgotten by the unit's ExecStopPost, and keeps its changes."""
    from overlayfuse.images.store import Store

    name = f"svc-{tmp_path.name}"[:60]
    dirs.conf(toml(mountpoint=dirs.mnt, image="test/svc", store=image_store), name="ro")
    ro = ctl("check", "ro", "--config-dir", dirs.conf_dir)
    assert ro.stdout == f"ro: ok (image test/svc (1 layer) on {dirs.mnt}, read-only)\n", ro.stderr

    dirs.conf(toml(mountpoint=dirs.mnt, image="test/svc", container=name, store=image_store))
    first = ctl("check", "web", "--config-dir", dirs.conf_dir)
    assert first.stdout == (f"web: ok (image test/svc, container {name} (created on first start) (1 layer) "
                            f"on {dirs.mnt}, read-write)\n"), first.stderr
    store = Store.open(image_store)
    with (
        NotifyListener(path=tmp_path / "notify.sock") as listener,
        daemon(_service_run(dirs), dirs.mnt, env=listener.env()) as d,
    ):
        assert listener.wait_for("READY=1", READY_TIMEOUT).pid == d.proc.pid
        assert run_isolated(_read, str(dirs.mnt / "etc/motd"), timeout=30) == b"image\n"
        run_isolated(_write, str(dirs.mnt / "etc/new"), b"kept\n", timeout=30)
        record = store.container(name)
        assert (record.mountpoint, record.pid) == (str(dirs.mnt), d.proc.pid)
        ps = json.loads(ctl("--root", image_store, "ps", "--json").stdout)
        # (ps also lists overlayfuse mounts that are no container's, unnamed: not this test's business)
        assert [(s["name"], s["state"]) for s in ps if s["name"]] == [(name, "running")]
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait() == 0
    cleanup = ctl("service", "cleanup", "web", "--config-dir", dirs.conf_dir, env=no_journal_env())
    assert cleanup.returncode == 0, cleanup.stderr
    assert store.container(name).mountpoint is None
    assert (image_store / "containers" / name / "upper" / "etc" / "new").read_bytes() == b"kept\n"
    again = ctl("check", "web", "--config-dir", dirs.conf_dir)
    assert again.stdout == f"web: ok (image test/svc, container {name} (1 layer) on {dirs.mnt}, read-write)\n"


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# --- logs ----------------------------------------------------------------------------------------


def test_journal_is_recognised_by_the_stream_it_names(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        fd = stream.fileno()
        assert under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd) is True
        assert under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fd) is False
        # A notify socket counts only when there is no JOURNAL_STREAM to say otherwise.
        assert under_journal({"JOURNAL_STREAM": "1:2", "NOTIFY_SOCKET": "/run/x"}, fd) is False
        assert under_journal({"NOTIFY_SOCKET": "/run/x"}, fd) is True
        assert under_journal({}, fd) is False


def test_journal_lines_carry_the_priority_on_every_line() -> None:
    assert [syslog_priority(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING,
                                                 logging.ERROR, logging.CRITICAL)] == [7, 6, 4, 3, 2]
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "first\nsecond", None, None)
    assert JournalFormatter("%(message)s").format(record) == "<3>first\n<3>second"


@pytest.mark.mount
@pytest.mark.parametrize("journal", [True, False], ids=["journal", "plain"])
def test_eio_reaches_the_log_with_its_cause(journal: bool, tmp_path: Path, overlayfuse_bin: Path) -> None:
    """A lower layer whose disk fails: the reader gets EIO, the log says which request and why.
    Without passthrough, which on this read-only mount would let the kernel read the file itself,
    never asking the daemon (tests/daemon/test_passthrough.py checks the reader's EIO there)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with faultfs(tmp_path / "control", tmp_path / "lower") as lower:
        listener = NotifyListener(path=tmp_path / "notify.sock")
        env = listener.env() if journal else no_journal_env()
        cmd = [str(overlayfuse_bin), "-f", "-o", f"lowerdir={lower},passthrough=off", str(mnt)]
        with listener, daemon(cmd, mnt, env=env) as d:
            wait_mounted(mnt, d.proc)
            assert run_isolated(_read, str(mnt / "ok"), timeout=30) == b"fine\n"
            with pytest.raises(OSError) as failure:
                run_isolated(_read, str(mnt / "broken"), timeout=30)
            assert failure.value.errno == errno.EIO
            d.proc.send_signal(signal.SIGTERM)
            assert d.wait() == 0
    errors = [line for line in d.log_text().splitlines() if "EIO" in line]
    assert errors, d.log_text()
    prefix = "<3>" if journal else "overlayfuse: ERROR "
    assert errors[0].startswith(prefix + "read("), errors
    assert "Input/output error" in errors[0]


@pytest.mark.mount
def test_debug_logs_each_request_at_debug_priority(dirs: Dirs, tmp_path: Path, overlayfuse_bin: Path) -> None:
    dirs.conf(toml(**dirs.good(debug=True)))
    with (
        NotifyListener(path=tmp_path / "notify.sock") as listener,
        daemon(_service_run(dirs), dirs.mnt, env=listener.env()) as d,
    ):
        listener.wait_for("READY=1", READY_TIMEOUT)
        assert run_isolated(_read, str(dirs.mnt / "etc/motd"), timeout=30) == b"top\n"
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait() == 0
    lines = d.log_text().splitlines()
    assert any(line.startswith("<7>lookup(") and "b'motd'" in line for line in lines), lines
    assert any(line.startswith("<7>open(") for line in lines), lines


# --- service install -----------------------------------------------------------------------------


def _install(tmp_path: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return ctl("service", "install", *args, "--unit-dir", tmp_path / "units", "--config-dir",
               tmp_path / "etc-overlayfuse", env=no_journal_env())


def test_install_into_a_temporary_root(tmp_path: Path) -> None:
    first = _install(tmp_path, "web")
    assert first.returncode == 0, first.stderr
    unit, conf = tmp_path / "units" / "overlayfuse@.service", tmp_path / "etc-overlayfuse" / "web.conf"
    # Neither directory is where overlayctl and systemd look by default: the hints say how to reach them.
    assert first.stdout.splitlines() == [
        f"{unit}: installed",
        f"{conf}: written",
        f"edit {conf}, then check it with: overlayctl check web --config-dir {conf.parent}",
        f"{unit.parent} is not where systemd looks for units: make it known with: systemctl link {unit}",
        "start it now and at every boot with: systemctl enable --now overlayfuse@web",
    ]
    if os.access(service_install.DEFAULT_OVERLAYCTL, os.X_OK):  # the tree's unit, told where the configs are
        expected = (UNIT.read_text().replace(" service run %i", f" service run --config-dir {conf.parent} %i")
                    .replace(" service cleanup %i", f" service cleanup --config-dir {conf.parent} %i")
                    .replace("(/etc/overlayfuse/%i.conf)", f"({conf.parent}/%i.conf)"))
        assert unit.read_text() == expected
    else:
        skip_or_fail(f"{service_install.DEFAULT_OVERLAYCTL} missing (scripts/setup creates it): "
                     "the installed unit cannot be compared with systemd/overlayfuse@.service")
    _verify(unit)
    assert unit.stat().st_mode & 0o777 == 0o644
    # The example is a config of the right shape, for mount "web", waiting for real paths.
    example = load_config(conf)
    assert (example.name, example.mountpoint) == ("web", "/mnt/web")
    assert "@NAME@" not in conf.read_text()

    conf.write_text(conf.read_text() + "# edited\n")
    second = _install(tmp_path, "web")
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[:2] == [f"{unit}: unchanged", f"{conf}: kept"]
    assert conf.read_text().endswith("# edited\n"), "an existing config is never overwritten"


def test_install_with_a_config_file(tmp_path: Path, dirs: Dirs) -> None:
    mine = tmp_path / "mine.conf"
    mine.write_text(toml(**dirs.good()))
    done = _install(tmp_path, "db", "--config", mine)
    assert done.returncode == 0, done.stderr
    conf = tmp_path / "etc-overlayfuse" / "db.conf"
    assert conf.read_bytes() == mine.read_bytes()
    assert f"{conf}: copied from {mine}" in done.stdout

    mine.write_text(toml(**dirs.good(read_only=True)))
    clash = _install(tmp_path, "db", "--config", mine)
    assert clash.returncode == 1 and clash.stdout == ""
    assert clash.stderr == (f"overlayctl: error: {conf} exists and differs from {mine}: "
                            "not overwriting it (edit or remove it)\n")
    assert "read_only" not in conf.read_text()


@pytest.mark.parametrize("args, expect", [
    (["bad/name"], "invalid mount name 'bad/name'"),
    ([".web"], "invalid mount name '.web'"),
    (["web", "--config", "/nonexistent/web.conf"], "/nonexistent/web.conf: no such config file"),
])  # fmt: skip
def test_install_refuses_bad_input_and_writes_nothing(args: list[str], expect: str, tmp_path: Path) -> None:
    proc = _install(tmp_path, *args)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and expect in proc.stderr, proc.stderr
    assert not (tmp_path / "units").exists() and not (tmp_path / "etc-overlayfuse").exists()
