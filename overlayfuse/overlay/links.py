"""The hardlink index, in the kernel's format: the names of a hardlinked lower file stay one file
after copy-up, and a kernel mounted on the same upper and work dirs (``index=on``) sees the same.

Copying up one name of a lower file with several links makes an upper copy; without more, the other
names would keep showing the old lower file (the kernel's behaviour without ``index=on``). And since
pyfuse3 makes ``st_ino`` the kernel's inode identity, all those names *are* one inode to the kernel.
So, like the kernel's ``index=on``, we remember the copy, where and as the kernel does:

- ``WORKDIR/index/<hex>`` is a hard link to the upper copy, where ``<hex>`` is the lowercase hex of
  the lower file's encoded file handle, the same bytes as its ``overlay.origin`` xattr
  (fs/overlayfs/namei.c ``ovl_get_index_name`` -> ``ovl_get_index_name_fh``: ``bin2hex`` of
  ``fh->fb.len`` bytes of the ``struct ovl_fb``). The copy carries that origin too (copy_up.c
  ``ovl_do_copy_up``: an indexed copy-up sets ``c->origin``), which the kernel checks against the
  entry's name when it mounts (``ovl_verify_index``).
- ``overlay.nlink`` on the copy holds the merged ``st_nlink`` relative to the upper inode's own
  count, as text: ``"U%+i"`` (inode.c ``ovl_set_nlink_upper``: merged minus upper), or ``"L%+i"``
  relative to the lower inode (``ovl_set_nlink_lower``, which ``ovl_link_up`` writes just before it
  links a name and replaces just after). ``ovl_get_nlink`` reads either; so do we.

A lookup that lands on a lower name of that file answers with the upper copy instead (the kernel's
``ovl_lookup_index``; an entry of another file type, such as the whiteout an ``nfs_export`` mount
leaves, is no copy); an operation that needs the name itself in upper (a rename, say) links it there
from the index (``ovl_link_up``).

The merged ``st_nlink`` of such a file counts its upper names (less the index entry) plus the lower
names not yet moved up or deleted: with ``n`` such lower names, the kernel's ``"U%+i"`` value is
``n - 1`` (the index entry is one of the upper inode's links and no name of the merged view).

Earlier versions kept the index as ``WORKDIR/overlayfuse-index/<dev>-<ino>`` with the count of
lower names left in ``overlay.fuse-lower-links``; such entries are still found and kept up to date
in their own format, so an upper dir written then still mounts with its links whole. New entries go
there only for a lower filesystem that cannot encode file handles (where the kernel keeps no index
at all, ``ovl_can_decode_fh``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field

from ..linux import ownwrite
from . import origin, whiteout
from .layers import Branch, Fd, Layer, Resolved, root_branch
from .whiteout import NO_MARKERS

log = logging.getLogger(__name__)

#: The kernel's index dir inside workdir (fs/overlayfs/overlayfs.h OVL_INDEXDIR_NAME).
INDEX_NAME = "index"
#: The index dir of earlier versions, still read.
LEGACY_INDEX_NAME = "overlayfuse-index"
_NLINK_SUFFIX = "overlay.nlink"
_LEGACY_COUNT_SUFFIX = "overlay.fuse-lower-links"


def indexes(lower: os.stat_result) -> bool:
    """Whether a copy of the lower object LOWER goes in the index: a file (not a directory) with
    several names. The one place that rule lives: the copy-up of one object or of a tree, the
    search for an earlier copy, and the deletion of one of several names all ask here."""
    return not stat.S_ISDIR(lower.st_mode) and lower.st_nlink >= 2


def nlink_value(lower_names: int) -> bytes:
    """The kernel's ``overlay.nlink`` for an indexed copy with LOWER_NAMES lower names still showing
    it: the merged count minus the upper inode's, which holds one link more (the index entry)."""
    return f"U{lower_names - 1:+d}".encode()


