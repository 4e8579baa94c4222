"""The daemon's command line, a drop-in for fuse-overlayfs's, parsed into typed settings.

    overlayfuse [-f] [-d] [-o OPTS]... [SOURCE] MOUNTPOINT

OPTS are comma-separated as for ``mount -t overlay``; ``\\,`` and ``\\:`` escape a comma or colon inside a
path, as in the kernel. The optional SOURCE is what mount(8) passes (``mount -t fuse.overlayfuse SOURCE
DIR``): it only names the mount in /proc/mounts.

`parse_args` only parses; `validate` then checks the filesystem (dirs exist, readable, workdir beside
upperdir...) so a bad mount fails before anything is mounted or written.
"""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass, field, replace

from .. import __version__
from ..overlay.features import CopyUpFeatures
from ..overlay.layers import check_layer_readable
from . import compat, inuse
from .fstype import FS_TYPE
from .polling import MAX_POLL_US


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 1 (2 for a malformed command line)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


#: Options mount(8) and fstab add that mean nothing to us: accepted silently.
_IGNORED = frozenset({"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "nofail", "_netdev"})

#: Kernel overlayfs tunables. overlayfuse's behaviour is fixed (see README), so they are accepted and
#: ignored: tools written for the kernel or fuse-overlayfs pass them routinely.
_KERNEL_TUNABLES = frozenset({"index", "xino", "nfs_export", "uuid", "userxattr", "volatile"})

#: The kernel's copy-up features we implement (see `overlay.features`), with the values the kernel
#: takes: anything but "on" writes no redirects (follow/nofollow are about reading them, which we
#: always do, as a stock kernel does).
_FEATURE_VALUES = {"redirect_dir": ("on", "follow", "nofollow", "off"), "metacopy": ("on", "off")}

#: FUSE generic and mount(8) flag options handed to libfuse unchanged.
_FUSE_FLAGS = frozenset(
    {
        "allow_root", "auto_unmount", "blkdev",
        "dev", "nodev", "suid", "nosuid", "exec", "noexec",
        "sync", "async", "dirsync", "atime", "noatime", "nodiratime", "relatime", "norelatime",
        "strictatime", "nostrictatime", "lazytime", "nolazytime",
    }
)  # fmt: skip
_FUSE_VALUED = frozenset({"fsname", "subtype", "blksize"})

#: Our own keys and the flags we act on: what a misspelt key is compared with.
_OWN = ("lowerdir", "upperdir", "workdir", "ro", "control", "allow_other", "noallow_other",
        "default_permissions", "nodefault_permissions", "poll_us", "passthrough")  # fmt: skip
_KNOWN = (frozenset(_OWN) | compat.KEYS | {"debug"} | _IGNORED | _KERNEL_TUNABLES | set(_FEATURE_VALUES)
          | _FUSE_FLAGS | _FUSE_VALUED
          | {"max_read"})
#: Keys people write from habit elsewhere, and what they mean here.
_HABITS = {"lowerdirs": "lowerdir"}  # the config file's key (a TOML list) is lowerdirs


@dataclass(frozen=True, slots=True)
class MountOptions:
    """Everything the daemon needs to mount, from the command line."""

    mountpoint: str
    lowerdirs: tuple[str, ...]
    upperdir: str | None
    workdir: str | None
    read_only: bool
    foreground: bool
    debug: bool
    source: str | None
    fuse_options: frozenset[str]
    """Passed to libfuse as they are (allow_other, default_permissions, fsname=..., nosuid...)."""
    warnings: tuple[str, ...]
    control: str | None = None
    """``control=ADDRESS``: where the daemon serves its control socket (freeze/thaw for a consistent
    ``overlayctl commit``); a leading ``@`` puts it in the abstract namespace (see `control`)."""
    view: compat.ViewOptions = field(default_factory=compat.ViewOptions)
    """fuse-overlayfs's options (ID mapping, squash, xattr permissions, fsync...), see `compat`."""
    features: CopyUpFeatures = field(default_factory=CopyUpFeatures)
    """``redirect_dir=`` and ``metacopy=``: constant-cost copy-up in the kernel's format (on unless off)."""
    poll_us: int | None = None
    """``poll_us=N``: µs the request loop polls /dev/fuse for the next request before sleeping
    (0: never); None: the default (see `polling`)."""
    passthrough: bool = True
    """``passthrough=off``: never let the kernel read and write upper files itself (see
    `overlayfuse.daemon.passthrough`; on by default where it can be)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)", status=2)


def _argument_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="overlayfuse",
        usage="%(prog)s [-h] [-V] [-f] [-d] [-o OPTS]... [SOURCE] MOUNTPOINT",
        description="Mount a merged view of read-only lower dirs and an optional writable upper dir.",
        # Raw: a command wrapped in the middle cannot be copied and pasted.
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  overlayfuse -o lowerdir=/l/app:/l/base,upperdir=/c/upper,workdir=/c/work /mnt",
    )
    parser.add_argument("-o", dest="opts", action="append", default=[], metavar="OPTS",
                        help="comma-separated options: lowerdir=A:B (leftmost is the top), upperdir=,"
                             " workdir=, ro, allow_other, default_permissions, redirect_dir=on|off,"
                             " metacopy=on|off (both on by default), FUSE options, and"
                             " fuse-overlayfs's (uidmapping=, gidmapping=, squash_to_*, xattr_permissions=,"
                             " fsync=0, volatile, noacl, noxattrs=1, static_nlink, timeout=: see README)")
    parser.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("-d", "--debug", action="store_true",
                        help="log every request (implies -f)")
    parser.add_argument("-V", "--version", action="version", version=f"overlayfuse {__version__}")
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    return parser  # fmt: skip


def split_escaped(text: str, separator: str, quoted_keys: frozenset[str] = frozenset()) -> list[str]:
    """Split on SEPARATOR except where a backslash escapes it; backslash escapes are kept for later.
    A value of one of QUOTED_KEYS that starts with a double quote runs to the closing quote, commas
    included (``context="...:c1,c2"``), as in the kernel's mount option parser."""
    parts, current, escaped, quoted = [], [], False, False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"' and (quoted or _opens_quote(current, quoted_keys)):
            quoted = not quoted
            current.append(char)
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def _opens_quote(current: list[str], quoted_keys: frozenset[str]) -> bool:
    text = "".join(current)
    return text.endswith("=") and text[:-1] in quoted_keys


def unescape(text: str) -> str:
    """Drop the backslash of each ``\\X`` pair, as the kernel does for overlay paths."""
    out, escaped = [], False
    for char in text:
        if escaped or char != "\\":
            out.append(char)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def escape(path: str) -> str:
    """PATH as it must be written inside ``-o`` (the inverse of `unescape`): options are split on
    ``,`` and lowerdir on ``:``, so those and the backslash itself get a backslash."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def parse_args(argv: list[str], *, euid: int | None = None) -> MountOptions:
    """Parse the command line; raises UsageError on malformed input. Touches no file."""
    args = _argument_parser().parse_args(argv)
    if len(args.paths) > 2:
        raise UsageError(f"too many arguments: {' '.join(args.paths)}", status=2)
    source = args.paths[0] if len(args.paths) == 2 else None
    mountpoint = args.paths[-1]

    lowerdirs: list[str] = []
    upperdir = workdir = control = None
    poll_us: int | None = None
    passthrough = True
    read_only = False
    fuse_options: set[str] = set()
    warnings: list[str] = []
    misspelt: dict[str, str] = {}  # a known key -> the unknown option that looks like it
    # As fuse-overlayfs: the kernel checks permissions for everyone, and root's mounts serve every user.
    is_root = (os.geteuid() if euid is None else euid) == 0
    default_permissions = True
    allow_other = is_root
    view = compat.ViewOptions()
    features = CopyUpFeatures()
    debug = args.debug
    for opts in args.opts:
        for raw in split_escaped(opts, ",", compat.QUOTED_KEYS):
            if not raw:
                continue
            key, has_value, value = raw.partition("=")
            key = unescape(key)
            if key == "lowerdir":
                lowerdirs = [unescape(part) for part in split_escaped(value, ":")]
                if any(not part for part in lowerdirs):
                    raise UsageError(f"lowerdir={value!r} has an empty layer path")
            elif key in ("upperdir", "workdir"):
                if not value:
                    raise UsageError(f"{key}= needs a directory")
                if key == "upperdir":
                    upperdir = unescape(value)
                else:
                    workdir = unescape(value)
            elif key == "ro":
                read_only = True
            elif key == "control":  # ours, not the kernel's: the freeze socket overlayctl uses
                if not value:
                    raise UsageError("control= needs a socket address (a path, or @NAME)")
                control = unescape(value)
            elif key == "allow_other":
                allow_other = True
            elif key == "noallow_other":
                allow_other = False
            elif key == "default_permissions":
                default_permissions = True
            elif key == "nodefault_permissions":
                default_permissions = False
            elif key == "poll_us":
                poll_us = _poll_us(value)
            elif key == "passthrough":
                passthrough = _choice(key, value, ("on", "off")) == "on"
            elif key == "debug":  # fuse-overlayfs's -o debug: as -d
                debug = True
            elif key in compat.KEYS:
                try:
                    view = compat.apply(view, key, bool(has_value), value)
                except compat.OptionError as exc:
                    raise UsageError(str(exc)) from None
            elif key in _FEATURE_VALUES:
                features = _feature(features, key, value)
            elif key in _IGNORED or key.startswith("x-") or key in _KERNEL_TUNABLES:
                continue
            elif key in _FUSE_FLAGS and not has_value:
                fuse_options.add(key)
            elif key in _FUSE_VALUED and has_value:
                fuse_options.add(f"{key}={unescape(value)}")
            elif key == "max_read":
                # pyfuse3 cannot repeat max_read in its INIT reply, and libfuse then refuses the
                # session: the mount would come up dead. Reads come in requests of up to 1 MiB.
                warnings.append(f"option {raw!r} ignored: pyfuse3 cannot pass max_read= on to the kernel")
            else:
                close = suggest(key)
                if close:
                    misspelt[close] = raw
                hint = f" (did you mean {close}{'=' if has_value else ''}?)" if close else ""
                warnings.append(f"unknown option {raw!r} ignored{hint}")

    if not lowerdirs:
        raise UsageError("missing lowerdir=: at least one lower layer is required" + _typo_note("lowerdir", misspelt))
    if (upperdir is None) != (workdir is None):
        given, missing = ("upperdir", "workdir") if workdir is None else ("workdir", "upperdir")
        raise UsageError(f"{given}= given without {missing}=: they are used together" + _typo_note(missing, misspelt))
    if upperdir is None:
        read_only = True  # as the kernel: no upper layer means a read-only mount

    if is_root:
        # Like the kernel's overlay mounted by root (and unlike FUSE's default): device nodes open and
        # setuid bits work, so a merged rootfs can be chrooted into. "nodev"/"nosuid" still win.
        for flag in ("dev", "suid"):
            if "no" + flag not in fuse_options:
                fuse_options.add(flag)
        if "auto_unmount" in fuse_options and not {"nodev", "nosuid"} <= fuse_options and _mounts_through_fusermount():
            # libfuse < 3.17 mounts through fusermount3 for auto_unmount, which always adds nosuid,nodev.
            warnings.append("auto_unmount: the mount will be nosuid,nodev (fusermount3 mounts it so): "
                            "leave auto_unmount out for device nodes and setuid programs to work")
    if allow_other:
        fuse_options.add("allow_other")
    if default_permissions:
        fuse_options.add("default_permissions")
    if read_only:
        fuse_options.add("ro")
    if not any(o.startswith("fsname=") for o in fuse_options):
        fuse_options.add(f"fsname={source or FS_TYPE}")
    fuse_options.discard(next((o for o in fuse_options if o.startswith("subtype=")), ""))
    fuse_options.add(f"subtype={FS_TYPE}")

    return MountOptions(
        mountpoint=os.path.abspath(mountpoint),
        lowerdirs=tuple(os.path.abspath(d) for d in lowerdirs),
        upperdir=os.path.abspath(upperdir) if upperdir else None,
        workdir=os.path.abspath(workdir) if workdir else None,
        read_only=read_only,
        foreground=args.foreground or debug,
        debug=debug,
        source=source,
        fuse_options=frozenset(fuse_options),
        warnings=tuple(warnings),
        control=control if control is None or control.startswith("@") else os.path.abspath(control),
        view=view,
        features=features,
        poll_us=poll_us,
        passthrough=passthrough,
    )


def _mounts_through_fusermount() -> bool:
    """Whether root's mount with auto_unmount goes through fusermount3 (libfuse before 3.17; from
    3.17 libfuse mounts itself and runs fusermount3 only to unmount when the daemon dies)."""
    from .binding import libfuse_version  # pyfuse3: only for this rare option

    version = libfuse_version()
    return version is None or version < 317


def _poll_us(value: str) -> int:
    if not value.isdigit() or int(value) > MAX_POLL_US:
        raise UsageError(f"poll_us={value!r}: a number of microseconds from 0 to {MAX_POLL_US}")
    return int(value)


def _feature(features: CopyUpFeatures, key: str, value: str) -> CopyUpFeatures:
    """FEATURES with ``KEY=VALUE`` (redirect_dir= or metacopy=) applied, or a UsageError."""
    on = _choice(key, value, _FEATURE_VALUES[key]) == "on"
    return replace(features, redirect_dir=on) if key == "redirect_dir" else replace(features, metacopy=on)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    """VALUE of ``KEY=VALUE`` if it is one of ALLOWED, else a UsageError naming them."""
    if value not in allowed:
        raise UsageError(f"{key}={value}: takes {', '.join(allowed)}")
    return value


def suggest(key: str) -> str | None:
    """The known option KEY is probably a misspelling of (``wrokdir`` -> ``workdir``), or None."""
    if key in _HABITS:
        return _HABITS[key]
    import difflib  # only for an unknown option: not on every daemon's start

    close = difflib.get_close_matches(key, sorted(_KNOWN), n=1, cutoff=0.75)
    return close[0] if close else None


def _typo_note(key: str, misspelt: dict[str, str]) -> str:
    raw = misspelt.get(key)
    if raw is None:
        return ""
    note = f" (is {raw.partition('=')[0]!r} a misspelt {key}=?"
    if raw.startswith("lowerdirs"):
        note += " lowerdirs is the config file's key; the command line takes lowerdir=TOP:...:BASE"
    return note + ")"


def validate(options: MountOptions, *, dead_mountpoint: bool = False) -> None:
    """Check the directories the way the kernel does at mount time; raises UsageError on the first problem.
    DEAD_MOUNTPOINT: a dead FUSE mount is there, which the daemon detaches first (only names are checked)."""
    if not dead_mountpoint:
        _require_dir(options.mountpoint, "mountpoint")
    _check_apart(options)
    for lower in options.lowerdirs:
        _require_dir(lower, "lowerdir")
        _require_readable(lower, "lowerdir")
    if options.upperdir is None or options.workdir is None:
        return
    upper = _require_dir(options.upperdir, "upperdir")
    work = _require_dir(options.workdir, "workdir")
    _require_readable(options.upperdir, "upperdir")
    if not options.read_only and not os.access(options.upperdir, os.W_OK):
        raise UsageError(f"upperdir {options.upperdir}: not writable")
    if upper.st_dev != work.st_dev:
        raise UsageError(
            f"workdir {options.workdir} is not on the same filesystem as upperdir {options.upperdir}"
        )
    real_upper, real_work = os.path.realpath(options.upperdir), os.path.realpath(options.workdir)
    if real_upper == real_work:
        raise UsageError("workdir and upperdir must be different directories")
    if is_inside(real_work, real_upper):
        raise UsageError(f"workdir {options.workdir} is inside upperdir {options.upperdir}")
    if is_inside(real_upper, real_work):
        raise UsageError(f"upperdir {options.upperdir} is inside workdir {options.workdir}")
    if not options.read_only:
        holder = inuse.holder(options.workdir)  # the daemon's own claim decides; this says it early
        if holder:
            raise UsageError(f"workdir {options.workdir} is in use by {holder}: unmount that first, "
                             "or give this mount an upperdir and workdir of its own")


def _check_apart(options: MountOptions) -> None:
    """No layer dir inside the mountpoint, and the mountpoint inside none: the daemon would reach
    its own mount through it and wait on itself (fuse-overlayfs's users met that as a hang)."""
    mountpoint = os.path.realpath(options.mountpoint)
    dirs = [("lowerdir", d) for d in options.lowerdirs]
    dirs += [(what, d) for what, d in (("upperdir", options.upperdir), ("workdir", options.workdir)) if d]
    for what, path in dirs:
        real = os.path.realpath(path)
        if real == mountpoint:
            raise UsageError(f"{what} {path} is the mountpoint itself: mount somewhere else")
        if is_inside(real, mountpoint):
            raise UsageError(f"{what} {path} is inside the mountpoint {options.mountpoint}: the mount would "
                             "hide it from the daemon, which would wait on itself; keep it outside")
        if is_inside(mountpoint, real):
            raise UsageError(f"the mountpoint {options.mountpoint} is inside {what} {path}: the daemon would "
                             "reach its own mount through it and wait on itself; mount outside it")


def is_inside(path: str, directory: str) -> bool:
    """Whether PATH is strictly below DIRECTORY, by name (resolve symlinks first)."""
    return path.startswith(directory.rstrip("/") + "/")


def _require_dir(path: str, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path}: not a directory")
    return st


def _require_readable(path: str, what: str) -> None:
    try:
        check_layer_readable(path)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read it: {exc.strerror}") from None
