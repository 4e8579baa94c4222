"""The daemon speaks sd_notify as systemd expects of a ``Type=notify`` service.

A test listener socket stands in for systemd: READY=1 must come from the daemon's own pid and
only once the mount answers, with a STATUS= line; STOPPING=1 when it begins to stop (SIGTERM, or
an unmount from outside), and exit status 0; a daemon that fails never says READY=1.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from overlayfuse.daemon.notify import notify
from tests.support.mounts import mount_at, overlayfuse_cmd, run, run_isolated
from tests.support.servicetools import NotifyListener, daemon, faultfs, wait_fstype
from tests.support.trees import File, make_tree

FUSE_TYPE = "fuse.overlayfuse"
READY_TIMEOUT = 30.0  # a foreground daemon mounts and answers in well under a second; bounds a hang


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> NotifyListener:
    if request.param == "path":
        sock = NotifyListener(path=tmp_path / "notify.sock")
    else:
        sock = NotifyListener(abstract=f"overlayfuse-test/{os.getpid()}/{tmp_path.name}")
    request.addfinalizer(sock.close)
    return sock


# --- the sender, in-process --------------------------------------------------------------------


def test_fields_arrive_as_one_datagram_from_us(listener: NotifyListener,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    assert notify("READY=1", "STATUS=serving /x") is True
    message = listener.receive(5)
    assert message is not None
    assert message.fields == ("READY=1", "STATUS=serving /x")
    assert message.pid == os.getpid()


def test_no_socket_means_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


@pytest.mark.parametrize("address", ["vsock:2:1234", "relative/notify.sock"])
def test_unsupported_address_is_refused_with_a_warning(address: str, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with caplog.at_level(logging.WARNING):
        assert notify("READY=1") is False
    assert address in caplog.text


def test_a_manager_that_went_away_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A manager that stopped listening (overlayctl mount does, after READY=1) is no news: debug only."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.DEBUG):
        assert notify("STOPPING=1") is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG] and "is gone" in caplog.text


# --- the daemon ------------------------------------------------------------------------------------


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "lower", File("hello", b"hello\n"))


def _foreground(mnt: Path, lower: Path) -> list[str]:
    mnt.mkdir(exist_ok=True)
    return overlayfuse_cmd(mnt, f"lowerdir={lower}", foreground=True)


def _answers(mnt: Path) -> bool:
    run_isolated(os.stat, str(mnt), timeout=30)
    return True


@pytest.mark.mount
def test_ready_status_stopping_and_exit_0(listener: NotifyListener, lower: Path, tmp_path: Path,
                                          overlayfuse_bin: Path) -> None:
    mnt = tmp_path / "mnt"
    with daemon(_foreground(mnt, lower), mnt, env=listener.env()) as d:
        ready = listener.wait_for("READY=1", READY_TIMEOUT)
        # The moment READY arrives, the mount is in the table and answers.
        info = mount_at(mnt)
        assert info is not None and info.fstype == FUSE_TYPE
        assert _answers(mnt)
        assert ready.pid == d.proc.pid, "READY=1 must come from the daemon itself (NotifyAccess=main)"
        assert ready.value("STATUS") == f"serving {mnt}"
        assert ready.value("MAINPID") == str(d.proc.pid)

        d.proc.send_signal(signal.SIGTERM)
        stopping = listener.wait_for("STOPPING=1", READY_TIMEOUT)
        assert stopping.pid == d.proc.pid
        assert stopping.value("STATUS") == f"unmounting {mnt}"
        assert d.wait() == 0
        assert mount_at(mnt) is None
    # Under a notify socket the log speaks journald: <6> for info lines, no text level.
    lines = d.log_text().splitlines()
    assert lines and all(line.startswith("<") for line in lines), lines
    assert any(line.startswith("<6>") and "unmounted" in line for line in lines), lines


@pytest.mark.mount
def test_ready_waits_until_the_mount_answers(tmp_path: Path, overlayfuse_bin: Path) -> None:
    """The only layer is a faultfs that will not answer a stat of its root while overlayfuse is
    mounted: mount(2) has happened, but the mount cannot answer, so READY=1 must not come; it
    comes once the layer answers."""
    listener = NotifyListener(path=tmp_path / "notify.sock")
    control, mnt = tmp_path / "control", tmp_path / "mnt"
    with (
        listener, faultfs(control, tmp_path / "lower", hold_while_mounted=mnt) as lower,
        daemon(_foreground(mnt, lower), mnt, env=listener.env()) as d,
    ):
        try:
            wait_fstype(mnt, FUSE_TYPE, d.proc)
            # It could not answer: its stat of its root is the one faultfs holds.
            assert _wait_file(control / "holding", READY_TIMEOUT), "nothing asked for the root's attributes"
            # Our own mark, queued before the release: a READY sent while the layer held the
            # stat is received before it, one sent after the release after it. No time window.
            listener.mark()
        finally:
            (control / "release").touch()
        ready = listener.wait_for("READY=1", READY_TIMEOUT)
        fields = [m.fields for m in listener.messages]
        assert ("MARK=1",) in fields[: listener.messages.index(ready)], \
            f"READY=1 sent while the mount could not answer: {fields}"
        assert ready.pid == d.proc.pid
        assert _answers(mnt)
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait() == 0


def _wait_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.mount
def test_unmount_from_outside_says_stopping(listener: NotifyListener, lower: Path, tmp_path: Path,
                                            overlayfuse_bin: Path) -> None:
    mnt = tmp_path / "mnt"
    with daemon(_foreground(mnt, lower), mnt, env=listener.env()) as d:
        listener.wait_for("READY=1", READY_TIMEOUT)
        assert run(["umount", mnt], timeout=30).returncode == 0
        stopping = listener.wait_for("STOPPING=1", READY_TIMEOUT)
        assert stopping.value("STATUS") == f"{mnt} was unmounted"
        assert d.wait() == 0


@pytest.mark.mount
def test_a_daemon_that_fails_never_says_ready(listener: NotifyListener, tmp_path: Path,
                                              overlayfuse_bin: Path) -> None:
    mnt = tmp_path / "mnt"
    with daemon(_foreground(mnt, tmp_path / "no-such-lower"), mnt, env=listener.env()) as d:
        assert d.wait(READY_TIMEOUT) == 1
        assert listener.pending() == []  # it has exited: all it ever sent is queued
        assert mount_at(mnt) is None
    # One line, filed by journald as an error.
    assert d.log_text().splitlines() == [f"<3>lowerdir {tmp_path / 'no-such-lower'}: {os.strerror(errno.ENOENT)}"]
