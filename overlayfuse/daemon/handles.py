"""Open file and directory handles by the number the kernel holds.

A number the kernel did not get from us (or already released) is `UnknownHandle`, its own type so
that the FUSE boundary answers it with ESTALE while any other missing key, a bug of ours, shows as
EIO with a traceback (see `fs._boundary`).
"""

from __future__ import annotations

import logging
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

H = TypeVar("H")


class UnknownHandle(LookupError):
    """The kernel named a file or directory handle that is not open (see `UnknownInode`)."""


class HandleTable(Generic[H]):
    """Open handles by number: a number the kernel did not get from us is `UnknownHandle`."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._handles: dict[int, H] = {}

    def __getitem__(self, number: int) -> H:
        handle = self._handles.get(number)
        if handle is None:
            raise UnknownHandle(f"{self._kind} {number}")
        return handle

    def __setitem__(self, number: int, handle: H) -> None:
        self._handles[number] = handle

    def __delitem__(self, number: int) -> None:
        self.pop(number)

    def __len__(self) -> int:
        return len(self._handles)

    def pop(self, number: int) -> H:
        handle = self[number]
        del self._handles[number]
        return handle
