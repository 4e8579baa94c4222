"""Unit tier: the fuse-overlayfs compatible command line, parsed without touching any file."""

from __future__ import annotations

import pytest

from overlayfuse.daemon.options import UsageError, parse_args, split_escaped, unescape
from overlayfuse.overlay.features import CopyUpFeatures


def test_full_command_line() -> None:
    opts = parse_args(
        ["-f", "-o", "lowerdir=/l/app:/l/base,upperdir=/c/up", "-o", "workdir=/c/work", "/mnt"], euid=0
    )
    assert opts.lowerdirs == ("/l/app", "/l/base")
    assert (opts.upperdir, opts.workdir, opts.mountpoint) == ("/c/up", "/c/work", "/mnt")
    assert opts.foreground and not opts.read_only
    assert {"allow_other", "default_permissions", "subtype=overlayfuse", "fsname=overlayfuse"} <= opts.fuse_options


def test_mount_helper_form_ignores_source_and_mount_options() -> None:
    """What fuse3's mount helper runs for `mount -t fuse.overlayfuse overlay /mnt -o ...`."""
    opts = parse_args(["overlay", "/mnt", "-o", "rw,lowerdir=/l,dev,suid,x-systemd.automount,nofail"], euid=0)
    assert opts.source == "overlay" and opts.mountpoint == "/mnt"
    assert "fsname=overlay" in opts.fuse_options
    assert {"dev", "suid"} <= opts.fuse_options
    assert opts.warnings == ()


def test_no_upper_means_read_only() -> None:
    assert "ro" in parse_args(["-o", "lowerdir=/l", "/mnt"], euid=0).fuse_options


def test_debug_implies_foreground() -> None:
    opts = parse_args(["-d", "-o", "lowerdir=/l", "/mnt"], euid=0)
    assert opts.debug and opts.foreground


def test_non_root_gets_no_allow_other_by_default() -> None:
    opts = parse_args(["-o", "lowerdir=/l", "/mnt"], euid=1000)
    assert "allow_other" not in opts.fuse_options and "default_permissions" in opts.fuse_options


def test_defaults_can_be_turned_off() -> None:
    opts = parse_args(["-o", "lowerdir=/l,noallow_other,nodefault_permissions", "/mnt"], euid=0)
    assert not {"allow_other", "default_permissions"} & opts.fuse_options


def test_unknown_option_is_a_warning() -> None:
    opts = parse_args(["-o", "lowerdir=/l,frobnicate=3", "/mnt"], euid=0)
    assert opts.warnings == ("unknown option 'frobnicate=3' ignored",)


def test_kernel_tunables_are_accepted_quietly() -> None:
    opts = parse_args(["-o", "lowerdir=/l,redirect_dir=on,index=on,xino=auto,metacopy=on", "/mnt"], euid=0)
    assert opts.warnings == ()


def test_copy_up_features_are_on_unless_turned_off() -> None:
    assert parse_args(["-o", "lowerdir=/l", "/mnt"], euid=0).features == CopyUpFeatures(True, True)
    opts = parse_args(["-o", "lowerdir=/l,redirect_dir=off,metacopy=off", "/mnt"], euid=0)
    assert opts.features == CopyUpFeatures(redirect_dir=False, metacopy=False)
    follow = parse_args(["-o", "lowerdir=/l,redirect_dir=follow", "/mnt"], euid=0)
    assert follow.features == CopyUpFeatures(redirect_dir=False, metacopy=True)


@pytest.mark.parametrize("option", ["redirect_dir=yes", "metacopy=follow", "metacopy"])
def test_bad_copy_up_feature_value_is_refused(option: str) -> None:
    with pytest.raises(UsageError, match=rf"^{option.partition('=')[0]}="):
        parse_args(["-o", f"lowerdir=/l,{option}", "/mnt"], euid=0)


def test_escaped_separators_in_paths() -> None:
    opts = parse_args(["-o", r"lowerdir=/a\:b:/c\,d,upperdir=/u\\x,workdir=/w", "/mnt"], euid=0)
    assert opts.lowerdirs == ("/a:b", "/c,d")
    assert opts.upperdir == "/u\\x"


def test_split_and_unescape() -> None:
    assert split_escaped(r"a\,b,c", ",") == [r"a\,b", "c"]
    assert unescape(r"a\:b\\c") == r"a:b\c"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/mnt"], "missing lowerdir="),
        (["-o", "lowerdir=", "/mnt"], "empty layer path"),
        (["-o", "lowerdir=/a::/b", "/mnt"], "empty layer path"),
        (["-o", "lowerdir=/l,upperdir=/u", "/mnt"], "upperdir= given without workdir="),
        (["-o", "lowerdir=/l,workdir=/w", "/mnt"], "workdir= given without upperdir="),
        (["-o", "lowerdir=/l", "a", "b", "c"], "too many arguments"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_command_lines(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as excinfo:
        parse_args(argv, euid=0)
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_root_mounts_allow_devices_and_setuid_like_the_kernel() -> None:
    assert {"dev", "suid"} <= parse_args(["-o", "lowerdir=/l", "/mnt"], euid=0).fuse_options
    opts = parse_args(["-o", "lowerdir=/l,nodev,nosuid", "/mnt"], euid=0)
    assert not {"dev", "suid"} & opts.fuse_options
    assert not {"dev", "suid"} & parse_args(["-o", "lowerdir=/l", "/mnt"], euid=1000).fuse_options
