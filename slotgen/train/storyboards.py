"""Write the example storyboards in ``storyboards/`` from shape-world scripts (vocabulary words only).

``python scripts/write_storyboards.py [--out storyboards]`` (:func:`write_all`) writes:

* ``exit_return.yaml`` – one entity enters, moves, leaves, is away for 72 frames (2× the local
  window of 36 video frames) and returns (slot memory);
* ``similar_pair.yaml`` – two entities of the same kind with different hidden traits; one leaves and
  returns (the attribute-leakage case);
* ``prompt_switches.yaml`` – three entities, every action a prompt switch (8 prompts in 7.3 s);
* ``long_story.yaml`` – a ≥ 5-minute story: three entities (two of the same kind) take turns moving,
  leaving for 1–12 s and returning, with a prompt switch at every action.

and in ``sprites/`` (:func:`write_sprites`), for a model trained on the sprite world
(``slotgen train-miniature --world sprites``; its captions use that world's words):

* ``sprites/demo.yaml`` – a sprite enters (its caption names side, row, colour, shape and dot), crosses,
  leaves, is away for 27 frames (3× the benchmark's 9-frame window) and returns; its dot is named only at
  the entrance, so only memory (slot) can bring it back; every chunk is a prompt switch.

Shape-world captions come from :mod:`slotgen.world.grammar`, so every word is in the miniature's vocabulary, and
every switch falls on a chunk boundary (segment lengths 21, then multiples of 12 frames).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slotgen.world import exit_return_episode
from slotgen.world.grammar import episode_to_storyboard_yaml, unknown_words, episode_prompts
from slotgen.world.scene import (DEFAULT_WORLD, Entity, Episode, Segment, Traits, lane_rows)


def long_story_episode(seed: int = 11, min_frames: int = 5 * 60 * 16 + 16) -> Episode:
    """Three entities (entity 1 has entity 0's kind, other traits) take turns: move, leave, wait, return."""
    rng = np.random.default_rng(seed)
    cfg = DEFAULT_WORLD
    rows = lane_rows(cfg)
    entities = (
        Entity("circle", "red", Traits("large", "dot", "cyan"), (32.0, float(rows[0]))),
        Entity("circle", "red", Traits("small", "stripe", "pink"), (20.0, float(rows[1]))),
        Entity("square", "yellow", Traits("small", "none", None), (44.0, float(rows[2]))),
    )
    segments = [Segment("enter", 0, "left", 21), Segment("enter", 1, "right", 12), Segment("enter", 2, "left", 12)]
    total = 45
    x = [32.0, 20.0, 44.0]
    while total < min_frames:
        k = int(rng.integers(3))
        direction = "left" if x[k] > 32 else "right"  # move towards the centre: always stays inside
        side = "left" if rng.random() < 0.5 else "right"
        gap = int(rng.choice([12, 24, 48, 96, 144, 192]))
        segs = [Segment("move", k, direction, 12), Segment("leave", k, side, 12), Segment("wait", None, None, gap),
                Segment("return", k, side, 12), Segment("stay", k, None, 12)]
        segments += segs
        total += sum(s.frames for s in segs)
        x[k] = entities[k].home[0]  # a return brings it home
    return Episode(entities=entities, segments=tuple(segments), background="gray", config=cfg, seed=seed)


def write_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    items = [
        ("exit_return.yaml", exit_return_episode(seed=3, gap_frames=72, n_entities=1), {"policy": "slot"},
         "exit and return: away for 72 frames (2x the local window)"),
        ("similar_pair.yaml", exit_return_episode(seed=5, gap_frames=48, n_entities=2, similar=True),
         {"policy": "slot"}, "two similar entities: one leaves and returns"),
        ("prompt_switches.yaml", exit_return_episode(seed=8, gap_frames=24, n_entities=3), {"policy": "slot"},
         "three entities, a prompt switch at every action"),
        ("long_story.yaml", long_story_episode(), {"policy": "slot"},
         "a five-minute story: three entities take turns leaving and returning"),
    ]
    written = []
    for name, ep, memory, title in items:
        text = episode_to_storyboard_yaml(ep, memory=memory, title=title)
        for cue in episode_prompts(ep):
            assert not unknown_words(cue.text), cue.text
        (out / name).write_text(text)
        written.append(out / name)
    return written + write_sprites(out / "sprites")


SPRITE_DEMO_SEED = 7  # a sprite with a dot (the trait memory must bring back)


def write_sprites(out: Path) -> list[Path]:
    from slotgen.train.miniature import world_vocabulary
    from slotgen.world.grammar import caption_words
    from slotgen.world.sprites import sprite_episode, storyboard_yaml

    out.mkdir(parents=True, exist_ok=True)
    ep = sprite_episode(SPRITE_DEMO_SEED, gap=8, lead=1)
    assert ep.sprite.trait != "no" and ep.absent_frames() == 27
    words = set(world_vocabulary("sprites"))
    for text in ep.captions:
        assert set(caption_words(text)) <= words, text
    path = out / "demo.yaml"
    path.write_text(storyboard_yaml(ep, seed=7, memory={"policy": "slot"},
                                    title="sprite world: enter, cross, leave, 27 frames away, return with its dot"))
    return [path]
