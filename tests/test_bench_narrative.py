"""``bench narrative``'s scores checked against their definitions, with tiny random CLIP and DINO built
from configs (no download), and the whole command on the miniature."""

from __future__ import annotations

import json
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slotgen.bench.narrative import Scorers, clip_pixels, score_video, vbench_consistency

ROOT = Path(__file__).resolve().parents[1]


def tiny_scorer_dir(root: Path) -> Path:
    """clip/ (CLIPModel + a character-level CLIPTokenizer) and dino/ (ViTModel), random, saved like the hub's."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    root.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=37),
        projection_dim=16)).eval()
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    torch.manual_seed(1)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37), add_pooling_layer=False).eval().save_pretrained(root / "dino")
    return root


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory) -> Path:
    return tiny_scorer_dir(tmp_path_factory.mktemp("scorers"))


@pytest.fixture(scope="module")
def scorers(scorer_dir) -> Scorers:
    from slotgen.bench.narrative import load_scorers

    return load_scorers(scorer_dir)


def moving_square(n: int = 12, h: int = 40, w: int = 56) -> np.ndarray:
    """A bright square drifting right over a gradient: neighbouring frames are alike, distant ones less."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[..., 2] = np.linspace(0, 200, w, dtype=np.uint8)[None, None, :]
    for i in range(n):
        x = 2 + 3 * i
        frames[i, 12:28, x:x + 12] = (250, 220, 40)
    return frames


def test_vbench_consistency_definition_on_hand_made_features():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # i=1: (cos(f1,f0)=1 + cos(f1,f0)=1)/2 = 1; i=2: (cos(f2,f1)=0 + cos(f2,f0)=0)/2 = 0 → mean 0.5
    assert vbench_consistency(f) == pytest.approx(0.5)
    # negative similarities count as 0 (VBench's max(0, ·)), and the norm does not matter
    assert vbench_consistency(torch.tensor([[2.0, 0.0], [-3.0, 0.0]])) == 0.0


def test_identical_frames_have_consistency_one(scorers):
    frames = np.repeat(moving_square(1), 6, axis=0)
    assert vbench_consistency(scorers.dino_features(frames)) == pytest.approx(1.0, abs=1e-6)
    assert vbench_consistency(scorers.clip_image_embeddings(frames)) == pytest.approx(1.0, abs=1e-6)


