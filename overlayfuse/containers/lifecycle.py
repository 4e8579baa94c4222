"""Containers: a writable upper dir over an image's layers, mounted by an overlayfuse daemon.

A container is ``containers/<name>/`` in the store: ``container.json`` (`ContainerRecord`), ``upper/``
and ``work/`` (the daemon's upperdir and workdir) and ``daemon.log`` (its stderr, appended). Mounting
starts ``overlayfuse -f`` in a session of its own, with the image's layer dirs as lowerdir (top
first) and asks it for sd_notify readiness: `mount_container` returns only once the daemon says
READY=1, which it says when the mount answers. The record then holds the mountpoint and the
daemon's pid, and the daemon serves a control socket (`overlayfuse.daemon.control`) that ``commit`` uses
to freeze the mount.

The record says what we started; the mount table and /proc say what is true. A container whose
record says mounted but whose daemon is gone with its mount still there (answering ENOTCONN) is
*dead*: ``ps`` shows it so, and ``umount`` detaches the dead mount and clears the record. One whose
daemon and mount are both gone was unmounted cleanly (umount(8), SIGTERM): it is *stopped*, even
before a command clears its record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..daemon.fstype import FS_TYPE
from ..errors import StoreError
from ..images.refs import resolve_image
from ..images.store import ContainerRecord, ImageRecord, Store, check_container_name, write_json_atomic
from ..linux import mounttable
from ..linux.sockets import sockaddr

log = logging.getLogger(__name__)

#: How long a daemon has to mount and answer. Generous: the machine may be busy, and a first mount
#: probes the workdir; a daemon that fails says so at once (it exits), so this only bounds a hang.
READY_TIMEOUT = 30.0
#: After umount(8) returns, the daemon notices and exits within milliseconds; this bounds a stuck one.
EXIT_TIMEOUT = 10.0
#: umount(8) or fusermount3 on a live mount: returns at once unless something is badly wrong.
UMOUNT_TIMEOUT = 30.0
FUSE_FSTYPE = f"fuse.{FS_TYPE}"
LOG_NAME = "daemon.log"

RUNNING, STOPPED, DEAD = "running", "stopped", "dead"


@dataclass(frozen=True, slots=True)
class ContainerState:
    """One line of ``overlayctl ps``: a container, or an overlayfuse mount that is not one."""

    name: str  # "" for a mount that is not a container
    image: str  # a tag of its image, else its short id ("" when not a container)
    mountpoint: str | None
    pid: int | None
    state: str  # running, stopped or dead
    read_only: bool = False
    source: str = ""  # the mount's fsname, for mounts that are not containers


# -- names and paths --------------------------------------------------------------------------------

_ADJECTIVES = (
    "brave", "calm", "clever", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid",
    "merry", "nimble", "proud", "quiet", "sharp", "stoic", "sunny", "tender", "vivid", "witty",
)  # fmt: skip
_NAMES = (
    "babbage", "curie", "dijkstra", "euler", "fermat", "gauss", "hopper", "hypatia", "knuth",
    "lamport", "lovelace", "noether", "pascal", "ritchie", "shannon", "thompson", "turing", "wirth",
)  # fmt: skip


def generate_name(store: Store) -> str:
    """A free docker-like name (``adjective_scientist``), with a number when those run out."""
    taken = {record.name for record in store.containers()}
    for _ in range(50):
        name = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NAMES)}"
        if name not in taken:
            return name
    return f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NAMES)}_{secrets.token_hex(3)}"


def lower_dirs(store: Store, record: ContainerRecord) -> list[Path]:
    """The container's layer dirs, top first, as overlay's lowerdir lists them."""
    return [store.layer_dir(diff_id) for diff_id in reversed(record.layers)]


def upper_dir(store: Store, name: str) -> Path:
    return store.container_path(name) / "upper"


def work_dir(store: Store, name: str) -> Path:
    return store.container_path(name) / "work"


def log_path(store: Store, name: str) -> Path:
    return store.container_path(name) / LOG_NAME


def control_address(store: Store, name: str) -> str:
    """The container daemon's control socket: abstract, named after the container dir (a store path
    can be longer than a socket path may be), so that any overlayctl can find it from the store."""
    import hashlib  # here: `ps` lists containers without it

    key = hashlib.sha256(os.fsencode(store.container_path(name))).hexdigest()[:32]
    return f"@overlayfuse/container/{key}"


def image_label(images: Sequence[ImageRecord], image_id: str) -> str:
    """How ``ps`` names an image: its first tag among IMAGES (the store's), else its short id (also
    once the image is gone)."""
    for record in images:
        if record.id == image_id and record.tags:
            return record.tags[0]
    return image_id.split(":", 1)[-1][:12]


def _is_container(store: Store, text: str) -> bool:
    try:
        check_container_name(text)
    except StoreError:
        return False
    return (store.container_path(text) / "container.json").is_file()


# -- creating -------------------------------------------------------------------------------------


def create_container(store: Store, name: str | None, image_ref: str, read_only: bool = False) -> ContainerRecord:
    """The container NAME on IMAGE_REF: created (with an empty upper dir) or, if it exists and comes
    from the same image, reused as it is. NAME None picks a free docker-like name.

    READ_ONLY is accepted for symmetry with `mount_container`; a container's upper dir is always
    made, whether its first mount writes or not.
    """
    with store.locked():
        image = resolve_image(store, image_ref)
        return _create_locked(store, name, image)


def _create_locked(store: Store, name: str | None, image: ImageRecord) -> ContainerRecord:
    if name is None:
        name = generate_name(store)
    check_container_name(name)
    if _is_container(store, name):
        existing = store.container(name)
        _check_same_image(store, existing, image)
        return existing
    layers = tuple(store.image_diff_ids(image))
    for diff_id in layers:
        if not store.has_layer(diff_id):
            raise StoreError(f"image {image.id}: its layer {diff_id} is missing from the store {store.root}")
    record = ContainerRecord(name=name, image=image.id, layers=layers)
    with store.staging("container") as staged:
        (staged / "upper").mkdir(mode=0o755)
        if layers:
            _adopt_root(staged / "upper", store.layer_dir(layers[-1]))
        (staged / "work").mkdir(mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            store.discard(store.container_path(name))  # a leftover without container.json
        target = store.container_path(name)
        write_json_atomic(staged / "container.json", dataclasses.asdict(record))
        os.rename(staged, target)
    log.info("created container %s from %s", name, image.id)
    return record


def _adopt_root(upper: Path, image_root: Path) -> None:
    """Give a new upper dir the image root's mode, owner and times.

    The merged root shows the upper dir's own metadata (as with the kernel's overlay): a fresh
    0755 dir made now would change the container's ``/`` from the image's before anything was done
    in it, and a commit would carry that change.
    """
    st = os.lstat(image_root)
    with contextlib.suppress(PermissionError):  # not root: the owner stays ours
        os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, stat.S_IMODE(st.st_mode))
    os.utime(upper, ns=(st.st_atime_ns, st.st_mtime_ns))


def _check_same_image(store: Store, existing: ContainerRecord, image: ImageRecord) -> None:
    if existing.image != image.id:
        raise StoreError(
            f"container {existing.name} already exists, from image {image_label(store.images(), existing.image)}: "
            "choose another --name or remove it first"
        )


# -- mounting -------------------------------------------------------------------------------------


def mount_container(
    store: Store, name_or_image: str, mountpoint: str | os.PathLike[str], read_only: bool = False,
    *, name: str | None = None,
) -> ContainerRecord:  # fmt: skip
    """Mount a container on MOUNTPOINT and return once the mount answers.

    NAME_OR_IMAGE is an existing container's name, or an image (tag, id or id prefix), which gets
    a new container (called NAME, or a generated name; an existing NAME from that image is reused).
    READ_ONLY mounts the container's upper dir as the top lower layer, so nothing can change.
    """
    target = os.path.realpath(mountpoint)  # as the mount table will show it
    with store.locked():
        existing: ContainerRecord | None = None
        image: ImageRecord | None = None
        if name is None and _is_container(store, name_or_image):
            existing = store.container(name_or_image)
        elif name is not None and name_or_image == name and _is_container(store, name):
            existing = store.container(name)
        else:
            try:
                image = resolve_image(store, name_or_image)
            except StoreError:
                raise StoreError(f"no such image or container: {name_or_image}") from None
            if name is not None and _is_container(store, name):
                existing = store.container(name)  # reused if it is from this image
                _check_same_image(store, existing, image)
        if existing is not None:
            existing = _refresh(store, existing)
            if existing.mountpoint is not None:
                where = "there" if existing.mountpoint == target else f"on {existing.mountpoint}"
                raise StoreError(f"container {existing.name} is already mounted {where} (pid {existing.pid})")
        _check_mountpoint(target)  # before a new container is made: a refused mount leaves nothing behind
        record = existing if image is None else _create_locked(store, name, image)
        assert record is not None
        for diff_id in record.layers:
            if not store.has_layer(diff_id):
                raise StoreError(f"container {record.name}: its layer {diff_id} is missing from the store")
        pid = _start_daemon(store, record, target, read_only)
        record = dataclasses.replace(record, mountpoint=target, pid=pid, read_only=read_only)
        store.save_container(record)
    log.info("mounted container %s on %s (pid %d)", record.name, target, pid)
    return record


def _check_mountpoint(target: str) -> None:
    if not os.path.isdir(target):
        what = "not a directory" if os.path.lexists(target) else "no such directory"
        raise StoreError(f"mountpoint {target}: {what}")
    entries = mounttable.mounts_at(target)
    if entries and mounttable.is_dead_fuse_mount(target):
        return  # the daemon detaches it itself (and what it shows is the dead mount's, not the dir's)
    if entries:
        raise StoreError(f"mountpoint {target} is already in use ({entries[-1].fstype} from {entries[-1].source})")
    try:
        with os.scandir(target) as listing:
            hidden = next(listing, None)
    except OSError as exc:
        raise StoreError(f"mountpoint {target}: cannot read it: {exc.strerror or exc}") from None
    if hidden is not None:
        raise StoreError(
            f"mountpoint {target} is not empty (it has {hidden.name!r}): the mount would hide what is there; "
            "give an empty directory"
        )


def daemon_command(store: Store, record: ContainerRecord, mountpoint: str, read_only: bool) -> list[str]:
    """The overlayfuse command line for RECORD: lowerdir top first, as the daemon wants it."""
    from ..daemon.options import escape  # the option parser and the overlay modules: not for `ps`

    lowers = lower_dirs(store, record)
    upper, work = upper_dir(store, record.name), work_dir(store, record.name)
    lowerdir = ":".join(escape(os.fspath(p)) for p in ([upper, *lowers] if read_only else lowers))
    if read_only:
        options = [f"lowerdir={lowerdir}", "ro"]
    else:
        options = [f"lowerdir={lowerdir}", f"upperdir={escape(os.fspath(upper))}", f"workdir={escape(os.fspath(work))}"]
        # A commit turns the upper dir into a layer tar, which cannot point into lower layers: no
        # redirects, no metacopy files (docker's overlay2 keeps them off for the same reason).
        options += ["redirect_dir=off", "metacopy=off"]
    options += [f"fsname=overlayctl\\:{record.name}", f"control={control_address(store, record.name)}"]
    return [sys.executable, "-m", "overlayfuse.daemon.cli", "-f", "-o", ",".join(options), mountpoint]


def _start_daemon(store: Store, record: ContainerRecord, mountpoint: str, read_only: bool) -> int:
    """Start the daemon in its own session and wait for its READY=1; return its pid."""
    command = daemon_command(store, record, mountpoint, read_only)
    address = f"@overlayfuse/notify/{os.getpid()}/{secrets.token_hex(8)}"
    log_file = log_path(store, record.name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as listener:
        listener.bind(sockaddr(address))
        env = {**os.environ, "NOTIFY_SOCKET": address}
        with open(log_file, "ab") as log_out:
            log_out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            log_out.flush()
            try:
                proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_out,
                    env=env, cwd="/", start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise StoreError(f"cannot start the daemon for {record.name}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill(proc)
                raise StoreError(
                    f"container {record.name}: the daemon did not answer within {READY_TIMEOUT:.0f} s (see {log_file})"
                )
            listener.settimeout(min(0.2, remaining))
            try:
                message = listener.recv(4096)
            except TimeoutError:
                message = b""
            if b"READY=1" in message.split(b"\n"):
                return proc.pid
            if proc.poll() is not None:
                raise StoreError(f"container {record.name}: {_last_log_line(log_file) or 'the daemon exited'}")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _last_log_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    line = lines[-1] if lines else ""
    if line[:1] == "<" and line[2:3] == ">":  # a syslog priority prefix, as the daemon may write for journald
        line = line[3:]
    return line.removeprefix("overlayfuse: error: ").removeprefix("overlayfuse: ")


# -- what is true now -------------------------------------------------------------------------------


def daemon_alive(pid: int | None, mountpoint: str | None) -> bool:
    """Whether PID is still an overlayfuse daemon serving MOUNTPOINT (not a recycled pid)."""
    if not pid or not mountpoint:
        return False
    argv = mounttable.command_line(pid)
    if argv is None:
        return False
    return mounttable.process_alive(pid) and mountpoint in argv and any("overlayfuse" in arg for arg in argv[:4])


def mount_state(pid: int | None, mountpoint: str | None) -> str:
    """running; stopped (never mounted, or unmounted cleanly: the daemon exited and took its mount
    with it, as after umount(8) or SIGTERM, even if no overlayctl command has cleared the record
    yet); or dead (the daemon died and left its mount, or the daemon lives without its mount)."""
    if mountpoint is None:
        return STOPPED
    if not daemon_alive(pid, mountpoint):
        entries = mounttable.mounts_at(mountpoint)
        if not entries or entries[-1].fstype != FUSE_FSTYPE:
            return STOPPED
        return DEAD
    entries = mounttable.mounts_at(mountpoint)
    if not entries or entries[-1].fstype != FUSE_FSTYPE:
        return DEAD  # the daemon is up but not (yet, or no longer) mounted there
    return DEAD if mounttable.is_dead_fuse_mount(mountpoint) else RUNNING


def _refresh(store: Store, record: ContainerRecord) -> ContainerRecord:
    """RECORD with a mount that has gone away cleanly (someone ran umount(8)) forgotten; call locked.

    A mount still in the table with its daemon dead is left as it is: `umount_container` deals with it.
    """
    if record.mountpoint is None or daemon_alive(record.pid, record.mountpoint):
        return record
    if mounttable.mounts_at(record.mountpoint) and mounttable.is_dead_fuse_mount(record.mountpoint):
        mounttable.detach_dead_mounts(record.mountpoint)
    cleared = dataclasses.replace(record, mountpoint=None, pid=None, read_only=False)
    store.save_container(cleared)
    log.info("container %s: its daemon had exited; cleared its mount", record.name)
    return cleared


def container_states(store: Store) -> list[ContainerState]:
    """Every container with its state, then the overlayfuse mounts that are no container's."""
    states = []
    known: set[str] = set()
    images = store.images()  # read once, not once per container
    for record in store.containers():
        state = mount_state(record.pid, record.mountpoint)
        if record.mountpoint:
            known.add(record.mountpoint)
        stopped = state == STOPPED
        states.append(
            ContainerState(
                record.name, image_label(images, record.image), None if stopped else record.mountpoint,
                None if stopped else record.pid, state, record.read_only and not stopped,
            )
        )  # fmt: skip
    for entry in mounttable.read_mounts():
        if entry.fstype != FUSE_FSTYPE or entry.mountpoint in known:
            continue
        known.add(entry.mountpoint)
        # Whether the mount answers decides its state; the pid is a best effort (found only when the
        # daemon was given the mountpoint as an absolute path: it runs in / and cannot resolve others).
        state = DEAD if mounttable.is_dead_fuse_mount(entry.mountpoint) else RUNNING
        pid = _find_daemon(entry.mountpoint) if state == RUNNING else None
        read_only = "ro" in entry.mount_options.split(",")
        states.append(ContainerState("", "", entry.mountpoint, pid, state, read_only, entry.source))
    return states


