"""Install the unit and a config where systemd and ``overlayctl service run`` look for them.

``overlayctl service install NAME`` puts ``overlayfuse@.service`` in /etc/systemd/system (when it is
missing or differs) and, when /etc/overlayfuse/NAME.conf does not exist yet, writes one: the given
``--config`` file, else the example with NAME filled in. A config that exists is never overwritten:
it is the administrator's. systemd is asked to reload only when it runs (``/run/systemd/system``
exists, as sd_booted(3) checks) and the unit went where it looks.

The unit and the example live in the source tree's ``systemd/`` directory (the project is installed
editable by scripts/setup); installing them copies those files, so what is tested is what is
installed. Both target directories can be moved (options, or ``$OVERLAYFUSE_UNIT_DIR`` and
``$OVERLAYFUSE_CONFIG_DIR``), which is how the tests install into a temporary root.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, UserError
from ..images.store import write_file_atomic
from .config import CONFIG_DIR, CONFIG_DIR_ENV, SUFFIX, check_name, config_dir, load_config

log = logging.getLogger(__name__)

UNIT_NAME = "overlayfuse@.service"
EXAMPLE_NAME = "overlayfuse.conf.example"
UNIT_DIR = Path("/etc/systemd/system")
UNIT_DIR_ENV = "OVERLAYFUSE_UNIT_DIR"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "systemd"
#: Where the unit's ExecStart= expects overlayctl (scripts/setup links it there).
DEFAULT_OVERLAYCTL = "/usr/local/bin/overlayctl"
NAME_PLACEHOLDER = "@NAME@"
CONFIG_PLACEHOLDER = "@CONFIG@"
CHECK_PLACEHOLDER = "@CHECK@"
#: Where systemd looks for system units (systemd.unit(5)); a unit elsewhere must be linked first.
SYSTEMD_UNIT_DIRS = tuple(
    Path(d) for d in ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                      "/usr/lib/systemd/system", "/lib/systemd/system")
)  # fmt: skip
#: daemon-reload waits for systemd to re-read every unit: seconds, on a busy machine.
RELOAD_TIMEOUT = 60


@dataclass(frozen=True, slots=True)
class Installed:
    """What `install` did, for the command to report."""

    unit: Path
    unit_action: str  # "installed", "updated" or "unchanged"
    config: Path
    config_action: str  # "written", "copied from FILE" or "kept"
    reloaded: bool
    check_command: str
    """How to check the installed config, with ``--config-dir`` when it is not the default."""
    start_steps: tuple[str, ...]
    """The commands that start the mount (a ``systemctl link`` first if systemd does not look there)."""


def unit_dir(override: str | os.PathLike[str] | None = None) -> Path:
    return Path(override or os.environ.get(UNIT_DIR_ENV) or UNIT_DIR)


def systemd_running() -> bool:
    """Whether systemd is the service manager of this machine (sd_booted's test)."""
    return os.path.isdir("/run/systemd/system")


def unit_text(overlayctl: str | None = None, configs: Path | None = None) -> str:
    """The unit as it should be installed: its ExecStart names an overlayctl that exists, and the
    config dir CONFIGS when that is not the default (systemd passes no $OVERLAYFUSE_CONFIG_DIR).

    The unit in the tree runs /usr/local/bin/overlayctl; where that is missing, its Exec lines get the
    path of the overlayctl doing the install (OVERLAYCTL, else this process's, else on PATH).
    """
    text = _read_source(UNIT_NAME)
    if configs is not None and not _same_dir(configs, CONFIG_DIR):
        where = _systemd_quote(os.path.abspath(configs))
        for action in ("run", "cleanup"):
            text = text.replace(f" service {action} %i", f" service {action} --config-dir {where} %i")
        text = text.replace(f"({CONFIG_DIR}/%i.conf)", f"({os.path.abspath(configs)}/%i.conf)")
    if os.access(DEFAULT_OVERLAYCTL, os.X_OK):
        return text
    binary = overlayctl or _this_overlayctl()
    if binary is None:
        raise UserError(f"cannot find overlayctl to run from the unit: {DEFAULT_OVERLAYCTL} is missing")
    return text.replace(f"={DEFAULT_OVERLAYCTL} ", f"={binary} ").replace(f"=-{DEFAULT_OVERLAYCTL} ", f"=-{binary} ")


def example_config(name: str, configs: Path | None = None) -> str:
    """The example config, for mount NAME, saying where it lives (in CONFIGS) and how to check it."""
    check_name(name)
    directory = Path(os.path.abspath(configs)) if configs is not None else CONFIG_DIR
    return (
        _read_source(EXAMPLE_NAME)
        .replace(CONFIG_PLACEHOLDER, str(directory / f"{name}{SUFFIX}"))
        .replace(CHECK_PLACEHOLDER, check_command(name, directory))
        .replace(NAME_PLACEHOLDER, name)
    )


def check_command(name: str, configs: Path) -> str:
    """``overlayctl check NAME``, with ``--config-dir`` when CONFIGS is not where it looks by default."""
    if _same_dir(configs, CONFIG_DIR) and not os.environ.get(CONFIG_DIR_ENV):
        return f"overlayctl check {name}"
    return f"overlayctl check {name} --config-dir {shlex.quote(os.path.abspath(configs))}"


def _same_dir(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (a.exists() and b.exists() and a.resolve() == b.resolve())


def _systemd_quote(path: str) -> str:
    """PATH as one word of an Exec= line (systemd.service(5): double quotes, backslash escapes)."""
    if all(c.isalnum() or c in "/._-+" for c in path):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def install(
    name: str,
    *,
    config_file: str | os.PathLike[str] | None = None,
    units: str | os.PathLike[str] | None = None,
    configs: str | os.PathLike[str] | None = None,
    reload: bool = True,
) -> Installed:
    """Install the unit and NAME's config (see the module's docstring); nothing half-done on error."""
    check_name(name)
    target_units, target_configs = unit_dir(units), config_dir(configs)
    text = unit_text(configs=target_configs)
    if config_file is not None:
        source = Path(config_file)
        load_config(source, name)  # its shape at least: a file that is not a config stays out
        config_content = source.read_bytes()
    else:
        source = None
        config_content = example_config(name, target_configs).encode()

    unit_path = target_units / UNIT_NAME
    config_path = target_configs / f"{name}{SUFFIX}"
    if config_path.exists() and source is not None and config_path.read_bytes() != config_content:
        raise ConfigError(f"{config_path} exists and differs from {source}: not overwriting it (edit or remove it)")

    unit_action = _write_if_changed(unit_path, text.encode(), mode=0o644)
    if config_path.exists():
        config_action = "kept"
    else:
        _write_if_changed(config_path, config_content, mode=0o644)
        config_action = f"copied from {source}" if source is not None else "written"

    reloaded = False
    default_place = unit_path.parent.resolve() == UNIT_DIR.resolve()
    if reload and unit_action != "unchanged" and default_place and systemd_running():
        _daemon_reload()
        reloaded = True
    start = f"systemctl enable --now overlayfuse@{name}"
    if any(_same_dir(unit_path.parent, d) for d in SYSTEMD_UNIT_DIRS):
        steps: tuple[str, ...] = (start,)
    else:  # systemd would not find it: `systemctl link` makes it known (and the reload with it)
        steps = (f"systemctl link {shlex.quote(os.path.abspath(unit_path))}", start)
    return Installed(
        unit_path, unit_action, config_path, config_action, reloaded, check_command(name, target_configs), steps
    )


def _read_source(filename: str) -> str:
    path = SOURCE_DIR / filename
    try:
        return path.read_text()
    except OSError as exc:
        raise UserError(
            f"{path}: {exc.strerror or exc} (overlayctl installs the unit from its source tree's systemd/)"
        ) from None


def _this_overlayctl() -> str | None:
    candidates = [sys.argv[0] if os.path.basename(sys.argv[0]) == "overlayctl" else None,
                  str(Path(sys.executable).parent / "overlayctl"), shutil.which("overlayctl")]  # fmt: skip
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None


def _write_if_changed(path: Path, content: bytes, mode: int) -> str:
    """Write CONTENT to PATH atomically unless it is there already; say what happened."""
    try:
        if path.read_bytes() == content:
            return "unchanged"
        action = "updated"
    except FileNotFoundError:
        action = "installed"
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, content)
        os.chmod(path, mode)  # MODE whatever the umask
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    log.info("%s %s", action, path)
    return action


def _daemon_reload() -> None:
    try:
        proc = subprocess.run(
            ["systemctl", "daemon-reload"], capture_output=True, text=True, timeout=RELOAD_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"systemctl daemon-reload: {exc}") from None
    if proc.returncode != 0:
        raise UserError(f"systemctl daemon-reload failed: {proc.stderr.strip() or proc.returncode}")
