"""The docs cannot drift: every documented command, option, variable, exit code, JSON key and message is
checked against the code, and no tracked file refers to a path outside the repository."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import click
import pytest

from entrypoint.base.config import SETTINGS
from entrypoint.base.errors import GATE_EXIT_CODES, SELFTEST_EXIT_CODES, TOGGLE_EXIT_CODES, ExitCode
from entrypoint.base.results import PidResult, ToggleResult
from entrypoint.cuda_toggle_all import cli as toggle_cli
from entrypoint.cycle.report import Cycle, Report
from entrypoint.gate.app import cli as gate_cli
from entrypoint.gate.config import GATE_SETTINGS
from entrypoint.selftest import cli as selftest_cli
from entrypoint.suspend.status import StatusResult
from tests.testing import REPO

README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"
CLI_DOC = (DOCS / "cli.md").read_text()
SCRIPTS = re.findall(r'^([\w-]+) = "entrypoint\.([\w.]+):main"', (REPO / "pyproject.toml").read_text(), re.M)
COMMANDS = {"cuda-toggle-all": toggle_cli, "selftest": selftest_cli, "vllm-gate": gate_cli}
JSON_TYPES = {cls.__name__: cls for cls in (ToggleResult, PidResult, StatusResult, Report, Cycle)}
# What a reader could follow out of the repository: notes and copies that only ever lay beside it.
OUTSIDE_PATHS = re.compile(r"FACTS\.md|MULTI-GPU-TEST|vllm-bundle|\.\./shared|/work/|GPU-FINDINGS|(?<![\w/])\.gpu/")


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name]


def section(text: str, heading: str) -> str:
    """The text under a `## heading`, up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section '## {heading}'"
    return match.group(1)


def documented_options(heading: str) -> set[str]:
    """The options of a command's table in docs/cli.md: rows that start with `--option` or `-o`."""
    rows = re.findall(r"^\| (`-.*?) \|", section(CLI_DOC, heading), re.M)
    return {option for row in rows for option in re.findall(r"`(--?[\w-]+)", row)}


def test_every_console_script_is_declared():
    """pyproject declares the three commands the image ships."""
    assert {name for name, _ in SCRIPTS} == set(COMMANDS)


