"""Image references: parsing ``name[:tag]`` the way docker does, and finding an image by reference.

A reference names an image in this store. The grammar is the distribution spec's (lower-case path
components separated by ``/``, an optional registry host first, a tag of up to 128 word characters,
dots and dashes); a missing tag means ``latest``. Nothing is prefixed with ``docker.io/library``:
this store has no registry, so ``alpine`` and ``docker.io/library/alpine`` are different names.

An image can also be named by its id (``sha256:<hex>``) or by a unique prefix of that hex, as in
``docker image inspect 3f57``.
"""

from __future__ import annotations

import re

from ..errors import StoreError
from .store import ImageRecord, Store

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?)"
_NAME = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
#: Shortest id prefix accepted, so that a short tag-like word is never taken for an id by accident.
MIN_ID_PREFIX = 4
_HEX = re.compile(r"[0-9a-f]+")


class InvalidReference(StoreError):
    """Not a valid image reference."""


def parse_reference(text: str) -> str:
    """Return TEXT as a normalized ``name:tag`` (tag ``latest`` when missing), or raise `InvalidReference`."""
    if "@" in text:
        raise InvalidReference(f"invalid reference {text!r}: digests are not tags (name an image by id instead)")
    name, tag = text, "latest"
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        name, tag = text[:colon], text[colon + 1 :]
    if len(name) > 255 or not _NAME.fullmatch(name):
        raise InvalidReference(
            f"invalid reference {text!r}: a name is lower-case letters, digits and separators (. _ - /)"
        )
    if not _TAG.fullmatch(tag):
        raise InvalidReference(f"invalid reference {text!r}: a tag is up to 128 letters, digits, '_', '.', '-'")
    return f"{name}:{tag}"


def reference_or_none(text: str) -> str | None:
    """TEXT normalized as `parse_reference` does, or None if it is not a reference (an id, say)."""
    try:
        return parse_reference(text)
    except InvalidReference:
        return None


def resolve_image(store: Store, text: str) -> ImageRecord:
    """The image TEXT names: a tag, an id (``sha256:<hex>``) or a unique id prefix of 4+ hex digits."""
    images = store.images()
    if text.startswith("sha256:"):
        hex_part = text.split(":", 1)[1]
    else:
        hex_part = text
        wanted = reference_or_none(text)
        if wanted is not None:
            for record in images:
                if wanted in record.tags:
                    return record
    if len(hex_part) >= MIN_ID_PREFIX and _HEX.fullmatch(hex_part):
        matches = [record for record in images if record.id.split(":", 1)[1].startswith(hex_part)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise StoreError(f"image id prefix {text!r} is ambiguous: it matches {len(matches)} images")
    raise StoreError(f"no such image: {text}")
