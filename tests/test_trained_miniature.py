"""The shipped miniature is trained: it draws what the storyboard prompts (scored by the world's analyser).

Both tests are strict expected failures while the shipped weights are the random initialisation (no
training run so far draws the world's entities over whole episodes: docs/MINIATURE.md). ``strict``
makes them fail the suite the moment trained weights pass them, so the marker must then go.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest

from slotgen.bench.identity import render_frames
from slotgen.models.miniature import ASSET_DIR, load_miniature
from slotgen.world import analyse_episode, exit_return_episode


@pytest.fixture(scope="module")
def shipped():
    return load_miniature()


NOT_TRAINED = pytest.mark.xfail(strict=True, reason="shipped miniature is still random init (docs/MINIATURE.md)")


@NOT_TRAINED
def test_shipped_weights_are_the_trained_ones(shipped):
    config = json.loads(resources.files("slotgen.models").joinpath(ASSET_DIR, "config.json").read_text())
    training = config["training"]
    assert training["vae_steps"] > 0 and training["transformer_steps"] > 0
    assert config["digest"] == shipped.digest


@NOT_TRAINED
@pytest.mark.parametrize("seed", [1003, 1004])
def test_prompted_entity_is_present_in_nine_of_ten_frames(shipped, seed):
    """An exit-and-return storyboard from the world's grammar (not one of the training episodes: those
    use seeds 0..127 with the default training seed): the prompted entity is detected with its prompted shape and colour in
    at least 90 % of the frames where the script has it fully inside the frame."""
    episode = exit_return_episode(seed=seed, gap_frames=24, n_entities=1)
    frames = render_frames(episode, "slot", shipped, storyboard_seed=seed)
    report = analyse_episode(frames, episode)
    assert report.judged_frames > 30
    assert report.presence >= 0.9, report.to_dict()
