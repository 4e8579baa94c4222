"""How the stress command speaks to the user: errors without a traceback, progress on stderr.

stderr, because with --json stdout carries only the report.
"""

from __future__ import annotations

import sys


class StressError(RuntimeError):
    """The run could not be done (not root, the mount failed...): a message for the user."""


def say(msg: str) -> None:
    print(f"stress: {msg}", file=sys.stderr, flush=True)
