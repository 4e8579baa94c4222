"""Limits on what one layer may unpack to, so a hostile image cannot fill the disk or hang us.

The defaults are far beyond any real image (the deepest paths in distribution images are a few
dozen components, the largest layers a few million entries and tens of GiB); each can be set from
the environment (``OVERLAYFUSE_MAX_LAYER_DEPTH``, ``OVERLAYFUSE_MAX_LAYER_ENTRIES``,
``OVERLAYFUSE_MAX_LAYER_BYTES``). Whatever the limits, unpacking also stops when the store's
filesystem has less than `reserve` bytes (or inodes) left: the import then fails and the store is
as it was.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..errors import UserError

log = logging.getLogger(__name__)

#: Components in one path. Deeper than any real image, and more than PATH_MAX lets one path name
#: (4096 bytes is at most 2048 components), yet a chain this deep still unpacks in seconds.
DEFAULT_MAX_DEPTH = 16_384
#: Tar entries in one layer: the largest real layers hold a few million.
DEFAULT_MAX_ENTRIES = 20_000_000
#: Bytes of file data in one layer (holes of sparse files do not count: they take no space).
DEFAULT_MAX_BYTES = 1 << 40
#: Free space kept on the store's filesystem: 5% of it, at most 1 GiB, so an import never
#: leaves the machine without room for its logs.
RESERVE_FRACTION = 20
MAX_RESERVE = 1 << 30
#: Inodes kept free on the store's filesystem (a layer of millions of empty files).
RESERVE_INODES = 1024

#: The environment variable that sets each limit (named in the error a limit gives).
ENV_VARIABLES = {
    "max_depth": "OVERLAYFUSE_MAX_LAYER_DEPTH",
    "max_entries": "OVERLAYFUSE_MAX_LAYER_ENTRIES",
    "max_bytes": "OVERLAYFUSE_MAX_LAYER_BYTES",
}


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    """What one layer may hold: path depth, number of tar entries, bytes of file data."""

    max_depth: int = DEFAULT_MAX_DEPTH
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_env(cls) -> UnpackLimits:
        """The defaults, each overridden by its environment variable when set (a positive integer)."""
        values: dict[str, int] = {}
        for field_name, variable in ENV_VARIABLES.items():
            text = os.environ.get(variable)
            if not text:
                continue
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value <= 0:
                raise UserError(f"{variable}={text!r}: expected a positive integer")
            values[field_name] = value
        return cls(**values)


def reserve_bytes(fs_size: int) -> int:
    """The bytes of a filesystem of FS_SIZE bytes an unpack leaves free."""
    return min(fs_size // RESERVE_FRACTION, MAX_RESERVE)
