"""``scripts/bench --startup``: what a start costs, from the bare interpreter up to our commands.

Each row is one command run RUNS times in a row (the first run warms the page cache and is not
counted); the medians of its wall time and of its CPU time (user + system) are reported. The rows
go from the floor (the interpreter alone, without and with ``site``) through the imports no FUSE
daemon in Python can skip (trio, pyfuse3) to ours, so that the README can say how close to the
floor we are. ``no bytecode`` runs a copy of the package
that has no ``__pycache__`` with ``PYTHONDONTWRITEBYTECODE=1``: what every start would pay on a
read-only install whose bytecode was not compiled at install time (scripts/setup compiles it).
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import BenchError
from .settings import REPO_ROOT, VENV_BIN

#: One start takes a fraction of a second; this only bounds a hang.
RUN_TIMEOUT = 60.0
PY = str(VENV_BIN / "python")
#: As the `overlayfuse` command imports the daemon: GC off (`overlayfuse.commands`) and trio
#: without its `ldconfig -p` (linux.libc).
DAEMON_IMPORTS = ("import gc; gc.disable()\nimport overlayfuse.daemon.cli as cli\n"
                  "with cli.pthread_in_libc():\n    import overlayfuse.daemon.mount")
#: What the installed ``overlayfuse`` script runs, for a copy of the package on PYTHONPATH.
VERSION_AS_INSTALLED = "import sys; from overlayfuse.commands import overlayfuse; sys.exit(overlayfuse())"
#: The floor under that: pyfuse3 and trio imported the same way, without any of our modules.
LEAN_PYFUSE3 = ("import gc; gc.disable()\nfrom overlayfuse.linux.libc import pthread_in_libc\n"
                "with pthread_in_libc():\n    import pyfuse3")


def rows(plain_copy: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    """(label, command, extra environment) for each row of the table."""
    no_pyc = {"PYTHONPATH": str(plain_copy), "PYTHONDONTWRITEBYTECODE": "1"}
    return [
        ("python -S -c pass (no site)", [PY, "-S", "-c", "pass"], {}),
        ("python -X frozen_modules=off -S -c pass (no frozen stdlib)",
         [PY, "-X", "frozen_modules=off", "-S", "-c", "pass"], {}),
        ("python -I -c pass (isolated: venv site, no env, no user site)", [PY, "-I", "-c", "pass"], {}),
        ("python -c pass (venv site)", [PY, "-c", "pass"], {}),
        ("python -c 'import trio'", [PY, "-c", "import trio"], {}),
        ("python -c 'import pyfuse3' (imports trio)", [PY, "-c", "import pyfuse3"], {}),
        ("  same, GC off and no ldconfig (as the daemon imports it)", [PY, "-c", LEAN_PYFUSE3], {}),
        ("python -c 'import overlayfuse.daemon.mount'", [PY, "-c", DAEMON_IMPORTS], {}),
        ("  same, no bytecode", [PY, "-c", DAEMON_IMPORTS], no_pyc),
        ("overlayfuse --version", [str(VENV_BIN / "overlayfuse"), "--version"], {}),
        ("  same, no bytecode", [PY, "-c", VERSION_AS_INSTALLED, "--version"], no_pyc),
        ("overlayctl --version", [str(VENV_BIN / "overlayctl"), "--version"], {}),
    ]


def median_run(cmd: Sequence[str], env: dict[str, str], runs: int, cwd: Path) -> tuple[float, float]:
    """The median wall time and the median CPU time (user + system, the command and its children)
    of RUNS runs of CMD in CWD (after one unmeasured run). CPU time is what a start costs whatever
    else the machine is doing; wall time on a loaded 2-core VM is mostly waiting for a core.
    CWD matters: ``python -c`` puts it first on sys.path, and a checkout there would be what gets
    imported."""
    environ = os.environ | env
    samples, cpu = [], []
    for n in range(runs + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(cmd, env=environ, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=RUN_TIMEOUT, check=False)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}")
        if n:
            samples.append(elapsed)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(samples), statistics.median(cpu)


def main(runs: int) -> int:
    with tempfile.TemporaryDirectory(prefix="overlayfuse-startup-") as tmp:
        copy, cwd = Path(tmp) / "plain", Path(tmp) / "cwd"  # cwd: empty, so it shadows nothing
        cwd.mkdir()
        shutil.copytree(REPO_ROOT / "overlayfuse", copy / "overlayfuse",
                        ignore=shutil.ignore_patterns("__pycache__"))
        print(f"median of {runs} runs, ms: wall, cpu (load average {os.getloadavg()[0]:.2f} at start)")
        for label, cmd, env in rows(copy):
            wall, cpu = median_run(cmd, env, runs, cwd)
            print(f"{wall * 1000:8.1f} {cpu * 1000:7.1f}  {label}", flush=True)
    return 0
