"""The hardlink index: the names of a hardlinked lower file stay one file after copy-up.

Copying up one name of a lower file with several links makes an upper copy; without more, the other
names would keep showing the old lower file (the kernel's behaviour without ``index=on``). And since
pyfuse3 makes ``st_ino`` the kernel's inode identity, all those names *are* one inode to the kernel.
So, like the kernel's ``index=on``, we remember the copy: ``WORKDIR/overlayfuse-index/<dev>-<ino>``
is a hard link to the upper copy of lower inode (dev, ino). A lookup that lands on a lower name of
that inode answers with the upper copy instead; an operation that needs the name itself in upper (a
rename, say) links it there from the index.

``st_nlink`` of such a file counts its upper names plus the lower names not yet moved up or deleted;
that second count lives in an overlay-private xattr on the copy (hidden from the merged view, and
ignored by the kernel, like its own ``trusted.overlay.nlink``).

The kernel keeps its own index in another format, so a kernel mounted on our upper dir later sees the
untouched lower names with their old content (as the kernel itself does without ``index=on``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from .layers import Branch, Fd, Layer, Resolved, root_branch
from .whiteout import NO_MARKERS

log = logging.getLogger(__name__)

INDEX_NAME = "overlayfuse-index"
_COUNT_SUFFIX = "overlay.fuse-lower-links"


@dataclass(frozen=True, slots=True)
class LinkIndex:
    directory: str
    count_xattr: str
    """``trusted.`` or ``user.`` + the counter's name, in the namespace this mount may write."""
    branch: Branch
    """The index directory, held: resolutions of index entries live in it."""

    @classmethod
    def prepare(cls, workdir: str, opaque_xattr: str, upper: Layer) -> LinkIndex:
        directory = os.path.join(workdir, INDEX_NAME)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        namespace = opaque_xattr.split(".", 1)[0] or "user"  # no overlay xattr writable: counts unkept
        index_layer = Layer(upper.index, directory, True)
        return cls(directory, f"{namespace}.{_COUNT_SUFFIX}", root_branch(index_layer, NO_MARKERS))

    def entry(self, lower: os.stat_result) -> str:
        return os.path.join(self.directory, f"{lower.st_dev:x}-{lower.st_ino:x}")

    def holds(self, resolved: Resolved) -> bool:
        """Whether RESOLVED is an index entry (a copy known to no upper name yet)."""
        return resolved.dir is self.branch

    def find(self, lower: os.stat_result, upper: Layer) -> Resolved | None:
        """The upper copy of a hardlinked lower file, if one of its names was copied up."""
        if stat.S_ISDIR(lower.st_mode) or lower.st_nlink < 2:
            return None
        name = os.path.basename(self.entry(lower))
        try:
            return Resolved(upper, self.branch, name, self.branch.lstat(name), ())
        except FileNotFoundError:
            return None

    def add(self, lower: os.stat_result, upper_copy: str) -> None:
        """Record UPPER_COPY as the copy of LOWER, whose other lower names are not moved up yet."""
        entry = self.entry(lower)
        os.link(upper_copy, entry)
        self.set_lower_names(entry, lower.st_nlink - 1)

    def record(self, lower: os.stat_result, upper_copy: str) -> str | None:
        """After LOWER was copied up to UPPER_COPY: a hardlinked file's copy goes in the index, so its
        other lower names show the copy from then on. Returns the entry made, or None (nothing to keep:
        a directory, or a file with one name). The one place that rule lives, for a copy-up of one
        object and of a whole tree alike."""
        if stat.S_ISDIR(lower.st_mode) or lower.st_nlink < 2:
            return None
        self.add(lower, upper_copy)
        return self.entry(lower)

    def set_lower_names(self, path: str, count: int) -> None:
        os.setxattr(path, self.count_xattr, str(count).encode(), follow_symlinks=False)

    def covered(self, entry_or_copy: str) -> None:
        """One more lower name of this file now has its own upper name or whiteout."""
        count = self.lower_names(entry_or_copy)
        if count:
            self.set_lower_names(entry_or_copy, count - 1)

    def lower_names(self, path: str, *, follow: bool = False) -> int | None:
        """How many lower names of this copied-up file still show it; None if it is not in the index.

        FOLLOW: PATH is /proc/self/fd/N of a held object, a link to follow to the object itself."""
        try:
            return int(os.getxattr(path, self.count_xattr, follow_symlinks=follow))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise
        except ValueError:
            log.warning("%s: unreadable %s, counting no lower links", path, self.count_xattr)
            return 0

    def link_count(self, resolved: Resolved, st: os.stat_result, held: Fd | None = None) -> int:
        """st_nlink as the merged view shows it: upper names (less the index's) and lower names left.

        HELD: the object itself, when its node holds it (its name may be gone: an unlinked file
        still open, whose lower names still count)."""
        if stat.S_ISDIR(st.st_mode):
            return st.st_nlink
        # A single link is a plain file, unless it is the index entry alone: every upper name of the
        # copy is gone and only lower names still show it.
        if held is None and st.st_nlink < 2 and not self.holds(resolved):
            return st.st_nlink
        try:
            lower = self.lower_names(held.proc, follow=True) if held is not None else self.lower_names(resolved.path)
        except (FileNotFoundError, NotADirectoryError):
            return st.st_nlink  # its name is gone and nothing holds it: nothing below counts
        return st.st_nlink if lower is None else st.st_nlink - 1 + lower
