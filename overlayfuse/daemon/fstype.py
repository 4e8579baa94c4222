"""The filesystem type our mounts carry (``fuse.overlayfuse`` in the mount table), on its own.

`overlayctl ps` finds the daemons' mounts by this name and must not import the option parser
(`options`, with the overlay modules it checks layers with) to learn a string: ps runs in a fresh
interpreter each time, and its imports are most of its time.
"""

from __future__ import annotations

FS_TYPE = "overlayfuse"
