"""``overlayctl system df``: the store's disk use.

Parsing and printing only: the counting is in `overlayfuse.images.usage`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``system df`` to COMMANDS."""
    system = commands.add_parser("system", help="the image store as a whole (df)")
    actions = system.add_subparsers(dest="system_command", metavar="SUBCOMMAND")
    system.set_defaults(handler=lambda args: _usage(system))
    df = actions.add_parser(
        "df", help="show the store's disk use",
        description="Show how much disk the store uses: images (their blobs and unpacked layers), "
        "blobs, layers, containers' changes, and the total (each file counted once).",
    )  # fmt: skip
    df.add_argument("--json", action="store_true", help="print JSON")
    df.set_defaults(handler=cmd_df)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def cmd_df(args: argparse.Namespace) -> int:
    from ..images.progress import human_size
    from ..images.store import Store
    from ..images.usage import store_usage

    store = Store.existing(args.root)
    with store.locked():
        rows = store_usage(store)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        return 0
    table = [("TYPE", "COUNT", "SIZE")]
    table += [(r.kind, str(r.count) if r.kind != "Total" else "", human_size(r.size, binary=False)) for r in rows]
    widths = [max(len(line[n]) for line in table) for n in range(2)]
    for line in table:
        print(f"{line[0].ljust(widths[0])}   {line[1].rjust(widths[1])}   {line[2]}")
    return 0