@pytest.mark.parametrize("name, module", SCRIPTS)
def test_every_command_has_help_and_is_in_the_readme_and_the_cli_doc(name, module):
    """Each command answers --help (with an example, except the gate's server), the README and docs/cli.md show it."""
    done = subprocess.run(
        [sys.executable, "-m", f"entrypoint.{module}", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    if name != "vllm-gate":
        assert "Examples:" in done.stdout
    assert f"`{name}`" in README
    assert f"## {name}" in CLI_DOC


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_is_documented_and_every_documented_option_exists(name):
    """docs/cli.md lists exactly the options each command's click definition has (help aside)."""
    command = COMMANDS[name]
    actual = {opt for param in command.params if isinstance(param, click.Option) for opt in param.opts}
    assert documented_options(name) == actual


@pytest.mark.parametrize("env", list(SETTINGS) + list(GATE_SETTINGS))
def test_every_setting_is_in_the_configuration_doc(env):
    """Each CUDA_TOGGLE_* and GATE_* variable has its row in docs/configuration.md."""
    assert f"| `{env}` |" in (DOCS / "configuration.md").read_text()


def test_configuration_doc_is_what_the_settings_tables_generate():
    """docs/configuration.md equals what `make docs` generates from both settings tables."""
    generated = subprocess.run(
        [sys.executable, "scripts/configuration_doc.py"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert generated.returncode == 0, generated.stderr
    assert (DOCS / "configuration.md").read_text() == generated.stdout, "run `make docs`"


def test_every_variable_named_in_the_docs_exists():
    """A CUDA_TOGGLE_* or GATE_* name anywhere in README.md or docs/ is a setting, or set by the image."""
    image = "".join((REPO / name).read_text() for name in ["Dockerfile", "supervisord.conf"])
    known = set(SETTINGS) | set(GATE_SETTINGS) | set(re.findall(r"\b(?:CUDA_TOGGLE|GATE)_[A-Z_]*[A-Z]\b", image))
    texts = [README] + [path.read_text() for path in DOCS.glob("*.md")]
    named = {name for text in texts for name in re.findall(r"\b(?:CUDA_TOGGLE|GATE)_[A-Z_]*[A-Z]\b", text)}
    assert named - known == set()


@pytest.mark.parametrize("code", list(ExitCode))
def test_every_exit_code_is_in_the_readme(code):
    """Each exit code is in the README's table, with the meaning --help gives."""
    assert f"| {int(code)} | {code.meaning} |" in README


def test_the_readme_lists_no_exit_code_that_does_not_exist():
    """Every row of the README's exit-code table is an ExitCode with that meaning."""
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", section(README, "Exit codes"), re.M)
    assert {int(code): meaning for code, meaning in rows} == {int(code): code.meaning for code in ExitCode}


@pytest.mark.parametrize(
    "name, codes",
    [("cuda-toggle-all", TOGGLE_EXIT_CODES), ("selftest", SELFTEST_EXIT_CODES), ("vllm-gate", GATE_EXIT_CODES)],
)
def test_every_help_lists_its_exit_codes_from_the_one_table(name, codes):
    """Each command's --help has an exit-code table: its codes, each with the meaning ExitCode gives, no other."""
    text = COMMANDS[name].get_help(click.Context(COMMANDS[name], info_name=name))
    listed = re.findall(r"^\s+(\d+)  (.+)$", text.split("Exit codes:")[1].split("\n\n")[0], re.M)
    assert {int(code): meaning for code, meaning in listed} == {int(code): code.meaning for code in codes}


@pytest.mark.parametrize("type_name", list(JSON_TYPES))
def test_documented_json_keys_are_the_result_fields(type_name):
    """Each JSON table of docs/cli.md lists exactly the fields of the result type that produces it."""
    match = re.search(rf"<!-- json: {type_name} -->\n(.*?)(?:\n\n|\Z)", CLI_DOC, re.S)
    assert match, f"no JSON table for {type_name}"
    rows = re.findall(r"^\| (`.*?) \|", match.group(1), re.M)
    documented = {key for row in rows for key in re.findall(r"`(\w+)`", row.split(" (each of")[0])}
    assert documented == {field.name for field in dataclasses.fields(JSON_TYPES[type_name])}


def test_troubleshooting_messages_are_what_the_code_prints():
    """Every quoted message of the tools' troubleshooting tables is, piece by piece, in entrypoint/."""
    code = "".join(path.read_text() for path in (REPO / "entrypoint").rglob("*.py"))
    doc = (DOCS / "troubleshooting.md").read_text()
    tables = section(doc, "cuda-toggle-all (and the suspends of selftest and the gate)") + section(doc, "selftest")
    rows = re.findall(r"^\| (`.+?) \| (\d+) \|", tables, re.M)
    assert len(rows) > 20
    for message, exit_code in rows:
        assert int(exit_code) in set(ExitCode), message
        for piece in re.findall(r"`([^`]+)`", message):
            assert piece in code, f"{piece!r} (troubleshooting.md) is not in the code any more"


def test_readme_transcript_shows_real_commands():
    """The README's transcript runs make targets and commands that exist, with options they have."""
    commands = re.findall(r"^\$ (.+)$", README, re.M)
    assert commands, "no transcript in the README"
    makefile = (REPO / "Makefile").read_text()
    for line in commands:
        program, *words = line.split()
        if program == "make":
            assert all(re.search(rf"^{re.escape(word)}:", makefile, re.M) for word in words), line
            continue
        assert program in COMMANDS, line
        options = {opt for param in COMMANDS[program].params for opt in param.opts}
        assert {word for word in words if word.startswith("-")} <= options, line
    assert "stand-in" in README and "not a GPU" in README


def test_readme_and_docs_cover_the_container_side():
    """The README and docs/container.md name the make targets, the settings and the flags the container needs."""
    text = README + (DOCS / "container.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in re.findall(r"^([a-z][\w-]*):.*##", makefile, re.M):
        assert f"make {target}" in text or f"`{target}`" in text, target
    for name in ["NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_NVLS_ENABLE", "VLLM_ALLREDUCE_USE_SYMM_MEM"]:
        assert name in text, name
    for flag in ["--disable-custom-all-reduce", "SYS_PTRACE", "seccomp=unconfined", "ipc: host", "127.0.0.1:8001"]:
        assert flag in text, flag
    for name in [
        "GATE_UPSTREAM",
        "GATE_IDLE_SUSPEND_S",
        "VLLM_SLEEP_MODE=0",
        "VLLM_SERVER_DEV_MODE=1",
        "127.0.0.1:8001",
    ]:
        assert name in text, name
    assert "CLEANUP=1 make test" in text


def heading_anchors(page) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, blanks to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_relative_links_in_the_docs_point_at_files_and_headings_that_exist():
    """Every relative link of the tracked Markdown files leads to a file of the repository, and to a heading of it."""
    pages = [REPO / name for name in tracked_files() if name.endswith(".md")]
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            linked = page.parent / target if target else page
            assert linked.exists(), f"{page.relative_to(REPO)} links to {target}, which is not there"
            if anchor and linked.suffix == ".md":
                assert anchor in heading_anchors(linked), f"{page.relative_to(REPO)} links to {target}#{anchor}"


def test_no_tracked_file_refers_to_a_path_outside_the_repository():
    """No tracked file cites notes, bundles or folders that lay outside the repository (the repo is self-contained)."""
    offenders = []
    for name in tracked_files():
        if name in (".gitignore", "tests/test_docs.py"):  # the ignore rule for a local folder; this test's pattern
            continue
        path = REPO / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{name}: {match.group(0)}" for match in OUTSIDE_PATHS.finditer(text)]
    assert offenders == []
