"""``overlayctl`` subcommands for mounts run as system services.

    overlayctl check NAME|FILE                       what the config will mount, or what is wrong
    overlayctl service run NAME|FILE                 check, then exec the daemon (the unit's ExecStart)
    overlayctl service install NAME [--config FILE]  the unit, and a config if there is none
    overlayctl service cleanup NAME|FILE             the unit's ExecStopPost (container records)

NAME means /etc/overlayfuse/NAME.conf (``--config-dir`` or ``$OVERLAYFUSE_CONFIG_DIR`` move it);
anything with a slash or ending in ``.conf`` is a file.
"""

from __future__ import annotations

import argparse
import logging

from ..errors import ConfigError
from ..linux.journal import configure_logging, print_error

log = logging.getLogger(__name__)

#: `overlayfuse.service.install.UNIT_DIR`, for --help: that module (and the image store it writes
#: with) is imported only when ``service install`` runs.
DEFAULT_UNIT_DIR = "/etc/systemd/system"

#: sysexits.h's EX_CONFIG: the unit's RestartPreventExitStatus= names it, so a bad config is not
#: retried every two seconds (fixing the file and starting again is what helps).
EXIT_CONFIG = 78


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check`` and ``service {run,install}`` to COMMANDS."""
    check = commands.add_parser("check", help="check a mount config and say what it mounts")
    check.add_argument("config", metavar="NAME|FILE", help="a config name (/etc/overlayfuse/NAME.conf) or file")
    _config_dir_option(check)
    check.set_defaults(handler=do_check)

    service = commands.add_parser("service", help="run mounts as systemd services")
    actions = service.add_subparsers(dest="action", metavar="ACTION", required=True)
    run_parser = actions.add_parser(
        "run", help="check the config, then exec the daemon in the foreground (the unit's ExecStart)"
    )
    run_parser.add_argument("config", metavar="NAME|FILE")
    _config_dir_option(run_parser)
    run_parser.set_defaults(handler=do_run)

    cleanup = actions.add_parser(
        "cleanup", help="after the daemon exited (the unit's ExecStopPost): forget a container's clean unmount"
    )
    cleanup.add_argument("config", metavar="NAME|FILE")
    _config_dir_option(cleanup)
    cleanup.set_defaults(handler=do_cleanup)

    install_parser = actions.add_parser(
        "install", help="install overlayfuse@.service, and NAME's config when it has none"
    )
    install_parser.add_argument("name", metavar="NAME", help="the mount's name: overlayfuse@NAME")
    install_parser.add_argument(
        "--config", metavar="FILE", help="install FILE as NAME's config (default: an example to edit)"
    )
    _config_dir_option(install_parser)
    install_parser.add_argument(
        "--unit-dir", metavar="DIR",
        help=f"where to put the unit (default: $OVERLAYFUSE_UNIT_DIR, else {DEFAULT_UNIT_DIR})",
    )  # fmt: skip
    install_parser.add_argument(
        "--no-reload", action="store_true", help="do not run systemctl daemon-reload"
    )
    install_parser.set_defaults(handler=do_install)


def _config_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config-dir", metavar="DIR",
        help="where NAME.conf files are (default: $OVERLAYFUSE_CONFIG_DIR, else /etc/overlayfuse)",
    )  # fmt: skip


def do_check(args: argparse.Namespace) -> int:
    from ..service.config import load_config, locate, plan_mount

    name, path = locate(args.config, args.config_dir)
    plan = plan_mount(load_config(path, name), args.root)
    print(f"{name}: ok ({plan.describe()})")
    return 0


def do_run(args: argparse.Namespace) -> int:
    """Check, then exec the daemon. Errors are one line on stderr, which the journal files as err."""
    from ..service import run

    configure_logging("overlayctl", logging.DEBUG if args.debug else logging.INFO)
    try:
        plan = run.prepare(args.config, args.config_dir, args.root)
    except ConfigError as exc:
        print_error("overlayctl", str(exc))
        return EXIT_CONFIG
    try:
        run.exec_daemon(plan, debug=args.debug)
    except OSError as exc:
        print_error("overlayctl", f"cannot start the daemon: {exc.strerror or exc}")
    return 1


def do_cleanup(args: argparse.Namespace) -> int:
    from ..service import run

    configure_logging("overlayctl", logging.DEBUG if args.debug else logging.INFO)
    done = run.release_container(args.config, args.config_dir, args.root)
    if done:
        log.info("%s", done)
    return 0


def do_install(args: argparse.Namespace) -> int:
    from ..service import install

    done = install.install(
        args.name, config_file=args.config, units=args.unit_dir, configs=args.config_dir, reload=not args.no_reload
    )
    print(f"{done.unit}: {done.unit_action}")
    print(f"{done.config}: {done.config_action}")
    if done.reloaded:
        print("systemctl daemon-reload: done")
    if done.config_action == "written":
        print(f"edit {done.config}, then check it with: {done.check_command}")
    if len(done.start_steps) > 1:
        print(f"{done.unit.parent} is not where systemd looks for units: make it known with: {done.start_steps[0]}")
    print(f"start it now and at every boot with: {done.start_steps[-1]}")
    return 0
