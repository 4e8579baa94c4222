"""Counting what the workers did: calls per op, failed calls per (op, errno), with one example each.

A worker fills one Tally and sends it to the parent as a plain dict when it ends; the parent
merges them.  Anomalies (a call that succeeded with a result that breaks a name class) are
counted like errnos, under a pseudo-errno in capitals that no errno name can clash with.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

WRONG_TYPE = "WRONG-TYPE"  # e.g. f3 is a directory
BAD_NAME = "BAD-NAME"  # a listed name that is in no class (a leaked whiteout, a temp file)
BAD_TARGET = "BAD-TARGET"  # a symlink whose target no worker ever wrote


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, f"errno {code}")


@dataclass(slots=True)
class Outcome:
    """All failed calls of one op with one errno, expected (a race) or not (a bug)."""

    op: str
    error: str
    expected: bool
    count: int = 0
    example: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "errno": self.error, "expected": self.expected,
                "count": self.count, "example": self.example}


@dataclass(slots=True)
class Tally:
    ops: Counter[str] = field(default_factory=Counter)
    outcomes: dict[tuple[str, str, bool], Outcome] = field(default_factory=dict)

    def attempt(self, op: str, expected: Iterable[int], what: str,
                call: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Count one call of `op`; on OSError record its errno (with `what` as the example) and
        return None.  `expected` is the set of errnos a race may legitimately give here."""
        self.ops[op] += 1
        try:
            return call(*args, **kwargs)
        except OSError as exc:
            code = exc.errno if exc.errno is not None else 0
            self.record(op, errno_name(code), code in expected, f"{op} {what}: {exc.strerror}")
            return None

    def record(self, op: str, error: str, expected: bool, example: str) -> None:
        key = (op, error, expected)
        outcome = self.outcomes.get(key)
        if outcome is None:
            outcome = self.outcomes[key] = Outcome(op, error, expected, example=example)
        outcome.count += 1

    def anomaly(self, op: str, kind: str, example: str) -> None:
        self.record(op, kind, False, example)

    def as_dict(self) -> dict[str, Any]:
        return {"ops": dict(self.ops), "outcomes": [o.as_dict() for o in self.outcomes.values()]}

    def merge(self, data: dict[str, Any]) -> None:
        """Add a worker's as_dict() (kept in this Tally's key order, first example wins)."""
        self.ops.update(data["ops"])
        for o in data["outcomes"]:
            key = (o["op"], o["errno"], o["expected"])
            mine = self.outcomes.get(key)
            if mine is None:
                mine = self.outcomes[key] = Outcome(o["op"], o["errno"], o["expected"],
                                                    example=o["example"])
            mine.count += o["count"]
