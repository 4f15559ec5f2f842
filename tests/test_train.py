"""Training the miniature: a tiny seeded run learns (loss falls on fixed data) and writes a loadable folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from slotgen.cli import app
from slotgen.models.miniature import VAE_CONFIG
from slotgen.errors import SlotgenError
from slotgen.train.miniature import (CHUNK, TrainConfig, build_dataset, chunk_first_frame, sample_dit_batch,
                                     train_miniature)


Z = VAE_CONFIG["z_dim"]  # latent channels of the miniature


def test_chunk_geometry_matches_the_engine():
    from slotgen.engine.generator import ChunkGeometry

    g = ChunkGeometry(3, 4)
    assert [chunk_first_frame(c) for c in range(5)] == [g.first_frame(c) for c in range(5)]


def test_training_mask_is_block_causal():
    clips = build_dataset(2, seed=3, max_gap=0)
    for c in clips:
        c.latents = torch.zeros(Z, 1 + (c.frames.shape[1] - 1) // 4, 16, 16)  # 4× spatial VAE
    cfg = TrainConfig(dit_batch=2, relocate_prob=1.0, token_drop=0.0)
    lat, ts, mask, target, loss_w, caps, rope, grp = sample_dit_batch(clips, np.random.default_rng(0), torch.Generator(),
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
    assert len(config["vae"]["latents_std"]) == Z
    from slotgen.models.miniature import load_miniature

    bundle = load_miniature(tmp_path / "mini")
    assert list(bundle.vae.config.latents_mean) == pytest.approx(res.latents_mean)
    card = (tmp_path / "mini" / "MODEL_CARD.md").read_text()
    assert "Model card" in card
    # the exact re-run line carries every non-default size, so the run can be repeated from the card
    assert "--episodes 4 --vae-batch 2 --dit-batch 4" in card and "--device" not in card


def test_cli_rejects_bad_budgets(tmp_path):
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--minutes", "0"])
    assert r.exit_code == 2 and "--minutes" in (r.stderr if hasattr(r, "stderr") else r.output)
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--threads", "0"])
    assert r.exit_code == 2 and "--threads" in (r.stderr if hasattr(r, "stderr") else r.output)
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--vae-warm-frames", "8"])
    assert r.exit_code == 2 and "1 + 4k" in (r.stderr if hasattr(r, "stderr") else r.output)
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--warm-steps", "-1"])
    assert r.exit_code == 2 and "--warm-steps" in (r.stderr if hasattr(r, "stderr") else r.output)
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--vae-from", str(tmp_path)])
    assert r.exit_code == 2 and "weights.safetensors" in (r.stderr if hasattr(r, "stderr") else r.output)
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--device", "tpu"])
    assert r.exit_code == 2 and "--device" in (r.stderr if hasattr(r, "stderr") else r.output)
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--vae-batch", "0"])
    assert r.exit_code == 2 and "--vae-batch" in (r.stderr if hasattr(r, "stderr") else r.output)
    assert not (tmp_path / "x").exists()  # rejected before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--device", "cuda"])
    out = r.stderr if hasattr(r, "stderr") else r.output
    assert r.exit_code == 2 and "--device cuda" in out and "no CUDA device" in out


def test_unknown_words_warn_by_name():
    from slotgen.render import Renderer
    from slotgen.storyboard import parse_storyboard

    sb = parse_storyboard("duration: 1\nprompts:\n  - prompt: a red circle dances near a zebra\n")
    warnings = Renderer(sb).warnings()
    assert len(warnings) == 1
    assert "'dances'" in warnings[0] and "'zebra'" in warnings[0] and "'near'" in warnings[0]
    assert "'circle'" not in warnings[0]


def test_training_forward_reproduces_the_engine_stream():
    """Noisy chunk j of the full-sequence training forward == the engine predicting chunk j after
    committing clean chunks < j (each with its own caption): the objective trains what the engine runs."""
    from slotgen.engine.generator import EngineOptions, StreamingEngine
    from slotgen.memory import WindowMemory
    from slotgen.models.miniature import load_miniature
    from slotgen.train.miniature import CaptionConditioner, dit_forward, install_training_processors

    torch.manual_seed(0)
    bundle = load_miniature()
    clips = build_dataset(1, seed=1, max_gap=0)
    clip = clips[0]
    clip.latents = torch.randn(Z, 1 + (clip.frames.shape[1] - 1) // 4, 16, 16)  # 4× spatial VAE
    clip.chunk_captions = ["a red circle enters from the left on a blue background", "a blue background",
                           "a green square stays on a white background", "a red star moves up on a gray background",
                           *clip.chunk_captions[4:]]
    cfg = TrainConfig(dit_batch=1, relocate_prob=0.0, clip_chunks=4, uniform_sigma_prob=0.0)
    rng = np.random.default_rng(5)
    tr = bundle.transformer
    cond = CaptionConditioner(bundle.text_encoder, bundle.tokenizer, bundle.settings.text_len)
    # a clip with a single episode always samples it; pick s = 0 by giving the clip exactly n chunks
    n = cfg.clip_chunks
    clip.latents = clip.latents[:, : n * CHUNK]
    clip.chunk_captions = clip.chunk_captions[:n]
    lat, ts, mask, target, loss_w, caps, rope, grp = sample_dit_batch([clip], rng, torch.Generator().manual_seed(0), cfg, cond)
    state = install_training_processors(tr)
    with torch.no_grad():
        full = dit_forward(tr, state, lat, ts, mask, rope, caps, cond, grp, n, 16)

    policy = WindowMemory(len(tr.blocks), window=10_000)
    engine = StreamingEngine(bundle, policy, EngineOptions(seed=0, fps=16, width=64, height=64, steps=4, shift=5.0))
    from slotgen.memory.base import ChunkContext

    R = CHUNK
    for j in range(n):
        emb = engine.text.embeds(clip.chunk_captions[j])
        policy.begin_chunk(ChunkContext(j, j * CHUNK, CHUNK, j, clip.chunk_captions[j]))
        engine.state.epoch += 1
        noisy = lat[:, :, R + n * CHUNK + j * CHUNK : R + n * CHUNK + (j + 1) * CHUNK]
        tau = float(ts[0, (R + n * CHUNK + j * CHUNK) * 16])
        out = engine._forward(noisy, tau, j * CHUNK, emb, commit=False)
        engine._forward(lat[:, :, R + j * CHUNK : R + (j + 1) * CHUNK], 0.0, j * CHUNK, emb, commit=True)
        policy.end_chunk()
        ref = full[:, :, R + n * CHUNK + j * CHUNK : R + n * CHUNK + (j + 1) * CHUNK]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_vae_batches_weight_entities_and_markings_and_tile_entity_crops():
    from slotgen.train.miniature import _tile, vae_batch

    clips = build_dataset(3, seed=2, max_gap=0)
    clip = clips[0]
    assert clip.pixel_class.shape == (1, *clip.frames.shape[1:])
    assert set(clip.pixel_class.unique().tolist()) <= {0, 1, 2} and (clip.pixel_class == 2).any()
    rng = np.random.default_rng(0)
    x, w = vae_batch(clips, rng, 2, 5, class_weights=(1.0, 5.0, 15.0))
    assert x.shape == (2, 3, 5, 64, 64) and w.shape == (2, 1, 5, 64, 64)
    assert set(w.unique().tolist()) <= {1.0, 5.0, 15.0}
    # entity-centred crops: almost every crop holds entity pixels (weights > 1) when entities are on stage
    crops, cw = vae_batch(clips, np.random.default_rng(1), 16, 5, class_weights=(1.0, 5.0, 15.0), crop=32)
    assert crops.shape == (16, 3, 5, 32, 32)
    assert (cw.amax(dim=(1, 2, 3, 4)) > 1).float().mean() >= 0.75
    # mosaics: 2×2 crops laid out row by row, pixel for pixel
    tiles = torch.arange(4 * 2 * 3 * 4 * 4, dtype=torch.float32).reshape(4, 2, 3, 4, 4)
    m = _tile(tiles, 2)
    assert m.shape == (1, 2, 3, 8, 8)
    assert torch.equal(m[0, :, :, :4, :4], tiles[0]) and torch.equal(m[0, :, :, :4, 4:], tiles[1])
    assert torch.equal(m[0, :, :, 4:, :4], tiles[2]) and torch.equal(m[0, :, :, 4:, 4:], tiles[3])
    mos, mw = vae_batch(clips, np.random.default_rng(1), 8, 5, crop=32, mosaic=2)
    assert mos.shape == (2, 3, 5, 64, 64) and mw.shape == (2, 1, 5, 64, 64)


def test_vae_loss_is_a_pixel_weighted_mean():
    from diffusers import AutoencoderKLWan

    from slotgen.models.miniature import VAE_CONFIG
    from slotgen.train.miniature import _decode_train, vae_loss

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    w = torch.ones(1, 1, 5, 16, 16)
    w[..., :4, :4] = 30.0  # a heavy corner
    with torch.no_grad():
        loss, parts = vae_loss(vae, x, w, 0.0, torch.Generator().manual_seed(0), noise=0.0)
        err = _decode_train(vae, vae.encode(x).latent_dist.mean) - x
        expected = ((err.abs() + err.pow(2)) * w).sum() / (w.sum() * 3)
        plain = (err.abs() + err.pow(2)).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert parts["plain_l1"] == pytest.approx(float(err.abs().mean()), rel=1e-5)
    assert abs(float(expected) - float(plain)) > 1e-3  # the weights matter


def test_vae_from_reuses_the_vae_and_trains_the_same_transformer(tmp_path):
    """Stages draw from their own streams: skipping stage a with the VAE of a same-seed run gives the
    very same transformer (so a transformer-only retrain reproduces the one-command run)."""
    from safetensors.torch import load_file

    cfg = TrainConfig(minutes=5, seed=1, steps_vae=3, steps_dit=4, episodes=4, vae_batch=4, dit_batch=2)
    train_miniature(cfg, tmp_path / "full", log=lambda m: None, command="test")
    cfg2 = TrainConfig(**{**cfg.to_dict(), "vae_from": str(tmp_path / "full")})
    res2 = train_miniature(cfg2, tmp_path / "reuse", log=lambda m: None, command="test")
    a, b = load_file(str(tmp_path / "full" / "weights.safetensors")), load_file(str(tmp_path / "reuse" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res2.vae_steps == 3  # taken from the source run's log, for the model card
    assert "reused from" in (tmp_path / "reuse" / "MODEL_CARD.md").read_text()
    with pytest.raises(SlotgenError):
        train_miniature(TrainConfig(**{**cfg.to_dict(), "vae_from": str(tmp_path)}), tmp_path / "x", log=lambda m: None)

    # stage b on the decoder only (warm_encoder=False) changes only the decoder: encoder, latents and so
    # the transformer stay exactly those of the run without it
    cfg3 = TrainConfig(**{**cfg2.to_dict(), "warm_steps": 2, "warm_lengths": (1, 5), "warm_encoder": False})
    res3 = train_miniature(cfg3, tmp_path / "decoder", log=lambda m: None, command="test")
    c = load_file(str(tmp_path / "decoder" / "weights.safetensors"))
    assert res3.warm_steps == 2 and len(res3.warm_losses) == 2
    changed = {k for k in a if not torch.equal(a[k], c[k])}
    assert changed and all(k.startswith(("vae.decoder.", "vae.post_quant_conv.")) for k in changed), sorted(changed)[:5]
    log = json.loads((tmp_path / "decoder" / "training_log.json").read_text())
    assert log["warm_steps"] == 2
    card = (tmp_path / "decoder" / "MODEL_CARD.md").read_text()
    assert "--warm-steps 2 --warm-decoder-only" in card and "decoder only" in card
    res4 = train_miniature(TrainConfig(**{**cfg.to_dict(), "vae_from": str(tmp_path / "decoder")}), tmp_path / "chain",
                           log=lambda m: None, command="test")
    assert res4.warm_steps == 2  # the card of a run reusing that VAE reports its decoder stage
    with pytest.raises(SlotgenError, match="1 \\+ 4k"):
        train_miniature(TrainConfig(**{**cfg3.to_dict(), "warm_lengths": (4,)}), tmp_path / "y", log=lambda m: None)


def test_warm_cache_reconstruction_equals_the_tail_of_one_long_pass():
    """Training frames deep inside a video: the warm-cache pass reproduces one long encode/decode."""
    from diffusers import AutoencoderKLWan

    from slotgen.models.miniature import VAE_CONFIG
    from slotgen.train.miniature import _decode_train, warm_cache_reconstruct

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    warm, x = torch.rand(1, 3, 9, 32, 32) * 2 - 1, torch.rand(1, 3, 8, 32, 32) * 2 - 1
    with torch.no_grad():
        long_mu = vae.encode(torch.cat([warm, x], 2)).latent_dist.mean  # (1, 16, 5, 8, 8)
        long_out = _decode_train(vae, long_mu)
    out, mu = warm_cache_reconstruct(vae, warm, x)
    assert mu.requires_grad and out.requires_grad  # the gradient flows through the x part only
    torch.testing.assert_close(mu.detach(), long_mu[:, :, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.detach(), long_out[:, :, 9:], rtol=1e-5, atol=1e-5)
    # and it is not the same as starting x from an empty cache
    with torch.no_grad():
        cold = _decode_train(vae, vae.encode(torch.cat([x[:, :, :1], x], 2)).latent_dist.mean)[:, :, 1:]
    assert (cold - out.detach()).abs().max() > 1e-3


def test_warm_cache_vae_steps_train(tmp_path):
    cfg = TrainConfig(minutes=5, seed=0, steps_vae=6, steps_dit=1, episodes=4, vae_batch=4, dit_batch=2,
                      vae_long_every=2, vae_warm_frames=9)
    res = train_miniature(cfg, tmp_path / "warm", log=lambda m: None, command="test")
    assert res.vae_steps == 6 and all(np.isfinite(res.vae_losses))
    assert res.vae_eval[1] < res.vae_eval[0]
    with pytest.raises(SlotgenError, match="1 \\+ 4k"):
        train_miniature(TrainConfig(**{**cfg.to_dict(), "vae_warm_frames": 8}), tmp_path / "bad", log=lambda m: None)


def test_entity_cells_mark_the_latent_cells_entities_touch():
    from slotgen.train.miniature import latent_entity_cells

    clip = build_dataset(1, seed=2, max_gap=0)[0]
    T = clip.frames.shape[1]
    cells = clip.entity_cells
    assert torch.equal(cells, latent_entity_cells(clip.pixel_class))
    assert cells.shape == (1 + (T - 1) // 4, 16, 16)  # one map per latent frame, 4×4-pixel cells
    entity = clip.pixel_class[0].numpy() > 0
    for f in range(T):  # every entity pixel of video frame f lies in a marked cell of its latent frame
        lat = 0 if f == 0 else 1 + (f - 1) // 4
        ys, xs = np.nonzero(entity[f])
        assert bool(cells[lat, ys // 4, xs // 4].all())
    assert 0.0 < cells.float().mean() < 0.5  # entities are small: most cells are background
    empty = torch.zeros_like(clip.pixel_class)
    assert not latent_entity_cells(empty).any()


def test_flow_loss_weights_entity_cells():
    from slotgen.train.miniature import weighted_mse

    clips = build_dataset(2, seed=3, max_gap=0)
    for c in clips:
        c.latents = torch.zeros(Z, 1 + (c.frames.shape[1] - 1) // 4, 16, 16)
    cfg = TrainConfig(dit_batch=2, dit_entity_weight=4.0)
    _, _, _, target, loss_w, _, _, _ = sample_dit_batch(clips, np.random.default_rng(0), torch.Generator(), cfg,
                                                        None)
    assert loss_w.shape == (2, 1, target.shape[2], 16, 16)
    assert set(loss_w.unique().tolist()) == {1.0, 5.0}
    pred = torch.randn(target.shape)
    assert torch.isclose(weighted_mse(pred, target, torch.ones_like(loss_w)), F.mse_loss(pred, target))
    half = torch.zeros_like(loss_w)
    half[..., :8] = 1.0
    assert torch.isclose(weighted_mse(pred, target, half), F.mse_loss(pred[..., :8], target[..., :8]))


def test_warm_stage_trains_the_encoder_unless_told_not_to():
    from diffusers import AutoencoderKLWan

    from slotgen.models.miniature import VAE_CONFIG
    from slotgen.train.miniature import finetune_warm

    clips = build_dataset(1, seed=4, max_gap=0)
    for encoder in (True, False):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**VAE_CONFIG)
        before = {k: v.clone() for k, v in vae.state_dict().items()}
        cfg = TrainConfig(warm_steps=1, warm_lengths=(5,), warm_encoder=encoder, vae_long_batch=1)
        losses = finetune_warm(vae, clips, cfg, (1.0, 5.0, 15.0), np.random.default_rng(0), log=lambda m: None)
        assert len(losses) == 1 and np.isfinite(losses[0])
        changed = {k.split(".")[0] for k, v in vae.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == ({"encoder", "quant_conv", "decoder", "post_quant_conv"} if encoder
                           else {"decoder", "post_quant_conv"})
        assert not any(p.requires_grad for p in vae.parameters())  # left frozen, in eval mode
        assert not vae.training
