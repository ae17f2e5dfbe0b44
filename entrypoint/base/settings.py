"""Settings from environment variables: one `Setting` type, one parser that checks every value once.

Each command keeps a table (a list of `Setting` rows: CUDA_TOGGLE_* in base/config.py, GATE_* in
gate/config.py); `parse_settings` turns the environment into the values of a table, `settings_help`
writes the table for --help, and `describe` says which value is in force and where it came from.
A bad value raises ToolError(ExitCode.USAGE) naming the variable, the value, what is allowed and
the fix; no value reaches the code unchecked (NaN, infinities and out-of-range numbers included).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ExitCode, ToolError

KINDS = ("int", "float", "str", "choice", "list", "bool")
NUMERIC_KINDS = ("int", "float")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# The prefixes a table's variables carry; the rest of the name, lower-cased, is the config field.
PREFIXES = ("CUDA_TOGGLE_", "GATE_")
DAY_S = 86400.0


class BadValue(ValueError):
    """Raised by a Setting's `check`: what is wrong with the value (it follows 'VAR=value '), and the fix."""

    def __init__(self, problem: str, fix: str = ""):
        super().__init__(problem)
        self.fix = fix


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default (as text), meaning, kind and bounds."""

    env: str
    default: str
    help: str
    kind: str = "str"
    minimum: float | None = None  # numbers: the smallest value allowed (inclusive)
    maximum: float | None = None  # numbers: the largest value allowed (inclusive)
    unit: str = ""  # shown with the range: "seconds", "MiB"
    choices: tuple[str, ...] = ()  # kind "choice": the words allowed (compared lower-cased)
    # True: an empty or blank value means the default. False: blank is a value of its own (an empty
    # list, no value); an optional setting has default "" and parses to None (numbers) or "".
    blank_is_default: bool = True
    # A further check of the parsed value, returning the value to keep (e.g. a normalised URL); raises BadValue.
    check: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.env}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind in NUMERIC_KINDS and (self.minimum is None or self.maximum is None):
            raise ValueError(f"{self.env}: a number needs a minimum and a maximum")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"{self.env}: a choice needs its choices")

    @property
    def field(self) -> str:
        """The config dataclass field that holds the value: CUDA_TOGGLE_VERIFY_SLEEP_S -> verify_sleep_s."""
        name = self.env
        for prefix in PREFIXES:
            name = name.removeprefix(prefix)
        return name.lower()

    @property
    def allowed(self) -> str:
        """What the value may be, in words: 'a number from 0 to 60 (seconds)'."""
        if self.kind in NUMERIC_KINDS:
            noun = "an integer" if self.kind == "int" else "a number"
            unit = f" ({self.unit})" if self.unit else ""
            return f"{noun} from {_number_text(self.minimum)} to {_number_text(self.maximum)}{unit}"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "one of " + ", ".join(TRUE_WORDS + FALSE_WORDS)
        if self.kind == "list":
            return "a comma-separated list"
        return "text"

    def parse(self, text: str) -> Any:
        """The value of `text` (already resolved: the environment's or the default); bad input raises ToolError."""
        stripped = text.strip()
        if stripped == "" and self.default.strip() == "" and self.kind != "list":
            return None if self.kind in NUMERIC_KINDS else ""  # optional and not set
        try:
            value = self._convert(stripped)
            return self.check(value) if self.check is not None else value
        except BadValue as problem:
            raise self.error(text, str(problem), problem.fix) from None

    def _convert(self, text: str) -> Any:
        if self.kind in NUMERIC_KINDS:
            return self._number(text)
        if self.kind == "choice":
            if text.lower() not in self.choices:
                raise BadValue("is not a known choice")
            return text.lower()
        if self.kind == "bool":
            if text.lower() in TRUE_WORDS:
                return True
            if text.lower() in FALSE_WORDS:
                return False
            raise BadValue("is not a yes or no")
        if self.kind == "list":
            return tuple(item.strip() for item in text.split(",") if item.strip())
        return text

    def _number(self, text: str) -> int | float:
        assert self.minimum is not None and self.maximum is not None
        try:
            number: int | float = int(text) if self.kind == "int" else float(text)
        except ValueError:
            raise BadValue("is not an integer" if self.kind == "int" else "is not a number") from None
        if not math.isfinite(number):
            raise BadValue("is not a finite number")
        if not self.minimum <= number <= self.maximum:
            raise BadValue("is out of range")
        return number

    def error(self, text: str, problem: str, fix: str = "") -> ToolError:
        default = f"the default {self.default}" if self.default.strip() else "none"
        if not fix:
            fix = f"set {self.allowed}" if self.kind in NUMERIC_KINDS + ("choice", "bool") else "fix it"
        return ToolError(f"{self.env}={text!r} {problem}: {fix}, or unset it for {default}", ExitCode.USAGE)


def _number_text(number: float | None) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def resolve(table: Iterable[Setting], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `table` that `environ` sets (blank ones left out where blank means the default)."""
    sources = {}
    for setting in table:
        if setting.env in environ:
            text = environ[setting.env]
            if text.strip() or not setting.blank_is_default:
                sources[setting.env] = text
    return sources


def parse_settings(table: Iterable[Setting], environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(field -> parsed value, env -> text taken from the environment) for every setting of `table`."""
    sources = resolve(table, environ)
    values = {setting.field: setting.parse(sources.get(setting.env, setting.default)) for setting in table}
    return values, sources


def describe(table: Iterable[Setting], sources: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(variable, value in force as text, where it came from) for every setting of `table`."""
    return [
        (s.env, sources[s.env].strip(), "environment") if s.env in sources else (s.env, s.default, "default")
        for s in table
    ]


def settings_help(table: Iterable[Setting], title: str = "Environment variables (default):") -> str:
    """The table for --help (click keeps the lines after a \\b marker as they are)."""
    lines = ["\b", title]
    for setting in table:
        bounds = f"; {setting.allowed}" if setting.kind in NUMERIC_KINDS + ("choice",) else ""
        lines.append(f"  {setting.env} ({setting.default or 'unset'}{bounds})")
        lines += textwrap.wrap(setting.help, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
