"""The synthetic shape world: generator, caption grammar, analyser and bootstrap helpers."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from slotgen.models.miniature import VOCABULARY
from slotgen.storyboard import parse_storyboard
from slotgen.world.analyse import (
    aggregate,
    analyse_episode,
    bootstrap_ci,
    detect_entities,
    label_components,
    paired_bootstrap,
)
from slotgen.world.grammar import GRAMMAR_WORDS, episode_prompts, episode_to_storyboard_yaml, unknown_words
from slotgen.world.scene import (
    BACKGROUND_COLOURS,
    DEFAULT_WORLD,
    ENTITY_COLOURS,
    MARKING_COLOURS,
    PALETTE,
    SHAPES,
    SIZES,
    Entity,
    Episode,
    Segment,
    Traits,
    exit_return_episode,
    first_return_frame,
    lane_rows,
    rasterise,
    render_episode,
)

N_EPISODES = 30


def _benchmark_episodes(count: int = N_EPISODES) -> list[Episode]:
    """A mix of cast sizes, gaps, and similar-entity episodes."""
    episodes = []
    for seed in range(count):
        n_entities = 1 + seed % 3
        similar = n_entities >= 2 and seed % 2 == 0
        episodes.append(exit_return_episode(seed, gap_frames=12 * (seed % 4), n_entities=n_entities, similar=similar))
    return episodes


@pytest.fixture(scope="module")
def episodes() -> list[Episode]:
    return _benchmark_episodes()


@pytest.fixture(scope="module")
def truth_reports(episodes):
    return [analyse_episode(render_episode(ep).frames, ep) for ep in episodes]


# --------------------------------------------------------------------------------------------------
# Generator


def test_palette_is_small_separated_and_markings_are_disjoint():
    assert not set(MARKING_COLOURS) & (set(ENTITY_COLOURS) | set(BACKGROUND_COLOURS))
    assert not set(ENTITY_COLOURS) & set(BACKGROUND_COLOURS)
    rgb = np.array(list(PALETTE.values()), dtype=float)  # (P, 3)
    distance = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert distance[np.triu_indices(len(rgb), 1)].min() >= 100
    # Marking colours are hidden: no standard-world caption names them (the reduced world names them once,
    # at an entity's first entrance: tests/test_reduced_world.py), and the entity colours do not include them.
    assert not set(MARKING_COLOURS) & set(ENTITY_COLOURS)


def test_generator_is_deterministic():
    first, again = exit_return_episode(7, 24, 3), exit_return_episode(7, 24, 3)
    assert first == again
    a, b = render_episode(first), render_episode(again)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.truth.labels, b.truth.labels)
    np.testing.assert_array_equal(a.truth.visible, b.truth.visible)
    np.testing.assert_array_equal(a.truth.complete, b.truth.complete)
    np.testing.assert_array_equal(a.truth.centres, b.truth.centres)  # NaNs compare equal here
    assert a.truth.traits == b.truth.traits
    assert a.frames.dtype == np.uint8 and a.frames.shape == (first.total_frames, 64, 64, 3)


def test_different_seeds_draw_different_hidden_traits():
    traits = [tuple(e.traits for e in exit_return_episode(seed, 12, 2).entities) for seed in range(12)]
    assert len(set(traits)) >= 8
    assert {t.size for pair in traits for t in pair} == set(SIZES)
    assert {t.marking for pair in traits for t in pair} == {"none", "dot", "stripe"}


def test_ground_truth_matches_the_pixels():
    episode = exit_return_episode(3, 24, 3)
    rendered = render_episode(episode)
    frames, truth = rendered.frames, rendered.truth
    background = np.array(BACKGROUND_COLOURS[episode.background], dtype=np.uint8)
    assert np.all(frames[truth.labels == 0] == background)
    for k, entity in enumerate(episode.entities):
        pixels = frames[truth.labels == k + 1]  # (N, 3)
        allowed = [ENTITY_COLOURS[entity.colour]]
        if entity.traits.marking_colour is not None:
            allowed.append(MARKING_COLOURS[entity.traits.marking_colour])
        assert np.all(np.any(np.all(pixels[:, None] == np.array(allowed), axis=-1), axis=1))
        np.testing.assert_array_equal(truth.visible[:, k], (truth.labels == k + 1).any(axis=(1, 2)))
        # The protagonist (0) leaves and is absent for the gap; companions stay once entered.
        assert truth.visible[:, k].any() and truth.complete[-1, k]
        assert all(frame_traits[k] == entity.traits for frame_traits in truth.traits)
    assert not truth.visible[episode.segment_starts[5] : episode.segment_starts[6], 0].any()  # the wait


def test_invalid_scripts_are_refused():
    entity = Entity("circle", "red", Traits("small"), (32.0, 32.0))
    enter = Segment("enter", 0, "left", 8)
    with pytest.raises(ValueError, match="only return after leaving"):
        Episode((entity,), (enter, Segment("return", 0, "left", 8)), "blue")
    with pytest.raises(ValueError, match="too close to the edge"):
        Episode((entity,), (enter, Segment("move", 0, "right", 40)), "blue")
    with pytest.raises(ValueError, match="not in the frame"):
        Episode((entity,), (Segment("stay", 0, None, 4),), "blue")
    with pytest.raises(ValueError, match="already entered"):
        Episode((entity,), (enter, enter), "blue")
    with pytest.raises(ValueError, match="no entity"):
        Segment("wait", 0, None, 4)
    with pytest.raises(ValueError, match="marking_colour"):
        Traits("small", "dot")
    with pytest.raises(ValueError, match="needs a direction"):
        Segment("leave", 0, None, 4)


def test_episode_round_trips_through_json():
    episode = exit_return_episode(5, 12, 3, similar=True)
    assert Episode.from_dict(json.loads(json.dumps(episode.to_dict()))) == episode


def test_similar_episode_has_one_kind_and_different_traits():
    for seed in range(10):
        episode = exit_return_episode(seed, 12, 2, similar=True)
        a, b = episode.entities
        assert a.kind == b.kind
        assert a.traits.size != b.traits.size
        assert (a.traits.marking, a.traits.marking_colour) != (b.traits.marking, b.traits.marking_colour)


# --------------------------------------------------------------------------------------------------
# Grammar


def test_captions_follow_the_grammar():
    episode = Episode(
        entities=(Entity("circle", "red", Traits("small"), (32.0, 11.0)),
                  Entity("circle", "red", Traits("large", "dot", "cyan"), (20.0, 52.0))),
        segments=(Segment("enter", 0, "left", 21), Segment("enter", 1, "bottom", 12), Segment("move", 0, "right", 12),
                  Segment("leave", 0, "top", 12), Segment("wait", None, None, 12), Segment("return", 0, "up", 12)),
        background="blue",
    )
    assert [cue.text for cue in episode_prompts(episode)] == [
        "a red circle enters from the left on a blue background",
        "a red circle enters from the bottom and another red circle stays on a blue background",
        "a red circle moves right and another red circle stays on a blue background",
        "a red circle leaves the frame to the top and another red circle stays on a blue background",
        "a red circle stays on a blue background",
        "a red circle returns from the top and another red circle stays on a blue background",
    ]
    lonely = Episode(episode.entities[:1], (Segment("enter", 0, "left", 9), Segment("leave", 0, "right", 9),
                                           Segment("wait", None, None, 5)), "gray")
    assert episode_prompts(lonely)[-1].text == "a gray background"


def test_storyboards_parse_and_use_only_vocabulary_words(episodes):
    assert GRAMMAR_WORDS <= set(VOCABULARY)
    hidden = set(MARKING_COLOURS) | set(SIZES) | {"dot", "stripe", "marking"}
    for episode in episodes[:12]:
        text = episode_to_storyboard_yaml(episode, fps=16, seed=3, memory={"policy": "slot", "top_k": 4})
        storyboard = parse_storyboard(text)
        cues = episode_prompts(episode)
        assert storyboard.total_frames == episode.total_frames
        assert storyboard.seed == 3 and storyboard.memory.policy == "slot" and storyboard.memory.top_k == 4
        assert storyboard.resolution == (64, 64) and storyboard.fps == 16
        assert [p.text for p in storyboard.prompts] == [cue.text for cue in cues]
        assert [round(p.start * 16) for p in storyboard.prompts] == [cue.start for cue in cues]
        for cue in cues:
            assert unknown_words(cue.text) == []
            assert not hidden & set(cue.text.split())
            assert len(cue.text.split()) < 31  # fits the miniature's 32 text tokens with </s>
        # The prompt switches where the script's actions change.
        assert len(cues) >= 5


def test_storyboard_defaults_come_from_the_episode():
    episode = exit_return_episode(11, 0, 1)
    storyboard = parse_storyboard(episode_to_storyboard_yaml(episode))
    assert storyboard.seed == 11 and storyboard.fps == DEFAULT_WORLD.fps
    assert storyboard.total_frames == episode.total_frames


# --------------------------------------------------------------------------------------------------
# Analyser: detection


def test_components_are_8_connected_and_per_frame():
    mask = np.zeros((2, 6, 6), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # diagonal neighbours: one component
    mask[0, 4, 4] = True  # another
    mask[1, 0, 0] = True  # same place, next frame: a third
    labels = label_components(mask)
    assert labels[0, 0, 0] == labels[0, 1, 1] != labels[0, 4, 4]
    assert len({int(v) for v in labels[mask]}) == 3
    assert np.all(labels[~mask] == 0)


def test_detector_measures_every_kind_and_trait_at_subpixel_positions():
    rng = np.random.default_rng(0)
    frames, expected = [], []
    for shape in SHAPES:
        for size in SIZES:
            for traits in (Traits(size), Traits(size, "dot", "cyan"), Traits(size, "stripe", "pink"),
                           Traits(size, "dot", "pink"), Traits(size, "stripe", "cyan")):
                for _ in range(6):
                    centre = (float(20 + 24 * rng.random()), float(20 + 24 * rng.random()))
                    body, marking, (x0, y0) = rasterise(shape, DEFAULT_WORLD.radius(size), centre, traits)
                    frame = np.empty((64, 64, 3), dtype=np.uint8)
                    frame[:] = BACKGROUND_COLOURS["white"]
                    window = frame[y0 : y0 + body.shape[0], x0 : x0 + body.shape[1]]
                    window[body] = ENTITY_COLOURS["purple"]
                    if traits.marking_colour:
                        window[marking] = MARKING_COLOURS[traits.marking_colour]
                    frames.append(frame)
                    expected.append((shape, traits))
    detections = detect_entities(np.stack(frames), DEFAULT_WORLD)
    found = [(d[0].shape, d[0].traits) if len(d) == 1 else None for d in detections]
    assert found == expected


# --------------------------------------------------------------------------------------------------
# Analyser: metrics


def test_ground_truth_scores_perfectly(truth_reports):
    summary = aggregate(truth_reports)
    assert summary["identity_recall"]["n"] == N_EPISODES
    assert summary["identity_recall"]["mean"] >= 0.98
    assert summary["compliance"]["mean"] >= 0.98
    assert summary["duplicate_rate"]["mean"] == 0.0 and summary["vanish_rate"]["mean"] == 0.0
    assert summary["flicker_proxy"]["mean"] == 0.0
    assert summary["leakage"]["n"] > 0 and summary["leakage"]["mean"] == 0.0
    assert all(r.judged_frames > 0 and r.settled_frames > 0 for r in truth_reports)
    assert all(e.before is not None for r in truth_reports for e in r.events)
    json.dumps([r.to_dict() for r in truth_reports])  # JSON-able
    json.dumps(summary)


@pytest.mark.slow
def test_shuffled_traits_score_near_chance(episodes, truth_reports):
    """The returning entity wears another episode's traits: recall must fall to about chance (1/9)."""
    reports = []
    for i, episode in enumerate(episodes):
        donor = episodes[(i + 1) % len(episodes)].entities[0].traits
        reports.append(analyse_episode(render_episode(episode, return_traits={0: donor}).frames, episode))
    recall = aggregate(reports)["identity_recall"]["mean"]
    assert recall < 0.5
    # Exactly the episodes whose donor happens to have the same traits count as recalled.
    coincidences = [episodes[(i + 1) % len(episodes)].entities[0].traits == ep.entities[0].traits
                    for i, ep in enumerate(episodes)]
    assert [r.identity_recall == 1.0 for r in reports] == coincidences
    # A paired comparison with the truth finds the drop.
    difference = paired_bootstrap([r.identity_recall for r in truth_reports], [r.identity_recall for r in reports])
    assert difference.low > 0.5
    # Compliance does not see hidden traits.
    assert aggregate(reports)["compliance"]["mean"] >= 0.98


