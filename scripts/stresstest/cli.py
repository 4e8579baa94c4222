"""The command line: options, preflight, the scratch dir and mount's lifecycle, exit codes.

Exit codes: 0 a clean run; 1 the run found failures (see the report); 2 bad usage;
3 the run could not be done (not root, the mount failed...); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.mounting import run
from overlayfuse.linux.mounttable import read_mounts

from . import daemon as daemons
from . import kernel, report, runner, tree
from .errors import StressError, say
from .settings import COMMAND_TIMEOUT, KINDS, VENV_BIN

EXIT_FAILED, EXIT_CANNOT_RUN, EXIT_INTERRUPTED = 1, 3, 130


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/stress",
        description="Mount overlayfuse on a generated two-layer tree and run concurrent "
                    "workers against it for --seconds; fail on any EIO, any errno that is not "
                    "a legitimate race, a wrong file type, daemon death, or growth of the "
                    "daemon's open fds. Needs root.",
        epilog="worker kinds: " + "; ".join(f"{k}: {v}" for k, v in KINDS.items()))
    p.add_argument("--seconds", type=_positive(float), default=60.0,
                   help="how long the workers run (default 60)")
    p.add_argument("--seed", type=int, help="seeds the tree and each worker's choices (not "
                   "the interleaving); default: random, printed in the report")
    p.add_argument("--workers", type=_positive(int), default=1,
                   help=f"worker processes of each of the {len(KINDS)} kinds (default 1)")
    p.add_argument("--target", choices=("overlayfuse", "kernel"), default="overlayfuse",
                   help="what to mount (default overlayfuse); kernel: kernel overlayfs with "
                        "index=on,redirect_dir=on, to check the checks (no daemon probes)")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (the text goes to stderr)")
    p.add_argument("--tmpdir", type=Path,
                   help="where to create the scratch dir (default: $TMPDIR or /tmp)")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch dir (layers, upper, daemon log) after the run")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = secrets.randbelow(1 << 31)
    return args


def preflight(target: str, binary: Path) -> None:
    if os.geteuid() != 0:
        raise StressError("needs root (mounts, trusted.* xattrs, drop_caches)")
    if target == "kernel":
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    run(["modprobe", "overlay"], COMMAND_TIMEOUT)
        return
    if not Path("/dev/fuse").exists():
        raise StressError("/dev/fuse is missing")
    if not binary.exists():
        raise StressError(f"{binary} is missing: run scripts/setup")
    if shutil.which("fusermount3") is None:
        raise StressError("fusermount3 is not installed (apt-get install fuse3)")


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base) + "/"
    return [m.mountpoint for m in read_mounts() if m.mountpoint.startswith(prefix)]


def _remove(base: Path) -> None:
    left = _mounts_under(base)
    if left:
        say(f"warning: still mounted, so {base} is kept: {left}")
        return
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        run(["rm", "-rf", "--one-file-system", str(base)], COMMAND_TIMEOUT)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    binary = VENV_BIN / "overlayfuse"
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    base: Path | None = None
    daemon: daemons.Daemon | None = None
    kernel_mnt: Path | None = None
    try:
        preflight(args.target, binary)
        if args.tmpdir is not None:
            args.tmpdir.mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix="overlayfuse-stress.", dir=args.tmpdir)).resolve()
        layers = tree.build(base, args.seed, oci_whiteouts=args.target != "kernel")
        upper, work, mnt = base / "upper", base / "work", base / "mnt"
        for d in (upper, work, mnt):
            d.mkdir()
        pid = None
        if args.target == "kernel":
            kernel.mount(layers.lowers, upper, work, mnt)
            kernel_mnt = mnt
        else:
            daemon = daemons.start(binary, layers.lowers, upper, work, mnt, base / "daemon.log")
            pid = daemon.pid
        what = "kernel overlayfs" if pid is None else f"overlayfuse pid {pid}"
        say(f"{mnt}: {what}; {args.workers} worker(s) of each of "
            f"{len(KINDS)} kinds for {args.seconds:g} s, seed {args.seed}")
        result = runner.run(mnt, daemon, args.seconds, args.seed, args.workers)
        if daemon is not None:
            daemons.stop(daemon)
            daemon = None
        if kernel_mnt is not None:
            kernel.unmount(kernel_mnt)
            kernel_mnt = None
        log = ""
        with contextlib.suppress(OSError):
            log = (base / "daemon.log").read_text(errors="replace")
        config = {"target": args.target, "seconds": args.seconds, "seed": args.seed,
                  "workers_per_kind": args.workers, "scratch": str(base)}
        data = report.build(result, config, layers.summary(), pid, log)
        text = report.render(data)
        if args.json:
            print(text, file=sys.stderr)
            print(json.dumps(data, indent=2))
        else:
            print(text)
        return 0 if data["ok"] else EXIT_FAILED
    except StressError as exc:
        say(f"error: {exc}")
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if daemon is not None:
            with contextlib.suppress(StressError):
                daemons.stop(daemon)
        if kernel_mnt is not None:
            with contextlib.suppress(StressError):
                kernel.unmount(kernel_mnt)
        if base is not None:
            if args.keep:
                say(f"kept {base}")
            else:
                _remove(base)
