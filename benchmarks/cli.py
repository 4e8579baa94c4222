"""The command line: options, preflight checks, the scratch dir's lifecycle, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import forkserver, rsswalk, startup, startupsteps
from .errors import BenchError, ViewMismatch, say
from .mounts import Mounter, mounts_under, remove_tree
from .processes import run
from .report import create_cost_us, host_info, render, summarize
from .runner import Bench
from .settings import (
    CTL_WORKLOADS,
    DEFAULT_CACHE,
    DEFAULT_TARGETS,
    DEFAULT_WORKDIR,
    MARKER,
    PODMAN_WORKLOAD,
    SCALES,
    TARGETS,
    VENV_BIN,
    WORKLOADS,
)
from .stack import choose_targets_of_work, prepare_stack
from .views import walk_view


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark kernel overlayfs, fuse-overlayfs and overlayfuse on one layer "
                    "stack (a Debian minbase rootfs plus a second layer), after checking that "
                    "all three show the same merged view. Needs root.",
        epilog="workloads: " + "; ".join(f"{k}: {v[2]}" for k, v in WORKLOADS.items()))
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: generated tree, 256 MiB big file, 2 reps, no debootstrap")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test size: ~300 entries, 16 MiB big file, under a minute")
    p.add_argument("--reps", type=int, help="repetitions per workload and target "
                   "(default 3; 2 with --quick; 1 with --tiny)")
    p.add_argument("--startup", action="store_true",
                   help="only time start-ups (bare interpreter, imports, --version; no root, no "
                        "mounts): medians of --reps runs (default 21)")
    p.add_argument("--startup-steps", action="store_true",
                   help="only time one overlayfuse start step by step, from exec to the first "
                        "answered read (root: it mounts): medians of --reps runs (default 21)")
    p.add_argument("--rss-walk", type=int, metavar="FILES",
                   help="only measure the FUSE daemons' memory around a find over a layer of FILES "
                        "empty files (200000 for issue 14's target) and after the kernel forgets them")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON on stdout (the table goes to stderr)")
    p.add_argument("--json-out", type=Path, metavar="FILE", help="also write the JSON here")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated, from {','.join(TARGETS)} (default: {','.join(DEFAULT_TARGETS)}; "
                        "overlayfuse-fs is overlayfuse with its fork server running)")
    p.add_argument("--overlayfuse-options", default="", metavar="OPTS",
                   help="extra -o options for overlayfuse only, e.g. fsync=0 to compare copy-ups with "
                        "fuse-overlayfs, which never fsyncs one (the table's header says what was given)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated workload names (default: all)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help=f"scratch dir, removed at the end (default {DEFAULT_WORKDIR})")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir")
    p.add_argument("--no-debootstrap", action="store_true",
                   help="use a generated tree even in the full run")
    p.add_argument("--release", default="bookworm", help="debootstrap suite (default bookworm)")
    p.add_argument("--mirror", help="debootstrap mirror (default: debootstrap's own)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help=f"where debootstrap rootfs are cached (default {DEFAULT_CACHE})")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.workloads = [w for w in args.workloads.split(",") if w]
    bad = [t for t in args.targets if t not in TARGETS]
    if bad or not args.targets or len(set(args.targets)) != len(args.targets):
        p.error(f"--targets: choose from {','.join(TARGETS)} (got {bad or args.targets})")
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad or not args.workloads:
        p.error(f"--workloads: unknown {bad}; choose from {','.join(WORKLOADS)}")
    args.workloads = [w for w in WORKLOADS if w in args.workloads]  # table order
    args.targets = [t for t in TARGETS if t in args.targets]
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def preflight(targets: Sequence[str], workloads: Sequence[str]) -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root (mounts, drop_caches)")
    if "kernel" in targets:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                run(["modprobe", "overlay"], 60, check=False)
    if "fuse-overlayfs" in targets and shutil.which("fuse-overlayfs") is None:
        raise BenchError("fuse-overlayfs is not installed (apt-get install fuse-overlayfs)")
    if {"overlayfuse", "overlayfuse-fs"} & set(targets) and not (VENV_BIN / "overlayfuse").exists():
        raise BenchError(f"{VENV_BIN / 'overlayfuse'} is missing: run scripts/setup")
    if "overlayfuse" in targets and set(workloads) & set(CTL_WORKLOADS) and shutil.which("umoci") is None:
        raise BenchError("umoci is not installed (it builds the images for ctl-image-ls and ctl-ps): "
                         "run scripts/setup")
    if PODMAN_WORKLOAD in workloads:
        missing = [tool for tool in ("podman", "runc", "conmon", "umoci", "busybox") if shutil.which(tool) is None]
        if missing:
            raise BenchError(f"{PODMAN_WORKLOAD} needs {', '.join(missing)}: run scripts/setup")


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--_walk"]:  # the isolated child of walk_view_isolated
        sys.stdout.write(json.dumps(walk_view(argv[1])))
        return 0
    args = parse_args(argv)
    # Cold unless a row asks for the fork server (overlayfuse-fs): a server someone runs on this
    # machine must not make the overlayfuse rows, --startup or --startup-steps warm.
    os.environ[forkserver.ENV] = "off"
    timing_alone = startup.main if args.startup else startupsteps.main if args.startup_steps else None
    if timing_alone is not None:  # start-ups only: no stack, no workloads
        try:
            return timing_alone(args.reps or 21)
        except BenchError as exc:
            say(f"error: {exc}")
            return 1
    scale = SCALES["tiny" if args.tiny else "quick" if args.quick else "full"]
    args.reps = args.reps or scale.reps
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    work = args.workdir.resolve()
    mounter: Mounter | None = None
    owned = False  # work is ours to remove
    exits = contextlib.ExitStack()  # the fork server, if overlayfuse-fs is a target
    try:
        preflight(args.targets, args.workloads)
        if work.exists():
            if mounts_under(work):
                raise BenchError(f"{work} has mounts under it (a previous run?): unmount them")
            if any(work.iterdir()) and not (work / MARKER).exists():
                raise BenchError(f"{work} exists and is not a bench scratch dir: choose another"
                                 " --workdir")
            remove_tree(work)
        work.mkdir(parents=True)
        (work / MARKER).write_text("scratch dir of scripts/bench; removed at the end\n")
        owned = True
        host = host_info() | {"create_us_start": create_cost_us(work)}
        say(f"load average {host['loadavg_start']}, nproc {host['nproc']}, kernel "
            f"{host['kernel']}, {host['fuse_overlayfs']}, overlayfuse {host['overlayfuse']}")
        if args.rss_walk:
            walked = rsswalk.measure(work, args.rss_walk, [t for t in args.targets if t != "kernel"])
            walked["host"] = host | {"loadavg_end": [round(x, 2) for x in os.getloadavg()]}
            print(rsswalk.render(walked), file=sys.stderr if args.json else sys.stdout)
            if args.json:
                print(json.dumps(walked, indent=2))
            return 0
        use_deb = scale.name == "full" and not args.no_debootstrap
        stack = prepare_stack(work, scale, use_deb, args.cache_dir, args.release, args.mirror)
        fork = exits.enter_context(forkserver.running(args.targets))
        mounter = Mounter(work / "mnt", [stack.l2, stack.l1], fork.socket if fork else None,
                          args.overlayfuse_options)
        bench = Bench(args, scale)
        view = bench.check_views(mounter, stack)
        choose_targets_of_work(stack, view, scale)
        say(f"merged view: {stack.view_entries} entries; rm-tree /{stack.rm_dir} "
            f"({stack.rm_entries}); copyup-many {stack.copyup_files} files")
        bench.measure(mounter, stack)
        host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        host["create_us_end"] = create_cost_us(work)
        host["load1_max_while_timing"] = round(max(bench.loads), 2) if bench.loads else None
        report = {
            "host": host,
            "config": {"mode": scale.name, "reps": args.reps, "targets": args.targets,
                       "workloads": args.workloads, "workdir": str(work),
                       "overlayfuse_options": args.overlayfuse_options},
            "stack": {"source": stack.source, "view_entries": stack.view_entries,
                      "l2": stack.l2_summary, "big_bytes": stack.big, "big2_bytes": stack.big2,
                      "big_fill": "written in full, pseudo-random",
                      "tar_files": stack.tar_files, "tar_bytes": stack.tar_bytes,
                      "copyup_files": stack.copyup_files, "rm_dir": stack.rm_dir,
                      "rm_entries": stack.rm_entries, "git_files": stack.git_files,
                      "build_files": stack.src_files, "build_bytes": stack.src_bytes,
                      "random_read_files": stack.random_files, "chown_files": stack.chown_files},
            "view_check": bench.view_check,
            "daemon_tracebacks": mounter.tracebacks,
            "fork_server_forks": fork.forks() if fork else None,
            "results": summarize(bench),
            "rss_walks": bench.rss_walks,
            "mount_s": bench.mount_s,
            "load1_samples": bench.loads,
        }
        text = render(bench, report)
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        if args.json:
            print(text, file=sys.stderr)
            print(json.dumps(report, indent=2))
        else:
            print(text)
        failed = any(c.errors for row in bench.cells.values() for c in row.values())
        return 1 if failed else 0
    except ViewMismatch as exc:
        say(f"error: {exc}")
        return 2
    except BenchError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if mounter is not None:
            mounter.unmount_all()
        exits.close()
        left = mounts_under(work)
        if left:
            say(f"warning: still mounted, so {work} is kept: {left}")
        elif args.keep:
            say(f"kept {work}")
        elif owned and work.exists():
            with contextlib.suppress(BenchError):
                remove_tree(work)
