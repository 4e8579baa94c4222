"""The service manager's readiness protocol (sd_notify), spoken directly: no systemd library.

A service manager (systemd for ``Type=notify`` units, or ``overlayctl mount``) puts the path of a
datagram socket in ``$NOTIFY_SOCKET``; the daemon sends ``KEY=VALUE`` lines to it: ``READY=1`` once
the mount answers, ``STATUS=...`` for humans, ``STOPPING=1`` when it begins to unmount. A name that
starts with ``@`` is in the abstract namespace. Without the variable every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

from ..linux.sockets import is_abstract, sockaddr

log = logging.getLogger(__name__)


def _address(value: str) -> str | bytes | None:
    """The socket address $NOTIFY_SOCKET names: an absolute path, or ``@name`` in the abstract
    namespace (no trailing NUL: the name is exactly the rest). Anything else (systemd 253's
    ``vsock:`` addresses, a relative path) is not ours to guess at: None."""
    if is_abstract(value) or value.startswith("/"):
        return sockaddr(value)
    return None


def notify(*fields: str) -> bool:
    """Send FIELDS (``"READY=1"``, ``"STATUS=..."``) as one datagram; True if a manager heard it.

    Never raises: a manager that went away must not take the mount down with it.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = _address(target)
    if address is None:
        log.warning("NOTIFY_SOCKET=%s: only paths and @abstract names are supported; not notifying", target)
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        # The manager stopped listening: `overlayctl mount` does once READY=1 has arrived. Not news.
        log.debug("the service manager at %s is gone: %s", target, exc.strerror or exc)
        return False
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", target, exc.strerror or exc)
        return False
    return True
