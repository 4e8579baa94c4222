"""Killpriv v2: the daemon clears set-id bits and file capabilities, and the kernel stops asking.

Judged two ways: by what reached the daemon (its `-d` log, as the request tests), and by the
kernel's overlay as the oracle for what a write, truncate or chown by root and by an unprivileged
caller leaves of S_ISUID, S_ISGID and ``security.capability`` (the differential harness's replay).
Needs the binding's killpriv v2 (pyfuse3 built against libfuse 3.17 by scripts/setup); on another
binding these tests are skipped, and in CI that is a failure of the set-up, not a skip.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from overlayfuse.daemon import binding
from tests.conftest import skip_or_fail
from tests.support.differential import OVERLAYFUSE, replay
from tests.support.differential.ops import Op
from tests.support.differential.worker import Workers
from tests.support.mounts import run_isolated
from tests.support.requestlog import debug_daemon, requests
from tests.support.trees import File, make_tree
from tests.support.writes import mounted_pair

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

#: A valid vfs_cap_data (revision 2, CAP_NET_BIND_SERVICE permitted).
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


@pytest.fixture(autouse=True)
def _killpriv_binding() -> None:
    if not binding.detect().killpriv_v2:
        skip_or_fail("the binding has no killpriv v2: scripts/setup builds pyfuse3 against libfuse 3.17")


def _untar_like(mnt: str) -> None:
    """What tar does per file: create, three writes, then owner, mode and times."""
    for name in ("f1", "f2"):
        fd = os.open(f"{mnt}/{name}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        try:
            for i in range(3):
                os.write(fd, bytes([65 + i]) * 4096)
            os.fchown(fd, 1000, 1000)
            os.fchmod(fd, 0o644)
            os.utime(fd, ns=(10**18, 10**18))
        finally:
            os.close(fd)


@pytest.mark.parametrize("stock", [False, True], ids=["killpriv", "stock"])
def test_later_writes_and_chowns_ask_nothing(tmp_path: Path, stock: bool) -> None:
    """With killpriv v2 the kernel asks for security.capability once per new file (its first write,
    then S_NOSEC holds) and refreshes no attributes before a chown; without it, before every write
    and every chown. Both ways, with passthrough=off, so that the writes are seen too."""
    lower = make_tree(tmp_path / "lower", File("lower", b"below\n"))
    with debug_daemon(tmp_path, lower, stock=stock, options="passthrough=off") as (mnt, log):
        run_isolated(_untar_like, str(mnt))
        seen = [(name, args) for name, args in requests(log)]
    capability_asks = [args for name, args in seen if name == "getxattr" and "security.capability" in args]
    writes = [args for name, args in seen if name == "write"]
    assert len(writes) == 6, seen
    assert (tmp_path / "upper/f1").read_bytes() == b"A" * 4096 + b"B" * 4096 + b"C" * 4096
    if stock:
        assert len(capability_asks) >= 8, seen  # per write, and per chown
    else:
        assert len(capability_asks) <= 4, seen  # per file: its first write, its chown
        assert len(capability_asks) < len(writes), seen


def _set_id_cases() -> list[list[Op]]:
    """Sequences whose end state the kernel's overlay decides: set-id bits and a file capability
    after writes, truncates and a chown, by root (CAP_FSETID: the bits stay) and by an
    unprivileged caller (they go), on lower files (copied up) and on new ones."""
    cases: list[list[Op]] = []
    for mode in (0o6777, 0o4777, 0o2777, 0o2767):  # 0o2767: S_ISGID without group execute
        for write in (("pwrite", "a", 1, ("q", 3)), ("append", "a", ("q", 3)), ("truncate", "a", 2),
                      ("open_trunc", "a"), ("write_trunc", "a", ("q", 2))):
            cases.append([("chmod", "a", mode), ("as_user", write), ("stat", "a")])
        cases.append([("chmod", "a", mode), ("pwrite", "a", 1, ("q", 3)), ("truncate", "a", 2), ("stat", "a")])
        cases.append([("chmod", "a", mode), ("chown", "a"), ("stat", "a")])
    cases.append([("create_excl", "n", ("q", 5)), ("chmod", "n", 0o6777), ("as_user", ("pwrite", "n", 0, ("q", 1))),
                  ("as_user", ("pwrite", "n", 2, ("q", 1))), ("stat", "n")])
    cases.append([("create_excl", "n", ("q", 5)), ("chmod", "n", 0o6777), ("pwrite", "n", 0, ("q", 1)), ("stat", "n")])
    for path in ("a", "n"):
        start: list[Op] = [("create_excl", "n", ("q", 5))] if path == "n" else []
        for change in (("pwrite", path, 0, ("q", 1)), ("truncate", path, 1), ("chown", path),
                       ("as_user", ("pwrite", path, 0, ("q", 1)))):
            cases.append([*start, ("chmod", path, 0o777), ("setxattr", path, "security.capability", CAPABILITY),
                          ("pwrite", path, 0, ("q", 1)), ("setxattr", path, "security.capability", CAPABILITY),
                          change, ("stat", path)])
    return cases


@pytest.mark.timeout(300)
def test_set_id_bits_and_capabilities_go_as_in_the_kernel(tmp_path: Path) -> None:
    """Every case of `_set_id_cases` ends as under the kernel's overlay, step by step and in the
    upper dir (the replay compares views, xattrs included, after every step)."""
    workers = Workers()
    try:
        for ops in _set_id_cases():
            result = replay(tmp_path / "case", ops, OVERLAYFUSE, workers)
            assert result.mismatch is None, (ops, result.mismatch)
    finally:
        workers.close()


#: Root without CAP_FSETID (dropped from the bounding set, so the exec gets none): the kernel
#: clears set-id bits on its writes and truncates as on anyone's. Each writes to the file "{}".
ROOT_WITHOUT_FSETID = ["setpriv", "--bounding-set=-fsetid", "--"]
_WRITES = {
    "write": ["dd", "of={}", "bs=1", "count=1", "conv=notrunc", "status=none", "if=/dev/zero"],
    "truncate": ["truncate", "-s", "1", "{}"],
    "open-trunc": ["dd", "of={}", "count=0", "status=none", "if=/dev/zero"],
}


@pytest.mark.parametrize("how", sorted(_WRITES))
def test_root_without_cap_fsetid_clears_set_id_bits(tmp_path: Path, how: str) -> None:
    """The caller's capability, not its uid, decides (read from /proc by the daemon): root with
    CAP_FSETID dropped clears the bits as the kernel's overlay does; root with it keeps them."""
    layers = {"l1": [File("dropped", b"data\n", 0o6755), File("kept", b"data\n", 0o6755)]}
    with mounted_pair(tmp_path, layers) as pair:
        modes = []
        for mnt in (pair.kernel.mnt, pair.ours.mnt):
            for name, prefix in (("dropped", ROOT_WITHOUT_FSETID), ("kept", [])):
                argv = [*prefix, *(arg.replace("{}", str(mnt / name)) for arg in _WRITES[how])]
                subprocess.run(argv, check=True, timeout=30)
            modes.append({name: stat.S_IMODE(os.lstat(mnt / name).st_mode) for name in ("dropped", "kept")})
    kernel, ours = modes
    assert kernel == {"dropped": 0o755, "kept": 0o6755}, kernel  # the oracle does what the test means
    assert ours == kernel


