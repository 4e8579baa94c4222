"""``overlayctl`` subcommands for containers: mount, umount, ps, rm, diff, commit.

Parsing and printing only: the work is in `overlayfuse.containers.lifecycle` and
`overlayfuse.containers.commit`, imported by the subcommand that needs it (see `overlayfuse.ctl`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this group's subcommands to COMMANDS."""
    mount = commands.add_parser(
        "mount", help="mount a container of an image (created on first use)",
        description="Mount IMAGE (a tag, an id or an id prefix) as a new container on MOUNTPOINT, or an "
        "existing container by its name. Returns once the mount answers.",
    )  # fmt: skip
    mount.add_argument("image", metavar="IMAGE", help="an image, or an existing container's name")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
    mount.add_argument("--name", help="the container's name (default: a new docker-like name)")
    mount.add_argument("--ro", action="store_true", help="mount read-only (the container's changes are shown)")
    mount.set_defaults(handler=cmd_mount)

    umount = commands.add_parser("umount", help="unmount a container", description="Unmount a container.")
    umount.add_argument("target", metavar="NAME|MOUNTPOINT")
    umount.set_defaults(handler=cmd_umount)

    ps = commands.add_parser(
        "ps", help="list containers and overlayfuse mounts",
        description="List mounted containers (running or dead) and other overlayfuse mounts; -a adds stopped ones.",
    )  # fmt: skip
    ps.add_argument("-a", "--all", action="store_true", help="also list containers that are not mounted")
    ps.add_argument("--json", action="store_true", help="print JSON")
    ps.set_defaults(handler=cmd_ps)

    rm = commands.add_parser(
        "rm", help="remove containers",
        description="Remove containers and their changes: all of them, or none if one cannot go.",
    )  # fmt: skip
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("-f", "--force", action="store_true", help="unmount them first if they are mounted")
    rm.set_defaults(handler=cmd_rm)

    container = commands.add_parser("container", help="manage containers (prune)")
    actions = container.add_subparsers(dest="container_command", metavar="SUBCOMMAND")
    container.set_defaults(handler=lambda args: _usage(container))
    prune = actions.add_parser(
        "prune", help="remove every container that is not mounted",
        description="Remove every container that is not mounted, with its changes, and the layers "
        "nothing uses any more.",
    )  # fmt: skip
    prune.set_defaults(handler=cmd_container_prune)

    diff = commands.add_parser(
        "diff", help="list a container's changes",
        description="List what a container changed, as docker diff does: A added, C changed, D deleted.",
    )  # fmt: skip
    diff.add_argument("name", metavar="NAME")
    diff.set_defaults(handler=cmd_diff)

    commit = commands.add_parser(
        "commit", help="make an image of a container",
        description="Make a new image from a container's changes (a running container is frozen while "
        "its changes are read, so the image holds one moment of it).",
    )  # fmt: skip
    commit.add_argument("name", metavar="NAME")
    commit.add_argument("ref", metavar="REF", help="the new image's tag (name[:tag])")
    commit.add_argument("-m", "--message", help="a commit message (the history entry's comment)")
    commit.add_argument("-a", "--author", help="the author (e.g. 'Name <mail>')")
    commit.set_defaults(handler=cmd_commit)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def cmd_mount(args: argparse.Namespace) -> int:
    from ..containers.lifecycle import mount_container
    from ..images.store import Store

    record = mount_container(Store.existing(args.root), args.image, args.mountpoint, args.ro, name=args.name)
    print(record.name)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from ..containers.lifecycle import umount_container
    from ..images.store import Store

    umount_container(Store.existing(args.root), args.target)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from ..containers.lifecycle import STOPPED, container_states
    from ..daemon.fstype import FS_TYPE
    from ..images.store import MissingStoreError, Store

    try:
        store = Store.existing(args.root)
    except MissingStoreError as exc:  # no containers then; other overlayfuse mounts are still listed
        print(f"overlayctl: note: {exc}", file=sys.stderr)
        store = Store(exc.root)  # lists nothing, creates nothing
    states = [s for s in container_states(store) if args.all or s.state != STOPPED]
    if args.json:
        print(json.dumps([asdict(state) for state in states], indent=2))
        return 0
    rows = [("NAME", "IMAGE", "STATE", "PID", "MOUNTPOINT")]
    for s in states:
        state = s.state + (" (ro)" if s.read_only and s.state != STOPPED else "")
        name = s.name or f"({s.source or FS_TYPE})"
        rows.append((name, s.image or "-", state, str(s.pid) if s.pid else "-", s.mountpoint or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from ..containers.lifecycle import remove_containers
    from ..images.store import Store

    for removed in remove_containers(Store.existing(args.root), args.names, force=args.force):
        log.info("freed %s", removed)
    return 0


def cmd_container_prune(args: argparse.Namespace) -> int:
    from ..containers.lifecycle import prune_containers
    from ..images.store import Store

    removed, freed = prune_containers(Store.existing(args.root))
    for name in removed:
        print(f"Deleted: {name}")
    for item in freed:
        log.info("freed %s", item)
    print(f"Removed {len(removed)} container(s)")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from ..containers.commit import container_changes
    from ..images.store import Store

    for change in container_changes(Store.existing(args.root), args.name):
        print(f"{change.kind} {change.path}")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from ..containers.commit import commit_container
    from ..images.store import Store

    record = commit_container(Store.existing(args.root), args.name, args.ref, message=args.message, author=args.author)
    print(record.id)
    return 0
