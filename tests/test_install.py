"""The package as users get it: `pip install .` into a fresh venv, then the three console scripts start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.testing import REPO


@pytest.mark.install
@pytest.mark.timeout(300)
def test_console_scripts_start_after_a_plain_pip_install(tmp_path: Path):
    """In a fresh venv, `pip install .` (no extras) gives cuda-toggle-all, selftest and vllm-gate that answer --help."""
    # A copy of the tree: the build leaves build/ and *.egg-info behind, which must not land in the checkout.
    source = tmp_path / "source"
    ignored = shutil.ignore_patterns(".git", ".venv", ".cache", "build", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(REPO, source, ignore=ignored)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    environ = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The test's own pip installs into the fresh venv (--python): seeding the venv with pip would double
    # the time. --no-compile: byte-compiling every dependency proves nothing here.
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile", str(source)],
        capture_output=True,
        text=True,
        timeout=280,
        env=environ,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    probe = [str(python), "-c", "import aiohttp, entrypoint.gate.app"]
    assert subprocess.run(probe, capture_output=True, timeout=60, env=environ, cwd=tmp_path).returncode == 0
    for script in ("cuda-toggle-all", "selftest", "vllm-gate"):
        done = subprocess.run(
            [str(env_dir / "bin" / script), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=environ,
            cwd=tmp_path,
        )
        assert done.returncode == 0, f"{script} --help failed:\n{done.stderr}"
        assert "Usage:" in done.stdout