def _made_set_id_while_open_for_writing(mnt: str) -> int:
    """A file of everyone's is held open for writing by an unprivileged process while root makes it
    set-id; that process then writes through its descriptor (a passed-through open). The mode after.
    (Names relative to the mount: the test's tmp dir is not searchable by the unprivileged user.)"""
    os.chdir(mnt)
    fd = os.open("shared", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666)
    os.write(fd, b"x")
    os.close(fd)
    os.chmod("shared", 0o666)
    opened, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(opened[0])
            os.close(go[1])
            os.setgroups([])
            os.setgid(1000)
            os.setuid(1000)
            held = os.open("shared", os.O_WRONLY)
            os.write(opened[1], b"1")
            os.read(go[0], 1)
            os.pwrite(held, b"y", 0)
            os.close(held)
            code = 0
        finally:
            os._exit(code)
    os.close(opened[1])
    os.close(go[0])
    assert os.read(opened[0], 1) == b"1", "the unprivileged process could not open the file"
    os.chmod("shared", 0o6777)
    os.write(go[1], b"1")
    assert os.waitpid(pid, 0)[1] == 0
    return stat.S_IMODE(os.lstat("shared").st_mode)


def test_a_write_through_an_open_made_before_the_bits_clears_them(tmp_path: Path) -> None:
    """The kernel asks the daemon to clear the bits before such a write (a SETATTR that changes
    nothing, from the writer) and then writes to the backing file itself: the bits must go there
    as on the kernel's overlay."""
    with mounted_pair(tmp_path, {"l1": [File("lower", b"below\n")]}) as pair:
        kernel, ours = pair.both(_made_set_id_while_open_for_writing)
    assert kernel == 0o777, oct(kernel)  # the oracle does what the test means
    assert ours == kernel, oct(ours)
