"""The ``overlayctl`` command: the control CLI for images and containers (commands arrive with the
image store; for now it answers --help and --version)."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlayctl",
        description="Manage overlayfuse images and containers.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"overlayctl {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    _parser().parse_args(sys.argv[1:] if argv is None else argv)
    _parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
