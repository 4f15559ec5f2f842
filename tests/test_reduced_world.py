"""The reduced world (slotgen.world.REDUCED_WORLD): a real world configuration the analyser scores, whose
captions decide every first frame (lanes named, traits named once at the entrance) and never name the
traits again, so a return still asks the memory."""

from __future__ import annotations

import pytest

from slotgen.models.miniature import VOCABULARY
from slotgen.storyboard import parse_storyboard
from slotgen.world import analyse_episode, episode_prompts, episode_to_storyboard_yaml, exit_return_episode, render_episode
from slotgen.world.grammar import GRAMMAR_WORDS, unknown_words
from slotgen.world.scene import (MARKING_COLOURS, REDUCED_WORLD, STANDARD_WORLD, WORLDS, Traits, lane_rows,
                                 with_entity_traits, world_named)

TRAIT_WORDS = set(MARKING_COLOURS) | {"dot", "stripe", "large", "small", "with"}


def reduced(seed: int, gap: int = 24, n: int = 1, similar: bool = False):
    return exit_return_episode(seed, gap, n_entities=n, similar=similar, world=REDUCED_WORLD)


def test_reduced_episodes_draw_only_from_the_reduced_world():
    seen = set()
    for seed in range(40):
        ep = reduced(seed, n=1 + seed % 2, similar=seed % 4 == 1)
        assert ep.background == "black" and ep.config == REDUCED_WORLD.config
        rows = lane_rows(ep.config)
        for e in ep.entities:
            assert e.shape in ("circle", "square") and e.colour in ("red", "green", "yellow")
            assert e.traits in REDUCED_WORLD.traits and e.home[0] == 32.0 and e.home[1] in rows
            seen.add(e.traits)
        if seed % 4 == 1:
            assert ep.entities[0].kind == ep.entities[1].kind and ep.entities[0].traits != ep.entities[1].traits
    assert seen == set(REDUCED_WORLD.traits) and REDUCED_WORLD.chance == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one per lane"):
        reduced(0, n=3)
    assert world_named("reduced") is REDUCED_WORLD and set(WORLDS) == {"standard", "reduced"}
    with pytest.raises(ValueError, match="unknown world"):
        world_named("tiny")


def test_standard_world_is_the_default_and_draws_as_before():
    assert exit_return_episode(7, 24, 3) == exit_return_episode(7, 24, 3, world=STANDARD_WORLD)
    for seed in range(20):  # the standard grammar names neither lanes nor traits
        for cue in episode_prompts(exit_return_episode(seed, 12, 1 + seed % 3, similar=seed % 3 == 2)):
            assert not (TRAIT_WORDS | {"lane"}) & set(cue.text.split()), cue.text


def test_ground_truth_of_the_reduced_world_scores_perfectly_and_a_trait_swap_is_caught():
    for seed in range(6):
        ep = reduced(seed, n=1 + seed % 2, similar=seed % 2 == 1)
        report = analyse_episode(render_episode(ep).frames, ep)
        assert report.presence == 1.0 and report.compliance == 1.0 and report.duplicate_rate == 0.0
        assert report.identity_recall == 1.0
        if seed % 2:
            assert report.leakage == 0.0
    ep = reduced(3)
    other = next(t for t in REDUCED_WORLD.traits if t != ep.entities[0].traits)
    swapped = render_episode(ep, return_traits={0: other}).frames
    assert analyse_episode(swapped, ep).identity_recall == 0.0


def test_captions_name_lanes_always_and_traits_only_at_the_first_entrance():
    for seed in range(30):
        ep = reduced(seed, gap=12 * (seed % 3), n=1 + seed % 2, similar=seed % 4 == 1)
        cues = episode_prompts(ep)
        for cue in cues:
            words = cue.text.split()
            assert unknown_words(cue.text) == [] and len(words) < 32  # fits 32 text tokens with </s>
            assert set(words) <= GRAMMAR_WORDS <= set(VOCABULARY)
            n_on_stage = cue.text.count(" circle ") + cue.text.count(" square ")
            assert cue.text.count(" lane") == n_on_stage
            actor_enters = " enters " in cue.text.split(" and ")[0]
            assert bool(TRAIT_WORDS & set(words)) == actor_enters, cue.text
        first = cues[0].text
        t = ep.entities[0].traits
        assert first.startswith(f"a {t.size} {ep.entities[0].colour} {ep.entities[0].shape}")
        assert (f"with a {t.marking_colour} dot" in first) == (t.marking != "none")
        back = next(c.text for c in cues if " returns " in c.text)
        assert not TRAIT_WORDS & set(back.split())  # after the absence only memory knows the traits
        storyboard = parse_storyboard(episode_to_storyboard_yaml(ep))
        assert storyboard.total_frames == ep.total_frames


def test_episodes_that_differ_only_in_traits_share_every_caption_but_the_entrance():
    ep = reduced(5)
    other = with_entity_traits(ep, {0: next(t for t in REDUCED_WORLD.traits if t != ep.entities[0].traits)})
    a, b = [c.text for c in episode_prompts(ep)], [c.text for c in episode_prompts(other)]
    assert a[0] != b[0] and a[1:] == b[1:]


def test_world_spec_rejects_kinds_outside_the_palette():
    from slotgen.world.scene import WorldSpec

    with pytest.raises(ValueError, match="colour"):
        WorldSpec("x", REDUCED_WORLD.config, colours=("orange",))
    with pytest.raises(ValueError, match="trait"):
        WorldSpec("x", REDUCED_WORLD.config, traits=(Traits("large"),))
