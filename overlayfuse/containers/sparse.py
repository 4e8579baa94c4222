"""Sparse files into layer tars: only their data goes in, with a map of where it lies.

A file with holes (a 1 TiB image file holding a few blocks, as a sparse layer member unpacks to)
would otherwise be written to the tar as all its zeros. The map comes from ``SEEK_DATA`` /
``SEEK_HOLE``, and the member is written in the GNU PAX sparse format 1.0, the one GNU tar writes
with ``--format=pax`` and that Python's tarfile, Go's archive/tar (containerd, docker, umoci) and
libarchive read: PAX records ``GNU.sparse.major=1``, ``minor=0``, ``name`` and ``realsize``, then a
data area that starts with the map (decimal lines, padded to a 512-byte block) followed by the data
pieces.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import tarfile

log = logging.getLogger(__name__)

Pieces = list[tuple[int, int]]


def data_pieces(fd: int, size: int) -> Pieces | None:
    """Where FD's data lies, as (offset, length) pieces, or None if it has no hole (or the
    filesystem cannot say): such a file is written as it is."""
    pieces: Pieces = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from OFFSET to the end
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            pieces.append((start, end - start))
            offset = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    if pieces == [(0, size)]:
        return None
    return pieces


def sparse_member(info: tarfile.TarInfo, fd: int, pieces: Pieces) -> io.RawIOBase:
    """Turn INFO (a regular file's entry, size set to its apparent size) into a PAX 1.0 sparse
    entry of PIECES, and return the stream tarfile must copy as its data (map, then pieces)."""
    real_name, real_size = info.name, info.size
    lines = [str(len(pieces))] + [str(n) for piece in pieces for n in piece]
    header = "\n".join(lines).encode() + b"\n"
    header += bytes(-len(header) % tarfile.BLOCKSIZE)
    info.pax_headers = {**info.pax_headers, "GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": real_name, "GNU.sparse.realsize": str(real_size)}
    # The ustar name GNU tar uses, so a reader that knows no sparse format extracts the raw data
    # area under a name of its own instead of over the real file.
    info.name = f"GNUSparseFile.0/{os.path.basename(real_name)}"[:100]
    info.size = len(header) + sum(length for _, length in pieces)
    return _SparseData(fd, header, pieces)


class _SparseData(io.RawIOBase):
    """The data area of a sparse entry: the map block, then each piece read with pread."""

    def __init__(self, fd: int, header: bytes, pieces: Pieces) -> None:
        super().__init__()
        self._fd = fd
        self._header = header
        self._pieces = list(reversed(pieces))  # popped from the end, in order
        self._current: tuple[int, int] | None = None

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to N bytes, short only at the end (tarfile's copy takes a short read as truncation)."""
        if n is None or n < 0:
            n = 1 << 20
        parts = []
        while n > 0:
            chunk = self._read_some(n)
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def _read_some(self, n: int) -> bytes:
        if self._header:
            out, self._header = self._header[:n], self._header[n:]
            return out
        while self._current is None or self._current[1] == 0:
            if not self._pieces:
                return b""
            self._current = self._pieces.pop()
        offset, left = self._current
        data = os.pread(self._fd, min(n, left), offset)
        if not data:
            raise OSError(errno.EIO, f"file shrank while being read (at offset {offset})")
        self._current = (offset + len(data), left - len(data))
        return data
