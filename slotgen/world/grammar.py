"""Caption grammar of the shape world, and episodes as slotgen storyboards.

Every segment of an :class:`~slotgen.world.scene.Episode` gets one caption. Captions use only words
of the miniature's vocabulary (:data:`slotgen.models.miniature.VOCABULARY`); :data:`GRAMMAR_WORDS`
lists every word this grammar can produce. Hidden traits (size, marking) are never named.

Grammar (EBNF; ``|`` separates alternatives)::

    caption  = clause { " and " clause } " on a " BG " background"
             | "a " BG " background"                   (* wait, nobody on stage *)
    clause   = det " " COLOUR " " SHAPE " " verb
    det      = "a" | "another"                         (* "another": kind already named in the caption *)
    verb     = "enters from the " SIDE                 (* enter *)
             | "moves " DIR                            (* move *)
             | "stays"                                 (* stay; and every on-stage bystander *)
             | "leaves the frame to the " SIDE         (* leave *)
             | "returns from the " SIDE                (* return *)
    SIDE     = "left" | "right" | "top" | "bottom"
    DIR      = "left" | "right" | "up" | "down"
    COLOUR   = "red" | "green" | "yellow" | "purple"
    SHAPE    = "circle" | "square" | "triangle" | "star"
    BG       = "blue" | "black" | "gray" | "white"

In a world whose config has ``name_lanes``, every clause ends with ``" in the " LANE " lane"`` (LANE =
"top" | "middle" | "bottom"); with ``introduce_traits``, the actor's clause of an ``enter`` segment (an
entity's first appearance) names its hidden traits, ``det SIZE COLOUR SHAPE [" with a " MCOLOUR " "
MARKING] verb`` ("a large red circle with a cyan dot enters from the left in the top lane"), and no other
clause ever does. The standard world does neither.

The first clause is the segment's actor; then every other entity on stage (not fully off the canvas),
in id order, with "stays". A ``wait`` segment has no actor, so its clauses are the bystanders only.
Examples: "a red circle enters from the left on a blue background", "a red circle returns from the
right and another red circle stays on a gray background", "a white background".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import yaml

from slotgen.world.scene import (
    BACKGROUND_COLOURS,
    ENTITY_COLOURS,
    MARKING_COLOURS,
    MARKINGS,
    SHAPES,
    SIZES,
    Direction,
    Episode,
    lane_name,
)

_SIDE_WORD: dict[str, str] = {"left": "left", "right": "right", "up": "top", "down": "bottom"}

GRAMMAR_WORDS: frozenset[str] = frozenset(
    "a another and on the from to frame background enters moves stays leaves returns".split()
    + ["left", "right", "up", "down", "top", "bottom"]
    + list(ENTITY_COLOURS) + list(SHAPES) + list(BACKGROUND_COLOURS)
    + ["in", "lane", "middle", "with"] + list(SIZES) + [m for m in MARKINGS if m != "none"] + list(MARKING_COLOURS)
)
"""Every word a caption can contain (the second line only in worlds that name lanes or introduce traits)."""


def _verb(action: str, direction: Optional[Direction]) -> str:
    if action == "enter":
        return f"enters from the {_SIDE_WORD[direction]}"  # type: ignore[index]
    if action == "move":
        return f"moves {direction}"
    if action == "stay":
        return "stays"
    if action == "leave":
        return f"leaves the frame to the {_SIDE_WORD[direction]}"  # type: ignore[index]
    if action == "return":
        return f"returns from the {_SIDE_WORD[direction]}"  # type: ignore[index]
    raise ValueError(f"no verb for action {action!r}")


def segment_caption(episode: Episode, index: int) -> str:
    """The caption of segment ``index`` (see the module docstring for the grammar)."""
    segment = episode.segments[index]
    start = episode.segment_starts[index]
    outside = episode.trajectory.outside[start]  # (E,) bystanders keep still, so one frame tells
    config = episode.config
    clauses: list[tuple[int, str]] = []
    if segment.entity is not None:
        clauses.append((segment.entity, _verb(segment.action, segment.direction)))
    clauses += [(k, "stays") for k in range(len(episode.entities)) if k != segment.entity and not outside[k]]
    if not clauses:
        return f"a {episode.background} background"
    introducing = config.introduce_traits and segment.action == "enter"  # the actor's first entrance
    named: set[tuple[str, str]] = set()
    parts: list[str] = []
    for k, verb in clauses:
        entity = episode.entities[k]
        det = "another" if entity.kind in named else "a"
        named.add(entity.kind)
        words = [det]
        if introducing and k == segment.entity:
            words.append(entity.traits.size)
        words += [entity.colour, entity.shape]
        if introducing and k == segment.entity and entity.traits.marking != "none":
            words.append(f"with a {entity.traits.marking_colour} {entity.traits.marking}")
        words.append(verb)
        if config.name_lanes:
            words.append(f"in the {lane_name(config, entity.home[1])} lane")
        parts.append(" ".join(words))
    return f"{' and '.join(parts)} on a {episode.background} background"


class PromptCue(NamedTuple):
    """A caption in force over frames ``[start, end)``."""

    start: int
    end: int
    text: str


def episode_prompts(episode: Episode) -> list[PromptCue]:
    """The episode's captions over frames; consecutive segments with the same caption are merged, so
    every cue boundary is a prompt switch."""
    cues: list[PromptCue] = []
    starts = episode.segment_starts
    for index in range(len(episode.segments)):
        text = segment_caption(episode, index)
        if cues and cues[-1].text == text:
            cues[-1] = cues[-1]._replace(end=starts[index + 1])
        else:
            cues.append(PromptCue(starts[index], starts[index + 1], text))
    return cues


def caption_words(text: str) -> list[str]:
    """Words as the miniature's tokenizer sees them (lower-cased, split on spaces and punctuation)."""
    return re.findall(r"[^\W_]+", text.lower())