def _patches(frames: np.ndarray, p: int = 16) -> np.ndarray:
    """uint8 (T, H, W, 3) → (T·(H/p)·(W/p), p·p·3) float patches in [-1, 1] (the miniature's token grid)."""
    t, h, w, _ = frames.shape
    x = frames.astype(np.float64) / 127.5 - 1.0
    return x.reshape(t, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3)


def _unpatch(patches: np.ndarray, shape: tuple, p: int = 16) -> np.ndarray:
    t, h, w, _ = shape
    x = patches.reshape(t, h // p, w // p, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(t, h, w, 3)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_analyser_tolerates_the_errors_of_a_rank_limited_generator(episodes):
    """A generator's frames are never pixel-exact. The miniature's transformer writes each 16×16 patch
    (768 values) through a linear head from its 128-wide stream, so even a perfect one outputs a
    rank-128 projection of the truth: blended edges, rims around markings. Here the truth itself is
    projected onto the best rank-128 basis (PCA over other episodes' patches). It still looks right,
    and the analyser must still score it (a detector thresholding each shape's fill ratio scores 0.04–0.41
    presence on such frames), while a trait swap under the same projection must still be caught."""
    fit = np.concatenate([_patches(render_episode(exit_return_episode(100 + s, 24, 1 + s % 3)).frames)
                          for s in range(30)])  # (N, 768)
    mean = fit.mean(axis=0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    basis = vt[:128]  # (128, 768)

    def project(frames: np.ndarray) -> np.ndarray:
        x = _patches(frames) - mean
        return _unpatch((x @ basis.T) @ basis + mean, frames.shape)

    honest, swapped = [], []
    for i, episode in enumerate(episodes[:12]):
        frames = project(render_episode(episode).frames)
        assert np.abs(frames.astype(int) - render_episode(episode).frames).max() > 60  # far from exact
        honest.append(analyse_episode(frames, episode))
        donor = episodes[(i + 1) % 12].entities[0].traits
        swapped.append(analyse_episode(project(render_episode(episode, return_traits={0: donor}).frames), episode))
    truth = aggregate(honest)
    assert truth["compliance"]["mean"] >= 0.9 and truth["presence"]["mean"] >= 0.9
    assert truth["identity_recall"]["mean"] >= 0.9
    coincidences = [episodes[(i + 1) % 12].entities[0].traits == ep.entities[0].traits for i, ep in enumerate(episodes[:12])]
    assert aggregate(swapped)["identity_recall"]["mean"] <= sum(coincidences) / 12 + 0.1


@pytest.mark.slow
def test_leakage_is_detected_on_a_constructed_swap():
    for seed in range(4):
        episode = exit_return_episode(seed, 24, 2 + seed % 2, similar=True)
        honest = analyse_episode(render_episode(episode).frames, episode)
        assert honest.leakage == 0.0 and honest.identity_recall == 1.0
        swapped = render_episode(episode, return_traits={0: episode.entities[1].traits})
        report = analyse_episode(swapped.frames, episode)
        (event,) = report.events
        assert report.leakage == 1.0 and report.identity_recall == 0.0
        assert event.after == episode.entities[1].traits and event.before == episode.entities[0].traits
        assert event.others == (episode.entities[1].traits,)


def test_compliance_fails_for_a_wrong_shape_and_for_no_motion():
    episode = exit_return_episode(2, 12, 1)
    protagonist = episode.entities[0]
    other_shape = next(s for s in SHAPES if s != protagonist.shape)
    wrong = replace(episode, entities=(replace(protagonist, shape=other_shape),))
    wrong_report = analyse_episode(render_episode(wrong).frames, episode)
    assert wrong_report.compliance == 0.0 and wrong_report.presence == 0.0

    still = replace(episode, segments=tuple(
        Segment("stay", 0, None, s.frames) if s.action == "move" else s for s in episode.segments))
    report = analyse_episode(render_episode(still).frames, episode)
    assert report.compliance_by_action["move"] == 0.0
    assert report.compliance_by_action["stay"] == 1.0
    # presence only asks for the prompted kind: a still entity is present, it just does not comply
    assert report.presence == 1.0 and report.compliance < 1.0


def test_duplicates_and_vanishings_are_counted():
    episode = exit_return_episode(4, 24, 2)
    rendered = render_episode(episode)
    erased = rendered.frames.copy()
    erased[rendered.truth.labels == 2] = BACKGROUND_COLOURS[episode.background]  # companion vanishes
    report = analyse_episode(erased, episode)
    assert report.vanish_rate > 0.3 and report.duplicate_rate == 0.0

    free_lane = next(y for y in lane_rows(DEFAULT_WORLD) if y not in {e.home[1] for e in episode.entities})
    clone = replace(episode.entities[0], home=(20.0, float(free_lane)))
    extra = Episode(episode.entities + (clone,),
                    episode.segments[:2] + (Segment("enter", 2, "left", 12),) + episode.segments[2:],
                    episode.background)
    frames = render_episode(extra).frames
    # Drop the clone's entrance frames so the script and video have the same length.
    start = extra.segment_starts[2]
    frames = np.concatenate([frames[:start], frames[start + 12 :]])
    report = analyse_episode(frames, episode)
    assert report.duplicate_rate > 0.3


def test_return_seen_says_how_many_returns_recall_judged():
    episode = exit_return_episode(4, 24, 1)
    rendered = render_episode(episode)
    assert analyse_episode(rendered.frames, episode).return_seen == 1.0
    back = first_return_frame(episode)
    frames = rendered.frames.copy()
    late = np.zeros(len(frames), bool)
    late[back:] = True
    frames[late[:, None, None] & (rendered.truth.labels == 1)] = BACKGROUND_COLOURS[episode.background]
    report = analyse_episode(frames, episode)  # the protagonist never comes back
    assert report.return_seen == 0.0 and report.identity_recall == 0.0


def test_judged_from_scores_only_the_generated_frames():
    """``judged_from``: frames before it were handed to the model, so compliance, presence, duplicates,
    vanishings and flicker skip them, while a return still compares with the traits seen before it."""
    episode = exit_return_episode(4, 24, 2)
    rendered = render_episode(episode)
    back = first_return_frame(episode)
    frames = rendered.frames.copy()
    early = np.zeros(len(frames), bool)
    early[: back - 12] = True
    erased = early[:, None, None] & (rendered.truth.labels == 2)  # the companion vanishes early on only
    frames[erased] = BACKGROUND_COLOURS[episode.background]
    bg = BACKGROUND_COLOURS[episode.background]
    shift = 12 if bg[0] < 200 else -12  # the early background flickers (a corner, within the palette radius)
    frames[: back - 13 : 2, :2, :2, 0] = bg[0] + shift  # not the last given frame: (f − 1, f) is judged
    everything = analyse_episode(frames, episode)
    later = analyse_episode(frames, episode, judged_from=back - 12)
    assert everything.vanish_rate > 0.1 and later.vanish_rate == 0.0
    assert everything.flicker_proxy > 0.0 and later.flicker_proxy == 0.0
    assert later.presence == later.compliance == 1.0 and later.judged_frames < everything.judged_frames
    assert later.identity_recall == 1.0  # the before-traits come from the given (early) frames
    with pytest.raises(ValueError, match="judged_from"):
        analyse_episode(frames, episode, judged_from=len(frames))


def test_flicker_proxy_measures_background_changes():
    episode = exit_return_episode(6, 12, 1)
    rendered = render_episode(episode)
    frames = rendered.frames.copy()
    background = rendered.truth.labels == 0  # (T, H, W)
    odd = np.zeros_like(background)
    odd[1::2] = True
    shift = 12 if BACKGROUND_COLOURS[episode.background][0] < 200 else -12  # stays within the palette radius
    red = frames[..., 0]
    red[background & odd] = (red[background & odd].astype(int) + shift).astype(np.uint8)
    report = analyse_episode(frames, episode)
    assert report.flicker_proxy == pytest.approx(4.0)  # 12 in one of 3 channels, every pair
    assert analyse_episode(rendered.frames, episode).flicker_proxy == 0.0


# --------------------------------------------------------------------------------------------------
# Bootstrap helpers


def test_bootstrap_on_known_cases():
    assert tuple(bootstrap_ci([0.7] * 10)) == (0.7, 0.7, 0.7)
    values = np.array([0.0, 1.0] * 50)  # mean 0.5, standard error 0.05
    mean, low, high = bootstrap_ci(values, n=4000, seed=1)
    assert mean == 0.5
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)

    base = np.linspace(0.0, 1.0, 40)
    a = base + 0.5
    assert tuple(paired_bootstrap(a, base)) == pytest.approx((0.5, 0.5, 0.5))
    # Pairing removes the between-episode spread that hides a small, consistent gain.
    noise = np.random.default_rng(0).normal(0.0, 0.01, 40)
    better = base + 0.05 + noise
    paired = paired_bootstrap(better, base)
    assert 0.0 < paired.low < paired.estimate < paired.high
    assert bootstrap_ci(better).low < bootstrap_ci(base).high  # unpaired intervals overlap
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([1.0, float("nan")])


@pytest.mark.slow
def test_shipped_miniature_lacks_the_reduced_world_words_and_warns_about_them():
    """docs/WORLD.md: VOCABULARY has the lane and trait words, the shipped tokenizer does not."""
    from slotgen.render import Renderer

    reduced_only = {"lane", "large", "small", "dot", "stripe", "cyan", "pink"}
    assert reduced_only <= set(VOCABULARY)
    prompt = "a large red circle with a cyan dot enters from the left in the top lane on a black background"
    (warning,) = Renderer(parse_storyboard(f"duration: 1s\nprompts:\n  - prompt: {prompt}\n")).warnings()
    assert "does not know the words 'cyan', 'dot', 'lane', 'large'" in warning
