"""Training the miniature: a tiny seeded run learns (loss falls on fixed data) and writes a loadable folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slotgen.cli import app
from slotgen.train.miniature import (CHUNK, TrainConfig, build_dataset, chunk_first_frame, sample_dit_batch,
                                     train_miniature)


def test_chunk_geometry_matches_the_engine():
    from slotgen.engine.generator import ChunkGeometry

    g = ChunkGeometry(3, 4)
    assert [chunk_first_frame(c) for c in range(5)] == [g.first_frame(c) for c in range(5)]


def test_training_mask_is_block_causal():
    clips = build_dataset(2, seed=3, max_gap=0)
    for c in clips:
        c.latents = torch.zeros(16, 1 + (c.frames.shape[1] - 1) // 4, 8, 8)
    cfg = TrainConfig(dit_batch=2, relocate_prob=1.0, token_drop=0.0)
    lat, ts, mask, target, caps, rope, grp = sample_dit_batch(clips, np.random.default_rng(0), torch.Generator(),
                                                              cfg, None)
    n, tpf = cfg.clip_chunks, 16
    g = grp.repeat_interleave(tpf)
    m = mask[0, 0]
    for j in range(n):  # noisy chunk j: clean chunks < j, itself, never a later clean chunk or other noisy chunk
        q = (g == 1 + n + j).nonzero()[0, 0]
        seen = set(g[m[q]].tolist())
        assert seen == {0} | {1 + i for i in range(j)} | {1 + n + j}
        assert (ts[0, g == 1 + n + j] > 0).all()
    assert (ts[0, g <= n] == 0).all()
    # noisy chunk j has the temporal positions of clean chunk j
    t_pos = rope[0]
    for j in range(n):
        assert torch.equal(t_pos[g == 1 + j], t_pos[g == 1 + n + j])


def test_tiny_training_run_learns_and_writes_a_loadable_miniature(tmp_path):
    cfg = TrainConfig(minutes=5, seed=0, steps_vae=12, steps_dit=24, episodes=4, vae_batch=2, dit_batch=4)
    res = train_miniature(cfg, tmp_path / "mini", log=lambda m: None, command="test")
    assert res.vae_steps == 12 and res.dit_steps == 24
    assert res.vae_eval[1] < res.vae_eval[0]
    assert res.dit_eval[1] < res.dit_eval[0]
    # noisy per-step losses: the last steps' mean is below the first steps'
    assert np.mean(res.dit_losses[-5:]) < np.mean(res.dit_losses[:5])
    for name in ("config.json", "tokenizer.json", "weights.safetensors", "MODEL_CARD.md", "loss.png"):
        assert (tmp_path / "mini" / name).is_file()
    config = json.loads((tmp_path / "mini" / "config.json").read_text())
    assert len(config["vae"]["latents_std"]) == 16
    from slotgen.models.miniature import load_miniature

    bundle = load_miniature(tmp_path / "mini")
    assert list(bundle.vae.config.latents_mean) == pytest.approx(res.latents_mean)
    assert "Model card" in (tmp_path / "mini" / "MODEL_CARD.md").read_text()


def test_cli_rejects_bad_budgets(tmp_path):
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--minutes", "0"])
    assert r.exit_code == 2 and "--minutes" in (r.stderr if hasattr(r, "stderr") else r.output)


def test_unknown_words_warn_by_name():
    from slotgen.render import Renderer
    from slotgen.storyboard import parse_storyboard

    sb = parse_storyboard("duration: 1\nprompts:\n  - prompt: a red circle dances near a zebra\n")
    warnings = Renderer(sb).warnings()
    assert len(warnings) == 1
    assert "'dances'" in warnings[0] and "'zebra'" in warnings[0] and "'near'" in warnings[0]
    assert "'circle'" not in warnings[0]
