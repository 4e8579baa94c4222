"""``overlayctl service run NAME``: check the config, then become the daemon.

The unit's ExecStart runs this; it execs ``overlayfuse -f`` in place, so the daemon keeps the
unit's main PID and its ``$NOTIFY_SOCKET``: systemd hears READY=1 from the process it started,
and its SIGTERM reaches the daemon itself. The daemon detaches a mount left dead by a killed
predecessor before it mounts (the config check accepts such a mountpoint), which is what makes
``Restart=on-failure`` after a crash work.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

from ..containers.lifecycle import control_address, create_container, daemon_alive
from ..errors import ConfigError, UserError
from ..images.store import Store
from ..linux import mounttable
from .config import MountConfig, MountPlan, daemon_args, load_config, locate, plan_mount, store_root

log = logging.getLogger(__name__)


def daemon_command() -> list[str]:
    """How to start the daemon: the ``overlayfuse`` script beside this interpreter, else the module.

    The script gives the process the name ``overlayfuse`` (in ps, and in the journal's _COMM=).
    """
    script = Path(sys.executable).parent / "overlayfuse"
    if os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "overlayfuse.daemon.cli"]


def prepare(
    name_or_file: str, configs: str | os.PathLike[str] | None = None, store: str | None = None
) -> MountPlan:
    """Load and check the config NAME_OR_FILE; raises `ConfigError` with what is wrong.

    A container the config names is created from its image if need be, and recorded as mounted
    by this process (the daemon it becomes keeps the pid), so ``overlayctl ps`` shows it and
    ``overlayctl commit`` freezes it through its control socket.
    """
    name, path = locate(name_or_file, configs)
    config = load_config(path, name)
    plan = plan_mount(config, store)
    if config.container is None:
        return plan
    try:
        opened = Store.open(store_root(config, store))
        if plan.new_container:
            assert config.image is not None
            create_container(opened, config.container, config.image, read_only=config.read_only)
            plan = plan_mount(config, store)
        _claim_container(opened, config, plan)
    except ConfigError:
        raise
    except UserError as exc:
        raise ConfigError(f"{path}: container: {exc}") from None
    # The same control socket `overlayctl mount` gives a container: `commit` freezes the mount by it.
    return dataclasses.replace(plan, extra_options=(f"control={control_address(opened, config.container)}",))


def _claim_container(store: Store, config: MountConfig, plan: MountPlan) -> None:
    assert config.container is not None
    target = plan.mountpoint
    with store.locked():
        record = store.container(config.container)
        if record.mountpoint and daemon_alive(record.pid, record.mountpoint):
            where = "there" if record.mountpoint == target else f"on {record.mountpoint}"
            raise ConfigError(
                f"{config.path}: container: {record.name} is already mounted {where} (pid {record.pid})"
            )
        store.save_container(
            dataclasses.replace(record, mountpoint=target, pid=os.getpid(), read_only=plan.read_only)
        )


def release_container(
    name_or_file: str, configs: str | os.PathLike[str] | None = None, store: str | None = None
) -> str | None:
    """After the daemon exited (the unit's ExecStopPost): forget the container's mount if it ended
    cleanly. A dead mount (the daemon was killed) stays recorded, so ``ps`` shows it dead until the
    next start detaches it. Returns what was done, or None when there was nothing to do."""
    name, path = locate(name_or_file, configs)
    config = load_config(path, name)
    if config.container is None:
        return None
    root = store_root(config, store)
    if not os.path.isdir(root):
        return None
    opened = Store.open(root)
    with opened.locked():
        try:
            record = opened.container(config.container)
        except UserError:
            return None
        if record.mountpoint is None or daemon_alive(record.pid, record.mountpoint):
            return None
        if mounttable.is_dead_fuse_mount(record.mountpoint):
            return f"container {record.name}: its mount on {record.mountpoint} is dead (kept for ps)"
        opened.save_container(dataclasses.replace(record, mountpoint=None, pid=None, read_only=False))
    return f"container {record.name}: unmounted from {record.mountpoint}"


def exec_daemon(plan: MountPlan, debug: bool = False) -> None:
    """Replace this process with the daemon serving PLAN; returns only if the exec fails (OSError)."""
    argv = daemon_command() + daemon_args(plan, debug=debug)
    log.info("%s: exec %s", plan.config.name, " ".join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
