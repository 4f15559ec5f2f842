"""A storyboard's prompt times: ``at`` / ``until`` / ``duration`` resolved into spans that tile the video.

:class:`Timeline` reads the prompts as written (``raw``: ``duration`` and ``prompts`` with ``prompt``,
``at``, ``until``, ``duration``; times already in seconds) and returns contiguous absolute spans, or
raises the first problem through ``fail(path, message)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slotgen.errors import StoryboardError
from slotgen.storyboard.messages import FieldPath
from slotgen.timeparse import format_time

MAX_DURATION = 24 * 3600.0
"""Longest accepted storyboard, in seconds (a guard against typos such as ``duration: 80000m``)."""

TIMELINE_TOLERANCE = 1e-6
"""Seconds within which two prompt boundaries count as the same time (absorbs float rounding)."""


class Timeline:
    """Resolves ``at``/``until``/``duration`` into contiguous absolute spans, or fails with a problem."""

    def __init__(self, raw: Any, fail: Callable[[FieldPath, str], StoryboardError]):
        self.raw = raw
        self.fail = fail

    def resolve(self) -> tuple[float, list[tuple[float, float, str]]]:
        """(duration, [(start, end, text) of every prompt]); raises ``fail(...)`` on the first problem."""
        raw, fail = self.raw, self.fail
        if raw.duration is not None and raw.duration <= 0:
            raise fail(("duration",), f"must be longer than 0s, got {format_time(raw.duration)}")
        starts: list[float] = []
        ends: list[float | None] = []  # None: runs until the next prompt (or the storyboard's end)
        end_keys: list[str] = []
        for index, item in enumerate(raw.prompts):
            where: FieldPath = ("prompts", index)
            start = self._start(index, item)
            if item.until is not None and item.duration is not None:
                raise fail(where + ("duration",), "give either 'until' or 'duration', not both")
            end: float | None = None
            if item.duration is not None:
                if item.duration <= 0:
                    raise fail(
                        where + ("duration",),
                        f"must be longer than 0s, got {format_time(item.duration)}",
                    )
                end = start + item.duration
                end_keys.append("duration")
            elif item.until is not None:
                if item.until <= start:
                    raise fail(
                        where + ("until",),
                        f"the prompt must end after it starts; it starts at {format_time(start)} "
                        f"but 'until' is {format_time(item.until)}",
                    )
                end = item.until
                end_keys.append("until")
            else:
                end_keys.append("at")
            if index:
                self._check_follows(index, start, starts[-1], ends[-1])
                ends[-1] = start
            starts.append(start)
            ends.append(end)
        duration = self._finish(starts, ends, end_keys)
        ends[-1] = duration
        return duration, [(start, end, item.prompt) for start, end, item in zip(starts, ends, raw.prompts)]

    def _start(self, index: int, item: Any) -> float:
        if index == 0:
            if item.at is not None and item.at != 0:
                raise self.fail(
                    ("prompts", 0, "at"),
                    f"the first prompt must start at 0s, not {format_time(item.at)}",
                )
            return 0.0
        if item.at is None:
            raise self.fail(
                ("prompts", index),
                "missing required key 'at'; every prompt after the first needs a start time",
            )
        return item.at

    def _check_follows(
        self, index: int, start: float, prev_start: float, prev_end: float | None
    ) -> None:
        """Check that prompt ``index`` starting at ``start`` directly follows the previous prompt."""
        where: FieldPath = ("prompts", index, "at")
        if start <= prev_start + TIMELINE_TOLERANCE:
            raise self.fail(
                where,
                f"prompt times must be in order; {format_time(start)} is not after the previous "
                f"prompt's start at {format_time(prev_start)}",
            )
        if prev_end is None:
            return
        if start < prev_end - TIMELINE_TOLERANCE:
            raise self.fail(
                where,
                f"prompt times must be in order; {format_time(start)} starts before the previous "
                f"prompt ends at {format_time(prev_end)}",
            )
        if start > prev_end + TIMELINE_TOLERANCE:
            raise self.fail(
                where,
                f"no prompt covers {format_time(prev_end)}–{format_time(start)}; start this prompt at "
                f"{format_time(prev_end)} or make the previous one end later",
            )

    def _finish(self, starts: list[float], ends: list[float | None], end_keys: list[str]) -> float:
        """The storyboard duration, checked against (or derived from) the last prompt."""
        last = len(starts) - 1
        last_end = ends[last]
        end_path: FieldPath = ("prompts", last, end_keys[last])
        if self.raw.duration is None:
            if last_end is None:
                raise self.fail(
                    ("prompts",),
                    "cannot tell how long the storyboard is; add a top-level 'duration' or give the "
                    "last prompt 'until' or 'duration'",
                )
            if last_end > MAX_DURATION:
                raise self.fail(
                    end_path,
                    f"the storyboard may last at most {format_time(MAX_DURATION)}, but the last "
                    f"prompt ends at {format_time(last_end)}",
                )
            return last_end
        duration = self.raw.duration
        if duration > MAX_DURATION:
            raise self.fail(
                ("duration",),
                f"must be at most {format_time(MAX_DURATION)} (24 hours), got {format_time(duration)}",
            )
        if last_end is None:
            if starts[last] >= duration - TIMELINE_TOLERANCE:
                raise self.fail(
                    ("prompts", last, "at"),
                    f"the last prompt starts at {format_time(starts[last])}, but the storyboard ends "
                    f"at {format_time(duration)}",
                )
        elif last_end < duration - TIMELINE_TOLERANCE:
            raise self.fail(
                end_path,
                f"no prompt covers {format_time(last_end)}–{format_time(duration)}; make the last "
                f"prompt end at {format_time(duration)} or shorten the storyboard's 'duration'",
            )
        elif last_end > duration + TIMELINE_TOLERANCE:
            raise self.fail(
                end_path,
                f"the last prompt ends at {format_time(last_end)}, after the storyboard ends at "
                f"{format_time(duration)}; shorten the prompt or lengthen 'duration'",
            )
        return duration
