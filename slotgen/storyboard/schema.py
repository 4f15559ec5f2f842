"""The storyboard schema: :class:`Storyboard` and its parts, validated from YAML with line-numbered errors.

:func:`parse_storyboard` reads the YAML (:mod:`.yaml_source`), validates the keys as written, then the
memory section (:mod:`slotgen.memory.registry`) and the prompt times (:mod:`.timeline`); problems are
worded by :mod:`.messages`. The format and the prompt-switch rule are described in :mod:`slotgen.storyboard`.
"""

from __future__ import annotations

import difflib
import os
import re
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    model_validator,
)

from slotgen.errors import StoryboardError
from slotgen.memory.base import PolicyConfig
from slotgen.memory.registry import (
    UnknownPolicyError,
    config_classes,
    default_memory,
    parse_memory_config,
    policy_names,
)
from slotgen.storyboard.messages import (
    FieldPath,
    Problem,
    describe,
    problems_from,
    single_line,
    unknown_key_message,
)
from slotgen.storyboard.timeline import MAX_DURATION, Timeline
from slotgen.storyboard.yaml_source import read_yaml
from slotgen.timeparse import format_time, parse_time

MAX_SEED = 2**63 - 1
"""Largest accepted seed (it must fit a signed 64-bit integer for the random generators)."""

SWITCH_TOLERANCE = 1e-9
"""Seconds of slack in :meth:`Storyboard.prompt_index_at`, so a frame at a switch gets the new prompt."""


# --------------------------------------------------------------------------------------------------
# Field types shared by the YAML schema and the public models

def _no_bool(expected: str) -> Callable[[Any], Any]:
    """Before-validator refusing booleans, which pydantic would otherwise read as 0/1."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {expected}, got {describe(value)}")
        return value

    return check


def _time(value: Any) -> float:
    return parse_time(value)


_RESOLUTION_TEXT = re.compile(r"\s*([0-9]{1,9})\s*[xX×]\s*([0-9]{1,9})\s*")
_RESOLUTION_FORMS = 'WIDTHxHEIGHT like "64x64" or a list [width, height]'


def _resolution(value: Any) -> tuple[int, int] | None:
    """Read ``"64x64"``, ``[64, 64]`` or ``(64, 64)`` as ``(width, height)``; None stays None."""
    if value is None:
        return None
    if isinstance(value, str) and (match := _RESOLUTION_TEXT.fullmatch(value)):
        width, height = int(match[1]), int(match[2])
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) for side in value)
    ):
        width, height = value
    else:
        raise ValueError(f"expected {_RESOLUTION_FORMS}, got {describe(value)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    return (width, height)


def _stripped_text(value: str) -> str:
    text = value.strip()
    if not text:
        raise ValueError("must not be empty")
    return text


_Time = Annotated[float, BeforeValidator(_time)]
_OptionalTime = Annotated[Optional[float], BeforeValidator(_time)]  # None only when the key is absent
_Fps = Annotated[int, BeforeValidator(_no_bool("an integer")), Field(ge=1, le=120)]
_Seed = Annotated[int, BeforeValidator(_no_bool("an integer")), Field(ge=0, le=MAX_SEED)]
_Resolution = Annotated[Optional[tuple[int, int]], BeforeValidator(_resolution)]
_Text = Annotated[str, AfterValidator(_stripped_text)]
_Steps = Annotated[int, BeforeValidator(_no_bool("an integer")), Field(ge=1, le=50)]
_Shift = Annotated[float, BeforeValidator(_no_bool("a number")), Field(gt=0)]
Blend = Literal["linear", "slerp"]
"""How a prompt transition mixes the previous prompt's text conditioning into the new one's
(:func:`slotgen.engine.blend.blend_embeddings`)."""


_Memory = Annotated[SerializeAsAny[PolicyConfig], BeforeValidator(parse_memory_config)]
"""A memory section, validated by its policy's own config class (see :mod:`slotgen.memory.registry`)."""


# --------------------------------------------------------------------------------------------------
# Public models

