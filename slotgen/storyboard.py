"""Storyboards: a YAML file of timed prompts, validated into a :class:`Storyboard`.

Format (every key except ``prompts`` is optional)::

    title: Shapes on the move
    duration: 8s            # total length; derived from the last prompt if omitted
    fps: 16                 # 1..120
    resolution: "64x64"     # WIDTHxHEIGHT or [width, height]; omitted = the model's default
    seed: 0
    model: miniature        # a model name or a local checkpoint path
    sampler: {steps: 4, shift: 5.0}    # either key may be omitted = the model's default
    memory: {policy: sink, sink: 3, window: 9}   # see slotgen.memory
    prompts:
      - prompt: a red circle moves left on a blue background      # starts at 0
      - at: 3s
        prompt: a green square enters from the right
        duration: 2.5s      # or `until: 5.5s`; neither = until the next prompt's `at`
      - at: 5.5s
        prompt: a yellow star moves up on a white background      # runs to `duration`

Times are seconds or strings like ``"12.5s"``, ``"1m30s"``, ``"2m"``, ``"1:30"`` and ``"0:01:30.5"``
(see :mod:`slotgen.timeparse`). The prompts must cover the whole video exactly once: the first one
starts at 0, each one ends where the next one starts, and the last one ends at ``duration``.

Prompt switching rule
---------------------
Video is generated in chunks of frames, and a chunk is conditioned on a single prompt. The engine
asks :meth:`Storyboard.prompt_index_at` for the time of each chunk's *first* frame
(``frame_index / fps``). So a prompt switch takes effect at the first chunk whose first frame is at
or after the switch time; a switch that falls inside a chunk is delayed to the next chunk boundary.
A frame exactly at the switch time (within 1e-9 s) already belongs to the new prompt.

Errors
------
Every problem in the user's file raises :class:`~slotgen.errors.StoryboardError`, formatted
``path:LINE: field: what was expected`` on a single line. Line numbers come from the composed YAML
nodes, so pydantic's error locations (``("prompts", 1, "at")``) are mapped back to the line where
that key was written. :meth:`Storyboard.error_at` lets later checks (for example the model's
resolution stride) report errors in the same way.
"""

from __future__ import annotations

import difflib
import os
import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, NamedTuple, Optional, Union

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
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from slotgen.errors import StoryboardError
from slotgen.memory.base import PolicyConfig
from slotgen.memory.registry import (
    UnknownPolicyError,
    config_classes,
    default_memory,
    parse_memory_config,
    policy_names,
)
from slotgen.timeparse import format_time, parse_time

FieldPath = tuple[Union[str, int], ...]
"""Location of a value in the storyboard, e.g. ``("prompts", 1, "at")`` or ``("resolution",)``."""

MAX_DURATION = 24 * 3600.0
"""Longest accepted storyboard, in seconds (a guard against typos such as ``duration: 80000m``)."""

MAX_SEED = 2**63 - 1
"""Largest accepted seed (it must fit a signed 64-bit integer for the random generators)."""

TIMELINE_TOLERANCE = 1e-6
"""Seconds within which two prompt boundaries count as the same time (absorbs float rounding)."""

SWITCH_TOLERANCE = 1e-9
"""Seconds of slack in :meth:`Storyboard.prompt_index_at`, so a frame at a switch gets the new prompt."""

_MAX_NESTING = 32


# --------------------------------------------------------------------------------------------------
# Message helpers


def _describe(value: object) -> str:
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


def _quote(key: str) -> str:
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


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "invalid storyboard"


def _unknown_key_message(key: str, expected: Sequence[str]) -> str:
    message = f"unknown key {_quote(key)}"
    if expected:
        message += f"; expected one of: {', '.join(expected)}"
        close = difflib.get_close_matches(key.lower(), list(expected), n=1, cutoff=0.6)
        if close:
            message += f" (did you mean '{close[0]}'?)"
    return message


# --------------------------------------------------------------------------------------------------
# Field types shared by the YAML schema and the public models


def _no_bool(expected: str) -> Callable[[Any], Any]:
    """Before-validator refusing booleans, which pydantic would otherwise read as 0/1."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {expected}, got {_describe(value)}")
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
        raise ValueError(f"expected {_RESOLUTION_FORMS}, got {_describe(value)}")
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
        return _Problem(tuple(path), tuple(path), message).to_error(self._source_path, self._lines)

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
        data["memory"] = self.memory.model_dump()
        data["prompts"] = [{"at": prompt.start, "prompt": prompt.text} for prompt in self.prompts]
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


def _override_as_data(key: str, value: Any) -> Any:
    """Turn an override value into the YAML-shaped data the schema expects."""
    if key == "prompts" and isinstance(value, (list, tuple)):
        return [
            {"at": item.start, "until": item.end, "prompt": item.text}
            if isinstance(item, PromptSpan)
            else item
            for item in value
        ]
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


def _expected_keys(parent: FieldPath, data: Any) -> list[str]:
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


# --------------------------------------------------------------------------------------------------
# Problems and their conversion to StoryboardError


class _Problem(NamedTuple):
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
        return StoryboardError(source, self.line(lines), _one_line(message))


_INT_ERRORS = {"int_type", "int_parsing", "int_from_float", "int_parsing_size"}
_FLOAT_ERRORS = {"float_type", "float_parsing"}
_STRING_ERRORS = {"string_type", "string_unicode", "string_sub_type"}
_LIST_ERRORS = {"list_type", "tuple_type", "iterable_type"}
_MAPPING_ERRORS = {"model_type", "model_attributes_type", "dict_type"}


def _error_message(error: dict[str, Any], path: FieldPath) -> str:
    """Human wording for one pydantic error (other than missing and extra keys)."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = _describe(error.get("input"))
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


