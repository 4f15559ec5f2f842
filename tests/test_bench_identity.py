"""`slotgen bench identity` end to end on one tiny episode and two policies; purity helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from slotgen.bench.identity import latent_to_video_frame, print_report, token_labels
from slotgen.cli import app


@pytest.mark.slow
def test_bench_identity_end_to_end(tmp_path, capsys):
    out_json, out_png = tmp_path / "id.json", tmp_path / "id.png"
    r = CliRunner().invoke(app, ["bench", "identity", "--episodes", "1", "--gaps", "0", "--policies", "window,slot",
                                 "--no-similar", "--no-purity", "--json", str(out_json), "--png", str(out_png)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out_json.read_text())
    assert doc["format"] == "slotgen-bench-identity" and doc["policies"] == ["window", "slot"]
    assert len(doc["rows"]) == 2 and {row["policy"] for row in doc["rows"]} == {"window", "slot"}
    for p in ("window", "slot"):
        assert set(doc["summary"][p]) == {"all", "0"}
        assert "identity_recall" in doc["summary"][p]["all"]
    assert "identity_recall" in doc["paired_vs_window"]["slot"]["all"]
    assert doc["ground_truth"]["all"]["identity_recall"]["mean"] == 1.0  # the analyser sees the truth
    with Image.open(out_png) as im:
        assert im.size == (640, 400)
    # the purity line is rounded like the table (a layer without enough tokens prints a dash)
    doc["slot_purity"] = {"mean_ari": 0.0584831, "best_ari": 0.0965, "layers": [{"layer": 0, "ari": 0.0584831, "n": 16},
                                                                                 {"layer": 1, "ari": None, "n": 0}]}
    capsys.readouterr()
    print_report(doc)
    assert "mean 0.06, best 0.10; L0: 0.06 (n=16), L1: – (n=0)" in capsys.readouterr().out


def test_bench_identity_rejects_unknown_policy():
    r = CliRunner().invoke(app, ["bench", "identity", "--policies", "window,nope"])
    assert r.exit_code == 2


def test_token_labels_and_frame_mapping():
    labels = np.zeros((64, 64), np.int16)
    labels[0:16, 0:16] = 1  # fills cell (0, 0)
    labels[20:25, 20:25] = 2  # 25 px < 20 % of a 256-px cell: background
    labels[40:56, 48:60] = 3  # 192 px in cell (2, 3) and (3, 3)
    t = token_labels(labels, 4, 4)
    assert t[0] == 1 and t[5] == 0 and t[2 * 4 + 3] == 3
    assert [latent_to_video_frame(f, 4) for f in range(4)] == [0, 4, 8, 12]
    assert [latent_to_video_frame(f, 1) for f in range(4)] == [0, 1, 2, 3]


def test_ari_of_a_perfect_assignment_is_one():
    from slotgen.memory.slot_attention import adjusted_rand_index

    gt = torch.tensor([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(torch.tensor([5, 5, 3, 3, 9, 9]), gt) == 1.0


@pytest.mark.slow
def test_slot_purity_scores_every_layer_on_ground_truth():
    """ARI per layer of the slot policy's assignment vs the ground-truth token labels of a similar-pair episode."""
    from slotgen.bench.identity import slot_purity
    from slotgen.models.miniature import load_miniature
    from slotgen.world import exit_return_episode

    bundle = load_miniature()
    res = slot_purity(bundle, [exit_return_episode(1000, 12, 2, similar=True)])
    assert len(res["layers"]) == len(bundle.transformer.blocks)
    for layer in res["layers"]:
        assert layer["n"] > 0 and -1.0 <= layer["ari"] <= 1.0
    assert res["best_ari"] == max(layer["ari"] for layer in res["layers"])


@pytest.mark.slow
def test_true_past_protocol_hands_over_ground_truth_until_the_return():
    """``--past truth``: every chunk that ends before the return is the episode's ground truth, bit for bit
    through the exact VAE; generation starts at the chunk holding the return; the run is deterministic."""
    from slotgen.bench.identity import render_frames, render_with_true_past
    from slotgen.models.miniature import load_miniature
    from slotgen.world import exit_return_episode, render_episode
    from slotgen.world.scene import first_return_frame

    bundle = load_miniature()
    ep = exit_return_episode(1000, 12, n_entities=1)
    truth = render_episode(ep).frames
    frames, judged_from = render_with_true_past(ep, "window", bundle, storyboard_seed=1000)
    back = first_return_frame(ep)
    assert frames.shape == truth.shape
    assert judged_from % 3 == 0 and judged_from <= back < judged_from + 3  # chunks of 3 frames
    assert np.array_equal(frames[:judged_from], truth[:judged_from])
    assert not np.array_equal(frames[judged_from:], truth[judged_from:])  # the rest is the model's
    again, _ = render_with_true_past(ep, "window", bundle, storyboard_seed=1000)
    assert np.array_equal(again, frames)
    free = render_frames(ep, "window", bundle, storyboard_seed=1000)  # same noise, the model's own past
    assert not np.array_equal(free[judged_from:], frames[judged_from:])


def test_forced_chunk_latents_must_fit_the_chunk():
    from slotgen.bench.identity import _episode_renderer
    from slotgen.models.miniature import load_miniature
    from slotgen.world import exit_return_episode

    engine = _episode_renderer(exit_return_episode(1000, 0), "window", load_miniature(), 1000).engine
    with pytest.raises(ValueError, match="forced latents must have shape"):
        engine.generate_chunk(0, "a black background", latents=torch.zeros(1, 48, 2, 16, 16))


@pytest.mark.slow
def test_bench_identity_true_past_end_to_end(tmp_path):
    out_json = tmp_path / "id.json"
    r = CliRunner().invoke(app, ["bench", "identity", "--episodes", "1", "--gaps", "0", "--policies", "window",
                                 "--no-similar", "--no-purity", "--past", "truth", "--json", str(out_json)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out_json.read_text())
    assert doc["past"] == "truth" and len(doc["rows"]) == 1
    assert "ground-truth past" in r.output


def test_bench_identity_rejects_unknown_past():
    r = CliRunner().invoke(app, ["bench", "identity", "--past", "oracle"])
    assert r.exit_code == 2 and "--past: expected one of generated, truth" in r.output
