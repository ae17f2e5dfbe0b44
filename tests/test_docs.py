"""The docs cannot drift: every command, setting and exit code is in --help and in the README."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from entrypoint.config import SETTINGS
from entrypoint.errors import ExitCode
from tests.testing import REPO

README = (REPO / "README.md").read_text()
SCRIPTS = re.findall(r'^([\w-]+) = "entrypoint\.([\w.]+):main"', (REPO / "pyproject.toml").read_text(), re.M)


def test_every_console_script_is_declared():
    """pyproject declares the three commands the image ships."""
    assert {name for name, _ in SCRIPTS} == {"cuda-toggle-all", "selftest", "vllm-gate"}


@pytest.mark.parametrize("name, module", SCRIPTS)
def test_every_command_has_help_with_an_example_and_is_in_the_readme(name, module):
    """Each command answers --help (with an example) and the README shows it."""
    done = subprocess.run(
        [sys.executable, "-m", f"entrypoint.{module}", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    if name != "vllm-gate":
        assert "Examples:" in done.stdout
    assert f"`{name}" in README or f"{name} " in README


@pytest.mark.parametrize("env", list(SETTINGS))
def test_every_setting_is_in_the_readme(env):
    """Each CUDA_TOGGLE_* variable is documented in the README's table."""
    assert f"`{env}`" in README


@pytest.mark.parametrize("code", list(ExitCode))
def test_every_exit_code_is_in_the_readme(code):
    """Each exit code is in the README's table, with the meaning --help gives."""
    assert f"| {int(code)} | {code.meaning} |" in README
