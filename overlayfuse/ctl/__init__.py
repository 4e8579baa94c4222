"""The ``overlayctl`` command: the control CLI for images, containers and services.

Each group of subcommands lives in its own module here (``images``, ``containers``, ``service``)
and registers itself with ``register(subparsers)``; a subcommand is a plain function taking the
parsed arguments and returning an exit status. The work itself is done in `overlayfuse.images`,
`overlayfuse.containers` and `overlayfuse.service`; these modules only parse, print and turn errors
into one line. The top of the import graph: nothing imports this package.

The installed command (`overlayfuse.commands`) starts with the cyclic garbage collector off, as
every ``overlayctl`` is a fresh interpreter whose imports are most of a listing's time; `main`
turns it on again, with what the imports and the parser made frozen, before the subcommand runs.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from .. import __version__
from ..collector import collector_on
from ..errors import UserError

log = logging.getLogger(__name__)


def _cache_argparse_messages() -> None:
    """argparse asks gettext for the translation of its own messages ("usage: ", "options", "show
    this help message and exit"...) every time it makes a parser: ~100 asks for overlayctl's ~30
    subcommand parsers, each a search of the locale directories (most of the ~800 failed stat
    calls of an ``overlayctl ps``, and ~20 of the ~33 ms of building the parser under a profiler).
    A message's translation cannot change within a process, so each is asked once; the answers are
    gettext's own."""
    lookup = argparse._  # type: ignore[attr-defined]
    if not isinstance(lookup, functools._lru_cache_wrapper):
        argparse._ = functools.cache(lookup)  # type: ignore[attr-defined]


def _parser() -> argparse.ArgumentParser:
    from . import containers, images, registry, service, system

    _cache_argparse_messages()

    parser = argparse.ArgumentParser(
        prog="overlayctl",
        description="Manage overlayfuse images, containers and service mounts.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"overlayctl {__version__}")
    parser.add_argument(
        "--root", metavar="DIR",
        help="the image store (default: $OVERLAYFUSE_ROOT, else /var/lib/overlayfuse)",
    )  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="log what happens, on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (images, registry, containers, service, system):
        module.register(commands)
    _global_flags_everywhere(parser)
    return parser


def _global_flags_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``--root`` and ``--debug`` after the subcommand too (``image ls --root DIR``), as podman
    takes its global flags. Given there, they win; not given, the global value stays (SUPPRESS)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            sub.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS,
                             help="the image store (also accepted before the command)")
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="log what happens, on stderr")
            _global_flags_everywhere(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point. A `UserError` is one line on stderr and exit 1; usage errors exit 2."""
    try:
        parser = _parser()
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    finally:  # --help, --version and usage errors end in SystemExit here
        collector_on()  # off since `commands.overlayctl`: the modules and parser are never garbage
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="overlayctl: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except UserError as exc:
        print(f"overlayctl: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("overlayctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `overlayctl image ls | head`: the reader left; say nothing more, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141

