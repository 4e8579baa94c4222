"""Smoke test of scripts/bench: the tiny run mounts all three targets and reports every cell.

A benchmark, not a performance test: nothing here looks at how fast anything was.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import podman
from benchmarks.errors import BenchError
from benchmarks.mounts import Mounter, target_options
from benchmarks.workloads import JOBS
from tests.conftest import skip_or_fail
from tests.support.mounts import REPO_ROOT, mounts

pytestmark = [pytest.mark.kernel, pytest.mark.mount]

BENCH = REPO_ROOT / "scripts" / "bench"
TARGETS = ("kernel", "fuse-overlayfs", "overlayfuse")
WORKLOADS = ("walk-cold", "walk-warm", "walk-again", "stat-ls", "read-all", "seqread-1G", "copyup-big",
             "create-small", "copyup-many", "copyup-big-nosync", "copyup-many-nosync", "rm-tree",
             "parallel", "mount-to-first-read", "git-status", "random-read-4t", "random-read-warm", "build-like",
             "chown-tree")
#: overlayctl's listings: one column, overlayfuse's.
CTL_WORKLOADS = ("ctl-image-ls", "ctl-ps")
#: podman on a storage of its own per target: every target, no daemon RSS.
PODMAN_WORKLOAD = "podman-run"
# --tiny finishes in under a minute on two idle cores (podman-run: three storages, 12 podman runs).
# This only bounds a hang.
BENCH_TIMEOUT = 600
#: What the podman-run row needs besides the bench's own tools.
PODMAN_TOOLS = ("podman", "runc", "conmon", "umoci", "busybox")
# A pull from a local layout and one failing run: seconds; this only bounds a hang.
PODMAN_FAILURE_TIMEOUT = 300
# --startup --reps 1: 24 starts of a second at most each, plus scripts/setup's check.
STARTUP_TIMEOUT = 120
# --startup-steps --reps 1: two mounts of a second or so each; this only bounds a hang.
STEPS_TIMEOUT = 120


@pytest.mark.timeout(BENCH_TIMEOUT + 30)
def test_tiny_bench_reports_every_workload_and_target(tmp_path: Path) -> None:
    for tool in ("fuse-overlayfs", *PODMAN_TOOLS):
        if shutil.which(tool) is None:
            skip_or_fail(f"needs {tool} (scripts/setup installs it)")
    workdir = tmp_path / "bench"
    proc = subprocess.run(
        [str(BENCH), "--quick", "--tiny", "--reps", "1", "--json", "--workdir", str(workdir)],
        capture_output=True, timeout=BENCH_TIMEOUT, check=False,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"scripts/bench exited {proc.returncode}:\n{stderr}"
    report = json.loads(proc.stdout)

    check = report["view_check"]
    assert check["ran"] and check["same"], check
    assert sorted(check["targets"]) == sorted(TARGETS)
    assert check["entries"] > 100

    for workload in WORKLOADS:
        cells = report["results"][workload]["targets"]
        for target in TARGETS:
            cell = cells[target]
            assert not cell["errors"], (workload, target, cell["errors"])
            assert cell["samples"] and all(v > 0 for v in cell["samples"]), (workload, target)
            assert cell["median"] > 0 and cell["min"] > 0 and cell["max"] > 0
            if target != "kernel":
                assert cell["peak_rss_kib"] and cell["peak_rss_kib"] > 0, (workload, target)
        assert set(report["results"][workload]["ratios"]) == {
            "overlayfuse/fuse-overlayfs", "overlayfuse/kernel"}
    for workload in CTL_WORKLOADS:
        cells = report["results"][workload]["targets"]
        assert list(cells) == ["overlayfuse"], (workload, cells)
        assert not cells["overlayfuse"]["errors"] and cells["overlayfuse"]["median"] > 0, (workload, cells)
    podman_cells = report["results"][PODMAN_WORKLOAD]["targets"]
    for target in TARGETS:
        cell = podman_cells[target]
        assert not cell["errors"], (target, cell["errors"])
        assert len(cell["samples"]) >= 3 and all(v > 0 for v in cell["samples"]), (target, cell)
    assert set(report["results"][PODMAN_WORKLOAD]["ratios"]) == {"overlayfuse/fuse-overlayfs", "overlayfuse/kernel"}
    for target in ("fuse-overlayfs", "overlayfuse"):
        walks = report["rss_walks"][target]
        assert "error" not in walks and all(k and k > 0 for k in walks["rss_kib"]), walks
    assert not report["daemon_tracebacks"]
    # What a create costs on this disk, without FUSE, at both ends of the run (the write rows carry it).
    assert report["host"]["create_us_start"] > 0 and report["host"]["create_us_end"] > 0
    assert "creating a file in the scratch dir (no FUSE)" in stderr

    # The table went to stderr; the scratch dir is gone and nothing stayed mounted.
    assert "workload" in stderr and "overlayfuse" in stderr
    assert not workdir.exists()
    assert not [m for m in mounts() if m.mountpoint.startswith(str(workdir))]


@pytest.mark.timeout(BENCH_TIMEOUT + 30)
def test_fork_server_target_goes_through_its_server(tmp_path: Path) -> None:
    """``overlayfuse-fs``: the start-up rows beside the cold target, every mount and every podman
    run of it forked by the bench's fork server (its count in the report: one probe, the view
    check, a mount per rep, podman's runs), and the server gone at the end."""
    for tool in ("fuse-overlayfs", *PODMAN_TOOLS):
        if shutil.which(tool) is None:
            skip_or_fail(f"needs {tool} (scripts/setup installs it)")
    workdir = tmp_path / "bench"
    proc = subprocess.run(
        [str(BENCH), "--tiny", "--reps", "1", "--json", "--workdir", str(workdir),
         "--targets", "fuse-overlayfs,overlayfuse,overlayfuse-fs",
         "--workloads", f"mount-to-first-read,{PODMAN_WORKLOAD}"],
        capture_output=True, timeout=BENCH_TIMEOUT, check=False,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"scripts/bench exited {proc.returncode}:\n{stderr}"
    report = json.loads(proc.stdout)
    for workload in ("mount-to-first-read", PODMAN_WORKLOAD):
        cells = report["results"][workload]["targets"]
        for target in ("overlayfuse", "overlayfuse-fs"):
            assert not cells[target]["errors"] and cells[target]["median"] > 0, (workload, target, cells[target])
        assert "overlayfuse-fs/fuse-overlayfs" in report["results"][workload]["ratios"]
    assert report["fork_server_forks"] >= 1 + 1 + 1 + podman.PODMAN_RUNS, report["fork_server_forks"]
    assert not [d for d in Path("/run").glob("ofb-fs-*")], "the fork server's directory is left"
    assert not workdir.exists()


@pytest.mark.timeout(PODMAN_FAILURE_TIMEOUT)
def test_podman_storage_is_gone_after_a_failed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount program that fails every mount: the row fails with a BenchError, and the target's
    containers-storage (image, container, mounts, directories) is removed all the same."""
    for tool in PODMAN_TOOLS:
        if shutil.which(tool) is None:
            skip_or_fail(f"needs {tool} (scripts/setup installs it)")
    monkeypatch.setattr(podman, "mount_program", lambda target: "/bin/false")
    made: list[podman.Storage] = []
    configure = podman.configure
    monkeypatch.setattr(podman, "configure", lambda *args: made.append(configure(*args)) or made[-1])
    with pytest.raises(BenchError, match="podman"), podman.storages(tmp_path, ["overlayfuse"]):
        pytest.fail("the storage came up although every mount fails")
    assert (tmp_path / "podman-layout").is_dir()  # it got as far as building the image
    assert not (tmp_path / "podman" / "overlayfuse").exists()
    assert [s.target for s in made] == ["overlayfuse"] and not made[0].run_root.exists()
    assert not [m for m in mounts() if m.mountpoint.startswith((str(tmp_path), str(made[0].run_root)))]


@pytest.mark.timeout(STARTUP_TIMEOUT + 30)
def test_startup_table_has_every_row() -> None:
    """``--startup``: no mounts; each row a median in ms, with and without bytecode."""
    proc = subprocess.run([str(BENCH), "--startup", "--reps", "1"], capture_output=True,
                          timeout=STARTUP_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    lines = proc.stdout.decode().splitlines()
    rows = [line.split(None, 2) for line in lines[1:]]
    assert len(rows) == 12, lines
    assert all(float(wall) > 0 and float(cpu) > 0 for wall, cpu, _ in rows), lines
    labels = [label for _, _, label in rows]
    assert "python -S -c pass (no site)" in labels and "overlayfuse --version" in labels
    assert labels.count("same, no bytecode") == 2, labels


@pytest.mark.timeout(STEPS_TIMEOUT + 30)
def test_startup_steps_table_names_each_step() -> None:
    """``--startup-steps``: one mount traced step by step; every step a time since exec, in order."""
    proc = subprocess.run([str(BENCH), "--startup-steps", "--reps", "1"], capture_output=True,
                          timeout=STEPS_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    lines = proc.stdout.decode().splitlines()
    steps = {}
    for line in lines[2:]:
        at, _gap, name = line.split(None, 2)
        steps[name] = float(at)
    for name in ("exec (harness: before spawning overlayfuse)", "daemon imported (trio, pyfuse3, overlay)",
                 "kernel mount made (pyfuse3.init)", "INIT handshake (Operations.init)",
                 "first read answered (harness)", "mount command exited (harness: a thread waiting on it)"):
        assert name in steps, lines
    assert steps["exec (harness: before spawning overlayfuse)"] == 0
    assert (steps["daemon imported (trio, pyfuse3, overlay)"] < steps["kernel mount made (pyfuse3.init)"]
            < steps["INIT handshake (Operations.init)"] <= steps["first read answered (harness)"]), lines


def test_overlayfuse_options_go_to_overlayfuse_alone(tmp_path: Path) -> None:
    """``--overlayfuse-options fsync=0``: copy-up rows compared with fuse-overlayfs on equal terms."""
    mounter = Mounter(tmp_path, [tmp_path / "l1"], overlayfuse_options="fsync=0")
    mnt = tmp_path / "mnt"
    assert mounter.command("overlayfuse", "lowerdir=L", mnt)[-2] == "lowerdir=L,fsync=0"
    assert mounter.command("fuse-overlayfs", "lowerdir=L", mnt)[-2] == "lowerdir=L"
    assert mounter.command("kernel", "lowerdir=L", mnt)[-2] == "lowerdir=L"
    assert Mounter(tmp_path, [tmp_path / "l1"]).command("overlayfuse", "lowerdir=L", mnt)[-2] == "lowerdir=L"


def test_nosync_rows_tell_the_kernel_and_overlayfuse_not_to_sync() -> None:
    """The -nosync copy-up rows compare like with like: fuse-overlayfs never syncs a copy-up, so the
    kernel mounts with ``volatile`` and overlayfuse with ``fsync=0``; the plain rows keep defaults."""
    jobs = {job.name: job for job in JOBS}
    for row in ("copyup-big-nosync", "copyup-many-nosync"):
        job = jobs[row]
        opts = {t: target_options(t, "lowerdir=L", job.kernel_opts, job.overlayfuse_opts)
                for t in ("kernel", "fuse-overlayfs", "overlayfuse", "overlayfuse-fs")}
        assert opts == {"kernel": "lowerdir=L,volatile", "fuse-overlayfs": "lowerdir=L",
                        "overlayfuse": "lowerdir=L,fsync=0", "overlayfuse-fs": "lowerdir=L,fsync=0"}, row
    for row in ("copyup-big", "copyup-many"):
        assert not jobs[row].kernel_opts and not jobs[row].overlayfuse_opts, row
    chown = jobs["chown-big"]
    assert target_options("fuse-overlayfs", "lowerdir=L", chown.kernel_opts, chown.overlayfuse_opts) == "lowerdir=L"
