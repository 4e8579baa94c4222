"""Log lines that journald files under the right priority, and plain ones everywhere else.

A service's stderr goes to the journal as a stream, one entry per line. journald reads a leading
``<N>`` (a syslog priority, 0-7) on each line as that entry's priority and strips it, so
``journalctl -p err`` finds our errors; any other text is filed at the default priority (info),
and a level written as a word would be invisible to ``-p``. So under a service manager each line
starts with ``<N>``; on a terminal or in a file it reads ``PROGRAM: LEVEL message``.

"Under a service manager" is decided as systemd's documentation advises: ``$JOURNAL_STREAM`` names
the device and inode of the stream journald gave us; when stderr is still that stream, we log to
the journal (a command whose stderr the unit redirected elsewhere does not). Without
``$JOURNAL_STREAM``, a ``$NOTIFY_SOCKET`` also counts: a manager that speaks sd_notify reads our
stderr as a journal (systemd with ``StandardError=`` set to a socket, or a test harness).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: syslog priorities (RFC 5424) for Python's levels; levels in between take the next more severe.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7
ERROR_PRIORITY = 3


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald should file a record of level LEVELNO under."""
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return DEBUG_PRIORITY


def under_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when FD (stderr) is read by journald, or by some other sd_notify service manager."""
    env = os.environ if environ is None else environ
    stream = env.get("JOURNAL_STREAM")
    if stream:
        device, _, inode = stream.partition(":")
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        return (device, inode) == (str(st.st_dev), str(st.st_ino))
    return bool(env.get("NOTIFY_SOCKET"))


class JournalFormatter(logging.Formatter):
    """``<N>message``, on every line of the record (a traceback's lines keep the record's priority)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def configure_logging(program: str, level: int, *, journal: bool | None = None) -> None:
    """Send every log record to stderr, one line each: journald's form or ``PROGRAM: LEVEL message``.

    Replaces whatever handlers the root logger had (``overlayctl service run`` configures once as
    overlayctl, and again as the daemon after the exec).
    """
    handler = logging.StreamHandler(sys.stderr)
    if under_journal() if journal is None else journal:
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{program}: %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def error_line(program: str, message: str) -> str:
    """The one line a command prints on stderr when it gives up: journald sees it as an error."""
    if under_journal():
        return f"<{ERROR_PRIORITY}>{message}"
    return f"{program}: error: {message}"


def print_error(program: str, message: str) -> None:
    print(error_line(program, message), file=sys.stderr, flush=True)
