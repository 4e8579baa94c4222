"""What the tiny test filesystems (`tests.support.faultfs`, `tests.support.gatefs`) share: a read-only FUSE
filesystem whose root is its only directory, and how one is served until it is unmounted.

Each subclass answers getattr, lookup, readdir, open and read its own way; the rest is here.
"""

from __future__ import annotations

import errno

import pyfuse3
import trio


class FlatReadOnlyFS(pyfuse3.Operations):
    """No directory but the root, no extended attributes, nothing writable."""

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data


def serve(operations: pyfuse3.Operations, mountpoint: str, name: str) -> int:
    """Mount OPERATIONS read-only on MOUNTPOINT as fuse.NAME and serve it until unmounted; exit status."""
    pyfuse3.init(operations, mountpoint, {f"fsname={name}", f"subtype={name}", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0
