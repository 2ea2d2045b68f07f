"""What a recipe setting's value may be: number ranges, type checks and how to describe them, and
reading YAML text, for `config`. No recipe knowledge here: only values and their types."""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The values a number setting accepts, from low to high (each end included unless open)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low = f"{'above' if self.low_open else 'at least'} {_number(self.low)}"
        if self.high == math.inf:
            return low
        return f"{low} and {'below' if self.high_open else 'at most'} {_number(self.high)}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# Counts and step numbers above this are typos, and overflow the int32 some libraries use.
MAX_COUNT = 2**31 - 1
POSITIVE = Range(0, math.inf, low_open=True)
COUNT = Range(1, MAX_COUNT)
SHARE = Range(0, 1, high_open=True)  # a fraction: 0 allowed, 1 not


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (and a `range` for numbers) kept in the metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def parse_yaml(text: str, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: not valid YAML: {e}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts (4300)
        raise ConfigError(f"{what}: a value cannot be read: {str(e).split(';')[0]}") from None
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply to read") from None


def coerce(value: Any, tp: Any) -> Any:
    """YAML reads `1e-4` (no dot) as a string: accept it where a number is expected."""
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    return {
        type(None): "empty (null)",
        int: "an integer",
        float: "a number",
        bool: "true/false",
        str: "a string",
    }.get(tp, str(tp))


def unknown(key: str, valid: list[str], what: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(valid))}"
    return f"unknown {what} {key!r}{hint}"
