"""The one error type a user sees from ``overlayctl``: its text is the whole message, one line.

The image store, the formats and the service configs raise subclasses of `UserError` with enough
context to act on (which image, which blob, which entry, which key); the CLI prints it without a
traceback and exits with `status`. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a failed operation, explained in one line."""

    status = 1


class ImageError(UserError):
    """An image, layer or blob is invalid, missing or does not match its digest."""


class StoreError(UserError):
    """The store cannot do what was asked (unknown name, in use, locked, ...)."""


class ConfigError(UserError):
    """A mount config (``/etc/overlayfuse/NAME.conf``) is invalid."""
