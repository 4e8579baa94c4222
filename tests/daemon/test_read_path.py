"""The read path of overlayfuse, compared with kernel overlayfs on the same layers.

The oracle is the kernel: each test builds (or shares) a layer stack twice, once in the
form overlayfuse reads and once in its kernel equivalent, mounts both, and compares
what a program sees.  The accepted differences are normalised in `compare.diff_views`
and asserted explicitly on our side here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.compare import Probe, Snapshot, assert_same_errnos, assert_same_view, getdents, take_snapshot
from tests.support.mounts import FuseMount, drop_caches, kernel_overlay, mount_at, overlayfuse, run, run_isolated
from tests.support.rich_tree import (
    BIG_DIR_L2,
    BIG_DIR_L3,
    BIG_DIR_OCI_WHITEOUT,
    BIG_DIR_WHITEOUT,
    RICH_PROBES,
    SPARSE_CHUNKS,
    SPARSE_SIZE,
    LayerSet,
    build_layer_set,
    rich_layers,
)
from tests.support.trees import Dir, Entry, File, HardLink, OciWhiteout, Opaque, Symlink, Whiteout, make_tree

pytestmark = pytest.mark.kernel

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Pair:
    """The same stack mounted twice: by the kernel (oracle) and by overlayfuse."""

    kernel: LayerSet
    ours: LayerSet
    fuse: FuseMount


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory, overlayfuse_bin: Path) -> Iterator[Pair]:
    """The rich tree, mounted with upper+work on both sides for the whole module.

    Built and mounted once because it is the expensive part (~6000 inodes, a 64 MiB
    sparse file); the tests only read, so sharing it cannot couple them.
    """
    base = tmp_path_factory.mktemp("rich")
    layers = rich_layers()
    k = build_layer_set(base / "kernel", layers, kernel=True)
    o = build_layer_set(base / "ours", layers, kernel=False)
    with kernel_overlay(k.mnt, k.lowers, k.upper, k.work), \
            overlayfuse(o.mnt, o.lowers, o.upper, o.work) as fuse:
        yield Pair(k, o, fuse)


@pytest.fixture(scope="module")
def rich_views(rich: Pair) -> tuple[Snapshot, Snapshot]:
    """One full walk of each mount, (kernel, ours)."""
    return take_snapshot(rich.kernel.mnt), take_snapshot(rich.ours.mnt)


# --- the whole view --------------------------------------------------------------------


def test_rich_view_equals_kernel(rich_views: tuple[Snapshot, Snapshot]) -> None:
    kernel, ours = rich_views
    assert_same_view(kernel, ours)


def test_whiteouts_are_never_listed(rich_views: tuple[Snapshot, Snapshot]) -> None:
    """Accepted difference (a): the kernel lists whiteouts of non-merged dirs; we never do.

    The kernel side is asserted too, so that this test notices if the harness stops
    building the cases that produce the difference.
    """
    kernel, ours = rich_views
    assert sorted(kernel.vanished) == ["only_l3/ghost", "pure_l1/ghost", "pure_l1/ghost2"]
    assert ours.vanished == []
    for path, entry in ours.entries.items():
        if entry.listing is None:
            continue
        names = [name for name, _ in entry.listing]
        assert not [n for n in names if n.startswith(".wh.")], path
        assert names.count(".") == 1 and names.count("..") == 1, path
        assert len(names) == len(set(names)), f"{path}: a name is listed twice"


OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


def test_overlay_xattrs_are_hidden(rich_views: tuple[Snapshot, Snapshot]) -> None:
    _, ours = rich_views
    for path, entry in ours.entries.items():
        private = [n for n, _ in entry.xattrs if n.startswith(OVERLAY_XATTR_PREFIXES)]
        assert not private, f"{path}: {private}"
    assert dict(ours.entries["xattrs/file"].xattrs) == {"trusted.secret": b"s3",
                                                        "user.color": b"blue"}
    assert dict(ours.entries["xattrs/link"].xattrs) == {"trusted.link": b"on a symlink"}


def test_merge_results(rich_views: tuple[Snapshot, Snapshot]) -> None:
    """Spot checks written out by hand, independent of the kernel build of the tree."""
    _, ours = rich_views

    def names(path: str) -> set[str]:
        listing = ours.entries[path].listing
        assert listing is not None, path
        return {n for n, _ in listing} - {".", ".."}

    assert names("merged") == {"from_upper", "l1_only", "l2_only", "l3_only", "opq", "shared",
                               "sub"}
    assert names("merged/opq") == {"visible_l1"}
    assert names("sandwich") == {"from_l1"}
    assert names("recreated") == {"new_child"}
    assert names("opq_trusted") == names("opq_user") == names("opq_oci") == {"above"}
    assert names("nested") == {"inner", "keep"} and names("nested/inner") == {"from_upper"}
    assert ours.entries["hide_dir_by_file"].kind == "file"
    assert ours.entries["hide_file_by_dir"].kind == "dir"
    assert stat.S_IMODE(ours.entries["merged"].mode) == 0o750  # the upper's dir metadata
    assert ours.entries["merged"].nlink == 1  # merged dirs report 1, like the kernel
    assert "dir_whited_in_upper" not in ours.entries and "etc/passwd" not in ours.entries
    expected_big = {f"f{i:04d}" for i in (*BIG_DIR_L3, *BIG_DIR_L2)} - {
        f"f{i:04d}" for i in (*BIG_DIR_WHITEOUT, *BIG_DIR_OCI_WHITEOUT)}
    assert names("big") == expected_big


# --- errnos ----------------------------------------------------------------------------

# One object of each type; every operation of the read path on each of them.
TYPE_PATHS = ("etc/hosts", "merged", "types/rel_link", "types/dangling", "types/fifo",
              "types/socket", "types/null", "types/loop0")
DEVICE_PATHS = ("types/null", "types/loop0")
TYPE_PROBES: list[Probe] = [
    probe
    for path in TYPE_PATHS
    for probe in (
        ("lstat", path), ("stat", path), ("readlink", path),
        ("getxattr", path, "user.missing"), ("getxattr", path, "trusted.overlay.origin"),
        ("listxattr", path), ("statfs", path),
        ("access", path, os.F_OK), ("access", path, os.R_OK), ("access", path, os.W_OK),
        ("access", path, os.X_OK), ("open_directory", path),
    )
]
OPEN_PROBES: list[Probe] = [
    (op, path, flags)
    for path in TYPE_PATHS
    for op, flags in (("open", os.O_RDONLY | os.O_NONBLOCK),
                      ("open", os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW))
    if path not in DEVICE_PATHS
]
DEVICE_OPEN_PROBES: list[Probe] = [
    ("open", path, os.O_RDONLY | os.O_NONBLOCK) for path in DEVICE_PATHS
] + [("read", "types/null", 0, 16)]


def test_rich_errnos_equal_kernel(rich: Pair) -> None:
    assert_same_errnos(rich.kernel.mnt, rich.ours.mnt, RICH_PROBES)


def test_each_file_type_errnos_equal_kernel(rich: Pair) -> None:
    assert_same_errnos(rich.kernel.mnt, rich.ours.mnt, TYPE_PROBES + OPEN_PROBES)


def test_device_nodes_open_like_kernel(rich: Pair) -> None:
    """A device node in a layer opens as on kernel overlayfs mounted by root (no `nodev`)."""
    assert_same_errnos(rich.kernel.mnt, rich.ours.mnt, DEVICE_OPEN_PROBES)


# --- hardlinks and inode numbers -------------------------------------------------------


def test_hardlink_groups(rich_views: tuple[Snapshot, Snapshot]) -> None:
    """Accepted difference (c): compare which paths share an inode, not the numbers."""
    kernel, ours = rich_views
    expected = {frozenset({"links/a", "links/b", "other/c"}), frozenset({"links2/p", "links2/q"})}
    assert kernel.hardlink_groups() == expected
    assert ours.hardlink_groups() == expected
    assert ours.entries["links/a"].nlink == 3
    # The real link count, even where names are whited out or shadowed above.
    assert ours.entries["links/x"].nlink == kernel.entries["links/x"].nlink == 2
    assert ours.entries["links/s1"].nlink == kernel.entries["links/s1"].nlink == 2
    assert ours.entries["links/s2"].nlink == 1


def _stdout(cmd: Sequence[str], cwd: Path) -> str:
    proc = run(cmd, cwd=cwd, timeout=60)
    return proc.stdout.decode("utf-8", "surrogateescape")


def test_find_samefile(rich: Pair) -> None:
    cmd = ["find", ".", "-samefile", "links/a"]
    ours = run(cmd, cwd=rich.ours.mnt)
    assert ours.returncode == 0, ours.stderr
    found = sorted(ours.stdout.decode().split("\n")[:-1])
    assert found == ["./links/a", "./links/b", "./other/c"]
    # The kernel's find also complains about whiteouts listed in pure dirs: stdout only.
    assert found == sorted(_stdout(cmd, rich.kernel.mnt).split("\n")[:-1])


def test_du_counts_hardlinks_once(rich: Pair) -> None:
    """du skips names whose inode it already counted; dir sizes are kept out (difference d)."""
    cmd = ["du", "-B1", "-c", "links/a", "links/b", "other/c", "links/x", "links/s1",
           "links/s2", "links2/p", "links2/q", "sparse/disk.img"]
    ours = run(cmd, cwd=rich.ours.mnt)
    assert ours.returncode == 0, ours.stderr
    lines = ours.stdout.decode().splitlines()
    assert [line.split("\t")[1] for line in lines] == [
        "links/a", "links/x", "links/s1", "links/s2", "links2/p", "sparse/disk.img", "total"]
    assert ours.stdout.decode() == _stdout(cmd, rich.kernel.mnt)


def test_tar_records_hardlinks(rich: Pair) -> None:
    cmd = ["sh", "-c", "tar --sort=name -cf - links other links2 sparse | tar -tvf -"]
    ours = _stdout(cmd, rich.ours.mnt)
    assert "links/b link to links/a" in ours
    assert "other/c link to links/a" in ours
    assert "links2/q link to links2/p" in ours
    assert ours == _stdout(cmd, rich.kernel.mnt)


def test_inode_numbers_unique(rich_views: tuple[Snapshot, Snapshot]) -> None:
    """Distinct objects have distinct st_ino; one device for the whole mount.

    Paths share an st_ino in ours exactly where they are hardlinks of one object in the
    kernel's view: two distinct objects with one number would form a group the kernel has
    not, and a count of distinct numbers checks the rest.
    """
    kernel, ours = rich_views
    assert len({dev for dev, _ in ours.inodes.values()}) == 1
    groups = ours.hardlink_groups()
    for group in groups:
        assert all(ours.entries[p].kind != "dir" for p in group), group
    assert groups == kernel.hardlink_groups()
    objects = len(ours.inodes) - sum(len(g) - 1 for g in groups)
    assert len({ino for _, ino in ours.inodes.values()}) == objects


def test_readdir_d_ino_matches_st_ino(rich_views: tuple[Snapshot, Snapshot]) -> None:
    """`ls -i` and other d_ino users must see the number stat reports."""
    _, ours = rich_views
    wrong = {p: (d, ours.inodes[p][1]) for p, d in ours.d_inos.items() if d != ours.inodes[p][1]}
    assert not wrong, f"(d_ino, st_ino) differ: {dict(list(wrong.items())[:20])}"


def stat_all_twice(mnt: str, paths: list[str]) -> list[str]:
    """lstat every path twice in a row; the paths whose results differ (atime aside)."""
    def key(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_ino, st.st_dev, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                st.st_size, st.st_blocks, st.st_mtime_ns, st.st_ctime_ns, st.st_rdev)
    first = [key(os.lstat(os.path.join(mnt, p))) for p in paths]
    second = [key(os.lstat(os.path.join(mnt, p))) for p in paths]
    return [p for p, a, b in zip(paths, first, second, strict=True) if a != b]


def test_stat_twice_agrees(rich: Pair, rich_views: tuple[Snapshot, Snapshot]) -> None:
    _, ours = rich_views
    assert run_isolated(stat_all_twice, str(rich.ours.mnt), sorted(ours.entries)) == []


def test_inodes_stable_across_walks(rich: Pair, rich_views: tuple[Snapshot, Snapshot]) -> None:
    """A second walk, after the kernel forgot every inode, sees the same numbers and data."""
    _, first = rich_views
    drop_caches()  # the kernel forgets our inodes: the next walk looks them up anew
    second = take_snapshot(rich.ours.mnt)
    changed = {p: (first.inodes[p], second.inodes.get(p)) for p in first.inodes
               if first.inodes[p] != second.inodes.get(p)}
    assert not changed, f"st_ino changed: {dict(list(changed.items())[:20])}"
    assert first.entries == second.entries


# --- sparse files and big directories --------------------------------------------------


def read_sparse(path: str, size: int, chunks: dict[int, bytes]) -> list[str]:
    """Read the whole file; describe every byte range that is not as built."""
    problems = []
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != size:
        problems.append(f"read {len(data)} bytes, expected {size}")
    expected = bytearray(size)
    for offset, chunk in chunks.items():
        expected[offset:offset + len(chunk)] = chunk
    if data != expected:
        first = next(i for i, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b)
        problems.append(f"first wrong byte at {first}")
    return problems


def test_sparse_file(rich: Pair, rich_views: tuple[Snapshot, Snapshot]) -> None:
    kernel, ours = rich_views
    path = str(rich.ours.mnt / "sparse/disk.img")
    assert run_isolated(read_sparse, path, SPARSE_SIZE, dict(SPARSE_CHUNKS)) == []
    k, o = kernel.entries["sparse/disk.img"], ours.entries["sparse/disk.img"]
    assert o.size == SPARSE_SIZE
    assert o.blocks == k.blocks
    assert o.blocks is not None and o.blocks * 512 < 1 * MiB, "no longer sparse"
    assert ours.entries["sparse/all_hole"].blocks == kernel.entries["sparse/all_hole"].blocks == 0


def listing_in_small_reads(path: str) -> list[str]:
    """Names from getdents64 with a 512-byte buffer: ~150 calls for the big directory."""
    return [e.name for e in getdents(path, bufsize=512)]


def test_big_dir_in_small_reads(rich: Pair, rich_views: tuple[Snapshot, Snapshot]) -> None:
    """readdir offsets must survive being resumed many times: no name lost or repeated."""
    _, ours = rich_views
    names = run_isolated(listing_in_small_reads, str(rich.ours.mnt / "big"))
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(n for n, _ in ours.entries["big"].listing or ())


# --- each whiteout/opaque form on its own ----------------------------------------------

FORMS = ("kernel", "oci", "user")


def form_layers(form: str) -> dict[str, list[Entry]]:
    """A small three-layer stack in which every whiteout and opaque marker uses `form`.

    The "user" form differs from "kernel" in its opaque xattr only: there is no
    user-namespace whiteout other than the 0:0 device.
    """
    def whiteout(path: str) -> Entry:
        return OciWhiteout(path) if form == "oci" else Whiteout(path)

    opaque_form = {"kernel": "trusted", "oci": "oci", "user": "user"}[form]
    return {
        "upper": [
            whiteout("b"), whiteout("d/y"), File("upper_file"),
            File("w2/again"),  # a directory re-created above its whiteout in l1
            Opaque("m/opq", opaque_form), File("m/opq/top"),
        ],
        "l1": [
            whiteout("a"), whiteout("w"), whiteout("d/x"), File("d/new"),
            Opaque("o", opaque_form), File("o/above"),
            File("p/real"), whiteout("p/ghost"),  # a whiteout in a pure dir
            whiteout("w2"),
            File("m/l1"),
        ],
        "l2": [
            File("a", b"a"), File("b", b"b"), File("d/x"), File("d/y"), File("d/z"),
            File("o/below"), File("w/z"), File("w2/old"), File("m/l2"), File("m/opq/old"),
            Dir("e"), Symlink("s", "a"), File("h1"), HardLink("h2", "h1"),
        ],
    }


@pytest.mark.parametrize("form", FORMS)
def test_each_form_alone(form: str, tmp_path: Path, kernel_mount: Callable[..., Path],
                         fuse_mount: Callable[..., FuseMount]) -> None:
    layers = form_layers(form)
    k = build_layer_set(tmp_path / "kernel", layers, kernel=True)
    o = build_layer_set(tmp_path / "ours", layers, kernel=False)
    kernel_mount(k.mnt, list(k.lowers), k.upper, k.work)
    fuse_mount(o.mnt, list(o.lowers), o.upper, o.work)
    _, ours = assert_same_view(k.mnt, o.mnt)
    assert ours.vanished == []
    assert {n for n, _ in ours.entries["."].listing or ()} == {
        ".", "..", "d", "e", "h1", "h2", "m", "o", "p", "s", "upper_file", "w2"}
    assert {n for n, _ in ours.entries["d"].listing or ()} == {".", "..", "new", "z"}
    assert {n for n, _ in ours.entries["m/opq"].listing or ()} == {".", "..", "top"}
    assert_same_errnos(k.mnt, o.mnt, [
        ("lstat", "a"), ("lstat", "b"), ("lstat", "w"), ("lstat", "w/z"), ("lstat", "d/x"),
        ("lstat", ".wh.a"), ("lstat", "o/.wh..wh..opq"), ("lstat", "p/ghost"),
        ("lstat", "w2/old"), ("getxattr", "o", "trusted.overlay.opaque"),
        ("getxattr", "o", "user.overlay.opaque"), ("listxattr", "o"), ("listxattr", "m/opq"),
    ])


# --- read-only mount and mount modes ---------------------------------------------------

READ_ONLY_PROBES: list[Probe] = [
    ("mkdir", "newdir"), ("mkdir", "merged/newdir"),
    ("open", "etc/hosts", os.O_WRONLY), ("open", "etc/hosts", os.O_RDWR),
    ("open", "created", os.O_WRONLY | os.O_CREAT), ("truncate", "etc/hosts", 0),
    ("unlink", "etc/hosts"), ("rmdir", "merged/sub"), ("rename", "etc/hosts", "moved"),
    ("setxattr", "etc/hosts", "user.new", b"v"), ("chmod", "etc/hosts", 0o600),
    ("utime", "etc/hosts"), ("symlink", "newlink", "etc/hosts"),
    ("access", "etc/hosts", os.W_OK), ("access", "merged", os.W_OK),
    ("statfs", "."),
]


def is_read_only(mnt: Path) -> bool:
    """Read-only either per mount or per superblock (the kernel sets the latter)."""
    info = mount_at(mnt)
    assert info is not None, mnt
    return "ro" in info.mount_options.split(",") or "ro" in info.options.split(",")


def test_read_only_mount(rich: Pair, tmp_path: Path, kernel_mount: Callable[..., Path],
                         fuse_mount: Callable[..., FuseMount]) -> None:
    """Without upper/work both mounts are read-only: same view, EROFS for every write."""
    kmnt = kernel_mount(tmp_path / "kmnt", list(rich.kernel.lowers))
    fuse = fuse_mount(tmp_path / "omnt", list(rich.ours.lowers))
    for mnt in (kmnt, fuse.mnt):
        assert is_read_only(mnt)
    assert_same_view(kmnt, fuse.mnt)
    outcomes = assert_same_errnos(kmnt, fuse.mnt, READ_ONLY_PROBES + RICH_PROBES)
    assert outcomes[:len(READ_ONLY_PROBES) - 1] == [("err", "EROFS")] * (len(READ_ONLY_PROBES) - 1)


def test_upper_mount_is_read_write(rich: Pair) -> None:
    for mnt in (rich.kernel.mnt, rich.ours.mnt):
        assert not is_read_only(mnt)


# --- an upper dir written by the kernel, used as a lower -------------------------------


def kernel_mutations(mnt: str) -> None:
    """Changes made through a kernel overlay mount, leaving kernel-made markers in upper."""
    os.unlink(f"{mnt}/f")  # whiteout (0:0 chardev)
    _rmtree(f"{mnt}/d")
    os.mkdir(f"{mnt}/d")  # opaque dir: trusted.overlay.opaque=y
    Path(f"{mnt}/d/n").write_bytes(b"new")
    os.chmod(f"{mnt}/keep/k", 0o600)  # metadata copy-up, with trusted.overlay.origin
    with open(f"{mnt}/h1", "ab") as f:  # data copy-up of one name of a hardlink pair
        f.write(b"more")
    os.setxattr(f"{mnt}/keep", "user.x", b"1")  # directory copy-up, impure parent
    os.rename(f"{mnt}/keep/gone", f"{mnt}/keep/moved")  # whiteout + new file
    os.mkdir(f"{mnt}/fresh")
    os.symlink("../keep/moved", f"{mnt}/fresh/link")
    os.unlink(f"{mnt}/merged/l_only")  # whiteout inside a dir that stays merged


def _rmtree(path: str) -> None:
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(path)


def test_kernel_written_upper_as_lower(tmp_path: Path, kernel_mount: Callable[..., Path],
                                       fuse_mount: Callable[..., FuseMount]) -> None:
    base = make_tree(
        tmp_path / "base",
        File("f", b"1"), File("d/sub/x", b"2"), File("d/y"), File("keep/k", b"3"),
        File("keep/gone", b"4"), File("h1", b"h"), HardLink("h2", "h1"),
        File("merged/l_only"), File("merged/stays"),
    )
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with kernel_overlay(tmp_path / "writer", [base], upper, work) as writer:
        run_isolated(kernel_mutations, str(writer))
    # The test covers what it claims only if the kernel wrote its own markers.
    assert stat.S_ISCHR(os.lstat(upper / "f").st_mode) and os.lstat(upper / "f").st_rdev == 0
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert stat.S_ISCHR(os.lstat(upper / "merged/l_only").st_mode)

    lowers = [upper, base]
    kmnt = kernel_mount(tmp_path / "kmnt", lowers)
    fuse = fuse_mount(tmp_path / "omnt", lowers)
    _, ours = assert_same_view(kmnt, fuse.mnt)
    assert {n for n, _ in ours.entries["d"].listing or ()} == {".", "..", "n"}
    assert "f" not in ours.entries and "keep/gone" not in ours.entries
    assert_same_errnos(kmnt, fuse.mnt, [
        ("lstat", "f"), ("lstat", "d/sub"), ("lstat", "merged/l_only"),
        ("getxattr", "d", "trusted.overlay.opaque"), ("getxattr", ".", "trusted.overlay.uuid"),
        ("getxattr", "keep/k", "trusted.overlay.origin"), ("listxattr", "keep"),
        ("listxattr", "."), ("read", "h1", 0, 16), ("read", "h2", 0, 16),
    ])