def parse_nlink(value: bytes) -> int:
    """The lower names still showing a copy, from its kernel ``overlay.nlink`` VALUE. ValueError
    if it cannot be read, or is the ``L`` form: the kernel leaves that one only when it failed
    between ``ovl_set_nlink_lower`` and the link that follows, and falls back then as we do."""
    text = value.decode("ascii")
    if len(text) < 3 or text[0] not in "UL" or text[1] not in "+-" or not text[2:].isdigit():
        raise ValueError(f"not an overlay.nlink value: {text!r}")
    if text[0] == "L":
        raise ValueError(f"{text!r} counts from the lower file: a link-up that did not finish")
    return int(text[1:], 10) + 1


@dataclass(frozen=True, slots=True)
class LinkIndex:
    directory: str
    """The kernel's index dir (WORKDIR/index)."""
    branch: Branch
    """That dir, held: resolutions of index entries live in it."""
    legacy_directory: str
    legacy_branch: Branch
    count_xattr: str
    """``trusted.`` or ``user.`` + ``overlay.nlink``, in the namespace this mount may write."""
    legacy_count_xattr: str
    origin_xattr: str
    legacy_used: bool
    """The earlier index dir held entries when the mount began: only then is it searched."""
    _handles: dict[tuple[int, int], bytes] = field(default_factory=dict)
    """Lower (st_dev, st_ino) -> its encoded handle (b"" for none): lower layers never change
    under a mount, and a dict write is atomic in CPython (worker threads compute the same value)."""

    @classmethod
    def prepare(cls, workdir: str, opaque_xattr: str, upper: Layer) -> LinkIndex:
        """Open (creating if missing) the index dirs of WORKDIR; the counts and origins go in
        OPAQUE_XATTR's namespace (``trusted.`` or ``user.``, as the kernel's ``userxattr``)."""
        namespace = opaque_xattr.split(".", 1)[0] or "user"  # no overlay xattr writable: counts unkept
        dirs = []
        for name in (INDEX_NAME, LEGACY_INDEX_NAME):
            directory = os.path.join(workdir, name)
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            dirs.append(directory)
        index_dir, legacy_dir = dirs
        with os.scandir(legacy_dir) as entries:
            legacy_used = any(True for _ in entries)
        if legacy_used:
            log.info("%s: hardlink index of an earlier version, still read", legacy_dir)
        return cls(
            index_dir, root_branch(Layer(upper.index, index_dir, True), NO_MARKERS),
            legacy_dir, root_branch(Layer(upper.index, legacy_dir, True), NO_MARKERS),
            f"{namespace}.{_NLINK_SUFFIX}", f"{namespace}.{_LEGACY_COUNT_SUFFIX}", f"{namespace}.overlay.origin",
            legacy_used,
        )  # fmt: skip

    # -- names ------------------------------------------------------------------------------------

    def handle(self, source: str, lower: os.stat_result) -> bytes:
        """The encoded handle of the lower file SOURCE (a path never followed), lstat'ed as LOWER:
        its ``overlay.origin`` value, b"" where its filesystem exports none. Asked once per file."""
        key = (lower.st_dev, lower.st_ino)
        value = self._handles.get(key)
        if value is None:
            value = self._handles[key] = origin.encode(source, lower)
        return value

    def entry(self, source: str, lower: os.stat_result) -> str:
        """The path of the lower file SOURCE's index entry, where a new one goes: the kernel's name,
        or the earlier format's where there is no handle."""
        fh = self.handle(source, lower)
        if fh:
            return os.path.join(self.directory, fh.hex())
        return os.path.join(self.legacy_directory, _legacy_name(lower))

    def entry_names(self, source: str, lower: os.stat_result) -> list[str]:
        """The names an entry of the lower file SOURCE may have, in either format."""
        fh = self.handle(source, lower)
        return [fh.hex(), _legacy_name(lower)] if fh else [_legacy_name(lower)]

    def _candidates(self, source: str, lower: os.stat_result) -> list[tuple[Branch, str]]:
        """Where an entry of SOURCE may be, the kernel's place first."""
        fh = self.handle(source, lower)
        places = [(self.branch, fh.hex())] if fh else []
        if self.legacy_used or not fh:
            places.append((self.legacy_branch, _legacy_name(lower)))
        return places

    def holds(self, resolved: Resolved) -> bool:
        """Whether RESOLVED is an index entry (a copy known to no upper name yet)."""
        return resolved.dir is self.branch or resolved.dir is self.legacy_branch

    def find(self, lower: Resolved, upper: Layer) -> Resolved | None:
        """The upper copy of the hardlinked lower file LOWER, if one of its names was copied up (by
        us or by the kernel). A kernel's metacopy copy keeps its data in LOWER, the same file."""
        st = lower.stat
        if not indexes(st):
            return None
        for branch, name in self._candidates(lower.path, st):
            try:
                found = branch.lstat(name)
            except FileNotFoundError:
                continue
            if stat.S_IFMT(found.st_mode) != stat.S_IFMT(st.st_mode):
                log.debug("index entry %s is a %o, its lower file a %o: not its copy", name,
                          stat.S_IFMT(found.st_mode), stat.S_IFMT(st.st_mode))
                continue
            data = None
            if stat.S_ISREG(found.st_mode) and found.st_size > 0 and whiteout.is_metacopy(branch.child(name)):
                data = lower
            return Resolved(upper, branch, name, found, (), data)
        return None

    # -- entries ----------------------------------------------------------------------------------

    def add(self, source: str, lower: os.stat_result, upper_copy: str) -> str:
        """Record UPPER_COPY as the copy of the lower file SOURCE (lstat'ed as LOWER), whose other
        lower names are not moved up yet. Origin and count go on the copy before it gets its
        index name, as the kernel does them before the rename or link into its index."""
        self.mark(upper_copy, source, lower, lower.st_nlink - 1)
        entry = self.entry(source, lower)
        os.link(upper_copy, entry)
        return entry

    def mark(self, copy: str, source: str, lower: os.stat_result, lower_names: int) -> None:
        """Give COPY, the copy of the lower file SOURCE, its origin and its count of LOWER_NAMES."""
        fh = self.handle(source, lower)
        if fh:
            origin.set_origin(copy, self.origin_xattr, fh)
            _set(copy, self.count_xattr, nlink_value(lower_names))
        else:
            _set(copy, self.legacy_count_xattr, str(lower_names).encode())

    def record(self, source: str, lower: os.stat_result, upper_copy: str) -> str | None:
        """After the lower file SOURCE (lstat'ed as LOWER) was copied up to UPPER_COPY: a hardlinked
        file's copy goes in the index, so its other lower names show the copy from then on. Returns
        the entry made, or None (nothing to keep: see `indexes`), for a copy-up of one object and
        of a whole tree alike."""
        if not indexes(lower):
            return None
        return self.add(source, lower, upper_copy)

    def covered(self, entry_or_copy: str) -> None:
        """One more lower name of this file now has its own upper name or whiteout."""
        found = self._count(entry_or_copy, follow=False)
        if found is None:
            return
        count, xattr = found
        if count:
            value = nlink_value(count - 1) if xattr == self.count_xattr else str(count - 1).encode()
            _set(entry_or_copy, xattr, value)

    def lower_names(self, path: str, *, follow: bool = False) -> int | None:
        """How many lower names of this copied-up file still show it; None if it is not in the index.

        FOLLOW: PATH is /proc/self/fd/N of a held object, a link to follow to the object itself."""
        found = self._count(path, follow=follow)
        return None if found is None else found[0]

    def _count(self, path: str, *, follow: bool) -> tuple[int, str] | None:
        """The lower names left and the xattr they were read from, the kernel's first."""
        for xattr in (self.count_xattr, self.legacy_count_xattr) if self.legacy_used else (self.count_xattr,):
            try:
                value = os.getxattr(path, xattr, follow_symlinks=follow)
            except OSError as exc:
                if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                    continue
                raise
            try:
                return (parse_nlink(value) if xattr == self.count_xattr else int(value)), xattr
            except ValueError as exc:
                # ovl_get_nlink falls back to the upper inode's own count: one lower name for the
                # index entry's link. The earlier format counted none.
                log.warning("%s: unreadable %s (%s), counting the upper links alone", path, xattr, exc)
                return (1 if xattr == self.count_xattr else 0), xattr
        return None

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


def _legacy_name(lower: os.stat_result) -> str:
    return f"{lower.st_dev:x}-{lower.st_ino:x}"


def _set(path: str, xattr: str, value: bytes) -> None:
    ownwrite.setxattr(path, xattr, value, follow_symlinks=False)