def unknown_words(text: str, vocabulary: Optional[frozenset[str] | set[str] | list[str]] = None) -> list[str]:
    """Words of ``text`` outside ``vocabulary`` (default: the miniature's), in order of appearance."""
    if vocabulary is None:
        from slotgen.models.miniature import VOCABULARY  # imports torch: only when asked

        vocabulary = VOCABULARY
    known = set(vocabulary)
    return [word for word in caption_words(text) if word not in known]


def episode_to_storyboard_yaml(
    episode: Episode,
    fps: Optional[int] = None,
    seed: Optional[int] = None,
    memory: Union[Mapping[str, Any], Any, None] = None,
    *,
    title: Optional[str] = None,
) -> str:
    """A slotgen storyboard (YAML text) that prompts the episode's captions at its frame times.

    Cue ``[start, end)`` frames become ``at: start / fps`` seconds; ``duration`` is
    ``total_frames / fps``, so the storyboard's ``total_frames`` equals the episode's. Note the engine
    switches prompts only at chunk boundaries (see :mod:`slotgen.storyboard`); a switch inside a chunk
    takes effect at the next one.

    Args:
        episode: the script.
        fps: frames per second (default: the episode's ``config.fps``).
        seed: the storyboard's generation seed (default: the episode's seed, or 0).
        memory: a ``memory:`` section — a mapping such as ``{"policy": "slot"}`` or a memory config
            model; validated with :func:`slotgen.memory.registry.parse_memory_config`. None leaves it
            out (the storyboard default).
        title: the storyboard title (default: ``"world episode, seed N"``).

    Returns:
        YAML text accepted by :func:`slotgen.storyboard.parse_storyboard`.
    """
    fps = episode.config.fps if fps is None else fps
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    if seed is None:
        seed = episode.seed if episode.seed is not None else 0
    data: dict[str, Any] = {
        "title": title if title is not None else f"world episode, seed {episode.seed}",
        "duration": _seconds(episode.total_frames, fps),
        "fps": fps,
        "resolution": f"{episode.config.width}x{episode.config.height}",
        "seed": int(seed),
    }
    if memory is not None:
        from slotgen.memory.registry import parse_memory_config

        data["memory"] = parse_memory_config(memory).model_dump()
    data["prompts"] = [{"at": _seconds(cue.start, fps), "prompt": cue.text} for cue in episode_prompts(episode)]
    header = "# Generated by slotgen.world.grammar from a shape-world episode; hidden traits are not in the prompts.\n"
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _seconds(frames: int, fps: int) -> Union[int, float]:
    """``frames / fps`` as a YAML-friendly number (an int when whole)."""
    value = frames / fps
    return int(value) if value.is_integer() else value


__all__ = [
    "GRAMMAR_WORDS",
    "PromptCue",
    "caption_words",
    "episode_prompts",
    "episode_to_storyboard_yaml",
    "segment_caption",
    "unknown_words",
]