def cross_fade(n: int = 12, h: int = 40, w: int = 56) -> np.ndarray:
    """A slow cross-fade between two unrelated random pictures: each frame is close to its neighbours."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, h, w, 3)).astype(np.float64)
    t = np.linspace(0, 1, n)[:, None, None, None]
    return ((1 - t) * a + t * b).round().astype(np.uint8)


def test_shuffled_frames_are_less_consistent_than_in_order(scorers):
    frames = cross_fade(12)
    order = np.r_[0, np.random.default_rng(0).permutation(np.arange(1, 12))]  # frame 0 stays first
    for features in (scorers.dino_features, scorers.clip_image_embeddings):
        in_order = vbench_consistency(features(frames))
        shuffled = vbench_consistency(features(frames[order]))
        # same frames, same first frame: only the frame-to-frame term differs, and it drops
        assert shuffled < in_order - 1e-4, (features.__name__, shuffled, in_order)


def test_clip_score_is_the_models_own_logit(scorers):
    frames = moving_square(5)
    texts = ["a yellow square moves right", "a blue sky"]
    ours = scorers.logits(scorers.clip_image_embeddings(frames), scorers.text_embeddings(texts))  # (5, 2)
    tok = scorers.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = scorers.clip(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                              pixel_values=clip_pixels(frames, scorers.clip_size)).logits_per_image
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0  # not a constant


def test_clip_preprocessing_is_vbench_short_side_resize_and_centre_crop():
    frames = np.zeros((1, 40, 80, 3), np.uint8)
    frames[0, :, 30:50] = 255  # a white band in the middle third: survives the centre crop
    px = clip_pixels(frames, 32)
    assert px.shape == (1, 3, 32, 32)
    white = (1.0 - 0.48145466) / 0.26862954
    assert px[0, 0, :, 16].min() == pytest.approx(white, abs=1e-5)  # centre column is the band
    assert px[0, 0, 0, 0] == pytest.approx(-0.48145466 / 0.26862954, abs=1e-5)  # the left edge was cropped to black


def test_segments_and_windows_follow_the_prompts(scorers):
    frames = moving_square(12)  # 12 frames at 4 fps = 3 s
    prompts = [(0.0, 1.5, "a yellow square"), (1.5, 3.0, "a blue sky")]
    s = score_video(frames, 4, prompts, scorers, window_seconds=1.0)
    assert [seg["frames"] for seg in s["segments"]] == [6, 6]
    assert [w["frames"] for w in s["windows"]] == [4, 4, 4] and [w["start"] for w in s["windows"]] == [0, 1, 2]
    img, txt = scorers.clip_image_embeddings(frames), scorers.text_embeddings([p[2] for p in prompts])
    logit = scorers.logits(img, txt)
    assert s["segments"][1]["clip"] == pytest.approx(float(logit[6:, 1].mean()), rel=1e-5)
    # window 1 (1 s to 2 s) has frames 4, 5 under the first prompt and 6, 7 under the second
    assert s["windows"][1]["clip"] == pytest.approx(float((logit[4:6, 0].sum() + logit[6:8, 1].sum()) / 4), rel=1e-5)
    assert s["clip"] == pytest.approx(float((logit[:6, 0].sum() + logit[6:, 1].sum()) / 12), rel=1e-5)


@pytest.mark.slow
def test_bench_narrative_end_to_end_on_the_miniature(scorer_dir, tmp_path):
    story = tmp_path / "story.yaml"
    story.write_text("duration: 2.0625\nfps: 16\nseed: 0\nprompts:\n  - prompt: a red circle moves left\n"
                     "  - at: 1.0\n    prompt: a green square enters from the right\n")
    out = tmp_path / "bench"
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "slotgen", "bench", "narrative", str(story), "--policies", "sink,slot",
                          "--seeds", "0,1", "--window", "1", "--scorer-dir", str(scorer_dir), "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr
    assert elapsed < 180, elapsed
    assert "meaningless" in run.stdout and "CLIP 1-2s" in run.stdout
    result = json.loads((out / "narrative.json").read_text())
    assert result["meaningful"] is False and result["settings"] == ["sink", "slot"]
    assert len(result["videos"]) == 4 and {v["seed"] for v in result["videos"]} == {0, 1}
    for v in result["videos"]:
        assert v["frames"] == 33 and len(v["segments"]) == 2 and len(v["windows"]) == 3
        assert 0 <= v["subject"] <= 1 and 0 <= v["background"] <= 1
    s = result["summary"]["slot"]["clip"]
    assert s["n"] == 2 and s["low"] <= s["mean"] <= s["high"]
    from PIL import Image

    assert Image.open(out / "narrative.png").size == (720, 420)
    # the same seed renders the same frames under the same setting: rerunning reuses the videos
    again = subprocess.run([sys.executable, "-m", "slotgen", "bench", "narrative", str(story), "--policies", "sink,slot",
                            "--seeds", "0,1", "--window", "1", "--scorer-dir", str(scorer_dir), "--out", str(out)],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "rendering" not in again.stderr, again.stderr
    assert json.loads((out / "narrative.json").read_text())["summary"] == result["summary"]


def test_bench_narrative_bad_input_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from slotgen.cli import app

    res = CliRunner().invoke(app, ["bench", "narrative", str(ROOT / "storyboards" / "demo.yaml"), "--policies",
                                   "sink,slot", "--models", "a,b,c"])
    assert res.exit_code == 2 and "--models: 3 models for 2 --policies entries" in res.output


def test_longlive_jsonl_gives_the_60_second_interactive_narrative():
    from slotgen.bench.narrative import narratives

    [sb] = narratives(ROOT / "storyboards" / "narrative_60s.jsonl")
    # LongLive's interactive protocol: 240 latent frames, switches at 40, 80, 120, 160, 200 (16 fps, 4x time stride)
    assert sb.duration == (1 + 4 * 239) / 16 and len(sb.prompts) == 6
    assert [p.start for p in sb.prompts[1:]] == [(1 + 4 * (s - 1)) / 16 for s in (40, 80, 120, 160, 200)]


SHORT = ("duration: 1.5625\nfps: 16\nseed: 0\nprompts:\n  - prompt: a red circle moves left\n"
         "  - at: 0.75\n    prompt: a green square\n")


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_bench_narrative_on_ray_renders_through_render_many(scorers, tmp_path):
    """--ray: the videos come from render-many's library (manifest and all) and equal in-process renders."""
    import logging

    import ray

    from slotgen.bench.narrative import Setting, run_narrative_bench
    from slotgen.video.writer import read_video

    story = tmp_path / "story.yaml"
    story.write_text(SHORT)
    settings = [Setting("slot", None)]
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=96 * 2**20,
             log_to_driver=False, logging_level=logging.WARNING)
    try:
        on_ray = run_narrative_bench(story, settings, [3], tmp_path / "ray", scorers=scorers,
                                     ray_address=ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
    rows = json.loads((tmp_path / "ray" / "videos" / "manifest.json").read_text())["jobs"]
    assert [(r["job"], r["status"]) for r in rows] == [("slot-seed3", "done")]
    local = run_narrative_bench(story, settings, [3], tmp_path / "local", scorers=scorers)
    assert np.array_equal(read_video(tmp_path / "ray" / "videos" / "slot-seed3.mkv"),
                          read_video(tmp_path / "local" / "videos" / "slot-seed3.mkv"))
    assert on_ray["summary"] == local["summary"]


def test_missing_scorers_fail_before_any_rendering(tmp_path):
    from slotgen.bench.narrative import Setting, run_narrative_bench
    from slotgen.errors import SlotgenError

    story = tmp_path / "story.yaml"
    story.write_text(SHORT)
    with pytest.raises(SlotgenError, match=r"--scorer-dir .*: no clip/ folder"):
        run_narrative_bench(story, [Setting("sink", None)], [0], tmp_path / "out", scorer_dir=tmp_path / "none")
    assert list((tmp_path / "out" / "videos").iterdir()) == []
