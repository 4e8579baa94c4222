"""What every part of the bench agrees on: paths, targets, workloads, limits and scales."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# benchmarks/settings.py -> the repository root
REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"

#: overlayfuse-fs: overlayfuse with its fork server running (benchmarks/forkserver.py); opt-in.
TARGETS = ("kernel", "fuse-overlayfs", "overlayfuse", "overlayfuse-fs")
DEFAULT_TARGETS = TARGETS[:3]
FSTYPES = {"kernel": "overlay", "fuse-overlayfs": "fuse.fuse-overlayfs",
           "overlayfuse": "fuse.overlayfuse", "overlayfuse-fs": "fuse.overlayfuse"}

CTL_IMAGES = 20  # images in the store ctl-image-ls and ctl-ps list
CTL_RUNS = 5  # runs of each overlayctl command per rep: one run takes a tenth of a second

PODMAN_RUNS = 3  # timed `podman run` per target per rep, in rotating order: one run takes ~0.3 s
#: One `podman run --rm` of busybox takes under a second; pulling from a local layout a few. A guard only.
PODMAN_TIMEOUT = 120.0

#: getxattr calls in the per-request row: enough that the interpreter's start (~30 ms) is noise.
PER_REQUEST_CALLS = 20000

# name, unit, cold (caches dropped after mounting), what it does
WORKLOADS: dict[str, tuple[str, bool, str]] = {
    "walk-cold": ("s", True, "find MNT -printf '%s %i %m\\n', caches dropped"),
    "walk-warm": ("s", False, "the same find again, same mount"),
    "walk-again": ("s", False, "the same find a third time: every listing cached by now (walk-warm still "
                   "pays one GETATTR per directory in a FUSE mount, see docs/performance.md)"),
    "stat-ls": ("s", False, "ls -lR MNT/usr, fresh mount"),
    "read-all": ("s", True, "tar cf - -C MNT --exclude=./opt/bench . | wc -c, caches dropped"),
    "seqread-1G": ("MB/s", True, "dd bs=1M of the big lower file, caches dropped"),
    "copyup-big": ("s", False, "1-byte write into the big lower file (full copy-up)"),
    "create-small": ("s", False, "untar many small files into a new dir"),
    "copyup-many": ("s", False, "append one byte to many lower files"),
    "copyup-big-nosync": ("s", False, "copyup-big with no target syncing the copy (kernel: volatile, "
                          "overlayfuse: fsync=0; fuse-overlayfs never syncs one)"),
    "copyup-many-nosync": ("s", False, "copyup-many with no target syncing the copies (as above)"),
    "rm-tree": ("s", False, "rm -rf of a lower tree (whiteouts)"),
    "parallel": ("s", True, "dd of big.bin + dd of big2.bin + find, at once, caches dropped"),
    "chown-big": ("s", False, "chown -R of the dir of big lower files (kernel: metacopy=on)"),
    "mv-big-dir": ("s", False, "mv of the dir of big lower files (kernel: redirect_dir=on)"),
    "mv-big-file": ("s", False, "mv of the big lower file within its dir (kernel: metacopy=on)"),
    "chown-tree": ("s", False, "chown -R of a dir of many small files and one big one (issue 18's case), "
                   "a layer of its own (kernel: metacopy=on)"),
    "per-request": ("us", False, f"one getxattr of a name no file has, which no cache answers: "
                    f"{PER_REQUEST_CALLS} of them, microseconds each"),
    "du-s": ("s", True, "du -s MNT, caches dropped"),
    "mount-to-first-read": ("s", False, "from starting the mount command to a 4 KiB read through the mount"),
    "git-status": ("s", False, "git status in a checkout of many files (a layer of its own), warm: "
                   "after one untimed git status"),
    "random-read-4t": ("s", True, "4 threads reading many small files of the view in a random order, "
                       "caches dropped"),
    "random-read-warm": ("s", False, "random-read-4t on a fresh mount whose lower files the host's cache "
                         "holds (a container of an image already read)"),
    "build-like": ("s", False, "untar a C-shaped source tree into MNT/bench-build, write a 3x-sized "
                   ".o for each .c (staged, renamed), link them into one file, rm -rf the tree"),
    "podman-run": ("s", False, "podman run --rm IMAGE true (busybox, runc, root, no network), target as "
                   "containers-storage's overlay backend"),
    "ctl-image-ls": ("s", False, f"overlayctl image ls, store of {CTL_IMAGES} images (overlayfuse only)"),
    "ctl-ps": ("s", False, f"overlayctl ps -a, store of {CTL_IMAGES} images (overlayfuse only)"),
}
#: Workloads of overlayctl, not of a mount: measured once, in the overlayfuse column.
CTL_WORKLOADS = ("ctl-image-ls", "ctl-ps")
#: Run by podman on a storage of its own per target, not on the bench's mounts.
PODMAN_WORKLOAD = "podman-run"

MOUNT_TIMEOUT = 60.0  # a mount must answer a stat by then; only bounds a hang
UNMOUNT_TIMEOUT = 15.0  # per unmount command, before the lazy fallback
DAEMON_EXIT_TIMEOUT = 15.0  # after unmount, before SIGKILL
SYNC_TIMEOUT = 300.0  # sync can wait on other busy filesystems
DEBOOTSTRAP_TIMEOUT = 1800.0  # a minbase download and install; usually 2 to 5 minutes
DEFAULT_WORKDIR = Path("/var/tmp/overlayfuse-bench")
DEFAULT_CACHE = Path("/var/cache/overlayfuse-bench")
BIG_DIR = "opt/bench"  # where the big files live in l1; excluded from read-all
CHOWN_DIR = "d"  # chown-tree's dir, in a layer of its own
NEW_DIR = "bench-new"  # top dir of the create-small tarball
CHUNK = 8 << 20  # write unit for the big files
RSS_WALKS = 3  # warm walks for the RSS-growth table
FIRST_READ = f"{BIG_DIR}/big.bin"  # in l1 in every scale; the mountpoint is empty until mounted
FIRST_READ_POLL = 0.0005  # seconds between tries to read FIRST_READ while the mount comes up
TOOL_TIMEOUT = 120.0  # one umoci or overlayctl call building the ctl store
MARKER = ".overlayfuse-bench"  # marks --workdir as ours, so a rerun may empty it
BUILD_DIR = "bench-build"  # top dir of the build-like tarball
GIT_TIMEOUT = 300.0  # one git command building the checkout (git add of 10k files: seconds)
RANDOM_READ_MAX = 64 << 10  # the random-read files: no bigger than this
RANDOM_READ_THREADS = 4


@dataclass(frozen=True, slots=True)
class Scale:
    """How big everything is in one mode."""

    name: str
    tree_entries: int  # generated l1 tree (debootstrap trees are what they are)
    l2_changes: int  # files added + replaced + whited out in l2
    big: int  # bytes in opt/bench/big.bin; big2.bin is half
    create_files: int
    create_bytes: int
    copyup_files: int
    rm_entries: int  # wanted size of the rm-tree subtree
    reps: int
    cmd_timeout: float  # per timed command
    repo_files: int  # files committed in the git-status checkout
    build_files: int  # sources in the build-like tarball
    random_files: int  # files random-read-4t reads
    chown_files: int  # small files beside one big one in chown-tree's layer


SCALES = {
    "full": Scale("full", 7000, 1500, 1 << 30, 4000, 45 << 20, 2000, 4000, 3, 1800.0, 10000, 2000, 3000, 1000),
    "quick": Scale("quick", 2500, 500, 256 << 20, 1500, 16 << 20, 700, 1200, 2, 600.0, 10000, 800, 1500, 1000),
    "tiny": Scale("tiny", 300, 60, 16 << 20, 120, 1 << 20, 50, 80, 1, 120.0, 200, 60, 100, 100),
}
