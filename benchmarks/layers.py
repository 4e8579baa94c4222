"""Building the layers: a generated rootfs-shaped l1, the l2 on top, the big files, the tarball."""

from __future__ import annotations

import io
import os
import random
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .settings import BIG_DIR, CHOWN_DIR, CHUNK, NEW_DIR
from .views import Entry, walk_view


class TreeWriter:
    """Creates entries under a root, counting them."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.count = 0
        self.bytes = 0

    def dir(self, rel: str, mode: int = 0o755) -> None:
        path = self.root / rel
        if path.is_dir():
            return
        if "/" in rel:
            self.dir(rel.rsplit("/", 1)[0])
        path.mkdir()
        os.chmod(path, mode)
        self.count += 1

    def file(self, rel: str, size: int, mode: int = 0o644) -> None:
        self._parent(rel)
        path = self.root / rel
        with open(path, "wb") as f:
            f.write(self.rng.randbytes(size))
        os.chmod(path, mode)
        self.count += 1
        self.bytes += size

    def symlink(self, rel: str, target: str) -> None:
        self._parent(rel)
        os.symlink(target, self.root / rel)
        self.count += 1

    def hardlink(self, rel: str, existing: str) -> None:
        self._parent(rel)
        os.link(self.root / existing, self.root / rel)
        self.count += 1

    def node(self, rel: str, kind: int, major: int = 0, minor: int = 0, mode: int = 0o666) -> None:
        self._parent(rel)
        os.mknod(self.root / rel, kind | mode, os.makedev(major, minor))
        os.chmod(self.root / rel, mode)
        self.count += 1

    def _parent(self, rel: str) -> None:
        if "/" in rel:
            self.dir(rel.rsplit("/", 1)[0])

    def size(self, low: int, high: int) -> int:
        """Log-uniform: many small files, a few big ones, like a real tree."""
        return int(low * (high / low) ** self.rng.random())


SYLLABLES = ["lib", "net", "core", "util", "base", "x", "py", "gnu", "sys", "io", "tls", "db",
             "c", "z", "ssl", "term", "dev", "run", "man", "conf", "fs", "pam", "acl", "at"]
LANGS = ["de", "fr", "es", "it", "ja", "pt_BR", "ru", "zh_CN", "sv", "nl", "pl", "cs"]


def generate_rootfs(root: Path, entries: int, seed: int = 1) -> int:
    """A tree shaped like a Debian rootfs with about `entries` entries; returns the count.

    Packages each bring some of: binaries, versioned libraries with symlink chains, docs,
    man pages, translations, data dirs, config and dpkg metadata; plus /dev nodes, a fifo,
    zoneinfo-style hardlinks and the usrmerge symlinks.
    """
    w = TreeWriter(root, random.Random(seed))
    rng = w.rng
    root.mkdir(parents=True, exist_ok=True)
    for d in ("boot", "etc", "home", "media", "mnt", "opt", "proc", "srv", "sys", "run",
              "usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu", "usr/lib64", "usr/libexec",
              "usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/zoneinfo",
              "var/cache", "var/lib/dpkg/info", "var/log", "var/spool", "var/mail", "dev/pts",
              "dev/shm"):
        w.dir(d)
    w.dir("root", 0o700)
    w.dir("tmp", 0o1777)
    w.dir("var/tmp", 0o1777)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):
        w.symlink(link, target)
    for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                               ("urandom", 1, 9), ("tty", 5, 0), ("console", 5, 1),
                               ("ptmx", 5, 2)):
        w.node(f"dev/{name}", stat.S_IFCHR, major, minor)
    w.node("dev/loop0", stat.S_IFBLK, 7, 0, 0o660)
    w.node("dev/sda", stat.S_IFBLK, 8, 0, 0o660)
    w.node("run/initctl", stat.S_IFIFO, mode=0o600)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        w.symlink(f"dev/{name}", target)
    for name in ("passwd", "group", "hostname", "hosts", "fstab", "nsswitch.conf", "profile"):
        w.file(f"etc/{name}", w.size(20, 2000))
    w.file("etc/shadow", 600, 0o640)
    w.file("usr/lib/os-release", 300)
    w.symlink("etc/os-release", "../usr/lib/os-release")
    w.file("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", 200_000, 0o755)
    w.symlink("usr/lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    # zoneinfo: about 4% of the tree, with posix/ and right/ names hardlinked to the zone files
    zones = max(2, entries // 120)
    for i in range(zones):
        region = ["Europe", "America", "Asia", "Africa", "Pacific"][i % 5]
        rel = f"usr/share/zoneinfo/{region}/City{i:03d}"
        w.file(rel, w.size(100, 3000))
        w.hardlink(f"usr/share/zoneinfo/posix/{region}/City{i:03d}", rel)
        if i % 3 == 0:
            w.symlink(f"usr/share/zoneinfo/Alias{i:03d}", f"{region}/City{i:03d}")
    w.symlink("etc/localtime", "/usr/share/zoneinfo/Europe/City000")
    n = 0
    while w.count < entries:
        n += 1
        pkg = rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + str(n)
        doc = f"usr/share/doc/{pkg}"
        w.file(f"{doc}/copyright", w.size(500, 20_000))
        w.file(f"{doc}/changelog.Debian.gz", w.size(300, 30_000))
        w.file(f"var/lib/dpkg/info/{pkg}.list", w.size(100, 4000))
        w.file(f"var/lib/dpkg/info/{pkg}.md5sums", w.size(100, 4000))
        if rng.random() < 0.2:
            w.file(f"var/lib/dpkg/info/{pkg}.postinst", w.size(200, 3000), 0o755)
        if rng.random() < 0.6:
            for i in range(rng.randint(1, 4)):
                name = f"{pkg}{'-' + str(i) if i else ''}"
                w.file(f"usr/bin/{name}", w.size(4000, 400_000), 0o755)
                w.file(f"usr/share/man/man1/{name}.1.gz", w.size(400, 8000))
                if rng.random() < 0.1:
                    w.symlink(f"usr/bin/{name}-alias", name)
                if rng.random() < 0.05:
                    w.hardlink(f"usr/bin/{name}.real", f"usr/bin/{name}")
        if rng.random() < 0.4:
            for i in range(rng.randint(1, 3)):
                lib = f"lib{pkg}{i}.so"
                w.file(f"usr/lib/x86_64-linux-gnu/{lib}.{i + 1}.2.3", w.size(8000, 800_000))
                w.symlink(f"usr/lib/x86_64-linux-gnu/{lib}.{i + 1}", f"{lib}.{i + 1}.2.3")
        if rng.random() < 0.3:
            for i in range(rng.randint(2, 15)):
                sub = f"usr/share/{pkg}" + (f"/part{i % 3}" if i > 5 else "")
                w.file(f"{sub}/data{i}.txt", w.size(200, 50_000))
        if rng.random() < 0.2:
            for lang in rng.sample(LANGS, rng.randint(3, 10)):
                w.file(f"usr/share/locale/{lang}/LC_MESSAGES/{pkg}.mo", w.size(1000, 40_000))
        if rng.random() < 0.15:
            for i in range(rng.randint(1, 4)):
                w.file(f"etc/{pkg}/{pkg}{i}.conf", w.size(50, 5000))
    return w.count


def copy_meta_dir(src: Path, dst: Path) -> None:
    """mkdir dst with src's mode and owner (what a layer builder would do)."""
    st = src.lstat()
    dst.mkdir()
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))


