"""The package as users get it: `pip install .` into a fresh venv, then the three console scripts start."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.install
@pytest.mark.timeout(300)
def test_console_scripts_start_after_a_plain_pip_install(tmp_path: Path):
    """In a fresh venv, `pip install .` (no extras) gives cuda-toggle-all, selftest and vllm-gate that answer --help."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, symlinks=True).create(env_dir)
    environ = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --no-compile: byte-compiling every dependency is half the time on a small machine, and proves nothing.
    install = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env=environ,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]
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