def _find_daemon(mountpoint: str) -> int | None:
    """The pid of the overlayfuse daemon serving MOUNTPOINT, by its command line."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and daemon_alive(int(entry), mountpoint):
            return int(entry)
    return None


# -- unmounting and removing ------------------------------------------------------------------------


def find_container(store: Store, name_or_mountpoint: str) -> ContainerRecord:
    """The container NAME_OR_MOUNTPOINT names: by name first, else the one mounted on that path."""
    if _is_container(store, name_or_mountpoint):
        return store.container(name_or_mountpoint)
    if "/" in name_or_mountpoint or os.path.isdir(name_or_mountpoint):
        target = os.path.realpath(name_or_mountpoint)
        for record in store.containers():
            if record.mountpoint == target:
                return record
        if any(entry.fstype == FUSE_FSTYPE for entry in mounttable.mounts_at(target)):
            raise StoreError(f"{target} is an overlayfuse mount but no container's: unmount it with umount(8)")
        raise StoreError(f"no container is mounted on {target}")
    raise StoreError(f"no such container: {name_or_mountpoint}")


def umount_container(store: Store, name_or_mountpoint: str) -> ContainerRecord:
    """Unmount a container (by name or mountpoint), wait for its daemon to exit, clear the record."""
    with store.locked():
        return _umount_locked(store, find_container(store, name_or_mountpoint))


def _umount_locked(store: Store, record: ContainerRecord) -> ContainerRecord:
    mountpoint = record.mountpoint
    if mountpoint is None:
        raise StoreError(f"container {record.name} is not mounted")
    alive = daemon_alive(record.pid, mountpoint)
    entries = mounttable.mounts_at(mountpoint)
    ours = bool(entries) and entries[-1].fstype == FUSE_FSTYPE
    if ours and mounttable.is_dead_fuse_mount(mountpoint):
        mounttable.detach_dead_mounts(mountpoint)
        log.info("container %s: detached its dead mount on %s", record.name, mountpoint)
    elif ours and alive:
        _unmount(mountpoint)
    if alive and record.pid is not None and not _wait_exit(record.pid, mountpoint, EXIT_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)  # unmounted, yet still there: it unmounts on SIGTERM too
        if not _wait_exit(record.pid, mountpoint, EXIT_TIMEOUT):
            raise StoreError(f"container {record.name}: its daemon (pid {record.pid}) did not exit after the unmount")
    cleared = dataclasses.replace(record, mountpoint=None, pid=None, read_only=False)
    store.save_container(cleared)
    log.info("unmounted container %s from %s", record.name, mountpoint)
    return cleared


def _unmount(mountpoint: str) -> None:
    command: Sequence[str] = ["umount", mountpoint] if os.geteuid() == 0 else ["fusermount3", "-u", mountpoint]
    try:
        proc = subprocess.run(command, capture_output=True, timeout=UMOUNT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise StoreError(f"{' '.join(command)} did not return within {UMOUNT_TIMEOUT:.0f} s") from None
    except FileNotFoundError:
        raise StoreError(f"{command[0]} is not installed") from None
    if proc.returncode != 0:
        text = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = text[-1] if text else f"exit status {proc.returncode}"
        if "busy" in reason.lower():
            reason = f"{mountpoint} is busy (a process uses it; see fuser -m {mountpoint})"
        raise StoreError(f"cannot unmount {mountpoint}: {reason}")


def _wait_exit(pid: int, mountpoint: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while daemon_alive(pid, mountpoint):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def remove_container(store: Store, name: str, force: bool = False) -> list[str]:
    """Delete a container's upper dir and record (unmounting first with FORCE), then the layers and
    blobs nothing uses any more; returns what the garbage collection removed."""
    return remove_containers(store, [name], force)


def remove_containers(store: Store, names: Sequence[str], force: bool = False) -> list[str]:
    """`remove_container` for each of NAMES, all or nothing: every one is checked (it exists, and is
    not mounted unless FORCE) before the first is removed."""
    with store.locked():
        records = [_refresh(store, store.container(name)) for name in dict.fromkeys(names)]
        for record in records:
            if record.mountpoint is not None and not force:
                raise StoreError(
                    f"container {record.name} is mounted on {record.mountpoint}: umount it first, or use --force"
                )
        for record in records:
            if record.mountpoint is not None:
                _umount_locked(store, record)
            _discard_container(store, record.name)
        return store.collect_garbage()


def prune_containers(store: Store) -> tuple[list[str], list[str]]:
    """Remove every container that is not mounted (a clean unmount counts), then what nothing uses;
    returns (the containers removed, what the garbage collection removed)."""
    with store.locked():
        removed = []
        for record in store.containers():
            if _refresh(store, record).mountpoint is None:
                _discard_container(store, record.name)
                removed.append(record.name)
        return removed, store.collect_garbage()


def _discard_container(store: Store, name: str) -> None:
    try:
        store.discard(store.container_path(name))
    except OSError as exc:
        raise StoreError(f"cannot remove container {name}: {exc.strerror or exc}") from None
    log.info("removed container %s", name)