def _problems_from(
    exc: ValidationError,
    prefix: FieldPath,
    data: Any,
) -> list[_Problem]:
    """Translate a pydantic ValidationError (raised for the value at ``prefix``) into problems."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = prefix + tuple(error["loc"])
        kind = error["type"]
        if kind == "missing" and loc:
            problems.append(_Problem(loc[:-1], loc[:-1], f"missing required key '{loc[-1]}'", rank=1))
        elif kind == "extra_forbidden" and loc:
            key = str(loc[-1])
            expected = _expected_keys(loc[:-1], data)
            problems.append(_Problem(loc, loc[:-1], _unknown_key_message(key, expected)))
        else:
            problems.append(_Problem(loc, loc, _error_message(error, loc)))
    return problems


def _memory_problems(value: Any) -> tuple[PolicyConfig, list[_Problem]]:
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
                message = _unknown_key_message(str(unknown[0]), known)
                return default_memory(), [_Problem(("memory", unknown[0]), ("memory",), message)]
            problem = _Problem(
                ("memory",),
                ("memory",),
                f"missing required key 'policy'; expected one of: {policies}",
                rank=1,
            )
            return default_memory(), [problem]
        message = f"unknown memory policy {_describe(exc.policy)}; expected one of: {policies}"
        close = difflib.get_close_matches(str(exc.policy), names, 1)
        if close:
            message += f" (did you mean '{close[0]}'?)"
        return default_memory(), [_Problem(("memory", "policy"), ("memory", "policy"), message)]
    except ValidationError as exc:
        return default_memory(), _problems_from(exc, ("memory",), {"memory": value})


# --------------------------------------------------------------------------------------------------
# YAML text -> plain data plus a line for every key


class _AliasUsed(Exception):
    def __init__(self, mark: yaml.Mark):
        super().__init__("alias")
        self.mark = mark


class _StoryboardLoader(yaml.SafeLoader):
    """Safe loader that refuses aliases (``*name``) while composing, at the alias' own line."""

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            raise _AliasUsed(self.peek_event().start_mark)
        return super().compose_node(parent, index)


_TAG = "tag:yaml.org,2002:"
_CONSTRUCTED_TAGS = {_TAG + name for name in ("str", "int", "float", "bool", "null")}
_VERBATIM_TAGS = {_TAG + "timestamp", _TAG + "value"}  # kept as the text the user wrote


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


def _is_text_field(path: FieldPath) -> bool:
    """Fields whose plain YAML scalars are read as written (``title: 1984``, ``prompt: yes``).

    ``resolution`` is included so that ``resolution: 0x40`` is not read as a hexadecimal number.
    """
    return path in (("title",), ("model",), ("resolution",)) or (
        len(path) == 3 and path[0] == "prompts" and path[2] == "prompt"
    )


