"""overlayfuse on a stock pyfuse3: correct, only slower (CI's smoke subset).

scripts/setup installs pyfuse3 with patches/pyfuse3 applied, and the daemon uses what those add only
where `overlayfuse.daemon.binding` finds it. This builds a second venv, ``.venv-stock``, with pyfuse3 as
released (pip's own build of the pinned version) and the checkout installed editable, and runs a
subset of the mount tests there: listings through opendir handles, the request counts, and the
semantics tests that lean hardest on readdir. Building it compiles pyfuse3 (a few minutes on a
2-core VM); the venv is kept until pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mounts import REPO_ROOT

pytestmark = pytest.mark.mount

STOCK_VENV = REPO_ROOT / ".venv-stock"
_STAMP = STOCK_VENV / ".overlayfuse-stock-stamp"
#: pip compiles pyfuse3 from its sdist when no wheel of it is cached: minutes on a small VM.
BUILD_TIMEOUT = 1200
#: The subset below takes well under a minute alone; this only guards against a hang.
SUBSET_TIMEOUT = 900
SUBSET = [
    "tests/daemon/test_kernel_cache.py",
    "tests/daemon/test_requests.py",
    "tests/daemon/test_semantics.py",
]


def _stock_venv() -> Path:
    """.venv-stock with stock pyfuse3 and this checkout (editable), rebuilt when pyproject changes."""
    want = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest()
    python = STOCK_VENV / "bin" / "python"
    if _STAMP.exists() and _STAMP.read_text() == want and python.exists():
        return python
    shutil.rmtree(STOCK_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(STOCK_VENV)], check=True, timeout=120)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f"{REPO_ROOT}[test]"],
        check=True, timeout=BUILD_TIMEOUT, cwd=REPO_ROOT,
    )  # fmt: skip
    _STAMP.write_text(want)
    return python


@pytest.mark.timeout(BUILD_TIMEOUT + SUBSET_TIMEOUT)
def test_the_mount_tests_pass_on_stock_pyfuse3() -> None:
    python = _stock_venv()
    probe = subprocess.run(
        [str(python), "-c", "from overlayfuse.daemon import binding; print(binding.detect().describe())"],
        capture_output=True, text=True, check=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip
    assert probe.stdout.startswith("none"), probe.stdout  # really the stock binding
    env = dict(os.environ, OVERLAYFUSE_STOCK_PYFUSE3="1")
    run = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUBSET],
        capture_output=True, text=True, timeout=SUBSET_TIMEOUT, cwd=REPO_ROOT, env=env,
    )  # fmt: skip
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
    assert run.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
