"""A bigger readahead window for the mount, so sequential reads reach the daemon in 1 MiB requests.

The kernel gives a FUSE mount the block layer's default readahead, 128 KiB, and splits buffered
reads into requests no bigger than that window. Every request costs this daemon a round trip
through the event loop and a worker thread, so a cold `dd` or `tar` of big files spends its time on
requests, not on the disk. libfuse already lets a request carry up to 256 pages (``max_pages``);
raising the mount's window to match, through the writable ``read_ahead_kb`` of the mount's
backing device in sysfs, cuts the requests per MiB from eight to one. Only root may write there; a
user mount keeps the kernel's default.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: One full FUSE request (256 pages of 4 KiB): a larger window measured no faster.
READ_AHEAD_KB = 1024


def bdi_setting(st_dev: int) -> str:
    """The sysfs file holding the readahead window of the mount whose ``st_dev`` is ST_DEV."""
    return f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb"


def widen(st_dev: int, kib: int = READ_AHEAD_KB) -> bool:
    """Raise the mount's readahead window to KIB (never lower it); False if the kernel refused."""
    path = bdi_setting(st_dev)
    try:
        with open(path, "r+") as setting:
            current = int(setting.read())
            if current >= kib:
                return True
            setting.seek(0)
            setting.write(str(kib))
    except (OSError, ValueError) as exc:
        log.debug("readahead stays at the kernel's default (%s: %s)", path, exc)
        return False
    log.debug("readahead window raised to %d KiB (%s)", kib, path)
    return True
