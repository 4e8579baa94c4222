"""fuse-overlayfs's options, parsed and then at work on real mounts: ID mapping (stat, create,
chown, ACLs), squash_*, xattr_permissions with force_mask (override_stat xattrs, hidden), fsync=0 and
volatile, noacl, noxattrs, static_nlink, timeout, a quoted context=; the unprivileged marker forms;
layer dirs inside the mountpoint."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlayfuse.daemon.compat import IdMap, IdRange
from overlayfuse.daemon.options import UsageError, parse_args
from tests.support.mounts import FuseMount, is_mounted, kernel_overlay, mount_syscalls, overlayfuse_cmd

BASE = "lowerdir=/l,upperdir=/u,workdir=/w"
TIMEOUT = 60.0


def _parse(*opts: str) -> object:
    return parse_args(["-o", ",".join([BASE, *opts]), "/mnt"], euid=0)


# -- parsing ---------------------------------------------------------------------------------------


def test_uidmapping_as_containers_storage_writes_it() -> None:
    opts = _parse("uidmapping=:0:1:5000", "gidmapping=0:1000:1:1:110000:65536")
    assert opts.view.uid_map == IdMap((IdRange(0, 1, 5000),))
    assert opts.view.gid_map.ranges == (IdRange(0, 1000, 1), IdRange(1, 110000, 65536))
    assert opts.warnings == ()
    uid_map = opts.view.uid_map
    assert (uid_map.shown(0), uid_map.shown(4999), uid_map.shown(5000)) == (1, 5000, 65534)
    assert (uid_map.disk(1), uid_map.disk(0)) == (0, None)


@pytest.mark.parametrize("value", ["0:1", "a:b:c", "0:1:2:3", "", "0:1:0", "0:-1:5", "0:1:99999999999"])
def test_bad_id_mapping_is_a_clear_error(value: str) -> None:
    with pytest.raises(UsageError, match="uidmapping="):
        _parse(f"uidmapping={value}")


def test_a_quoted_context_holding_commas_is_one_option() -> None:
    opts = _parse('context="system_u:object_r:container_file_t:s0:c1,c2"', "ro")
    assert opts.warnings == ()
    assert opts.view.context == "system_u:object_r:container_file_t:s0:c1,c2"
    assert opts.read_only


@pytest.mark.parametrize(
    ("option", "field", "value"),
    [
        ("squash_to_root", "squash_uid", 0),
        ("squash_to_uid=7", "squash_uid", 7),
        ("squash_to_gid=8", "squash_gid", 8),
        ("xattr_permissions=2", "xattr_permissions", 2),
        ("force_mask=0700", "force_mask", 0o700),
        ("fsync=0", "fsync", False),
        ("volatile", "fsync", False),
        ("noacl", "acl", False),
        ("noxattrs=1", "xattrs", False),
        ("noxattrs=0", "xattrs", True),
        ("static_nlink", "static_nlink", True),
        ("timeout=2.5", "timeout", 2.5),
    ],
)
def test_each_option_reaches_the_view(option: str, field: str, value: object) -> None:
    opts = _parse(option)
    assert getattr(opts.view, field) == value
    assert opts.warnings == ()


def test_squash_to_uid_wins_over_squash_to_root_in_any_order() -> None:
    for order in (("squash_to_uid=7", "squash_to_root"), ("squash_to_root", "squash_to_uid=7")):
        view = _parse(*order).view
        assert (view.squash_uid, view.squash_gid) == (7, 0)


@pytest.mark.parametrize("option", ["xattr_permissions=3", "force_mask=9", "timeout=x", "squash_to_uid=-1",
                                    "fsync=yes"])  # fmt: skip
def test_bad_values_are_errors(option: str) -> None:
    with pytest.raises(UsageError, match=option.split("=")[0]):
        _parse(option)


def test_threaded_and_debug_are_taken_and_unknown_options_still_warn() -> None:
    opts = _parse("threaded=1", "debug", "frobnicate=1")
    assert opts.debug and opts.foreground
    assert opts.warnings == ("unknown option 'frobnicate=1' ignored",)


# -- on real mounts --------------------------------------------------------------------------------


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (tmp_path / name for name in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "owned").write_text("x\n")
    os.chown(lower / "owned", 5, 6)
    (lower / "stranger").write_text("y\n")
    os.chown(lower / "stranger", 50, 60)
    (lower / "d" / "sub").mkdir(parents=True)
    (lower / "d" / "f").write_text("f\n")
    (lower / "open").mkdir(mode=0o777)
    (lower / "open").chmod(0o777)
    return lower, upper, work, mnt


Mounter = Callable[..., FuseMount]


def _mount(fuse_mount: Mounter, layers: tuple[Path, Path, Path, Path], *extra: str) -> Path:
    lower, upper, work, mnt = layers
    fuse_mount(mnt, [lower], upper, work, extra)
    return mnt


def _ids(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def _open_as(uid: int, gid: int, directory: Path, name: str, flags: int) -> subprocess.CompletedProcess[str]:
    """Open NAME in DIRECTORY with FLAGS (a new file gets 0644) as UID:GID, in a child, through a
    descriptor of DIRECTORY (the test's tmp dir is closed to other users)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        code = f"import os; os.close(os.open({name!r}, {flags}, 0o644, dir_fd={fd}))"
        return subprocess.run([sys.executable, "-c", code], pass_fds=[fd], user=uid, group=gid, extra_groups=[],
                              cwd="/", capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    finally:
        os.close(fd)


@pytest.mark.mount
def test_id_mapping_shows_mapped_ids_and_stores_them_back(fuse_mount: Mounter, layers: tuple) -> None:
    mnt = _mount(fuse_mount, layers, "uidmapping=:0:1000:10", "gidmapping=0:2000:10")
    upper = layers[1]
    assert _ids(mnt / "owned") == (1005, 2006)
    assert _ids(mnt / "stranger") == (65534, 65534)  # no mapping: the overflow id
    assert _ids(mnt) == (1000, 2000)
    os.chown(mnt / "owned", 1003, 2004)
    assert _ids(mnt / "owned") == (1003, 2004)
    assert _ids(upper / "owned") == (3, 4)
    with pytest.raises(OSError) as failed:
        os.chown(mnt / "owned", 5000, -1)
    assert failed.value.errno == errno.EINVAL
    assert _ids(upper / "owned") == (3, 4)
    made = _open_as(1001, 2002, mnt / "open", "by-1001", os.O_CREAT | os.O_WRONLY)
    assert made.returncode == 0, made.stderr
    assert _ids(upper / "open" / "by-1001") == (1, 2)
    assert _ids(mnt / "open" / "by-1001") == (1001, 2002)
    (mnt / "by-root").write_text("r\n")  # root is not mapped: stored as the overflow id
    assert _ids(upper / "by-root") == (65534, 65534)


@pytest.mark.mount
def test_acl_ids_are_mapped_both_ways(fuse_mount: Mounter, layers: tuple) -> None:
    mnt = _mount(fuse_mount, layers, "uidmapping=0:1000:10", "gidmapping=0:2000:10")
    upper = layers[1]
    subprocess.run(["setfacl", "-m", "u:1007:r,g:2003:r", mnt / "owned"], check=True, timeout=TIMEOUT)
    shown = subprocess.run(["getfacl", "-n", mnt / "owned"], capture_output=True, text=True, check=True,
                           timeout=TIMEOUT).stdout  # fmt: skip
    assert "user:1007:r--" in shown and "group:2003:r--" in shown
    on_disk = subprocess.run(["getfacl", "-n", upper / "owned"], capture_output=True, text=True, check=True,
                             timeout=TIMEOUT).stdout  # fmt: skip
    assert "user:7:r--" in on_disk and "group:3:r--" in on_disk
    refused = subprocess.run(["setfacl", "-m", "u:99:r", mnt / "owned"], capture_output=True, text=True,
                             timeout=TIMEOUT)  # fmt: skip
    assert refused.returncode != 0 and "Invalid argument" in refused.stderr


@pytest.mark.mount
@pytest.mark.parametrize(("options", "ids"), [
    (("squash_to_root",), (0, 0)),
    (("squash_to_uid=7", "squash_to_gid=8"), (7, 8)),
    (("squash_to_root", "squash_to_uid=7"), (7, 0)),
])  # fmt: skip
def test_squash_shows_one_owner_and_takes_any_chown(
    fuse_mount: Mounter, layers: tuple, options: tuple[str, ...], ids: tuple[int, int]
) -> None:
    mnt = _mount(fuse_mount, layers, *options)
    for name in ("owned", "stranger", "d", "d/f"):
        assert _ids(mnt / name) == ids
    os.chown(mnt / "stranger", 123, 456)  # accepted; the mount still shows the squashed owner
    assert _ids(mnt / "stranger") == ids
    assert _ids(layers[1] / "stranger") == (123, 456)


@pytest.mark.mount
@pytest.mark.parametrize(("level", "name"), [(1, "security.fuseoverlayfs.override_stat"),
                                             (2, "user.fuseoverlayfs.override_stat")])  # fmt: skip
def test_xattr_permissions_keeps_owner_and_mode_in_a_hidden_xattr(
    fuse_mount: Mounter, layers: tuple, level: int, name: str
) -> None:
    mnt = _mount(fuse_mount, layers, f"xattr_permissions={level}", "force_mask=0700")
    upper = layers[1]
    assert os.getxattr(upper, name) == b"0:0:555"  # the upper root is marked, as fuse-overlayfs does
    os.chown(mnt / "owned", 11, 12)
    os.chmod(mnt / "owned", 0o640)
    st = os.lstat(mnt / "owned")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (11, 12, 0o640)
    assert os.getxattr(upper / "owned", name) == b"11:12:640"
    real = os.lstat(upper / "owned")
    # No real chown: the copy-up belongs to the daemon, with force_mask's bits (| u+rw).
    assert (real.st_uid, real.st_gid, real.st_mode & 0o7777) == (os.getuid(), os.getgid(), 0o700)
    (mnt / "new").write_text("n\n")
    os.chmod(mnt / "new", 0o604)
    assert os.lstat(upper / "new").st_mode & 0o7777 == 0o700
    assert os.lstat(mnt / "new").st_mode & 0o7777 == 0o604
    for path in (mnt, mnt / "owned", mnt / "new"):
        assert name not in os.listxattr(path)
        with pytest.raises(OSError) as hidden:
            os.getxattr(path, name)
        assert hidden.value.errno == errno.ENODATA


@pytest.mark.mount
def test_xattr_permissions_of_an_open_file_whose_name_went(fuse_mount: Mounter, layers: tuple) -> None:
    """An open file's owner and mode come from its own override xattr after its name went to a
    new file (fstat asks the daemon: the kernel dropped the attributes at the unlink)."""
    mnt = _mount(fuse_mount, layers, "xattr_permissions=2", "force_mask=0700")
    (mnt / "f").write_text("old\n")
    os.chmod(mnt / "f", 0o604)
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        os.unlink(mnt / "f")
        (mnt / "f").write_text("new\n")
        os.chmod(mnt / "f", 0o640)
        assert (os.fstat(fd).st_mode & 0o7777, os.lstat(mnt / "f").st_mode & 0o7777) == (0o604, 0o640)
    finally:
        os.close(fd)


@pytest.mark.mount
def test_containers_override_on_a_lower_layer_is_read_and_hidden(fuse_mount: Mounter, layers: tuple) -> None:
    lower = layers[0]
    name = "user.containers.override_stat"
    os.setxattr(lower, name, b"0:0:755")
    os.setxattr(lower / "owned", name, b"33:44:4750")
    mnt = _mount(fuse_mount, layers)
    st = os.lstat(mnt / "owned")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (33, 44, 0o4750)
    assert name not in os.listxattr(mnt / "owned")
    assert _ids(mnt / "stranger") == (50, 60)  # no xattr: the real owner
    with open(mnt / "owned", "a") as f:  # a copy-up keeps what the mount showed, for real (as the peer)
        f.write("more\n")
    real = os.lstat(layers[1] / "owned")
    assert (real.st_uid, real.st_gid, real.st_mode & 0o7777) == (33, 44, 0o4750)
    st = os.lstat(mnt / "owned")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (33, 44, 0o4750)


@pytest.mark.mount
def test_noxattrs_and_noacl(fuse_mount: Mounter, tmp_path: Path, layers: tuple) -> None:
    mnt = _mount(fuse_mount, layers, "noxattrs=1")
    with pytest.raises(OSError) as failed:
        os.setxattr(mnt / "owned", "user.x", b"1")
    assert failed.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as failed:
        os.listxattr(mnt / "owned")
    assert failed.value.errno == errno.EOPNOTSUPP
    other = tuple(tmp_path / f"acl-{name}" for name in ("lower", "upper", "work", "mnt"))
    for d in other:
        d.mkdir()
    (other[0] / "f").write_text("f\n")
    mnt2 = _mount(fuse_mount, other, "noacl")
    os.setxattr(mnt2 / "f", "user.x", b"1")  # other xattrs still work
    refused = subprocess.run(["setfacl", "-m", "u:7:r", mnt2 / "f"], capture_output=True, text=True,
                             timeout=TIMEOUT)  # fmt: skip
    assert refused.returncode != 0 and "Operation not supported" in refused.stderr


@pytest.mark.mount
def test_noacl_leaves_permission_checks_to_the_mode(fuse_mount: Mounter, layers: tuple) -> None:
    """With noacl the kernel is not told to check ACLs (as fuse-overlayfs): asked for one, the daemon
    would answer EOPNOTSUPP and every group or other access would fail with it."""
    mnt = _mount(fuse_mount, layers, "noacl")
    (layers[0] / "private").write_text("p\n")
    (layers[0] / "private").chmod(0o600)
    readable = _open_as(1000, 1000, mnt, "stranger", os.O_RDONLY)  # 0644, owned by 50:60
    assert readable.returncode == 0, readable.stderr
    refused = _open_as(1000, 1000, mnt, "private", os.O_RDONLY)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr


@pytest.mark.mount
def test_a_layer_without_acls_shows_no_acl(ramfs: Path, fuse_mount: Mounter, tmp_path: Path) -> None:
    """A layer on a filesystem with no ACLs (ramfs) has none: ENODATA, as the kernel's overlay
    answers, not the layer's EOPNOTSUPP, which the kernel's ACL checks would fail with.
    (ramfs first: it is torn down after the mounts on it.)"""
    lower, base = ramfs / "lower", ramfs / "base"  # two: the kernel's overlay needs two without an upper
    lower.mkdir()
    base.mkdir()
    (lower / "f").write_text("f\n")
    os.chown(lower / "f", 50, 60)  # not the reader's: the group and other classes are checked
    errnos = {}
    with kernel_overlay(tmp_path / "kernel", [lower, base]) as kernel:
        for name, mnt in (("kernel", kernel), ("overlayfuse", fuse_mount(tmp_path / "fuse", [lower, base]).mnt)):
            with pytest.raises(OSError) as failed:
                os.getxattr(mnt / "f", "system.posix_acl_access", follow_symlinks=False)
            errnos[name] = failed.value.errno
            read = _open_as(1000, 1000, mnt, "f", os.O_RDONLY)
            assert read.returncode == 0, (name, read.stderr)
    assert errnos == {"kernel": errno.ENODATA, "overlayfuse": errno.ENODATA}


@pytest.mark.mount
@pytest.mark.parametrize(("options", "nlink"), [((), 3), (("static_nlink",), 1)])
def test_static_nlink(fuse_mount: Mounter, layers: tuple, options: tuple[str, ...], nlink: int) -> None:
    mnt = _mount(fuse_mount, layers, *options)
    assert os.lstat(mnt / "d").st_nlink == nlink  # d holds one subdirectory
    assert os.lstat(mnt / "owned").st_nlink == 1


@pytest.mark.mount
@pytest.mark.parametrize(("options", "sees_change"), [((), False), (("timeout=0",), True)])
def test_timeout_is_how_long_the_kernel_trusts_attributes(
    fuse_mount: Mounter, layers: tuple, options: tuple[str, ...], sees_change: bool
) -> None:
    mnt = _mount(fuse_mount, layers, *options)
    assert os.stat(mnt / "d" / "f").st_size == 2
    with open(layers[0] / "d" / "f", "a") as f:  # behind the mount's back, to see who asks again
        f.write("more\n")
    assert (os.stat(mnt / "d" / "f").st_size == 7) is sees_change



def _write_and_copy_up(mnt: Path) -> None:
    fd = os.open(mnt / "fresh", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"data")
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(mnt / "owned", "a") as f:  # a copy-up
        f.write("more\n")


@pytest.mark.mount
@pytest.mark.parametrize(("options", "synced"), [((), True), (("fsync=0",), False), (("volatile",), False)])
def test_fsync_off_makes_no_fsync(
    fuse_mount: Mounter, layers: tuple, tmp_path: Path, options: tuple[str, ...], synced: bool
) -> None:
    mnt = _mount(fuse_mount, layers, *options)
    count = mount_syscalls(mnt, ("fsync", "fdatasync"), lambda: _write_and_copy_up(mnt), tmp_path / "strace.out")
    assert (count > 0) is synced, f"{count} fsyncs"
    assert (mnt / "owned").read_text() == "x\nmore\n"


def _fsync_a_directory(mnt: Path) -> None:
    os.rename(mnt / "owned", mnt / "renamed")  # the durable-rename pattern: rename, fsync the dir
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.mount
@pytest.mark.parametrize(("options", "synced"), [((), True), (("fsync=0",), False)])
def test_fsync_of_a_directory_writes_out_its_upper_dir(
    fuse_mount: Mounter, layers: tuple, tmp_path: Path, options: tuple[str, ...], synced: bool
) -> None:
    """As the kernel's overlay does (ovl_dir_fsync): the upper dir is fsynced, or, where FSYNCDIR
    does not say which directory (no-opendir mode), the upper filesystem is (syncfs)."""
    mnt = _mount(fuse_mount, layers, *options)
    count = mount_syscalls(mnt, ("fsync", "syncfs"), lambda: _fsync_a_directory(mnt), tmp_path / "strace.out")
    assert (count > 0) is synced, f"{count} fsync or syncfs calls"
    assert (mnt / "renamed").read_text() == "x\n"


def _fsync_read_only(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # as coreutils' `sync FILE` opens it
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.mount
def test_fsync_through_a_read_only_open(fuse_mount: Mounter, layers: tuple, tmp_path: Path) -> None:
    """As the kernel's overlay (ovl_fsync): an fsync through any open of a file in upper writes it
    out, a read-only one too; a lower file, a read-only layer's, is never synced."""
    mnt = _mount(fuse_mount, layers)
    (mnt / "fresh").write_text("in upper\n")
    upper = mount_syscalls(mnt, ("fsync", "fdatasync"), lambda: _fsync_read_only(mnt / "fresh"),
                           tmp_path / "upper.strace")
    lower = mount_syscalls(mnt, ("fsync", "fdatasync"), lambda: _fsync_read_only(mnt / "owned"),
                           tmp_path / "lower.strace")
    assert (upper, lower) == (1, 0)


@pytest.mark.mount
def test_metadata_only_copy_ups_make_no_fsync(fuse_mount: Mounter, layers: tuple, tmp_path: Path) -> None:
    """chown of a lower file in a lower dir copies up the dir and a metacopy file: no data, so no
    fsync (the kernel's default: its fsync=strict is what syncs metadata copy-ups); still there."""
    _, upper, _, _ = layers
    mnt = _mount(fuse_mount, layers)
    count = mount_syscalls(mnt, ("fsync", "fdatasync"), lambda: os.chown(mnt / "d" / "f", 7, 8),
                           tmp_path / "strace.out")
    assert count == 0, f"{count} fsyncs"
    assert os.lstat(upper / "d" / "f").st_uid == 7 and (mnt / "d" / "f").read_text() == "f\n"


@pytest.mark.mount
def test_quoted_context_mounts_without_warnings(fuse_mount: Mounter, layers: tuple) -> None:
    lower, upper, work, mnt = layers
    mounted = fuse_mount(mnt, [lower], upper, work, ('context="system_u:object_r:container_file_t:s0:c1,c2"',))
    assert "WARNING" not in mounted.log_text()
    assert (mnt / "owned").read_text() == "x\n"


@pytest.mark.mount
def test_symlinked_layer_paths_are_followed(fuse_mount: Mounter, layers: tuple, tmp_path: Path) -> None:
    """containers-storage passes lowerdir=.../l/SHORTNAME, a symlink to the layer."""
    lower, upper, work, mnt = layers
    (tmp_path / "link").symlink_to(lower)
    fuse_mount(mnt, [tmp_path / "link"], upper, work)
    assert (mnt / "owned").read_text() == "x\n"


# -- unprivileged marker forms ---------------------------------------------------------------------


@pytest.mark.mount
def test_fuse_overlayfs_opaque_xattr_alone_makes_a_directory_opaque(fuse_mount: Mounter, layers: tuple) -> None:
    lower, upper, work, mnt = layers
    (upper / "d").mkdir()
    (upper / "d" / "mine").write_text("m\n")
    os.setxattr(upper / "d", "user.fuseoverlayfs.opaque", b"y")
    os.setxattr(upper / "d", "user.fuseoverlayfs.origin", b"o")
    fuse_mount(mnt, [lower], upper, work)
    assert sorted(os.listdir(mnt / "d")) == ["mine"]
    assert not [n for n in os.listxattr(mnt / "d") if n.startswith("user.fuseoverlayfs.")]


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs: no xattrs at all (setxattr says EOPNOTSUPP), where mknod works."""
    where = tmp_path / "ramfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", where], check=True, timeout=TIMEOUT)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False, timeout=TIMEOUT)


@pytest.mark.mount
def test_upper_without_xattrs_marks_opaque_dirs_with_a_file(ramfs: Path, fuse_mount: Mounter, layers: tuple) -> None:
    """(ramfs first: it is torn down after the mount on it.)"""
    lower, _, _, mnt = layers
    upper, work = ramfs / "upper", ramfs / "work"
    upper.mkdir()
    work.mkdir()
    os.link(lower / "owned", lower / "owned-too")
    fuse_mount(mnt, [lower], upper, work)
    shutil.rmtree(mnt / "d")
    (mnt / "d").mkdir()
    (mnt / "d" / "new").write_text("n\n")
    assert os.listdir(mnt / "d") == ["new"]
    assert sorted(os.listdir(upper / "d")) == [".wh..wh..opq", "new"]
    # No xattr to count lower names in: a hardlinked file's copy-up breaks the link, as the kernel's
    # does without index=on, instead of failing.
    with open(mnt / "owned", "a") as f:
        f.write("more\n")
    assert ((mnt / "owned").read_text(), (mnt / "owned-too").read_text()) == ("x\nmore\n", "x\n")


# -- layers inside the mountpoint -------------------------------------------------------------------


@pytest.mark.mount
@pytest.mark.parametrize("where", ["lower-inside", "upper-inside", "mount-inside-lower"])
def test_layer_and_mountpoint_nesting_is_refused(tmp_path: Path, overlayfuse_bin: Path, where: str) -> None:
    mnt = tmp_path / "mnt"
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    if where == "lower-inside":
        lower = mnt / "lower"
    elif where == "upper-inside":
        upper = mnt / "upper"
    else:
        mnt = lower / "mnt"
    for d in (mnt, lower, upper, work):
        d.mkdir(parents=True, exist_ok=True)
    cmd = overlayfuse_cmd(mnt, f"lowerdir={lower},upperdir={upper},workdir={work}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    try:
        assert proc.returncode == 1
        assert "inside" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False, timeout=TIMEOUT)