class SamplerConfig(BaseModel):
    """Few-step sampler settings; a field left as None uses the model's default.

    Fields:
        steps: denoising steps per chunk, 1..50 (default None = the model's default).
        shift: flow-matching timestep shift, greater than 0 (default None = the model's default).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    steps: Optional[_Steps] = None
    shift: Optional[_Shift] = None


class PromptSpan(BaseModel):
    """One prompt and the absolute time span ``[start, end)`` (seconds) during which it is in force."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    start: float = Field(ge=0)
    end: float
    text: _Text
    transition: float = Field(default=0.0, ge=0, le=MAX_DURATION)  # seconds of blending in from the previous prompt
    blend: Blend = "linear"

    def transition_weight(self, t: float) -> float | None:
        """The new prompt's weight at time ``t`` (seconds) while its transition runs: ``(t - start) /
        transition`` in [0, 1); None once it is over (or when there is none): pure conditioning."""
        if self.transition <= 0 or t >= self.start + self.transition:
            return None
        return max(0.0, (t - self.start) / self.transition)

    @model_validator(mode="after")
    def _positive_length(self) -> PromptSpan:
        if self.end <= self.start:
            raise ValueError(
                f"a prompt must end after it starts; it spans {format_time(self.start)}"
                f"–{format_time(self.end)}"
            )
        return self


