"""A progress bar on stderr for long imports: one line per layer, bytes done of bytes total.

Drawn only when the stream is a terminal: a log file or a pipe gets nothing, so scripts that
capture stderr see only real errors. Redrawing is throttled, because a layer is read in 64 KiB
chunks and a terminal redraw per chunk would cost more than the import itself.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger(__name__)

#: Seconds between two redraws of the same line: smooth enough to the eye, cheap for the CPU.
REDRAW_INTERVAL = 0.1
BAR_WIDTH = 30


def human_size(size: float, *, binary: bool = True) -> str:
    """SIZE in bytes as ``12.3 MiB`` (BINARY) or ``12.3MB`` (decimal, as ``docker images`` shows)."""
    base, units = (1024.0, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000.0, ("B", "kB", "MB", "GB", "TB"))
    value = float(size)
    for unit in units:
        if value < base or unit == units[-1]:
            if unit == "B":
                return f"{int(value)} B" if binary else f"{int(value)}B"
            return f"{value:.1f} {unit}" if binary else f"{value:.3g}{unit}"
        value /= base
    raise AssertionError("unreachable")


class Progress:
    """Progress of one import. `start(label, total)` begins a line; the returned callable takes the
    number of bytes just read (increments, as `unpack_layer` reports them); `finish()` ends the line."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._label = ""
        self._total = 0
        self._done = 0
        self._drawn_at = 0.0
        self._open = False

    def start(self, label: str, total: int) -> Callable[[int], None]:
        self.finish()
        self._label, self._total, self._done, self._drawn_at = label, total, 0, 0.0
        self._open = True
        self._draw(force=True)
        return self.advance

    def advance(self, count: int) -> None:
        self._done += count
        self._draw()

    def finish(self) -> None:
        """End the current line (drawn complete), if one is open."""
        if not self._open:
            return
        self._open = False
        if self.enabled:
            self._done = max(self._done, self._total)
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < REDRAW_INTERVAL:
            return
        self._drawn_at = now
        fraction = min(1.0, self._done / self._total) if self._total else 1.0
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = f"{self._label} [{bar}] {human_size(self._done)} / {human_size(self._total)}"
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r" + line[: max(width - 1, 10)] + "\x1b[K")
        self.stream.flush()
