"""Which of the kernel's constant-cost copy-up features a mount writes: redirect_dir and metacopy.

Both are the kernel's on-disk formats (Documentation/filesystems/overlayfs.rst), so an upper dir
written with them on reads the same under ``mount -t overlay -o redirect_dir=on,metacopy=on``:

- redirect_dir: a directory with lower content is renamed by copying up the directory alone and
  recording where its lower content is (``overlay.redirect``), instead of copying its whole tree;
- metacopy: chmod, chown, utimes and setxattr of a lower file copy up its metadata alone (an empty
  file marked ``overlay.metacopy``); its data is copied in at the first open for writing.

The xattrs go in the namespace the mount writes its opaque markers in (``trusted.overlay.*``, or
``user.overlay.*`` as the kernel's ``userxattr`` reads them); where neither can be written, both
features fall back to full copies. Copy-ups also record their lower object (``overlay.origin``,
see `origin`) in that namespace, as the kernel does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: The kernel's ``redirect_max`` module parameter default: a longer absolute redirect is not written
#: (the kernel answers EXDEV and tools copy); we copy the tree instead.
REDIRECT_MAX = 256


@dataclass(frozen=True, slots=True)
class CopyUpFeatures:
    """What the mount options ask for (``redirect_dir=``, ``metacopy=``); on unless turned off."""

    redirect_dir: bool = True
    metacopy: bool = True


@dataclass(frozen=True, slots=True)
class FeatureXattrs:
    """The xattrs this mount writes for each feature; "" where the feature is off or unavailable."""

    redirect: str = ""
    metacopy: str = ""
    origin: str = ""
    """Written on every copy-up, as the kernel does whatever its options (see `origin`)."""
    impure: str = ""
    """Set ("y") on an upper directory that gains a child carrying an origin (a copy-up into it, a
    rename into it from another directory), as the kernel's ``ovl_set_impure`` does whatever its
    options: a kernel mounted later reads it to give those children their lower inode numbers in
    readdir's d_ino, the numbers their st_ino shows."""
    protattr: str = ""
    """Where the kernel's overlay keeps an object's append-only and immutable flags ("a", "i"),
    read here so that an upper dir a kernel wrote shows them (this daemon sets them on the object)."""


#: The options' defaults (both on), and a mount writing neither.
DEFAULT = CopyUpFeatures()
NONE = FeatureXattrs()


def xattrs_for(features: CopyUpFeatures, opaque_xattr: str) -> FeatureXattrs:
    """The feature xattrs in OPAQUE_XATTR's namespace (the one the marker probe found writable)."""
    if opaque_xattr.startswith("trusted.overlay."):
        prefix = "trusted.overlay."
    elif opaque_xattr.startswith("user.overlay."):
        prefix = "user.overlay."
    else:
        if features.redirect_dir or features.metacopy:
            log.warning("the upper dir takes no overlay xattrs: directory renames and metadata changes "
                        "copy whole objects up (no redirect_dir, no metacopy)")
        return FeatureXattrs()
    return FeatureXattrs(
        redirect=prefix + "redirect" if features.redirect_dir else "",
        metacopy=prefix + "metacopy" if features.metacopy else "",
        origin=prefix + "origin",
        impure=prefix + "impure",
        protattr=prefix + "protattr",
    )