class Storyboard(BaseModel):
    """A validated storyboard: global settings plus prompts that tile ``[0, duration)`` exactly.

    Build one with :func:`parse_storyboard` or :func:`load_storyboard`; those remember the line of
    every key so that :meth:`error_at` can point at the source. Constructing the model directly
    validates the same invariants (without line information).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    title: Optional[str] = None
    duration: _Time = Field(gt=0, le=MAX_DURATION)
    fps: _Fps = 16
    resolution: _Resolution = None
    seed: _Seed = 0
    model: _Text = "miniature"
    sampler: Optional[SamplerConfig] = None
    memory: _Memory = Field(default_factory=default_memory)
    prompts: list[PromptSpan] = Field(min_length=1)

    _lines: dict[FieldPath, int] = PrivateAttr(default_factory=dict)
    _source_path: str = PrivateAttr(default="<storyboard>")

    @model_validator(mode="after")
    def _prompts_tile_the_video(self) -> Storyboard:
        if self.prompts[0].start != 0:
            raise ValueError(
                f"the first prompt must start at 0s, not {format_time(self.prompts[0].start)}"
            )
        for previous, current in zip(self.prompts, self.prompts[1:]):
            if current.start != previous.end:
                raise ValueError(
                    f"prompts must follow each other without gaps or overlaps; one ends at "
                    f"{format_time(previous.end)} but the next starts at {format_time(current.start)}"
                )
        if self.prompts[-1].end != self.duration:
            raise ValueError(
                f"the last prompt ends at {format_time(self.prompts[-1].end)}, but the storyboard "
                f"lasts {format_time(self.duration)}"
            )
        if self.prompts[0].transition > 0:
            raise ValueError("the first prompt cannot have a transition: there is no previous prompt to blend from")
        return self

    def __eq__(self, other: object) -> bool:
        """Storyboards are equal when their settings and prompts are; source lines are ignored."""
        if not isinstance(other, Storyboard):
            return NotImplemented
        return self.__dict__ == other.__dict__

    # -- source locations -------------------------------------------------------------------------

    @property
    def source_path(self) -> str:
        """The path used in error messages (the file name, or ``<storyboard>``)."""
        return self._source_path

    def line_of(self, *path: str | int) -> int | None:
        """1-based line where the value at ``path`` (e.g. ``"prompts", 1, "at"``) is written.

        Returns None when that key was not written in the source (defaults, overrides, or a
        storyboard that was not parsed from text).
        """
        return self._lines.get(tuple(path))

    def error_at(self, message: str, *path: str | int) -> StoryboardError:
        """A :class:`StoryboardError` about the value at ``path``, for the caller to raise.

        The message is prefixed with the field path (``resolution: ...``) and located at the line
        of ``path``, or of its nearest enclosing key that was written in the source.
        """
        return Problem(tuple(path), tuple(path), message).to_error(self._source_path, self._lines)

    # -- timeline ---------------------------------------------------------------------------------

    @property
    def total_frames(self) -> int:
        """Number of video frames: ``round(duration * fps)``, at least 1."""
        return max(1, round(self.duration * self.fps))

    def prompt_index_at(self, t: float) -> int:
        """Index of the prompt in force at time ``t`` seconds.

        That is the last prompt whose start is at or before ``t`` (with a 1e-9 s tolerance, so a
        time exactly at a switch belongs to the new prompt). Times before 0 give the first prompt,
        times past the end the last one. See the module docstring for how the engine uses this.
        """
        starts = [prompt.start for prompt in self.prompts]
        return max(0, bisect_right(starts, t + SWITCH_TOLERANCE) - 1)

    def conditioning_at(self, t: float) -> tuple[int, tuple[str, float, str] | None]:
        """The prompt in force at ``t`` (:meth:`prompt_index_at`) and, while its ``transition`` runs,
        ``(previous prompt's text, the new prompt's weight, blend)``; else None (pure conditioning).

        The engine asks this at each chunk's first frame, so the weight is fixed per chunk."""
        index = self.prompt_index_at(t)
        weight = self.prompts[index].transition_weight(t) if index else None
        if weight is None:
            return index, None
        return index, (self.prompts[index - 1].text, weight, self.prompts[index].blend)

    # -- checks needing the model -----------------------------------------------------------------

    def check_resolution(self, stride: int, default: tuple[int, int]) -> tuple[int, int]:
        """The ``(width, height)`` to render at: the storyboard's resolution or the model's default.

        Raises:
            StoryboardError: on the ``resolution`` line if a side is not a multiple of ``stride``;
                the message suggests the nearest valid size.
            ValueError: if ``stride`` is not positive (a programming error).
        """
        if stride < 1:
            raise ValueError(f"stride must be positive, got {stride}")
        width, height = self.resolution if self.resolution is not None else default
        if width % stride == 0 and height % stride == 0:
            return (width, height)
        nearest = [max(stride, (side + stride // 2) // stride * stride) for side in (width, height)]
        advice = f"is not divisible by {stride} (the model's stride); try {nearest[0]}x{nearest[1]}"
        if self.resolution is None:  # not the file's fault, so no line to point at
            message = f"resolution: the model's default {width}x{height} {advice}"
            raise StoryboardError(self._source_path, None, message)
        raise self.error_at(f"{width}x{height} {advice}", "resolution")

    # -- serialisation and overrides --------------------------------------------------------------

    def _yaml_data(self) -> dict[str, Any]:
        """The storyboard as YAML-shaped data (each prompt by its start; ends are implied)."""
        data: dict[str, Any] = {}
        if self.title is not None:
            data["title"] = self.title
        data["duration"] = self.duration
        data["fps"] = self.fps
        if self.resolution is not None:
            data["resolution"] = f"{self.resolution[0]}x{self.resolution[1]}"
        data["seed"] = self.seed
        data["model"] = self.model
        if self.sampler is not None:
            data["sampler"] = self.sampler.model_dump(exclude_none=True)
        if self.memory.model_fields_set:  # only the keys given: the rest comes from the preset (engine/presets.py)
            data["memory"] = {"policy": self.memory.policy,
                              **self.memory.model_dump(include=set(self.memory.model_fields_set) - {"policy"})}
        data["prompts"] = [_prompt_data(prompt) for prompt in self.prompts]
        return data

    def to_yaml(self) -> str:
        """YAML text that :func:`parse_storyboard` reads back to an equal storyboard."""
        return yaml.dump(
            self._yaml_data(),
            Dumper=_StoryboardDumper,
            sort_keys=False,
            allow_unicode=True,
            default_flow_style=False,
            width=4096,
        )

    def with_overrides(self, **fields: Any) -> Storyboard:
        """A revalidated copy with some top-level fields replaced (e.g. CLI ``--seed``/``--memory``).

        Values may be given as in YAML: ``duration="10s"``, ``resolution="128x128"``,
        ``memory={"policy": "window", "window": 8}``, ``sampler={"steps": 4}``; model instances
        (``SinkConfig``, ``SamplerConfig``, a list of ``PromptSpan``) work too. The storyboard's
        ``duration`` is kept unless overridden, so new prompts must end at it.

        Raises:
            StoryboardError: for an unknown field or a value that does not validate. Errors about
                overridden fields carry no line number (they did not come from the file).
        """
        data = self._yaml_data()
        for key, value in fields.items():
            data[key] = _override_as_data(key, value)
        # Drop the lines of overridden fields, and of the document itself, so that errors about
        # overridden values do not point at unrelated lines of the file.
        lines = {path: line for path, line in self._lines.items() if path and path[0] not in fields}
        return _build(data, lines, self._source_path)


class _StoryboardDumper(yaml.SafeDumper):
    """Safe dumper that double-quotes (and so escapes) text with line breaks or control characters.

    PyYAML would otherwise write some of them (e.g. U+0085) raw inside plain scalars, where they
    read back as line breaks.
    """

    def represent_str(self, data: str) -> yaml.ScalarNode:
        if all(char.isprintable() for char in data):
            return super().represent_str(data)
        return self.represent_scalar("tag:yaml.org,2002:str", data, style='"')


_StoryboardDumper.add_representer(str, _StoryboardDumper.represent_str)


def _prompt_data(prompt: PromptSpan, until: bool = False) -> dict[str, Any]:
    """One prompt as YAML-shaped data; ``transition``/``blend`` only when they differ from the defaults."""
    data: dict[str, Any] = {"at": prompt.start}
    if until:
        data["until"] = prompt.end
    data["prompt"] = prompt.text
    if prompt.transition > 0:
        data["transition"] = prompt.transition
        if prompt.blend != "linear":
            data["blend"] = prompt.blend
    return data


def _override_as_data(key: str, value: Any) -> Any:
    """Turn an override value into the YAML-shaped data the schema expects."""
    if key == "prompts" and isinstance(value, (list, tuple)):
        return [_prompt_data(item, until=True) if isinstance(item, PromptSpan) else item for item in value]
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    return value


# --------------------------------------------------------------------------------------------------
# The YAML schema, as written by users (before prompt times are resolved)

class _RawPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: _Text
    at: _OptionalTime = None
    until: _OptionalTime = None
    duration: _OptionalTime = None
    transition: _OptionalTime = None
    blend: Optional[Blend] = None


class _RawStoryboard(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    title: Optional[str] = None
    duration: _OptionalTime = None
    fps: _Fps = 16
    resolution: _Resolution = None
    seed: _Seed = 0
    model: _Text = "miniature"
    sampler: Optional[SamplerConfig] = None
    memory: Any = None  # validated separately, to map the discriminated union's errors
    prompts: list[_RawPrompt] = Field(min_length=1)


def expected_keys(parent: FieldPath, data: Any) -> list[str]:
    """Keys allowed in the mapping at ``parent``, for "unknown key" messages."""
    if parent == ():
        return list(_RawStoryboard.model_fields)
    if len(parent) == 2 and parent[0] == "prompts":
        return list(_RawPrompt.model_fields)
    if parent == ("sampler",):
        return list(SamplerConfig.model_fields)
    if parent == ("memory",) and isinstance(data, dict) and isinstance(data.get("memory"), dict):
        policy = data["memory"].get("policy")
        config_type = config_classes().get(policy) if isinstance(policy, str) else None
        if config_type is not None:
            return list(config_type.model_fields)
    return []


def _memory_problems(value: Any) -> tuple[PolicyConfig, list[Problem]]:
    """Validate the ``memory`` block with its policy's config, wording unknown-policy errors for users."""
    if value is None:
        return default_memory(), []
    try:
        return parse_memory_config(value), []
    except UnknownPolicyError as exc:
        names = policy_names()
        policies = ", ".join(names)
        if exc.policy is None:
            known = list(dict.fromkeys(k for cls in config_classes().values() for k in cls.model_fields))
            unknown = [key for key in value if key not in known]
            if unknown:  # most likely a misspelt 'policy'
                message = unknown_key_message(str(unknown[0]), known)
                return default_memory(), [Problem(("memory", unknown[0]), ("memory",), message)]
            problem = Problem(
                ("memory",),
                ("memory",),
                f"missing required key 'policy'; expected one of: {policies}",
                rank=1,
            )
            return default_memory(), [problem]
        message = f"unknown memory policy {describe(exc.policy)}; expected one of: {policies}"
        close = difflib.get_close_matches(str(exc.policy), names, 1)
        if close:
            message += f" (did you mean '{close[0]}'?)"
        return default_memory(), [Problem(("memory", "policy"), ("memory", "policy"), message)]
    except ValidationError as exc:
        return default_memory(), problems_from(exc, ("memory",), {"memory": value}, expected_keys)


# --------------------------------------------------------------------------------------------------
# Validation and entry points

def _build(data: dict[str, Any], lines: dict[FieldPath, int], source: str) -> Storyboard:
    """Validate YAML-shaped data into a Storyboard, reporting the first problem by line."""

    def fail(path: FieldPath, message: str) -> StoryboardError:
        return Problem(path, path, message).to_error(source, lines)

    problems: list[Problem] = []
    raw: _RawStoryboard | None = None
    try:
        raw = _RawStoryboard.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from(exc, (), data, expected_keys))
    memory, memory_problems = _memory_problems(data.get("memory"))
    problems.extend(memory_problems)
    if problems:
        # A missing key is reported at its parent's line, which tends to come first; a misspelt
        # key elsewhere usually explains it, so prefer problems at the keys actually written.
        first = min(problems, key=lambda problem: (problem.rank, problem.line(lines) or 0))
        raise first.to_error(source, lines)
    assert raw is not None
    duration, spans = Timeline(raw, fail).resolve()
    if round(duration * raw.fps) < 1:  # the README's rule: a video has round(duration × fps) frames
        raise fail(("duration",), f"{format_time(duration)} at {raw.fps} fps is {duration * raw.fps:.2f} frames, which "
                                  f"rounds to 0 (a video has round(duration × fps) frames); make it longer than "
                                  f"{format_time(0.5 / raw.fps)}")
    for index, item in enumerate(raw.prompts):
        where = ("prompts", index)
        if item.transition is not None and item.transition < 0:
            raise fail(where + ("transition",), f"must be 0s or longer, got {format_time(item.transition)}")
        if item.transition is not None and item.transition > MAX_DURATION:
            raise fail(where + ("transition",), f"must be at most {format_time(MAX_DURATION)}, got "
                                                f"{format_time(item.transition)}")
        if index == 0 and item.transition:
            raise fail(where + ("transition",), "the first prompt cannot have a transition: there is no previous "
                                                "prompt to blend from")
        if item.blend is not None and not item.transition:
            raise fail(where + ("blend",), "'blend' needs a 'transition' longer than 0s on the same prompt")
    prompts = [PromptSpan(start=start, end=end, text=text, transition=item.transition or 0.0,
                          blend=item.blend or "linear")
               for (start, end, text), item in zip(spans, raw.prompts)]
    try:
        storyboard = Storyboard(
            title=raw.title,
            duration=duration,
            fps=raw.fps,
            resolution=raw.resolution,
            seed=raw.seed,
            model=raw.model,
            sampler=raw.sampler,
            memory=memory,
            prompts=prompts,
        )
    except ValidationError as exc:  # the timeline was already checked; kept as a safety net
        raise problems_from(exc, (), data, expected_keys)[0].to_error(source, lines) from None
    storyboard._lines = dict(lines)
    storyboard._source_path = source
    return storyboard


def parse_storyboard(text: str, path: str = "<storyboard>") -> Storyboard:
    """Parse and validate storyboard YAML text.

    Args:
        text: the YAML document.
        path: the name used in error messages (normally the file's path).

    Raises:
        StoryboardError: ``path:LINE: ...`` for any problem in the text; no other exception.
    """
    source = str(path)
    try:
        data, lines = read_yaml(text, source)
    except RecursionError:
        raise StoryboardError(source, None, "the storyboard is nested too deeply to read") from None
    return _build(data, lines, source)


def load_storyboard(path: str | os.PathLike[str]) -> Storyboard:
    """Read a UTF-8 storyboard file and validate it (see :func:`parse_storyboard`).

    Raises:
        StoryboardError: for a missing, unreadable or non-UTF-8 file (without a line number), or
            any problem in its contents.
    """
    source = os.fspath(path)
    file = Path(source)
    try:
        raw_bytes = file.read_bytes()
    except FileNotFoundError:
        raise StoryboardError(source, None, "storyboard file not found") from None
    except IsADirectoryError:
        raise StoryboardError(source, None, "is a directory; expected a storyboard YAML file") from None
    except PermissionError:
        raise StoryboardError(source, None, "cannot read the storyboard: permission denied") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StoryboardError(source, None, single_line(f"cannot read the storyboard: {reason}")) from None
    try:
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw_bytes.count(b"\n", 0, exc.start) + 1
        raise StoryboardError(
            source,
            None,
            f"is not UTF-8 text (byte 0x{raw_bytes[exc.start]:02x} on line {line}); save it as UTF-8",
        ) from None
    return parse_storyboard(text, source)


__all__ = ["Blend", "MAX_SEED", "SWITCH_TOLERANCE", "PromptSpan", "SamplerConfig", "Storyboard", "load_storyboard",
           "parse_storyboard"]