def _compose(text: str, source: str) -> Node | None:
    """Parse YAML text into a node tree, turning every YAML problem into a StoryboardError."""
    try:
        return yaml.compose(text, Loader=_StoryboardLoader)
    except _AliasUsed as exc:
        raise StoryboardError(
            source,
            exc.mark.line + 1,
            "YAML aliases (*name) are not supported; write the value out in full",
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(0, exc.position)) + 1
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        raise StoryboardError(
            source, line, f"invalid YAML: control character U+{code:04X} is not allowed; remove it"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "cannot parse"
        if exc.problem and exc.context:
            context = exc.context
            if exc.context_mark and mark and exc.context_mark.line != mark.line:
                context += f" (line {exc.context_mark.line + 1})"
            message = f"{context}, {exc.problem}"
        if "<block end>" in message or "<block mapping start>" in message:
            message += "; check the indentation"
        raise StoryboardError(
            source, mark.line + 1 if mark else None, _one_line(f"invalid YAML: {message}")
        ) from None
    except yaml.YAMLError as exc:
        raise StoryboardError(source, None, _one_line(f"invalid YAML: {exc}")) from None


class _NodeReader:
    """Converts composed YAML nodes to plain data, recording the line of every key and item."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[FieldPath, int] = {}
        self._constructor = yaml.constructor.SafeConstructor()

    def fail(self, node: Node, path: FieldPath, message: str) -> StoryboardError:
        prefix = format_field_path(path)
        text = f"{prefix}: {message}" if prefix else message
        return StoryboardError(self.source, node.start_mark.line + 1, _one_line(text))

    def read(self, node: Node, path: FieldPath) -> Any:
        if len(path) > _MAX_NESTING:
            raise self.fail(node, path, "nested too deeply")
        if isinstance(node, MappingNode):
            self._check_tag(node, path, _TAG + "map")
            return self._read_mapping(node, path)
        if isinstance(node, SequenceNode):
            self._check_tag(node, path, _TAG + "seq")
            items = []
            for index, item in enumerate(node.value):
                self.lines[path + (index,)] = item.start_mark.line + 1
                items.append(self.read(item, path + (index,)))
            return items
        return self._read_scalar(node, path)

    def _check_tag(self, node: Node, path: FieldPath, *allowed: str) -> None:
        if node.tag not in allowed:
            raise self.fail(
                node,
                path,
                f"YAML tag '{_short_tag(node.tag)}' is not supported; "
                "use plain text, numbers, lists and mappings",
            )

    def _read_mapping(self, node: MappingNode, path: FieldPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                raise self.fail(
                    key_node,
                    path,
                    "YAML merge keys ('<<') are not supported; write the keys out in full",
                )
            if not isinstance(key_node, ScalarNode):
                raise self.fail(key_node, path, "keys must be plain names, not lists or mappings")
            self._check_tag(key_node, path, *_CONSTRUCTED_TAGS, *_VERBATIM_TAGS)
            key = key_node.value
            child = path + (key,)
            if key in result:
                raise self.fail(
                    key_node,
                    path,
                    f"duplicate key {_quote(key)} (already given on line {self.lines[child]})",
                )
            self.lines[child] = key_node.start_mark.line + 1
            result[key] = self.read(value_node, child)
        return result

    def _read_scalar(self, node: ScalarNode, path: FieldPath) -> Any:
        self._check_tag(node, path, *_CONSTRUCTED_TAGS, *_VERBATIM_TAGS)
        if node.tag in _VERBATIM_TAGS:
            return node.value
        try:
            value = self._constructor.construct_object(node)
        except (ValueError, KeyError, IndexError, TypeError, OverflowError, yaml.YAMLError):
            raise self.fail(
                node, path, f"cannot read {_describe(node.value)} as '{_short_tag(node.tag)}'"
            ) from None
        if _is_text_field(path) and isinstance(value, (bool, int, float)) and node.style is None:
            return node.value
        return value


def _read_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[FieldPath, int]]:
    """YAML text -> (top-level mapping, line of every key path)."""
    root = _compose(text, source)
    if root is None:
        raise StoryboardError(
            source, 1, "the storyboard is empty; expected keys such as 'duration' and 'prompts'"
        )
    reader = _NodeReader(source)
    reader.lines[()] = root.start_mark.line + 1
    data = reader.read(root, ())
    if not isinstance(data, dict):
        raise StoryboardError(
            source,
            root.start_mark.line + 1,
            f"the top level must be a mapping of keys such as 'duration' and 'prompts', "
            f"got {_describe(data)}",
        )
    return data, reader.lines


# --------------------------------------------------------------------------------------------------
# Validation: schema, then the prompt timeline


class _Timeline:
    """Resolves ``at``/``until``/``duration`` into contiguous absolute spans, or fails with a problem."""

    def __init__(self, raw: _RawStoryboard, fail: Callable[[FieldPath, str], StoryboardError]):
        self.raw = raw
        self.fail = fail

    def resolve(self) -> tuple[float, list[PromptSpan]]:
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
        spans = [
            PromptSpan(start=start, end=end, text=item.prompt)
            for start, end, item in zip(starts, ends, raw.prompts)
        ]
        return duration, spans

    def _start(self, index: int, item: _RawPrompt) -> float:
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


def _build(data: dict[str, Any], lines: dict[FieldPath, int], source: str) -> Storyboard:
    """Validate YAML-shaped data into a Storyboard, reporting the first problem by line."""

    def fail(path: FieldPath, message: str) -> StoryboardError:
        return _Problem(path, path, message).to_error(source, lines)

    problems: list[_Problem] = []
    raw: _RawStoryboard | None = None
    try:
        raw = _RawStoryboard.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems_from(exc, (), data))
    memory, memory_problems = _memory_problems(data.get("memory"))
    problems.extend(memory_problems)
    if problems:
        # A missing key is reported at its parent's line, which tends to come first; a misspelt
        # key elsewhere usually explains it, so prefer problems at the keys actually written.
        first = min(problems, key=lambda problem: (problem.rank, problem.line(lines) or 0))
        raise first.to_error(source, lines)
    assert raw is not None
    duration, prompts = _Timeline(raw, fail).resolve()
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
        raise _problems_from(exc, (), data)[0].to_error(source, lines) from None
    storyboard._lines = dict(lines)
    storyboard._source_path = source
    return storyboard


# --------------------------------------------------------------------------------------------------
# Public entry points


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
        data, lines = _read_yaml(text, source)
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
        raise StoryboardError(source, None, _one_line(f"cannot read the storyboard: {reason}")) from None
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


__all__ = [
    "FieldPath",
    "MAX_DURATION",
    "MAX_SEED",
    "PromptSpan",
    "SamplerConfig",
    "Storyboard",
    "format_field_path",
    "load_storyboard",
    "parse_storyboard",
]
