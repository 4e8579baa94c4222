"""A tiny FUSE filesystem that fails on cue, to use as a lower layer under overlayfuse.

    python -m tests.support.faultfs CONTROL_DIR MOUNTPOINT [HOLD_WHILE_MOUNTED]

It serves two files: `ok` (reads fine) and `broken` (every read answers EIO, as a failing disk
would). With HOLD_WHILE_MOUNTED, a `stat` of its root waits while HOLD_WHILE_MOUNTED is a mount
point and CONTROL_DIR/release does not exist (creating CONTROL_DIR/holding when it starts
waiting): overlayfuse stacked on it checks its layers freely before mounting, but once mounted it
cannot answer a stat of its own root until the test says so. Attributes are never cached by the
kernel (timeouts 0), so every stat really reaches this process.
"""

from __future__ import annotations

import errno
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

from tests.support.minifs import FlatReadOnlyFS, serve

FILES = {b"ok": (pyfuse3.ROOT_INODE + 1, b"fine\n"), b"broken": (pyfuse3.ROOT_INODE + 2, b"x" * 4096)}
POLL_SECONDS = 0.02
FIXED_NS = 1_600_000_000_000_000_000


def _is_mountpoint(path: str) -> bool:
    with open("/proc/self/mountinfo") as table:
        return any(line.split(" ")[4] == path for line in table)


class FaultFS(FlatReadOnlyFS):
    def __init__(self, control: Path, hold_while_mounted: str | None) -> None:
        super().__init__()
        self.control = control
        self.hold_while_mounted = hold_while_mounted

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFDIR | 0o755, 2, 0
        else:
            sizes = {ino: len(data) for ino, data in FILES.values()}
            if inode not in sizes:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o644, 1, sizes[inode]
        attr.st_blksize = 4096
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = FIXED_NS
        return attr

    async def _hold(self) -> None:
        if self.hold_while_mounted is None:
            return
        while _is_mountpoint(self.hold_while_mounted) and not (self.control / "release").exists():
            (self.control / "holding").touch()
            await trio.sleep(POLL_SECONDS)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            await self._hold()
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name in FILES:
            return self._attr(FILES[name][0])
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for index, (name, (inode, _)) in enumerate(FILES.items()):
            if index >= start_id and not pyfuse3.readdir_reply(token, name, self._attr(inode), index + 1):
                return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh == FILES[b"broken"][0]:
            raise pyfuse3.FUSEError(errno.EIO)
        return FILES[b"ok"][1][off : off + size]


def main(argv: list[str]) -> int:
    control, mountpoint = Path(argv[0]), argv[1]
    hold = argv[2] if len(argv) > 2 else None
    return serve(FaultFS(control, hold), mountpoint, "faultfs")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