def l2_parent(l1: Path, l2: Path, rel: str) -> None:
    """Create rel's parent dirs in l2, each with the metadata of its l1 counterpart."""
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if not (l2 / sub).is_dir():
            if (l1 / sub).is_dir():
                copy_meta_dir(l1 / sub, l2 / sub)
            else:
                (l2 / sub).mkdir()


def subtree_counts(entries: dict[str, Entry]) -> dict[str, int]:
    """Entries in each directory's subtree, the directory included."""
    counts = {p: 1 for p, e in entries.items() if e[0] == "d"}
    for p in entries:
        parts = p.split("/")
        for i in range(1, len(parts)):
            anc = "/".join(parts[:i])
            if anc in counts:
                counts[anc] += 1
    return counts


def under(path: str, dirs: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def build_l2(l1: Path, l2: Path, changes: int, seed: int = 2) -> dict[str, Any]:
    """The second layer: adds, replaces, whiteouts (0:0), dir whiteouts, one opaque dir."""
    rng = random.Random(seed)
    w = TreeWriter(l2, rng)
    l2.mkdir(parents=True)
    entries = walk_view(str(l1))["entries"]
    counts = subtree_counts(entries)
    skip = [BIG_DIR, "opt", "dev", "proc", "sys", "run", "tmp", "var/tmp"]
    dirs = sorted(p for p in counts if "/" in p and not under(p, skip))
    # One opaque dir of a modest size, and a few whited-out dirs.
    want = max(6, changes // 25)
    opaque = min(dirs, key=lambda p: (abs(counts[p] - want), p))
    blocked = [opaque]
    wh_dirs: list[str] = []
    for p in rng.sample(dirs, len(dirs)):
        if len(wh_dirs) >= max(1, changes // 500):
            break
        if 3 <= counts[p] <= 40 and not under(p, blocked) and not any(
                under(b, [p]) for b in blocked):
            wh_dirs.append(p)
            blocked.append(p)
    l2_parent(l1, l2, opaque)
    copy_meta_dir(l1 / opaque, l2 / opaque)
    os.setxattr(l2 / opaque, "trusted.overlay.opaque", b"y")
    for i in range(3):
        w.file(f"{opaque}/replacement{i}.conf", w.size(100, 4000))
    for p in wh_dirs:
        l2_parent(l1, l2, p)
        os.mknod(l2 / p, stat.S_IFCHR, os.makedev(0, 0))
    files = [p for p, e in sorted(entries.items())
             if e[0] == "f" and not under(p, blocked + skip)]
    rng.shuffle(files)
    n_wh, n_rep = changes // 5, (changes * 2) // 5
    whiteouts, replaced = files[:n_wh], files[n_wh:n_wh + n_rep]
    for p in whiteouts:
        l2_parent(l1, l2, p)
        os.mknod(l2 / p, stat.S_IFCHR, os.makedev(0, 0))
    for p in replaced:
        l2_parent(l1, l2, p)
        st = (l1 / p).lstat()
        w.file(p, w.size(100, max(200, st.st_size * 2)), stat.S_IMODE(st.st_mode))
        os.chown(l2 / p, st.st_uid, st.st_gid)
    free_dirs = [p for p in dirs if not under(p, blocked)] or ["etc"]
    added = 0
    n_add = changes - n_wh - n_rep - 3
    while added < n_add:
        if rng.random() < 0.05:  # a new directory with a few files
            d = f"{rng.choice(free_dirs)}/added-dir{added}"
            for i in range(min(rng.randint(3, 10), n_add - added)):
                l2_parent(l1, l2, f"{d}/x")
                w.file(f"{d}/new{i}.dat", w.size(100, 30_000))
                added += 1
            continue
        d = rng.choice(free_dirs)
        l2_parent(l1, l2, f"{d}/x")
        if rng.random() < 0.1:
            w.symlink(f"{d}/added-link{added}", f"added-target{added}")
        else:
            w.file(f"{d}/added{added}.dat", w.size(100, 50_000))
        added += 1
    return {"opaque_dir": opaque, "whiteout_dirs": wh_dirs, "whiteouts": len(whiteouts),
            "replaced": len(replaced), "added": added + 3, "l2_entries": w.count}


def build_chown_tree(layer: Path, files: int, big: int) -> None:
    """chown-tree's layer: ``d/`` with FILES small files (2 KiB of random data each) and one file
    of BIG bytes, sparse but for its first MiB (a metadata change never reads it; only
    fuse-overlayfs, which copies data, does, and it skips the hole)."""
    d = layer / CHOWN_DIR
    d.mkdir(parents=True)
    rng = random.Random(12)
    for i in range(files):
        (d / f"f{i:05d}").write_bytes(rng.randbytes(2048))
    with open(d / "big.bin", "wb") as f:
        f.write(rng.randbytes(1 << 20))
        f.truncate(big)


def write_big(path: Path, size: int, seed: int) -> None:
    """`size` bytes of pseudo-random data, every block written (no holes, no unwritten extents)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(CHUNK, left)
            f.write(rng.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def build_create_tar(path: Path, files: int, total: int, seed: int = 3) -> int:
    """The create-small tarball: `files` files of about `total` bytes in all, under NEW_DIR/."""
    rng = random.Random(seed)
    raw = [256 * (256 ** rng.random()) for _ in range(files)]  # 256 B .. 64 KiB, log-uniform
    factor = total / sum(raw)
    sizes = [max(1, int(s * factor)) for s in raw]
    per_dir = 20
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        made: set[str] = set()
        for i, size in enumerate(sizes):
            d = f"{NEW_DIR}/d{i // (per_dir * 10):02d}/s{(i // per_dir) % 10}"
            for k in range(1, d.count("/") + 2):
                sub = "/".join(d.split("/")[:k])
                if sub not in made:
                    made.add(sub)
                    info = tarfile.TarInfo(sub)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                    tar.addfile(info)
            info = tarfile.TarInfo(f"{d}/file{i:05d}.dat")
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
    return sum(sizes)
