"""Mount configs: ``/etc/overlayfuse/NAME.conf``, one mount each, in TOML, checked before anything runs.

A config names what to stack and where::

    mountpoint = "/srv/web/rootfs"
    lowerdirs = ["/srv/layers/app", "/srv/layers/base"]   # top first, as lowerdir= is
    upperdir = "/srv/web/upper"                            # with workdir, or neither (read-only)
    workdir = "/srv/web/work"
    options = ["nosuid"]                                   # more mount options, one per item
    read_only = false

or an image from the store instead of ``lowerdirs``, with a container for the writable layer::

    mountpoint = "/srv/web/rootfs"
    image = "debian:12"
    container = "web"        # created from the image on first start; its upper/work are in the store
    store = "/var/lib/overlayfuse"

Checking happens in two steps. `load_config` reads the file and checks its shape (known keys, types,
absolute paths, which keys go together) without touching anything else. `plan_mount` then checks
the world (directories exist and are usable, the image and its layers are in the store) and turns
the config into the daemon's command line, using the daemon's own option checks last, so what
``overlayctl check`` accepts is what the daemon accepts. Every problem is a `ConfigError` that
names the file, the key and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import logging
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..containers.lifecycle import upper_dir, work_dir
from ..daemon.options import UsageError, escape, is_inside, parse_args, validate
from ..errors import ConfigError, UserError
from ..images.refs import resolve_image
from ..images.store import DEFAULT_ROOT, ROOT_ENV, Store, check_container_name
from ..linux import mounttable
from ..overlay.layers import check_layer_readable

log = logging.getLogger(__name__)

CONFIG_DIR = Path("/etc/overlayfuse")
CONFIG_DIR_ENV = "OVERLAYFUSE_CONFIG_DIR"
SUFFIX = ".conf"

#: A mount's name is a file name and a systemd instance name (``overlayfuse@NAME``): no escaping
#: needed in either, so no slash, no space, no ``\``, and nothing that starts with a dot or dash.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")

#: Each key and the TOML type it takes (list items are checked separately).
_KEYS: dict[str, type] = {
    "mountpoint": str,
    "lowerdirs": list,
    "upperdir": str,
    "workdir": str,
    "image": str,
    "container": str,
    "store": str,
    "options": list,
    "read_only": bool,
    "debug": bool,
}
_PATH_KEYS = ("mountpoint", "upperdir", "workdir", "store")

#: Options that have a key of their own: one way to say each thing.
_OWN_KEYS = {
    "lowerdir": "lowerdirs", "upperdir": "upperdir", "workdir": "workdir", "ro": "read_only = true",
}  # fmt: skip

_TYPE_NAMES = {
    str: "a string", bool: "true or false", list: "a list", dict: "a table", int: "an integer", float: "a number",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class MountConfig:
    """What one config file says, typed and checked for shape (not yet against the filesystem)."""

    name: str
    path: Path
    mountpoint: str
    lowerdirs: tuple[str, ...] = ()
    upperdir: str | None = None
    workdir: str | None = None
    image: str | None = None
    container: str | None = None
    store: str | None = None
    options: tuple[str, ...] = ()
    read_only: bool = False
    debug: bool = False


@dataclass(frozen=True, slots=True)
class MountPlan:
    """What the daemon will mount for a config, checked against the filesystem and the store."""

    config: MountConfig
    lowerdirs: tuple[str, ...]
    """Top first, as the daemon's ``lowerdir=`` wants them (an image's layers end up here)."""
    upperdir: str | None
    workdir: str | None
    read_only: bool
    new_container: bool = False
    """The config's container does not exist yet: ``service run`` creates it from the image."""
    dead_mount: bool = False
    """The mountpoint holds a FUSE mount whose daemon died: the daemon detaches it when it starts."""
    extra_options: tuple[str, ...] = ()
    """Options the service adds (a container's control socket), after the config's own."""
    mountpoint: str = ""
    """The config's mountpoint with symlinks resolved, as the mount table will show it."""

    def describe(self) -> str:
        """One line for ``overlayctl check``: what will be mounted where."""
        config = self.config
        if config.image or config.container:
            layers = len(self.lowerdirs) - (1 if config.container and self.upperdir is None else 0)
            parts = [f"image {config.image}"] if config.image else []
            if config.container:
                created = " (created on first start)" if self.new_container else ""
                parts.append(f"container {config.container}{created}")
            what = ", ".join(parts) + f" ({_count(layers, 'layer')})"
        else:
            what = _count(len(self.lowerdirs), "lowerdir")
            if self.upperdir:
                what += f" + upperdir {self.upperdir}"
        mode = "read-only" if self.read_only else "read-write"
        note = "; the dead mount there will be detached first" if self.dead_mount else ""
        return f"{what} on {config.mountpoint}, {mode}{note}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# -- finding and reading ----------------------------------------------------------------------------


