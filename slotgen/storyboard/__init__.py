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
        transition: 1s      # optional: blend in from the previous prompt over 1 s
        blend: slerp        # linear (default) or slerp; see Storyboard.conditioning_at

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

Modules: :mod:`.schema` (the models, validation, :func:`parse_storyboard`), :mod:`.yaml_source` (YAML
text to data and lines), :mod:`.timeline` (prompt times to spans), :mod:`.messages` (error wording).
"""

from __future__ import annotations

from slotgen.storyboard.messages import FieldPath, format_field_path
from slotgen.storyboard.schema import (
    MAX_SEED,
    SWITCH_TOLERANCE,
    PromptSpan,
    SamplerConfig,
    Storyboard,
    load_storyboard,
    parse_storyboard,
)
from slotgen.storyboard.timeline import MAX_DURATION, TIMELINE_TOLERANCE

__all__ = [
    "FieldPath",
    "MAX_DURATION",
    "MAX_SEED",
    "PromptSpan",
    "SWITCH_TOLERANCE",
    "SamplerConfig",
    "Storyboard",
    "TIMELINE_TOLERANCE",
    "format_field_path",
    "load_storyboard",
    "parse_storyboard",
]
