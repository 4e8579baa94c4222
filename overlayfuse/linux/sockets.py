"""Unix socket addresses as the daemon, the service manager and overlayctl write them.

A name that starts with ``@`` is in the abstract namespace: no file, no 108-byte path limit, gone
with the last socket (the form systemd's ``$NOTIFY_SOCKET`` and our control sockets use). The
address is the rest of the name after a NUL byte, with no trailing NUL. Anything else is a path.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def is_abstract(name: str) -> bool:
    return name.startswith("@")


def sockaddr(name: str) -> str | bytes:
    """The address to bind or connect to for NAME: ``@x`` is b"\\0x" (abstract), else the path."""
    return b"\0" + name[1:].encode() if is_abstract(name) else name
