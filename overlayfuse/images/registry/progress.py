"""What a pull or push shows while blobs move: one line per blob.

On a terminal the lines are redrawn in place (bytes done of total, rate, or ``skipped: already in
the store``), throttled like the import's bar; otherwise each blob gets a plain line when it starts
being transferred, is skipped or is done, so a log shows what was fetched. ``--quiet`` shows nothing.
Called from several download threads at once, hence the lock.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from ..progress import human_size

log = logging.getLogger(__name__)

#: Seconds between two redraws of the whole block of lines (see progress.REDRAW_INTERVAL).
REDRAW_INTERVAL = 0.2


@dataclass(slots=True)
class _Line:
    label: str
    total: int
    done: int = 0
    started: float = 0.0
    state: str = "waiting"  # waiting, copying, done, skipped


class Transfers:
    """Lines for the blobs of one pull or push, keyed by digest."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(not quiet and isatty and isatty())
        self._lines: dict[str, _Line] = {}
        self._drawn = 0  # lines drawn last time (to move the cursor back over them)
        self._drawn_at = 0.0
        self._lock = threading.Lock()

    def _say(self, text: str) -> None:
        if not self.quiet and not self.tty:
            self.stream.write(text + "\n")
            self.stream.flush()

    def add(self, key: str, label: str, total: int) -> None:
        with self._lock:
            self._lines[key] = _Line(label, total)
            self._draw(force=True)

    def skip(self, key: str, why: str) -> None:
        with self._lock:
            line = self._lines[key]
            line.state = f"skipped: {why}"
            self._say(f"{line.label}: skipped, {why}")
            self._draw(force=True)

    def start(self, key: str) -> Callable[[int], None]:
        """Mark KEY as transferring; the returned callable takes bytes moved (a negative count
        takes bytes back, when a download restarts from zero)."""
        with self._lock:
            line = self._lines[key]
            line.state, line.started, line.done = "copying", time.monotonic(), 0
            self._say(f"{line.label}: copying {human_size(line.total)}")
            self._draw(force=True)

        def advance(count: int) -> None:
            with self._lock:
                line.done += count
                self._draw()

        return advance

    def done(self, key: str, what: str = "done") -> None:
        with self._lock:
            line = self._lines[key]
            line.state, line.done = what, line.total
            self._say(f"{line.label}: {what}")
            self._draw(force=True)

    def close(self) -> None:
        with self._lock:
            self._draw(force=True)

    def _text(self, line: _Line, now: float) -> str:
        if line.state == "copying":
            elapsed = max(now - line.started, 1e-3)
            return (f"{line.label}: {human_size(line.done)} / {human_size(line.total)} "
                    f"({human_size(line.done / elapsed)}/s)")
        return f"{line.label}: {line.state}"

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < REDRAW_INTERVAL:
            return
        self._drawn_at = now
        out = "\x1b[F" * self._drawn if self._drawn else ""
        for line in self._lines.values():
            out += self._text(line, now)[:200] + "\x1b[K\n"
        self._drawn = len(self._lines)
        self.stream.write(out)
        self.stream.flush()
