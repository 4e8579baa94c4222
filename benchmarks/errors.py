"""How the bench speaks to the user: errors printed without a traceback, and progress on stderr.

stderr, because with --json stdout carries only the report.
"""

from __future__ import annotations

import sys


class BenchError(RuntimeError):
    """A failure with a message for the user (printed without a traceback)."""


class ViewMismatch(BenchError):
    """The targets do not show the same merged tree."""


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)
