"""Upper dirs out: the layer tar a commit writes, and the A/C/D changes `overlayctl diff` lists.

The round trip is the property that matters: a container's upper dir (written for real, by the
overlayfuse daemon or by kernel overlayfs), turned into a layer tar, unpacked, and stacked on the
same lowers, must show what the container showed, through the kernel and through overlayfuse.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from overlayfuse.containers.changes import Change, list_changes
from overlayfuse.containers.layertar import write_layer_tar
from overlayfuse.errors import ImageError
from overlayfuse.images import oci
from overlayfuse.images.unpack import unpack_layer
from tests.conftest import MountFactory
from tests.support.compare import Snapshot, assert_same_view, take_snapshot
from tests.support.imagebuild import sha256_digest
from tests.support.mounts import FuseMount, kernel_overlay, overlayfuse, run_isolated
from tests.support.trees import (
    CharDev,
    Dir,
    Fifo,
    File,
    HardLink,
    OciWhiteout,
    Opaque,
    Socket,
    Symlink,
    Whiteout,
    make_tree,
)

NS_MTIME = 1_700_000_000_987_654_321


def tar_of(upper: Path) -> bytes:
    out = io.BytesIO()
    write_layer_tar(upper, out)
    return out.getvalue()


def members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        return tf.getmembers()


# --- the tar format -------------------------------------------------------------------------------


def _upper_in_every_format(root: Path) -> Path:
    """An upper dir using every marker format a daemon or kernel writes, and every file type."""
    # A kernel >= 6.7 xattr whiteout, inside its "opaque=x" (not opaque, has whiteouts) directory;
    # made first, so that make_tree's final pass gives it fixed times too.
    xdir = root / "xattr-wh"
    xdir.mkdir(parents=True)
    os.setxattr(xdir, "trusted.overlay.opaque", b"x")
    (xdir / "gone").write_bytes(b"")
    os.setxattr(xdir / "gone", "trusted.overlay.whiteout", b"")
    (xdir / "kept").write_bytes(b"k")
    upper = make_tree(
        root,
        Dir("etc"), File("etc/hosts", b"hosts\n", mode=0o640, uid=1000, gid=42,
                         xattrs={"user.keep": b"\xffbinary", "trusted.overlay.origin": b"x",
                                 "user.overlay.junk": b"y"}),
        Whiteout("etc/dev-wh"), OciWhiteout("etc/oci-wh"),
        Opaque("op-trusted"), File("op-trusted/f", b"1"),
        Opaque("op-user", "user"), Opaque("op-oci", "oci"),
        Dir("replaced"), File("replaced/new", b"n"), OciWhiteout("replaced"),  # whited out + present
        File("file-too", b"f"), OciWhiteout("file-too"),
        Dir("links"), File("links/a", b"shared"), HardLink("links/b", "links/a"),
        HardLink("links/c", "links/a"),
        Symlink("links/sym", "/etc/hosts"), CharDev("dev/null", 1, 3, mode=0o666), Fifo("dev/fifo"),
        Socket("dev/sock"), File(".wh..wh.plnk/junk"),
    )
    os.utime(upper / "etc/hosts", ns=(NS_MTIME, NS_MTIME))
    return upper


def test_every_marker_format_becomes_the_oci_one(tmp_path: Path) -> None:
    tar = tar_of(_upper_in_every_format(tmp_path / "upper"))
    got = [(m.name, m.type) for m in members(tar)]
    reg, dir_, lnk = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE
    assert got == [
        (".", dir_),  # tarfile strips the trailing slash of "./"
        ("dev", dir_), ("dev/fifo", tarfile.FIFOTYPE), ("dev/null", tarfile.CHRTYPE),
        ("etc", dir_), ("etc/.wh.dev-wh", reg), ("etc/.wh.oci-wh", reg), ("etc/hosts", reg),
        ("file-too", reg),
        ("links", dir_), ("links/a", reg), ("links/b", lnk), ("links/c", lnk),
        ("links/sym", tarfile.SYMTYPE),
        ("op-oci", dir_), ("op-oci/.wh..wh..opq", reg),
        ("op-trusted", dir_), ("op-trusted/.wh..wh..opq", reg), ("op-trusted/f", reg),
        ("op-user", dir_), ("op-user/.wh..wh..opq", reg),
        ("replaced", dir_), ("replaced/.wh..wh..opq", reg), ("replaced/new", reg),
        ("xattr-wh", dir_), ("xattr-wh/.wh.gone", reg), ("xattr-wh/kept", reg),
    ]
    by_name = {m.name: m for m in members(tar)}
    hosts = by_name["etc/hosts"]
    assert (hosts.mode, hosts.uid, hosts.gid, hosts.uname, hosts.gname) == (0o640, 1000, 42, "", "")
    assert hosts.pax_headers["mtime"] == "1700000000.987654321"
    xattrs = {k: v for k, v in hosts.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    assert xattrs == {"SCHILY.xattr.user.keep": "\udcffbinary"}
    assert by_name["links/b"].linkname == by_name["links/c"].linkname == "links/a"
    assert by_name["links/sym"].linkname == "/etc/hosts"
    assert (by_name["dev/null"].devmajor, by_name["dev/null"].devminor) == (1, 3)
    assert not any("SCHILY.xattr.trusted.overlay" in k for m in members(tar) for k in m.pax_headers)


def test_the_tar_is_deterministic(tmp_path: Path) -> None:
    # Two builds of one description: other inode numbers, other creation order on disk.
    first = tar_of(_upper_in_every_format(tmp_path / "one"))
    assert tar_of(_upper_in_every_format(tmp_path / "two")) == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tf:
        assert tf.pax_headers == {}  # no global header: no timestamps of the commit itself


def test_our_unpacker_reads_it_back(tmp_path: Path) -> None:
    tar = tar_of(_upper_in_every_format(tmp_path / "upper"))
    layer = tmp_path / "layer"
    result = unpack_layer(io.BytesIO(tar), oci.MEDIA_LAYER_TAR, layer,
                          diff_id=sha256_digest(tar))
    assert result.unpacked_size == len(b"hosts\n1nfsharedk")
    assert os.getxattr(layer / "etc/hosts", "user.keep") == b"\xffbinary"
    assert os.lstat(layer / "etc/hosts").st_mtime_ns == NS_MTIME
    assert os.lstat(layer / "links/a").st_nlink == 3
    for name in ("etc/dev-wh", "etc/oci-wh", "xattr-wh/gone"):
        assert os.lstat(layer / name).st_rdev == 0 and stat.S_ISCHR(os.lstat(layer / name).st_mode)
    for name in ("op-trusted", "op-user", "op-oci", "replaced"):
        assert os.getxattr(layer / name, "trusted.overlay.opaque") == b"y", name
    assert not os.path.lexists(layer / "dev/sock")


# --- scenarios written through real mounts -------------------------------------------------------

LOWER0 = (
    Dir("etc"), File("etc/hosts", b"127.0.0.1 localhost\n"), File("etc/motd", b"hello\n"),
    File("etc/shadow", b"secret\n", mode=0o640), File("etc/passwd", b"root\n"),
    Dir("opt/app/conf"), File("opt/app/run", b"#!/bin/sh\n", mode=0o755),
    File("opt/app/conf/a", b"a"), Dir("opt/tool"), File("opt/tool/bin", b"tool"),
    Dir("var/cache/stuff"), File("var/cache/stuff/x", b"x"), File("var/cache/stuff/y", b"y"),
    File("srv/data", b"file, later a dir"),
    Dir("usr/share/doc/pkg"), File("usr/share/doc/pkg/README", b"read me"),
    Dir("keep"), File("keep/untouched", b"u"), File("keep/other", b"o"),
    File("bin/sh", b"#!", mode=0o755),
    Dir("deep/a/b/c"), File("deep/a/b/c/leaf", b"leaf"),
    Dir("hidden"), File("hidden/by-l1", b"h"),
)
LOWER1 = (
    File("etc/l1-file", b"from layer 1\n"), Whiteout("etc/passwd"),  # the image deletes passwd
    Opaque("hidden"), File("hidden/l1-only", b"l1"),
)


def apply_changes(mnt: str, rename_dirs: bool) -> None:
    """The container's work (run in a child process: a hung mount costs a timeout)."""
    def p(rel: str) -> str:
        return os.path.join(mnt, rel)

    os.unlink(p("etc/motd"))
    shutil.rmtree(p("var/cache/stuff"))
    shutil.rmtree(p("opt/app"))
    os.mkdir(p("opt/app"))
    Path(p("opt/app/new")).write_bytes(b"new app\n")
    Path(p("etc/added")).write_bytes(b"added\n")
    os.utime(p("etc/added"), ns=(NS_MTIME, NS_MTIME))
    with open(p("etc/hosts"), "ab") as f:
        f.write(b"10.0.0.1 db\n")
    os.chmod(p("bin/sh"), 0o700)
    os.chown(p("etc/shadow"), 1000, 42)
    os.setxattr(p("etc/l1-file"), "user.note", b"changed")
    os.makedirs(p("new/deep"))
    Path(p("new/deep/f")).write_bytes(b"deep")
    Path(p("new/a")).write_bytes(b"linked")
    os.link(p("new/a"), p("new/b"))
    os.symlink("/etc/hosts", p("new/link"))
    os.mknod(p("new/null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(p("new/fifo"), 0o600)
    os.unlink(p("srv/data"))
    os.mkdir(p("srv/data"))
    Path(p("srv/data/inside")).write_bytes(b"now a dir")
    shutil.rmtree(p("usr/share/doc"))
    Path(p("usr/share/doc")).write_bytes(b"now a file")
    os.rename(p("keep/untouched"), p("keep/renamed"))
    Path(p("etc/passwd")).write_bytes(b"root\nuser\n")
    os.utime(p("deep/a/b/c/leaf"), ns=(NS_MTIME, NS_MTIME))
    if rename_dirs:
        os.rename(p("opt/tool"), p("opt/tool2"))


EXPECTED_CHANGES = [
    "C /bin", "C /bin/sh",
    "C /deep", "C /deep/a", "C /deep/a/b", "C /deep/a/b/c", "C /deep/a/b/c/leaf",
    "C /etc", "A /etc/added", "C /etc/hosts", "C /etc/l1-file", "D /etc/motd", "A /etc/passwd",
    "C /etc/shadow",
    "C /keep", "A /keep/renamed", "D /keep/untouched",
    "A /new", "A /new/a", "A /new/b", "A /new/deep", "A /new/deep/f", "A /new/fifo", "A /new/link",
    "A /new/null",
    "C /opt", "C /opt/app", "D /opt/app/conf", "A /opt/app/new", "D /opt/app/run",
    "C /srv", "C /srv/data", "A /srv/data/inside",
    "C /usr", "C /usr/share", "C /usr/share/doc",
    "C /var", "C /var/cache", "D /var/cache/stuff",
]
RENAME_CHANGES = ["D /opt/tool", "A /opt/tool2", "A /opt/tool2/bin"]


def _lowers(tmp_path: Path) -> list[Path]:
    """The image: LOWER1 over LOWER0, lowerdir order (top first)."""
    return [make_tree(tmp_path / "l1", *LOWER1), make_tree(tmp_path / "l0", *LOWER0)]


def _container(tmp_path: Path, writer: str) -> tuple[list[Path], Path, Snapshot]:
    """Run the scenario on a WRITER ("kernel" or "overlayfuse") mount; returns the lowers, the
    upper dir, and what the container showed before it was unmounted."""
    lowers = _lowers(tmp_path)
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "container"
    upper.mkdir()
    work.mkdir()
    if writer == "kernel":
        # redirect_dir=off: a directory rename is EXDEV (tools copy instead), as in docker.
        with kernel_overlay(mnt, lowers, upper, work, extra="redirect_dir=off"):
            run_isolated(apply_changes, str(mnt), False)
            shown = take_snapshot(mnt)
    else:
        # As overlayctl mounts a container: no redirects, no metacopy files (a layer cannot say them).
        with overlayfuse(mnt, lowers, upper, work, ["redirect_dir=off", "metacopy=off"]):
            run_isolated(apply_changes, str(mnt), True)
            shown = take_snapshot(mnt)
    return lowers, upper, shown


def _commit_and_unpack(upper: Path, layer: Path) -> None:
    tar = tar_of(upper)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        assert not [m.name for m in tf if ".wh." in m.name and m.size]
    unpack_layer(io.BytesIO(tar), oci.MEDIA_LAYER_TAR, layer,
                 diff_id=sha256_digest(tar))


@pytest.mark.kernel
@pytest.mark.parametrize("writer", ["kernel", "overlayfuse"])
def test_committed_layer_shows_what_the_container_showed(
        tmp_path: Path, writer: str, overlayfuse_bin: Path, kernel_mount: MountFactory,
        fuse_mount: Callable[..., FuseMount]) -> None:
    lowers, upper, shown = _container(tmp_path, writer)
    layer = tmp_path / "layer"
    _commit_and_unpack(upper, layer)
    stacked = [layer, *lowers]
    shown = _without_blocks(shown)
    kernel = _without_blocks(take_snapshot(kernel_mount(tmp_path / "kernel", stacked)))
    fuse = _without_blocks(take_snapshot(fuse_mount(tmp_path / "fuse", stacked).mnt))
    if writer == "kernel":
        assert_same_view(shown, kernel, ours_is_kernel=True)
        assert_same_view(shown, fuse)
    else:
        assert_same_view(kernel, shown)
        assert_same_view(kernel, fuse)
    assert "etc/motd" not in kernel.entries and "opt/app/run" not in kernel.entries
    assert kernel.entries["etc/added"].mtime_ns == NS_MTIME


def _without_blocks(snap: Snapshot) -> Snapshot:
    """st_blocks is storage, not content: on ext4 it counts an external xattr block, which an
    upper file needs for the kernel's ``trusted.overlay.origin`` (dropped by the commit) and its
    unpacked copy does not. Sizes and content hashes are still compared."""
    return replace(snap, entries={p: replace(e, blocks=None) for p, e in snap.entries.items()})


@pytest.mark.kernel
@pytest.mark.parametrize("writer", ["kernel", "overlayfuse"])
def test_changes_of_a_real_container(tmp_path: Path, writer: str, overlayfuse_bin: Path,
                                     kernel_mount: MountFactory) -> None:
    lowers, upper, shown = _container(tmp_path, writer)
    changes = list_changes(lowers, upper)
    assert changes == sorted(changes, key=lambda c: c.path)
    expected = EXPECTED_CHANGES + (RENAME_CHANGES if writer == "overlayfuse" else [])
    assert [str(c) for c in changes] == sorted(expected, key=lambda line: line[2:])
    _check_against_views(changes, take_snapshot(kernel_mount(tmp_path / "image", lowers)), shown)


def _check_against_views(changes: list[Change], image: Snapshot, container: Snapshot) -> None:
    """An oracle that knows nothing of upper dirs: the image's view and the container's."""
    def rel(path: str) -> str:
        return path.lstrip("/")

    def is_dir(snap: Snapshot, path: str) -> bool:
        return path in snap.entries and snap.entries[path].kind == "dir"

    both = image.entries.keys() & container.entries.keys()
    kinds = {rel(c.path): c.kind for c in changes}
    assert {p for p, k in kinds.items() if k == "A"} == container.entries.keys() - image.entries.keys()
    topmost_deleted = {p for p in image.entries.keys() - container.entries.keys()
                       if is_dir(container, os.path.dirname(p) or ".")
                       and is_dir(image, os.path.dirname(p) or ".")}
    assert {p for p, k in kinds.items() if k == "D"} == topmost_deleted
    assert {p for p, k in kinds.items() if k == "C"} <= both
    differing = {p for p in both - {"."} if _differs(image, container, p)}
    assert differing <= {p for p, k in kinds.items() if k == "C"}


def _differs(image: Snapshot, container: Snapshot, path: str) -> bool:
    a, b = image.entries[path], container.entries[path]
    if a.kind == b.kind == "dir":  # merged dirs: nlink and listing follow their children
        return (a.mode, a.uid, a.gid, a.xattrs) != (b.mode, b.uid, b.gid, b.xattrs)
    return (a.kind, a.mode, a.uid, a.gid, a.size, a.sha256, a.target, a.rdev, a.mtime_ns,
            a.xattrs) != (b.kind, b.mode, b.uid, b.gid, b.size, b.sha256, b.target, b.rdev,
                          b.mtime_ns, b.xattrs)


def test_changes_with_no_lowers_are_all_additions(tmp_path: Path) -> None:
    upper = make_tree(tmp_path / "upper", File("a/b", b"x"), Whiteout("gone"))
    assert [str(c) for c in list_changes([], upper)] == ["A /a", "A /a/b"]


def test_changes_see_the_image_through_its_own_whiteouts(tmp_path: Path) -> None:
    lowers = _lowers(tmp_path)
    upper = make_tree(tmp_path / "upper", Whiteout("etc/passwd"), Whiteout("hidden/by-l1"),
                      Opaque("hidden"), File("hidden/l1-only", b"again"), OciWhiteout("etc/hosts"))
    # etc/passwd and hidden/by-l1 are already gone in the image: deleting them changes nothing.
    assert [str(c) for c in list_changes(lowers, upper)] == [
        "C /etc", "D /etc/hosts", "C /hidden", "C /hidden/l1-only"]


# --- what a layer cannot say ----------------------------------------------------------------------


@pytest.mark.kernel
def test_a_kernel_redirect_is_refused_by_name(tmp_path: Path) -> None:
    lowers = _lowers(tmp_path)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with kernel_overlay(tmp_path / "mnt", lowers, upper, work, extra="redirect_dir=on"):
        os.rename(tmp_path / "mnt/opt/tool", tmp_path / "mnt/opt/moved")
    assert os.getxattr(upper / "opt/moved", "trusted.overlay.redirect")
    with pytest.raises(ImageError, match=r"^/opt/moved: this directory was renamed by kernel "
                                         r"overlayfs with redirect_dir=on"):
        tar_of(upper)


@pytest.mark.kernel
def test_a_kernel_metacopy_file_is_refused_by_name(tmp_path: Path) -> None:
    lowers = _lowers(tmp_path)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with kernel_overlay(tmp_path / "mnt", lowers, upper, work, extra="redirect_dir=on,metacopy=on"):
        os.chmod(tmp_path / "mnt/etc/hosts", 0o600)
    with pytest.raises(ImageError, match=r"^/etc/hosts: a kernel metacopy file"):
        tar_of(upper)


def test_an_unreadable_upper_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"cannot read the upper dir .*missing"):
        tar_of(tmp_path / "missing")


def test_sockets_are_left_out(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(upper / "s"))
        assert [m.name for m in members(tar_of(upper))] == ["."]


#: Apparent size of the sparse file a commit must keep sparse: large enough that writing its
#: zeros shows, small enough that an unsparse tar of it still fits in memory.
SPARSE_SIZE = 256 << 20


def test_a_sparse_file_stays_sparse_through_the_layer(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    with open(upper / "disk.img", "wb") as f:
        f.write(b"head")
        f.seek(SPARSE_SIZE // 2)
        f.write(b"middle")
        f.truncate(SPARSE_SIZE)  # ends in a hole
    (upper / "plain").write_bytes(b"no holes")
    out = io.BytesIO()
    write_layer_tar(upper, out)
    tar = out.getvalue()
    assert len(tar) < 64 << 10  # the data and the map, not the zeros
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert members["disk.img"].size == SPARSE_SIZE and members["disk.img"].sparse
        assert members["plain"].sparse is None
        assert tf.extractfile("plain").read() == b"no holes"  # type: ignore[union-attr]
    unpack_layer(io.BytesIO(tar), oci.MEDIA_LAYER_TAR, tmp_path / "layer")
    st = os.stat(tmp_path / "layer" / "disk.img")
    assert st.st_size == SPARSE_SIZE and st.st_blocks * 512 < 1 << 20
    with open(tmp_path / "layer" / "disk.img", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(SPARSE_SIZE // 2)
        assert f.read(6) == b"middle"
        assert f.read(100) == bytes(100)
    if shutil.which("tar"):  # GNU tar reads it back as the same file
        listing = subprocess.run(["tar", "-tvf", "-"], input=tar, capture_output=True, timeout=60, check=True)
        assert b"disk.img" in listing.stdout and str(SPARSE_SIZE).encode() in listing.stdout
