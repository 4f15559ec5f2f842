"""Storyboard error plumbing: field paths, user-facing wording, and pydantic errors turned into problems.

A :class:`Problem` names where a mistake is (the path whose line is reported, the path shown) and what
was expected; :meth:`Problem.to_error` makes it a one-line ``path:LINE: field: message``
:class:`~slotgen.errors.StoryboardError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

from pydantic import ValidationError

from slotgen.errors import StoryboardError

FieldPath = tuple[Union[str, int], ...]
"""Location of a value in the storyboard, e.g. ``("prompts", 1, "at")`` or ``("resolution",)``."""


def describe(value: object) -> str:
    """Short, single-line description of a user value for error messages."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def quote_key(key: str) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def format_field_path(path: FieldPath) -> str:
    """Human form of a field path: ``("prompts", 1, "at")`` -> ``prompts[1].at``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def single_line(message: str) -> str:
    return " ".join(message.split()) or "invalid storyboard"


def unknown_key_message(key: str, expected: Sequence[str]) -> str:
    message = f"unknown key {quote_key(key)}"
    if expected:
        message += f"; expected one of: {', '.join(expected)}"
        close = difflib.get_close_matches(key.lower(), list(expected), n=1, cutoff=0.6)
        if close:
            message += f" (did you mean '{close[0]}'?)"
    return message


class Problem(NamedTuple):
    """A user mistake: where to find its line, which field to name, and what was expected."""

    line_path: FieldPath
    shown_path: FieldPath
    message: str
    rank: int = 0  # problems with a higher rank are reported only when nothing else is wrong

    def line(self, lines: dict[FieldPath, int]) -> int | None:
        """Line of ``line_path``, or of its nearest ancestor that has one."""
        for size in range(len(self.line_path), -1, -1):
            line = lines.get(self.line_path[:size])
            if line is not None:
                return line
        return None

    def to_error(self, source: str, lines: dict[FieldPath, int]) -> StoryboardError:
        prefix = format_field_path(self.shown_path)
        message = f"{prefix}: {self.message}" if prefix else self.message
        return StoryboardError(source, self.line(lines), single_line(message))


_INT_ERRORS = {"int_type", "int_parsing", "int_from_float", "int_parsing_size"}
_FLOAT_ERRORS = {"float_type", "float_parsing"}
_STRING_ERRORS = {"string_type", "string_unicode", "string_sub_type"}
_LIST_ERRORS = {"list_type", "tuple_type", "iterable_type"}
_MAPPING_ERRORS = {"model_type", "model_attributes_type", "dict_type"}


def error_message(error: dict[str, Any], path: FieldPath) -> str:
    """Human wording for one pydantic error (other than missing and extra keys)."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = describe(error.get("input"))
    if kind in _INT_ERRORS:
        return f"expected an integer, got {got}"
    if kind in _FLOAT_ERRORS:
        return f"expected a number, got {got}"
    if kind == "finite_number":
        return f"expected a finite number, got {got}"
    if kind in _STRING_ERRORS:
        return f"expected text, got {got}"
    if kind in _LIST_ERRORS:
        what = "a list of prompts" if path == ("prompts",) else "a list"
        return f"expected {what}, got {got}"
    if kind in _MAPPING_ERRORS:
        return f"expected a mapping of keys to values, got {got}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}, got {got}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}, got {got}"
    if kind == "less_than":
        return f"must be less than {ctx.get('lt')}, got {got}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}, got {got}"
    if kind == "too_short":
        return "must list at least one prompt" if path == ("prompts",) else "must not be empty"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    message = str(error.get("msg", "invalid value")).replace("Input should be", "expected")
    return f"{message}, got {got}"


def problems_from(
    exc: ValidationError,
    prefix: FieldPath,
    data: Any,
    expected_keys: Callable[[FieldPath, Any], list[str]],
) -> list[Problem]:
    """Translate a pydantic ValidationError (raised for the value at ``prefix``) into problems.

    ``expected_keys(parent, data)``: the keys allowed at ``parent``, for "unknown key" messages."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = prefix + tuple(error["loc"])
        kind = error["type"]
        if kind == "missing" and loc:
            problems.append(Problem(loc[:-1], loc[:-1], f"missing required key '{loc[-1]}'", rank=1))
        elif kind == "extra_forbidden" and loc:
            key = str(loc[-1])
            expected = expected_keys(loc[:-1], data)
            problems.append(Problem(loc, loc[:-1], unknown_key_message(key, expected)))
        else:
            problems.append(Problem(loc, loc, error_message(error, loc)))
    return problems
