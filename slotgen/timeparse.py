"""Reading and writing the times used in storyboards.

A time is a number of seconds (``12.5``) or a string in one of these forms:

* seconds with a unit: ``"12.5s"`` (a bare numeric string such as ``"12.5"`` also works);
* hours/minutes/seconds units: ``"1m30s"``, ``"2m"``, ``"1h5m"``;
* clock notation: ``"1:30"`` (minutes:seconds) or ``"0:01:30.5"`` (hours:minutes:seconds).

Note that YAML 1.1 already reads an unquoted ``1:30`` as the integer 90 (base-60 notation), which
gives the same result.
"""

from __future__ import annotations

import math
import re

TIME_FORMS = 'a number of seconds like 12.5, or "12.5s", "1m30s", "2m", "1:30" or "0:01:30.5"'
"""Human description of the accepted forms, used in error messages."""

_NUM = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SECONDS = re.compile(rf"({_NUM})\s*s?", re.ASCII)
_UNITS = re.compile(rf"(?:({_NUM})\s*h)?\s*(?:({_NUM})\s*m)?\s*(?:({_NUM})\s*s)?", re.ASCII)
_CLOCK = re.compile(r"(?:([0-9]+):)?([0-9]+):([0-9]{1,2}(?:\.[0-9]*)?)", re.ASCII)


def _parse_text(text: str) -> float | None:
    """Seconds for a non-negative time string, or None if it is in no accepted form."""
    if match := _SECONDS.fullmatch(text):
        return float(match[1])
    match = _UNITS.fullmatch(text)
    if match and any(match.groups()):
        hours, minutes, seconds = (float(part) if part else 0.0 for part in match.groups())
        return hours * 3600 + minutes * 60 + seconds
    if match := _CLOCK.fullmatch(text):
        hours = float(match[1]) if match[1] else 0.0
        minutes, seconds = float(match[2]), float(match[3])
        if seconds >= 60 or (match[1] and minutes >= 60):
            return None
        return hours * 3600 + minutes * 60 + seconds
    return None


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_time(value: object) -> float:
    """Convert a storyboard time (number or string, see the module docstring) to seconds.

    Returns:
        A finite, non-negative number of seconds.

    Raises:
        ValueError: with a one-line message naming the accepted forms, for anything else
            (including booleans, ``None``, negative and non-finite values).
    """
    seconds: float | None
    if isinstance(value, bool) or value is None:
        seconds = None
    elif isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"time {_describe(value)} is too large") from None
    elif isinstance(value, str):
        text = value.strip()
        negative = text.startswith("-")
        seconds = _parse_text(text[1:].lstrip() if negative else text)
        if negative and seconds is not None:
            seconds = -seconds
    else:
        seconds = None
    if seconds is None:
        raise ValueError(f"expected a time: {TIME_FORMS}; got {_describe(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite time, got {_describe(value)}")
    if seconds < 0:
        raise ValueError(f"times cannot be negative, got {_describe(value)}")
    return seconds + 0.0  # normalises -0.0


def format_time(seconds: float) -> str:
    """Format seconds for messages: ``6s``, ``6.5s``, ``0.125s`` (at most millisecond precision)."""
    if not math.isfinite(seconds) or abs(seconds) >= 1e6:
        return f"{seconds:g}s"
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{'0' if text == '-0' else text}s"


__all__ = ["TIME_FORMS", "format_time", "parse_time"]
