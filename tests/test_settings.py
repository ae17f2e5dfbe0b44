"""Settings of both tables (CUDA_TOGGLE_* and GATE_*): one parser, every value checked, the printers.

Parametrized over the tables: a row added to either is covered without a new test.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable, Mapping

import pytest

from entrypoint.base.config import SETTINGS, Config, load_config
from entrypoint.base.errors import ExitCode, ToolError
from entrypoint.base.settings import NUMERIC_KINDS, Setting, parse_settings
from entrypoint.gate.config import GATE_SETTINGS, GateConfig, load_gate_config
from tests.testing import REPO

TABLES: list[tuple[str, dict[str, Setting], type, Callable[[Mapping[str, str]], object]]] = [
    ("CUDA_TOGGLE", SETTINGS, Config, load_config),
    ("GATE", GATE_SETTINGS, GateConfig, load_gate_config),
]
ROWS = [pytest.param(setting, load, id=setting.env) for _, table, _, load in TABLES for setting in table.values()]
NUMERIC_ROWS = [row for row in ROWS if row.values[0].kind in NUMERIC_KINDS]
# Values no numeric setting may take: not finite, absurdly large, negative, not a number at all.
BAD_NUMBERS = ["nan", "NaN", "inf", "-inf", "1e400", "1e30", "99999999999999999999", "-1", "-0.5", "five", "0x10", ""]


@pytest.mark.parametrize(("prefix", "table", "config_type", "load"), TABLES, ids=[t[0] for t in TABLES])
def test_each_setting_is_one_row_and_one_field(prefix, table, config_type, load):
    """Every row fills exactly one field of its config dataclass, and every field but `sources` has a row."""
    fields = {f.name for f in dataclasses.fields(config_type)} - {"sources"}
    assert {setting.field for setting in table.values()} == fields
    assert all(env == setting.env for env, setting in table.items())
    defaults = load({})
    assert all(source == "default" for _, _, source in defaults.describe())


@pytest.mark.parametrize(("setting", "load"), NUMERIC_ROWS)
def test_every_number_has_finite_bounds_and_a_default_inside_them(setting, load):
    """A numeric setting states its minimum and maximum, and its default lies between them."""
    assert setting.minimum is not None and setting.maximum is not None
    assert setting.minimum <= setting.maximum < 1e12
    if setting.default:
        assert setting.minimum <= float(setting.default) <= setting.maximum


@pytest.mark.parametrize(("setting", "load"), NUMERIC_ROWS)
@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_bad_numbers_are_refused_naming_variable_value_range_and_fix(setting, load, bad):
    """NaN, infinities, huge, negative and non-numbers: exit USAGE, naming the variable, value, range and fix."""
    if bad == "":
        # Blank means the default (or, for an optional number, no value): never an error, never a NaN.
        value = getattr(load({setting.env: " "}), setting.field)
        assert value is None or value == setting.parse(setting.default)
        return
    if setting.minimum is not None and setting.minimum < 0 and bad.startswith("-"):
        pytest.skip("negative values are allowed here")
    with pytest.raises(ToolError) as raised:
        load({setting.env: bad})
    message = raised.value.message
    assert raised.value.exit_code == ExitCode.USAGE
    assert message.startswith(f"{setting.env}={bad!r} ")
    noun = "an integer" if setting.kind == "int" else "a number"
    assert f"set {noun} from " in message and "a int" not in message
    assert "or unset it for " in message


@pytest.mark.parametrize(("setting", "load"), NUMERIC_ROWS)
def test_bounds_are_inclusive(setting, load):
    """The minimum and the maximum themselves are accepted, one step beyond each is not."""
    kind = int if setting.kind == "int" else float
    for edge in (setting.minimum, setting.maximum):
        assert getattr(load({setting.env: str(kind(edge))}), setting.field) == kind(edge)
    step = 1 if setting.kind == "int" else 0.001
    for beyond in (setting.minimum - step, setting.maximum + step):
        with pytest.raises(ToolError, match="is out of range"):
            load({setting.env: str(kind(beyond))})


@pytest.mark.parametrize(("setting", "load"), [row for row in ROWS if row.values[0].kind == "choice"])
def test_choices_are_checked_and_case_insensitive(setting, load):
    """A choice takes its words in any case and refuses others, listing them."""
    first = setting.choices[0]
    assert getattr(load({setting.env: first.upper()}), setting.field) == first
    with pytest.raises(ToolError) as raised:
        load({setting.env: "bogus"})
    assert raised.value.message.startswith(f"{setting.env}='bogus' is not a known choice: set one of ")


def test_parse_settings_reports_sources_and_blank_rules():
    """Blank means the default unless the row says otherwise; `sources` holds what the environment set."""
    table = [
        Setting("GATE_A", "3", "a", "int", 0, 10),
        Setting("GATE_B", "x,y", "b", "list", blank_is_default=False),
        Setting("GATE_C", "", "c", "float", 0, 1),
        Setting("GATE_D", "off", "d", "bool"),
    ]
    values, sources = parse_settings(table, {"GATE_A": " ", "GATE_B": "", "GATE_D": "YES"})
    assert values == {"a": 3, "b": (), "c": None, "d": True}
    assert sources == {"GATE_B": "", "GATE_D": "YES"}
    with pytest.raises(ToolError, match=r"GATE_D='maybe' is not a yes or no: set one of 1, true"):
        parse_settings(table, {"GATE_D": "maybe"})


@pytest.mark.parametrize(
    ("env", "value", "complaint"),
    [
        ("GATE_UPSTREAM", "ftp://127.0.0.1:8001", "is not an http URL: fix it"),
        ("GATE_UPSTREAM", "http://127.0.0.1:8001/v1", "has a path, query or fragment"),
        ("GATE_PASSIVE_PATHS", "/health,/sleep", "does not forward"),
        ("GATE_PASSIVE_PATHS", "/rerank", "add it to GATE_EXTRA_PATHS"),
        ("GATE_PASSIVE_PATHS", "health", "plain absolute path"),
        ("GATE_EXTRA_PATHS", "/collective_rpc", "administration or development endpoints"),
        ("GATE_EXTRA_PATHS", "/v1/load_lora_adapter", "never forwards"),
        ("GATE_EXTRA_PATHS", "/init_weight_transfer_engine", "never forwards"),
        ("GATE_EXTRA_PATHS", "/my/own", "not one of the public routes the gate can add"),
        ("GATE_EXTRA_PATHS", "/v1/../sleep", "plain absolute path"),
    ],
)
def test_gate_text_settings_are_checked(env, value, complaint):
    """URLs and route lists are checked too: the message names the variable, the value and the problem."""
    with pytest.raises(ToolError) as raised:
        load_gate_config({env: value})
    assert raised.value.exit_code == ExitCode.USAGE
    assert raised.value.message.startswith(f"{env}={value!r}") and complaint in raised.value.message


def run_cli(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in __import__("os").environ.items() if not key.startswith(("GATE_", "CUDA_"))}
    return subprocess.run(
        [sys.executable, "-m", f"entrypoint.{module}", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**environ, **(env or {})},
        timeout=60,
    )


def test_cuda_toggle_all_config_prints_every_setting_and_its_source():
    """`cuda-toggle-all config --json` lists every CUDA_TOGGLE_* setting, its value and where it came from."""
    done = run_cli("cuda_toggle_all", "config", "--json", env={"CUDA_TOGGLE_VERIFY_SLEEP_S": "0.5"})
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert list(printed) == list(SETTINGS)
    assert printed["CUDA_TOGGLE_VERIFY_SLEEP_S"] == {"value": "0.5", "from": "environment"}
    assert printed["CUDA_TOGGLE_BUSY_WAIT_S"] == {"value": "5", "from": "default"}
    text = run_cli("cuda_toggle_all", "config").stdout
    assert "CUDA_TOGGLE_VERIFY_SLEEP_S=0.2  (default)" in text


def test_cuda_toggle_all_refuses_nan_before_acting():
    """A NaN setting stops cuda-toggle-all with exit 2 and one line naming it, no traceback."""
    done = run_cli("cuda_toggle_all", "status", env={"CUDA_TOGGLE_VERIFY_SLEEP_S": "nan"})
    assert done.returncode == ExitCode.USAGE
    assert "CUDA_TOGGLE_VERIFY_SLEEP_S='nan' is not a finite number" in done.stderr
    assert "Traceback" not in done.stderr


def test_gate_print_config_shows_both_tables():
    """`vllm-gate --print-config --json` lists GATE_* then CUDA_TOGGLE_*; the gate's busy wait replaces the tool's."""
    done = run_cli("gate", "--print-config", "--json", env={"GATE_IDLE_SUSPEND_S": "120", "GATE_BUSY_WAIT_S": "42"})
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert list(printed) == list(GATE_SETTINGS) + list(SETTINGS)
    assert printed["GATE_IDLE_SUSPEND_S"] == {"value": "120", "from": "environment"}
    assert printed["GATE_MAX_CONNECTIONS"] == {"value": "1000", "from": "default"}
    assert printed["CUDA_TOGGLE_BUSY_WAIT_S"] == {"value": "42.0", "from": "GATE_BUSY_WAIT_S"}
    assert printed["CUDA_TOGGLE_SERVER_URL"]["value"] == "http://127.0.0.1:8001"


def test_gate_refuses_a_private_endpoint_in_extra_paths_at_start():
    """GATE_EXTRA_PATHS naming an admin endpoint stops the gate with exit 2, the endpoint and the fix."""
    done = run_cli("gate", env={"GATE_EXTRA_PATHS": "/rerank,/v1/load_lora_adapter"})
    assert done.returncode == ExitCode.USAGE
    assert "GATE_EXTRA_PATHS='/rerank,/v1/load_lora_adapter' names /v1/load_lora_adapter" in done.stderr
    assert "never forwards" in done.stderr and "remove /v1/load_lora_adapter, or unset it" in done.stderr


def test_gate_refuses_nan_poll_before_listening():
    """GATE_POLL_S=nan stops the gate with exit 2 and one line naming it, before it listens."""
    done = run_cli("gate", env={"GATE_POLL_S": "nan"})
    assert done.returncode == ExitCode.USAGE
    assert "GATE_POLL_S='nan' is not a finite number: set a number from 0.05 to 3600 (seconds)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("module", "table"), [("cuda_toggle_all", SETTINGS), ("gate", GATE_SETTINGS)])
def test_help_lists_every_variable_with_its_range(module, table):
    """--help names every variable of the command's table, with the allowed range of each number."""
    done = run_cli(module, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for setting in table.values():
        assert setting.env in text
        if setting.kind in NUMERIC_KINDS:
            assert setting.allowed in text, setting.env


GATE_DOC = (REPO / "docs" / "gate.md").read_text()


@pytest.mark.parametrize("setting", list(GATE_SETTINGS.values()), ids=list(GATE_SETTINGS))
def test_every_gate_setting_is_in_the_gate_doc_with_its_default_and_range(setting):
    """docs/gate.md's settings table has a row per GATE_* variable with the code's default and bounds."""
    row = next((line for line in GATE_DOC.splitlines() if line.startswith(f"| `{setting.env}` |")), None)
    assert row is not None, f"{setting.env} is not in docs/gate.md"
    assert row.startswith(f"| `{setting.env}` | `{setting.default}` |")
    if setting.kind in NUMERIC_KINDS:
        assert f"| {setting.allowed} |" in row