def config_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where NAME.conf files live: OVERRIDE, else ``$OVERLAYFUSE_CONFIG_DIR``, else /etc/overlayfuse."""
    return Path(override or os.environ.get(CONFIG_DIR_ENV) or CONFIG_DIR)


def check_name(name: str) -> str:
    """NAME if it can be both a config file's name and a systemd instance name."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"invalid mount name {name!r}: use letters, digits, '_', '.' and '-' (not first), up to 100"
        )
    return name


def locate(name_or_file: str, directory: str | os.PathLike[str] | None = None) -> tuple[str, Path]:
    """(name, path) of the config NAME_OR_FILE means: a path if it has a slash or ends in .conf, else
    DIRECTORY/NAME.conf. A file's name is its file name without ``.conf``."""
    if "/" in name_or_file or name_or_file.endswith(SUFFIX):
        path = Path(name_or_file)
        return path.name.removesuffix(SUFFIX) or path.name, path
    return check_name(name_or_file), config_dir(directory) / f"{name_or_file}{SUFFIX}"


def load_config(path: str | os.PathLike[str], name: str | None = None) -> MountConfig:
    """Read and shape-check the config at PATH (named NAME, else after the file)."""
    path = Path(path)
    name = name if name is not None else path.name.removesuffix(SUFFIX)
    try:
        data = tomllib.loads(path.read_bytes().decode())
    except FileNotFoundError:
        hint = f" (overlayctl service install {name} writes an example)" if _NAME.fullmatch(name) else ""
        raise ConfigError(f"{path}: no such config file{hint}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path, name)


def parse_config(data: dict[str, Any], path: Path, name: str) -> MountConfig:
    """Check DATA (a parsed TOML table) for shape; the first problem is a `ConfigError`."""

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {problem}")

    def at(key: str) -> str:
        return f"{path}: {key}"

    for key, value in data.items():
        if key not in _KEYS:
            close = difflib.get_close_matches(key, list(_KEYS), n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}? " if close else ""
            if key == "lowerdir":
                hint = 'did you mean lowerdirs? it takes a list, top first: lowerdirs = ["/top", "/base"]; '
            known = ", ".join(_KEYS)
            raise ConfigError(f"{path}: unknown key {key!r} ({hint}known keys: {known})")
        expected = _KEYS[key]
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            hint = ""
            if key == "lowerdirs" and isinstance(value, str):
                hint = ', e.g. lowerdirs = ["/layers/top", "/layers/base"] (top first)'
            raise fail(key, f"must be {_TYPE_NAMES[expected]}, not {_type_name(value)}{hint}")
    for key in ("lowerdirs", "options"):
        for index, item in enumerate(data.get(key, [])):
            if not isinstance(item, str) or not item:
                raise fail(f"{key}[{index}]", f"must be a non-empty string, not {_type_name(item)}")
    for key in _PATH_KEYS:
        if key in data:
            _check_path(data[key], at(key))
    for index, lower in enumerate(data.get("lowerdirs", [])):
        _check_path(lower, at(f"lowerdirs[{index}]"))

    if "mountpoint" not in data:
        raise ConfigError(f"{path}: mountpoint: missing (the directory to mount on)")
    has_lowers, has_image, has_container = "lowerdirs" in data, "image" in data, "container" in data
    if has_lowers and (has_image or has_container):
        other = "image" if has_image else "container"
        raise ConfigError(f"{path}: lowerdirs and {other} are both given: use one or the other")
    if not (has_lowers or has_image or has_container):
        raise ConfigError(f"{path}: nothing to mount: give lowerdirs (a list of directories) or image")
    if has_lowers and not data["lowerdirs"]:
        raise fail("lowerdirs", "is empty: at least one lower directory is needed")
    if ("upperdir" in data) != ("workdir" in data):
        given, missing = ("upperdir", "workdir") if "upperdir" in data else ("workdir", "upperdir")
        raise ConfigError(f"{path}: {given} is given without {missing}: they go together")
    if not has_lowers:
        for key in ("upperdir", "workdir"):
            if key in data:
                raise fail(key, "not used with an image: a container keeps its upper and work dirs in the store")
    elif "store" in data:
        raise fail("store", "only used with image or container")
    if has_container:
        try:
            check_container_name(data["container"])
        except UserError as exc:
            raise fail("container", str(exc)) from None
    for index, option in enumerate(data.get("options", [])):
        _check_option(option, at(f"options[{index}]"))

    return MountConfig(
        name=name,
        path=path,
        mountpoint=os.path.normpath(data["mountpoint"]),
        lowerdirs=tuple(os.path.normpath(p) for p in data.get("lowerdirs", ())),
        upperdir=_norm(data.get("upperdir")),
        workdir=_norm(data.get("workdir")),
        image=data.get("image"),
        container=data.get("container"),
        store=_norm(data.get("store")),
        options=tuple(data.get("options", ())),
        read_only=data.get("read_only", False),
        debug=data.get("debug", False),
    )


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _norm(value: str | None) -> str | None:
    return None if value is None else os.path.normpath(value)


def _check_path(value: str, where: str) -> None:
    if not value:
        raise ConfigError(f"{where}: is empty (an absolute path is needed)")
    if not value.startswith("/"):
        raise ConfigError(f"{where}: {value!r} is relative: use an absolute path (the service runs in /)")
    if "\0" in value or "\n" in value:
        raise ConfigError(f"{where}: {value!r} has a NUL or newline in it")


def _check_option(option: str, where: str) -> None:
    key = option.partition("=")[0]
    if key in _OWN_KEYS:
        raise ConfigError(f"{where}: {option!r}: say it with the {_OWN_KEYS[key]} key instead")
    if "," in option:
        raise ConfigError(f"{where}: {option!r} has a comma: give each option as its own list item")


# -- checking against the world ---------------------------------------------------------------------


def plan_mount(config: MountConfig, store: str | None = None) -> MountPlan:
    """Check CONFIG against the filesystem (and the store) and say what the daemon will mount.

    STORE is the image store when the config has no ``store`` key (``overlayctl --root``).
    """
    where = str(config.path)
    dead = _check_mountpoint(config.mountpoint, f"{where}: mountpoint")
    if config.image or config.container:
        plan = _plan_from_store(config, store_root(config, store))
    else:
        for index, lower in enumerate(config.lowerdirs):
            _check_dir(lower, f"{where}: lowerdirs[{index}]", readable=True)
        for key in ("upperdir", "workdir"):
            value = getattr(config, key)
            if value is not None:
                _check_dir(value, f"{where}: {key}")
        plan = MountPlan(
            config, config.lowerdirs, config.upperdir, config.workdir,
            read_only=config.read_only or config.upperdir is None,
        )  # fmt: skip
    # realpath does not fail on a dead mount: it takes what it cannot lstat for a plain name.
    plan = dataclasses.replace(plan, dead_mount=dead, mountpoint=os.path.realpath(config.mountpoint))
    _check_not_nested(plan)
    _check_with_daemon_rules(plan)
    return plan


def _check_mountpoint(path: str, where: str) -> bool:
    """True when PATH is a dead FUSE mount (fine: the daemon detaches it); raise if it is no directory.

    Asked first, and by statvfs (in `mounttable`): a dead mount may still answer stat from the
    kernel's attribute cache."""
    if mounttable.is_dead_fuse_mount(path):
        return True
    _check_dir(path, where)
    entries = mounttable.mounts_at(os.path.realpath(path))
    if entries:  # a live mount: ours would hide it (or stack a second daemon on a running one)
        raise ConfigError(
            f"{where}: {path} is already in use ({entries[-1].fstype} from {entries[-1].source}): unmount it first"
        )
    return False


def _check_dir(path: str, where: str, readable: bool = False) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{where}: {path}: {_reason(exc)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{where}: {path} is not a directory")
    if readable:
        try:
            check_layer_readable(path)
        except OSError as exc:
            raise ConfigError(f"{where}: {path}: cannot read it: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such directory"
    return (exc.strerror or str(exc)).lower()


def _check_not_nested(plan: MountPlan) -> None:
    """The daemon reads its layers by path: a layer under the mountpoint, or the mountpoint in a
    layer, would have it read its own mount (and hang on itself, or stack the view into itself)."""
    mountpoint = plan.mountpoint
    layers = [("lowerdirs", d) for d in plan.lowerdirs]
    if plan.upperdir and plan.workdir:
        layers += [("upperdir", plan.upperdir), ("workdir", plan.workdir)]
    for key, layer in layers:
        real = os.path.realpath(layer)
        if real == mountpoint or is_inside(real, mountpoint):
            raise ConfigError(
                f"{plan.config.path}: {key}: {layer} is the mountpoint or inside it: the mount would hide it"
            )
        if is_inside(mountpoint, real):
            raise ConfigError(
                f"{plan.config.path}: mountpoint: {plan.config.mountpoint} is inside {key} {layer}: "
                "the mount would show up inside its own layer"
            )


def _check_with_daemon_rules(plan: MountPlan) -> None:
    """Parse and validate the daemon's own command line, so the daemon cannot refuse what we accept."""
    where = plan.config.path
    try:
        options = parse_args(daemon_args(plan), euid=0)
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    unknown = [w for w in options.warnings if w.startswith("unknown option ")]
    if unknown:
        option = unknown[0].removeprefix("unknown option ").replace(" ignored", "", 1)
        raise ConfigError(f"{where}: options: unknown mount option {option}")
    if plan.new_container:  # its upper and work dirs do not exist until it is created
        options = dataclasses.replace(options, upperdir=None, workdir=None)
    try:  # a dead mount: the daemon detaches it first, and the checks would stumble on ENOTCONN
        validate(options, dead_mountpoint=plan.dead_mount)
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# -- images and containers ---------------------------------------------------------------------------


def store_root(config: MountConfig, default: str | None = None) -> str:
    """The image store CONFIG uses: its ``store`` key, else DEFAULT, else the store's own default."""
    return config.store or default or os.environ.get(ROOT_ENV) or str(DEFAULT_ROOT)


def _plan_from_store(config: MountConfig, root: str) -> MountPlan:
    where = config.path
    key = "store" if config.store else "image" if config.image else "container"
    if not os.path.isdir(root):
        raise ConfigError(f"{where}: {key}: the image store {root} does not exist (no image was ever imported there)")
    try:
        store = Store.open(root)
        image = resolve_image(store, config.image) if config.image else None
    except UserError as exc:
        raise ConfigError(f"{where}: {key}: {exc} (in the store {root})") from None
    record = None
    if config.container:
        try:
            record = store.container(config.container)
        except UserError:
            if image is None:
                raise ConfigError(
                    f"{where}: container: no container {config.container} in the store {root}; "
                    "name an image to create it from"
                ) from None
    if record is not None and image is not None and record.image != image.id:
        raise ConfigError(
            f"{where}: container: {config.container} was made from image {record.image}, "
            f"not from {config.image} ({image.id})"
        )
    if record is None:
        assert image is not None  # without a container record there is an image (see above)
        diff_ids, what = store.image_diff_ids(image), f"image: {config.image}"
    else:
        diff_ids, what = list(record.layers), f"container: {config.container}"
    _check_layers(store, diff_ids, f"{where}: {what}")
    lowers = tuple(str(store.layer_dir(d)) for d in reversed(diff_ids))
    if not config.container:  # the image alone: nothing to write to
        return MountPlan(config, lowers, None, None, read_only=True)
    upper, work = str(upper_dir(store, config.container)), str(work_dir(store, config.container))
    if record is None:
        return MountPlan(config, lowers, upper, work, read_only=config.read_only, new_container=True)
    if config.read_only:  # the container's changes stay visible, and nothing can change them
        return MountPlan(config, (upper, *lowers), None, None, read_only=True)
    return MountPlan(config, lowers, upper, work, read_only=False)


def _check_layers(store: Store, diff_ids: list[str], where: str) -> None:
    if not diff_ids:
        raise ConfigError(f"{where}: has no layers")
    for diff_id in diff_ids:
        if not store.layer_dir(diff_id).is_dir():
            raise ConfigError(f"{where}: layer {diff_id} is missing from the store {store.root}")


# -- the daemon's command line ----------------------------------------------------------------------


def daemon_args(plan: MountPlan, debug: bool = False) -> list[str]:
    """The arguments after ``overlayfuse``: in the foreground (``-d`` with DEBUG or the config's
    ``debug``, which logs every request), named ``overlayfuse@NAME`` in the mount table."""
    opts = ["lowerdir=" + ":".join(escape(d) for d in plan.lowerdirs)]
    if plan.upperdir and plan.workdir:
        opts += [f"upperdir={escape(plan.upperdir)}", f"workdir={escape(plan.workdir)}"]
    if plan.read_only:
        opts.append("ro")
    opts += plan.config.options
    opts += plan.extra_options
    flag = "-d" if debug or plan.config.debug else "-f"
    return [flag, "-o", ",".join(opts), f"overlayfuse@{plan.config.name}", plan.mountpoint or plan.config.mountpoint]
