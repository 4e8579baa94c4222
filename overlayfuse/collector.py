"""The cyclic garbage collector around a command's imports.

The installed commands (`overlayfuse.commands`) turn the collector off before they import anything:
the cyclic collections that tens of thousands of import-made objects trigger were ~25 ms of CPU of
a ~200 ms daemon start (see `commands`). Once its imports are done, a command turns it on again
with `collector_on`. Its own module, imported by the daemon's and overlayctl's entry points, so
that they need not import the module that imports them.
"""

from __future__ import annotations

import gc


def collector_on() -> None:
    """The collector on again if a command turned it off for its imports, with every object made so
    far frozen (out of its sight: modules and parsers live as long as the process). Nothing to do
    where it was never turned off (a test or a tool that imported the command's module)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
