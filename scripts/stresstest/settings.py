"""What every part of the stress command agrees on: paths, worker kinds, limits."""

from __future__ import annotations

from pathlib import Path

# scripts/stresstest/settings.py -> the repository root
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"
FUSE_FSTYPE = "fuse.overlayfuse"

# The kinds of worker process, each with what it does (for --help and the report).
KINDS: dict[str, str] = {
    "lister": "scandir + fstatat of every entry, fresh and through dir fds held open across changes",
    "stater": "lstat of random paths",
    "reader": "open O_NOFOLLOW + read; holds up to 32 fds and preads/fstats them later",
    "writer": "create (plain, O_EXCL, O_TRUNC), append, overwrite, ftruncate, all O_NOFOLLOW",
    "renamer": "rename of files and symlinks over each other, and of directories",
    "exchanger": "renameat2 RENAME_EXCHANGE of file<->dir (and file<->file, dir<->dir), rename x<->x",
    "linker": "link and symlink",
    "unlinker": "unlink of files, symlinks and swap names",
    "dirmaker": "mkdir and rmdir",
}

# Only bound hangs; on two busy cores a healthy mount answers in well under a second.
MOUNT_TIMEOUT = 60.0  # the daemon must be mounted and answering by then
UNMOUNT_TIMEOUT = 15.0  # per unmount command, before the lazy fallback
DAEMON_EXIT_TIMEOUT = 15.0  # after unmount, before SIGKILL
HANG_GRACE = 60.0  # after --seconds, how long a worker may take to finish its last call
COMMAND_TIMEOUT = 60.0  # stat of the mount, drop_caches, rm -rf of the scratch dir
SAMPLE_INTERVAL = 0.5  # how often the daemon's fds and RSS are sampled while workers run

# After the workers exit, the kernel still holds inodes (and the daemon whatever it keeps for
# them) until it forgets them: the end count is taken after dropping the kernel's dentry and
# inode caches, and waiting up to FD_SETTLE_TIMEOUT for the count to come down.
FD_SETTLE_TIMEOUT = 20.0
# A daemon may open a few fds lazily (an index file, a layer dir it caches), and overlayfuse holds
# one descriptor per directory the kernel still holds (the mount root's children may stay cached),
# freeing the last few when Python next collects a caught exception's frames: more than this many
# above the count before the workers started is a leak (a leak per call shows as hundreds).
FD_SLACK = 24

READER_HELD_FDS = 32  # open files a reader keeps (and reads through) across changes
LISTER_HELD_DIRS = 8  # directory fds a lister keeps and lists again across changes
WRITER_MAX_SIZE = 256 << 10  # appends stop growing a file past this (bounds disk use)
