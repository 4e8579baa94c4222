"""The rich four-layer tree (upper, l1, l2, l3) that most read-path tests share.

Every case the read path must get right lives somewhere in here, each in its own
top-level directory so a diff names the case: whiteouts and opaque directories in
every form, non-directories hiding directories and the reverse, all file types,
xattrs, ownership and special mode bits, a 64 MiB sparse file, hardlink groups (one
with a name whited out above it), awkward names, and a directory of ~3000 entries
merged across layers.  `build_layer_set` builds it twice: as overlayfuse reads it, and
as its kernel equivalent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.compare import Probe
from tests.support.trees import (
    BlockDev,
    CharDev,
    Dir,
    Entry,
    Fifo,
    File,
    HardLink,
    OciWhiteout,
    Opaque,
    Socket,
    Sparse,
    Symlink,
    Whiteout,
    kernel_equivalent,
    make_tree,
)

MiB = 1 << 20
SPARSE_SIZE = 64 * MiB
SPARSE_CHUNKS = {0: b"head", 1 * MiB: b"A" * 4096, 33 * MiB + 5: b"middle",
                 SPARSE_SIZE - 4: b"tail"}
BIG_DIR_L3 = range(0, 2000)  # big/f0000..f1999 in l3
BIG_DIR_L2 = range(1000, 3000)  # big/f1000..f2999 in l2: half overlaps l3
BIG_DIR_WHITEOUT = range(0, 100)  # kernel-form whiteouts in l1
BIG_DIR_OCI_WHITEOUT = range(100, 150)  # OCI-form whiteouts in l1
NON_UTF8 = os.fsdecode(b"bad\xff\xfe")  # whited out in l1
LATIN1 = os.fsdecode(b"latin1-\xe9")  # not valid UTF-8 either; stays visible
LONGEST_NAME = "n" * 255

# One mtime per layer, so a merged directory's mtime says which layer it came from.
BASE_MTIME_NS = 1_600_000_000_123_456_789
LAYER_MTIME_NS = {"l3": BASE_MTIME_NS, "l2": BASE_MTIME_NS + 1_000_000_001,
                  "l1": BASE_MTIME_NS + 2_000_000_002, "upper": BASE_MTIME_NS + 3_000_000_003}


def layer_l3() -> list[Entry]:
    """The bottom layer: most of the content, and every file type."""
    return [
        File("etc/hosts", b"127.0.0.1 localhost\n"),
        File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        File("etc/shadow", b"root:*::::::\n", mode=0o640, gid=42),
        *(File(f"big/f{i:04d}", f"l3 {i}\n".encode()) for i in BIG_DIR_L3),
        File("hide_dir_by_file/child", b"hidden by a file above"),
        File("hide_file_by_dir", b"hidden by a directory above"),
        File("sandwich/from_l3", b"below the file in l2"),
        Dir("merged", mode=0o700),
        File("merged/l3_only"), File("merged/shared", b"l3"), File("merged/l3_gone"),
        File("merged/sub/l3"), File("merged/opq/hidden_l3"),
        File("recreated/old_child"), File("recreated/old_sub/deep"),
        File("opq_trusted/below"), File("opq_user/below"), File("opq_oci/below"),
        File("opq_upper/below"),
        File("dir_whited_in_upper/child"),
        Fifo("types/fifo", 0o640),
        Socket("types/socket"),
        CharDev("types/null", 1, 3, 0o666),
        BlockDev("types/loop0", 7, 0, 0o660),
        Symlink("types/rel_link", "../etc/hosts"),
        Symlink("types/abs_link", "/etc/hostname"),
        Symlink("types/dangling", "nowhere/at/all"),
        Symlink("types/dir_link", "../etc"),
        Symlink("types/long_link", "x" * 200 + "/target"),  # too long for an inline symlink
        File("types/setuid", b"#!/bin/sh\n", mode=0o4755),
        Dir("types/sticky", mode=0o1777),
        File("types/owned", b"mine", mode=0o600, uid=1000, gid=1000),
        Dir("types/owned_dir", mode=0o750, uid=12345, gid=54321),
        File("types/noperm", b"root reads it anyway", mode=0o000),
        Dir("types/locked_dir", mode=0o000),
        File("xattrs/file", b"x", xattrs={"user.color": b"blue", "trusted.secret": b"s3"}),
        File("xattrs/empty_value", xattrs={"user.empty": b""}),
        Dir("xattrs/dir", xattrs={"user.dir": b"yes", "trusted.dir": b"\x00\x01binary"}),
        Symlink("xattrs/link", "file", xattrs={"trusted.link": b"on a symlink"}),
        Sparse("sparse/disk.img", SPARSE_SIZE, SPARSE_CHUNKS),
        Sparse("sparse/all_hole", 10 * MiB),
        File("sparse/empty"),
        File("links/a", b"three names"),
        HardLink("links/b", "links/a"),
        HardLink("other/c", "links/a"),
        File("links/x", b"pair, one name whited out above"),
        HardLink("links/y", "links/x"),
        File("links/s1", b"pair, one name shadowed above"),
        HardLink("links/s2", "links/s1"),
        File("names/with space"), File("names/new\nline"), File(f"names/{NON_UTF8}"),
        File("names/ünïcode"), File("names/-dash"), File("names/.hidden"),
        File(f"names/{LONGEST_NAME}"), File("names/tab\there"),
        File("names/still\nvisible"), File(f"names/{LATIN1}"),
        File("deep/a/b/c/d/e/f/g/h/leaf", b"deep"),
        File("only_l3/real"),
        Whiteout("only_l3/ghost"),  # meaningless in a pure dir: the kernel lists it anyway
    ]


def layer_l2() -> list[Entry]:
    return [
        Whiteout("etc/passwd"),
        File("hide_dir_by_file", b"a file hiding a directory"),
        File("hide_file_by_dir/inner", b"a directory hiding a file"),
        File("sandwich", b"a file between two directories"),
        File("merged/l2_only"), File("merged/shared", b"l2"), File("merged/sub/l2"),
        File("merged/opq/hidden_l2"),
        Whiteout("recreated"),
        *(File(f"big/f{i:04d}", f"l2 {i}\n".encode()) for i in BIG_DIR_L2),
        Whiteout("links/y"),
        File("nested/inner/from_l2"), File("nested/keep"),
        OciWhiteout("names/-dash"),
    ]


def layer_l1() -> list[Entry]:
    return [
        OciWhiteout("etc/shadow"),
        File("sandwich/from_l1", b"above the file in l2"),
        File("merged/l1_only"),
        Opaque("merged/opq", "trusted"), File("merged/opq/visible_l1"),
        File("recreated/new_child", b"recreated above its whiteout"),
        Opaque("opq_trusted", "trusted"), File("opq_trusted/above"),
        Opaque("opq_user", "user"), File("opq_user/above"),
        Opaque("opq_oci", "oci"), File("opq_oci/above"),
        *(Whiteout(f"big/f{i:04d}") for i in BIG_DIR_WHITEOUT),
        *(OciWhiteout(f"big/f{i:04d}") for i in BIG_DIR_OCI_WHITEOUT),
        File("links/s2", b"shadows one name of a hardlink pair"),
        File("links2/p", b"a pair in a middle layer"), HardLink("links2/q", "links2/p"),
        File("pure_l1/real"), Whiteout("pure_l1/ghost"), OciWhiteout("pure_l1/ghost2"),
        Opaque("pure_opq", "oci"), File("pure_opq/f"),
        OciWhiteout(f"names/{NON_UTF8}"),
        Whiteout("names/new\nline"),
    ]


def layer_upper() -> list[Entry]:
    return [
        File("etc/hosts", b"127.0.0.1 upper\n", mode=0o600),
        File("upper_only/file", b"only in upper"),
        Dir("merged", mode=0o750),
        File("merged/from_upper"), File("merged/shared", b"upper"),
        Whiteout("merged/l3_gone"),
        Opaque("opq_upper", "trusted"), File("opq_upper/x"),
        Whiteout("dir_whited_in_upper"),
        Opaque("nested/inner", "trusted"), File("nested/inner/from_upper"),
    ]


# --- errno probes for the rich tree: (operation, path, *arguments), see compare.OPERATIONS

TOO_LONG = "x" * 300

RICH_PROBES: list[Probe] = [
    ("lstat", "etc/passwd"),  # kernel-form whiteout: ENOENT
    ("lstat", "etc/shadow"),  # OCI-form whiteout: ENOENT
    ("lstat", "etc/.wh.shadow"),  # the OCI marker itself is invisible
    ("lstat", "opq_oci/.wh..wh..opq"),
    ("lstat", "pure_l1/ghost"),
    ("lstat", "pure_l1/.wh.ghost2"),
    ("lstat", "etc/hosts/child"),  # ENOTDIR
    ("lstat", "hide_dir_by_file/child"),  # the dir below is hidden by a file: ENOTDIR
    ("lstat", "hide_file_by_dir/inner"),
    ("lstat", "sandwich/from_l3"),  # below the file: ENOENT
    ("lstat", "recreated/old_child"),
    ("lstat", "big/f0000"), ("lstat", "big/f0120"), ("lstat", "big/f2999"),
    ("lstat", "links/y"),
    ("lstat", "missing/child"),
    ("lstat", "etc/passwd/child"),
    ("lstat", TOO_LONG),  # ENAMETOOLONG
    ("lstat", f"etc/{TOO_LONG}"),
    ("lstat", f"names/{LONGEST_NAME}"),
    ("lstat", f"names/{LONGEST_NAME}n"),
    ("lstat", f"names/{NON_UTF8}"),
    ("lstat", "names/with space"), ("lstat", "names/still\nvisible"),
    ("lstat", f"names/{LATIN1}"), ("read", f"names/{LATIN1}"),
    ("stat", "types/dangling"),  # ENOENT through the symlink
    ("stat", "types/rel_link"), ("stat", "types/dir_link"), ("stat", "types/long_link"),
    ("readlink", "etc/hosts"),  # EINVAL
    ("readlink", "merged"), ("readlink", "types/fifo"),
    ("readlink", "types/dangling"), ("readlink", "types/abs_link"),
    ("readlink", "types/long_link"), ("readlink", "etc/passwd"),
    ("getxattr", "etc/hosts", "user.missing"),  # ENODATA
    ("getxattr", "merged", "user.missing"),
    ("getxattr", "opq_trusted", "trusted.overlay.opaque"),  # ENODATA: never exposed
    ("getxattr", "opq_user", "user.overlay.opaque"),
    ("getxattr", "opq_oci", "trusted.overlay.opaque"),
    ("getxattr", "merged/opq", "trusted.overlay.opaque"),
    ("getxattr", "xattrs/file", "user.color"),
    ("getxattr", "xattrs/empty_value", "user.empty"),
    ("getxattr", "xattrs/link", "trusted.link"),
    ("getxattr", "etc/passwd", "user.x"),  # ENOENT
    ("listxattr", "opq_trusted"), ("listxattr", "opq_user"), ("listxattr", "xattrs/dir"),
    ("listxattr", "types/fifo"), ("listxattr", "types/socket"), ("listxattr", "types/null"),
    ("open_directory", "etc/hosts"),  # ENOTDIR
    ("open_directory", "types/dir_link"),
    ("open_directory", "types/rel_link"),
    ("listdir", "etc/hosts"),
    ("listdir", "types/locked_dir"),
    ("read", "merged"),  # EISDIR
    ("read", "etc/hosts"),
    ("read", "types/noperm"),
    ("read", "sparse/disk.img", 33 * MiB + 5, 6),
    ("read", "sparse/disk.img", 2 * MiB, 16),
    ("read", "sparse/disk.img", SPARSE_SIZE - 2, 16),
    ("read", "sparse/disk.img", SPARSE_SIZE + 10, 16),
    ("open_nofollow", "types/rel_link"),  # ELOOP
    ("open", "types/fifo", os.O_WRONLY | os.O_NONBLOCK),  # ENXIO: no reader
    ("open", "merged", os.O_WRONLY),  # EISDIR
    ("open", "etc/hosts/", os.O_RDONLY),  # ENOTDIR
    ("access", "etc/hosts", os.R_OK), ("access", "etc/hosts", os.X_OK),
    ("access", "types/setuid", os.X_OK), ("access", "types/noperm", os.R_OK),
    ("access", "types/noperm", os.X_OK), ("access", "etc/passwd", os.F_OK),
    ("access", "merged", os.X_OK), ("access", "types/locked_dir", os.X_OK),
    ("statfs", "."), ("statfs", "merged"),
]


RICH_LAYERS = {"upper": layer_upper, "l1": layer_l1, "l2": layer_l2, "l3": layer_l3}


@dataclass(frozen=True, slots=True)
class LayerSet:
    """One built copy of a layer stack: layer dirs, a workdir and a mountpoint."""

    root: Path
    lowers: tuple[Path, ...]  # top first
    upper: Path | None
    work: Path | None
    mnt: Path


def build_layer_set(root: Path, layers: Mapping[str, Sequence[Entry]], *, kernel: bool,
                    mtimes: dict[str, int] | None = None) -> LayerSet:
    """Build `layers` ({"upper": [...], "l1": [...], ...}, top first) under `root`.

    With `kernel=True` each layer is built in its kernel-equivalent form.
    """
    mtimes = mtimes or LAYER_MTIME_NS
    built: dict[str, Path] = {}
    for name, entries in layers.items():
        spec = kernel_equivalent(entries) if kernel else list(entries)
        built[name] = make_tree(root / name, *spec, mtime_ns=mtimes.get(name, BASE_MTIME_NS))
    upper = built.pop("upper", None)
    work = None
    if upper is not None:
        work = root / "work"
        work.mkdir()
    (root / "mnt").mkdir()
    return LayerSet(root, tuple(built.values()), upper, work, root / "mnt")


def rich_layers() -> dict[str, list[Entry]]:
    return {name: make() for name, make in RICH_LAYERS.items()}
