"""The shipped miniature is trained, and draws what the storyboard prompts (scored by the world's analyser).

The presence test is a strict expected failure: the shipped weights are trained but do not draw the
world's entities free-running, and a reduced-world pilot extrapolates to about 0.55 presence within the
CPU budget (docs/MINIATURE.md, "The reduced-world pilot"). ``strict`` makes it fail the suite the moment
shipped weights pass it, so the marker must then go.
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


NOT_DRAWING = pytest.mark.xfail(strict=True, reason="shipped miniature does not draw entities free-running yet "
                                                   "(docs/MINIATURE.md)")


def test_shipped_weights_are_the_trained_ones(shipped):
    config = json.loads(resources.files("slotgen.models").joinpath(ASSET_DIR, "config.json").read_text())
    training = config["training"]
    assert training["transformer_steps"] > 1000
    assert training["eval_loss"][1] < 0.2 * training["eval_loss"][0]  # the run learned
    assert config["digest"] == shipped.digest


@pytest.mark.slow
@NOT_DRAWING
@pytest.mark.parametrize("seed", [1003, 1004])
def test_prompted_entity_is_present_in_nine_of_ten_frames(shipped, seed):
    """An exit-and-return storyboard from the world's grammar (not one of the training episodes: those
    use seeds 0..255 with the default training seed): the prompted entity is detected with its prompted shape and colour in
    at least 90 % of the frames where the script has it fully inside the frame."""
    episode = exit_return_episode(seed=seed, gap_frames=24, n_entities=1)
    frames = render_frames(episode, "slot", shipped, storyboard_seed=seed)
    report = analyse_episode(frames, episode)
    assert report.judged_frames > 30
    assert report.presence >= 0.9, report.to_dict()
