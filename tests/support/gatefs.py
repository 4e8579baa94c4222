"""A tiny FUSE filesystem whose one file cannot be read until the test says so.

    python -m tests.support.gatefs CONTROL_DIR MOUNTPOINT [--handoff | --size BYTES]

It serves a single regular file, `gated` (1 MiB unless --size says).  A read of it first creates
CONTROL_DIR/waiting, then waits (without blocking gatefs itself) until
CONTROL_DIR/release exists.  Used as a lower layer, it gives a test a lower-layer read
that stays blocked for exactly as long as the test wants: a real, slow filesystem
rather than a mock, and no timing guesses.

With ``--handoff`` the wait runs in a worker thread handed the job through pyfuse3's ``Handoff``
(patch 0006), while the event loop spins for its result, watching for requests (patch 0009), for
up to ten minutes (longer than any test may take): CONTROL_DIR/parked says the loop stopped
spinning before the job was done. Only a request that waited on the FUSE device can make it stop
that early.
"""

from __future__ import annotations

import contextlib
import errno
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import trio

from tests.support.minifs import FlatReadOnlyFS, serve
from tests.support.mounts import DAEMON_EXIT_TIMEOUT, MOUNT_TIMEOUT, REPO_ROOT, mount_at, run, wait_pids_gone

FILE_NAME = b"gated"
FILE_INODE = pyfuse3.ROOT_INODE + 1
FILE_SIZE = 1 << 20
FSTYPE = "fuse.gatefs"
POLL_SECONDS = 0.02  # how quickly a released read notices the release file
FIXED_NS = 1_600_000_000_000_000_000


class GateFS(FlatReadOnlyFS):
    """Root directory with one file whose reads wait for `control/release`."""

    def __init__(self, control: Path, size: int = FILE_SIZE) -> None:
        super().__init__()
        self.waiting_marker = control / "waiting"
        self.release_marker = control / "release"
        self.size = size

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFDIR | 0o755, 2, 0
        elif inode == FILE_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o644, 1, self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_uid = attr.st_gid = 0
        attr.st_blksize = 4096
        attr.st_blocks = attr.st_size // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = FIXED_NS
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == FILE_NAME:
            return self._attr(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attr(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)  # every read reaches us

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.waiting_marker.touch()
        while not self.release_marker.exists():
            await trio.sleep(POLL_SECONDS)
        return b"g" * max(0, min(size, self.size - off))


@contextlib.contextmanager
def gate_fs(control: Path, mnt: Path, *, handoff: bool = False, size: int = FILE_SIZE) -> Iterator[Path]:
    """Mount gatefs (HANDOFF: its ``--handoff`` kind; SIZE: its file's, for the plain kind); on
    exit release every waiting read, unmount, reap the process."""
    control.mkdir()
    mnt.mkdir()
    log = control / "gatefs.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.gatefs", str(control), str(mnt),
                                 *(["--handoff"] if handoff else ["--size", str(size)])],
                                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while (info := mount_at(mnt)) is None or info.fstype != FSTYPE:
            assert proc.poll() is None, f"gatefs died: {log.read_text()}"
            assert time.monotonic() < deadline, "gatefs did not mount"
            time.sleep(0.05)
        yield mnt
    finally:
        (control / "release").touch()
        for cmd in (["fusermount3", "-u", str(mnt)], ["fusermount3", "-u", "-z", str(mnt)]):
            if mount_at(mnt) is None:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                run(cmd, timeout=10)
        if wait_pids_gone([proc.pid], DAEMON_EXIT_TIMEOUT):
            proc.kill()
        proc.wait(timeout=DAEMON_EXIT_TIMEOUT)
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")


def wait_held(control: Path, timeout: float) -> None:
    """Wait until a read of the gated file is being held (CONTROL/waiting exists); the timeout
    bounds a hang only."""
    deadline = time.monotonic() + timeout
    while not (control / "waiting").exists():
        assert time.monotonic() < deadline, f"no read of {FILE_NAME!r} within {timeout}s"
        time.sleep(0.02)


class HandoffGateFS(GateFS):
    """GateFS whose read waits in a worker thread while the event loop spins for it (see above)."""

    #: The loop's window: far longer than any test waits, so that only a request ends it.
    WINDOW_NS = 600 * 10**9

    def __init__(self, control: Path) -> None:
        super().__init__(control)
        self.handoff = pyfuse3.Handoff()  # type: ignore[attr-defined]  # patch 0006
        self.done = threading.Event()
        threading.Thread(target=self._worker, daemon=True).start()

    def _worker(self) -> None:
        while (job := self.handoff.wait_job(10**9)) is None:
            pass
        job()
        self.handoff.finish(None, 0)
        self.done.set()

    def _wait_for_release(self) -> None:
        self.waiting_marker.touch()  # the worker has the job: the loop spins for it now
        while not self.release_marker.exists():
            time.sleep(POLL_SECONDS)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        while (posted := self.handoff.post_and_wait(self._wait_for_release, self.WINDOW_NS, True)) is None:
            await trio.sleep(POLL_SECONDS)  # the worker is not waiting yet
        if posted == (False, None):
            (self.waiting_marker.parent / "parked").touch()
        while not self.done.is_set():
            await trio.sleep(POLL_SECONDS)
        return b"g" * max(0, min(size, self.size - off))


def main(argv: list[str]) -> int:
    control, mountpoint = Path(argv[0]), argv[1]
    if argv[2:] == ["--handoff"]:
        fs: GateFS = HandoffGateFS(control)
    else:
        fs = GateFS(control, int(argv[3]) if argv[2:3] == ["--size"] else FILE_SIZE)
    return serve(fs, mountpoint, "gatefs")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
