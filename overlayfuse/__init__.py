"""overlayfuse: a userspace overlay filesystem with kernel overlayfs semantics (pyfuse3 + trio)."""

__version__ = "0.1.0"
