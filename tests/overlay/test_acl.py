"""`overlay.acl.inherit`: what the kernel's posix_acl_create gives a new object (the kernel's own
answers, taken from kernel overlayfs on ext4, are in tests/daemon/test_semantics.py)."""

from __future__ import annotations

import errno
import stat

import pytest

from overlayfuse.overlay import acl

# u::rwx u:7:rwx g::r-x m::rwx o::r-x, as `setfacl -d -m u:7:rwx` leaves a directory of mode 0755
DEFAULT = acl.pack([(acl.USER_OBJ, 7, 0xFFFFFFFF), (acl.USER, 7, 7), (acl.GROUP_OBJ, 5, 0xFFFFFFFF),
                    (acl.MASK, 7, 0xFFFFFFFF), (acl.OTHER, 5, 0xFFFFFFFF)])


def test_without_a_default_acl_the_umask_applies() -> None:
    got = acl.inherit(None, stat.S_IFREG | 0o666, 0o022)
    assert (got.mode, got.access, got.default) == (stat.S_IFREG | 0o644, None, None)


def test_a_default_acl_masked_by_the_mode_asked_takes_the_umasks_place() -> None:
    got = acl.inherit(DEFAULT, stat.S_IFREG | 0o666, 0o077)
    assert got.mode == stat.S_IFREG | 0o664  # the group bits are the mask's
    assert got.access is not None and got.default is None
    assert acl.entries(got.access) == [(acl.USER_OBJ, 6, 0xFFFFFFFF), (acl.USER, 7, 7),
                                       (acl.GROUP_OBJ, 5, 0xFFFFFFFF), (acl.MASK, 6, 0xFFFFFFFF),
                                       (acl.OTHER, 4, 0xFFFFFFFF)]


def test_a_directory_also_keeps_the_default_acl_and_its_set_id_bits() -> None:
    got = acl.inherit(DEFAULT, stat.S_IFDIR | stat.S_ISGID | 0o777, 0o077)
    assert got.mode == stat.S_IFDIR | stat.S_ISGID | 0o775 and got.default == DEFAULT


def test_a_default_acl_of_base_entries_only_gives_a_mode_and_no_access_acl() -> None:
    base = acl.pack([(acl.USER_OBJ, 7, 0xFFFFFFFF), (acl.GROUP_OBJ, 5, 0xFFFFFFFF), (acl.OTHER, 0, 0xFFFFFFFF)])
    got = acl.inherit(base, stat.S_IFREG | 0o666, 0o022)
    assert (got.mode, got.access) == (stat.S_IFREG | 0o640, None)


def test_a_symlink_inherits_nothing() -> None:
    got = acl.inherit(DEFAULT, stat.S_IFLNK | 0o777, 0o022)
    assert (got.mode, got.access) == (stat.S_IFLNK | 0o777, None)


def test_a_malformed_value_is_einval() -> None:
    with pytest.raises(OSError) as excinfo:
        acl.entries(b"\x02\x00\x00\x00\x01")
    assert excinfo.value.errno == errno.EINVAL
