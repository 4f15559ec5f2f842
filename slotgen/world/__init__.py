"""A synthetic shape world with ground truth, for benchmarking identity persistence.

* :mod:`slotgen.world.scene` — palette, hidden traits, scripted episodes, renderer with ground truth,
  and :func:`exit_return_episode`, the benchmark's standard leave-and-return episode;
* :mod:`slotgen.world.grammar` — captions in the miniature's vocabulary and storyboard YAML;
* :mod:`slotgen.world.analyse` — detection from pixels, identity recall, leakage, prompt compliance,
  duplicates/vanishings, a flicker proxy, and bootstrap intervals.

docs/WORLD.md describes the world and defines every metric.
"""

from __future__ import annotations

from slotgen.world.analyse import (
    BootstrapResult,
    Detection,
    EpisodeReport,
    ReturnEvent,
    aggregate,
    analyse_episode,
    bootstrap_ci,
    detect_entities,
    paired_bootstrap,
)
from slotgen.world.grammar import (
    GRAMMAR_WORDS,
    PromptCue,
    episode_prompts,
    episode_to_storyboard_yaml,
    segment_caption,
    unknown_words,
)
from slotgen.world.scene import (
    BACKGROUND_COLOURS,
    DEFAULT_WORLD,
    ENTITY_COLOURS,
    MARKING_COLOURS,
    PALETTE,
    Entity,
    Episode,
    GroundTruth,
    RenderedEpisode,
    Segment,
    Trajectory,
    Traits,
    WorldConfig,
    compute_trajectory,
    draw_traits,
    exit_return_episode,
    render_episode,
    with_entity_traits,
)

__all__ = [
    "BACKGROUND_COLOURS",
    "BootstrapResult",
    "DEFAULT_WORLD",
    "Detection",
    "ENTITY_COLOURS",
    "Entity",
    "Episode",
    "EpisodeReport",
    "GRAMMAR_WORDS",
    "GroundTruth",
    "MARKING_COLOURS",
    "PALETTE",
    "PromptCue",
    "RenderedEpisode",
    "ReturnEvent",
    "Segment",
    "Trajectory",
    "Traits",
    "WorldConfig",
    "aggregate",
    "analyse_episode",
    "bootstrap_ci",
    "compute_trajectory",
    "detect_entities",
    "draw_traits",
    "episode_prompts",
    "episode_to_storyboard_yaml",
    "exit_return_episode",
    "paired_bootstrap",
    "render_episode",
    "segment_caption",
    "unknown_words",
    "with_entity_traits",
]
