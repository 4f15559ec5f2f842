"""Training the miniature: the objective trains what the engine runs, a tiny seeded run learns and writes a
loadable folder, the exact VAE loses nothing, and bad settings are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slotgen.cli import app
from slotgen.train.slots import SlotTrainConfig
from slotgen.train.miniature import (CHUNK, TrainConfig, base_mask, build_dataset, chunk_first_frame, encode_clip,
                                     sample_batch, train_miniature, x0_loss)


TINY_SLOTS = SlotTrainConfig(episodes=2, steps=3, batch=4)  # the φ stage at test size


def _out(r) -> str:
    return r.stderr if hasattr(r, "stderr") else r.output


def _with_latents(clips):
    """Latents through the shipped (exact) VAE, as training encodes them."""
    from slotgen.models.miniature import load_miniature
    from slotgen.train.miniature import encode_all

    for c, z in zip(clips, encode_all(load_miniature().vae, [c.frames for c in clips])):
        c.latents = z
    return clips


def test_chunk_geometry_matches_the_engine():
    from slotgen.engine.generator import ChunkGeometry
    from slotgen.models.miniature import SETTINGS

    g = ChunkGeometry(SETTINGS.chunk_frames, SETTINGS.vae_stride_t)
    assert SETTINGS.chunk_frames == CHUNK
    assert [chunk_first_frame(c) for c in range(6)] == [g.first_frame(c) for c in range(6)]


@pytest.mark.slow
def test_exact_vae_round_trips_every_pixel_of_a_world_video():
    """encode → decode of a world episode gives back every uint8 pixel (the VAE is 'shown adequate'), frame
    t's latent is frame t's pixels, and streaming decode chunk by chunk equals the one-shot decode."""
    from slotgen.models.miniature import load_miniature
    from slotgen.video.decoder import StreamingDecoder
    from slotgen.world import exit_return_episode, render_episode

    vae = load_miniature().vae
    frames = render_episode(exit_return_episode(7, 12, n_entities=3)).frames  # (T, H, W, 3) uint8
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)  # (3, T, H, W)
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

    z = encode_clip(vae, x)
    assert z.shape == (48, x.shape[1], 16, 16)
    assert float((z - patchify(x[None], 4)[0]).abs().max()) < 1e-3  # latent t is frame t's 4×4 blocks
    y = vae.decode(z[None]).sample[0]
    back = ((y + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(back, frames)
    mean = torch.tensor(vae.config.latents_mean)[:, None, None, None]
    std = torch.tensor(vae.config.latents_std)[:, None, None, None]
    dec = StreamingDecoder(vae)
    parts = [dec.decode_chunk(((z[:, i : i + 3] - mean) / std)[None]) for i in range(0, 30, 3)]
    assert np.array_equal(np.concatenate(parts), frames[:30])


@pytest.mark.slow
def test_training_mask_is_block_causal():
    clips = _with_latents(build_dataset(2, seed=3, max_gap=0))
    cfg = TrainConfig(batch=2, relocate_prob=1.0, return_prob=0.0, token_drop=0.0)
    b = sample_batch(clips, np.random.default_rng(0), torch.Generator(), cfg)
    n, tpf = cfg.clip_chunks, 16
    g = b.groups.repeat_interleave(tpf)
    m = b.mask[0, 0]
    for j in range(n):  # noisy chunk j: clean chunks < j, itself, never a later clean chunk or another noisy chunk
        q = (g == 1 + n + j).nonzero()[0, 0]
        assert set(g[m[q]].tolist()) == {0} | {1 + i for i in range(j)} | {1 + n + j}
        assert (b.timesteps[0, g == 1 + n + j] > 0).all()
    assert (b.timesteps[0, g <= n] == 0).all()
    t_pos = b.rope[0]
    for j in range(n):  # noisy chunk j has the temporal positions of clean chunk j
        assert torch.equal(t_pos[g == 1 + j], t_pos[g == 1 + n + j])
    grp, base = base_mask(n, tpf)
    assert torch.equal(grp, b.groups) and base.shape == m.shape


@pytest.mark.slow
def test_return_clips_relocate_a_chunk_with_the_protagonist_before_it_left():
    """With return_prob 1 every sample covers the protagonist's return, and its relocated chunk is one in
    which the protagonist was fully inside, before the leave: the trait copy the memory must make."""
    clips = _with_latents(build_dataset(6, seed=4, max_gap=24))
    for c in clips:
        assert c.return_chunk is not None and c.before_chunks
    cfg = TrainConfig(batch=16, return_prob=1.0, token_drop=0.0)
    rng = np.random.default_rng(1)
    b = sample_batch(clips, rng, torch.Generator().manual_seed(0), cfg)
    n = cfg.clip_chunks
    for caps in b.captions:
        assert any("returns" in c for c in caps[1:]), caps  # a clip chunk shows the return
        assert "leaves" not in caps[0] and "returns" not in caps[0]  # the relocated chunk is from before
        assert len(caps) == n + 1


@pytest.mark.slow
def test_x0_loss_weights_entities_and_low_noise():
    clips = _with_latents(build_dataset(2, seed=5, max_gap=0))
    cfg = TrainConfig(batch=2)
    b = sample_batch(clips, np.random.default_rng(2), torch.Generator().manual_seed(0), cfg)
    assert float(x0_loss(b.x0.clone(), b)) == 0.0
    pred = b.x0 + 0.1
    expected = 0.01  # a uniform error: the weighted mean of a constant is the constant / weights' normaliser
    assert float(x0_loss(pred, b)) == pytest.approx(expected, rel=1e-4)
    # an error on entity pixels costs more than the same error on background pixels
    near = (b.weight > 1).expand_as(pred)
    e_ent = b.x0.clone()
    e_ent[near] += 0.1
    e_bg = b.x0.clone()
    e_bg[~near] += 0.1
    per_pixel_ent = float(x0_loss(e_ent, b)) / near.float().mean()
    per_pixel_bg = float(x0_loss(e_bg, b)) / (~near).float().mean()
    assert per_pixel_ent > 2 * per_pixel_bg


@pytest.mark.slow
def test_tiny_training_run_learns_and_writes_a_loadable_miniature(tmp_path):
    cfg = TrainConfig(minutes=5, seed=0, steps=30, episodes=4, batch=2, clip_chunks=2, slots=TINY_SLOTS)
    res = train_miniature(cfg, tmp_path / "mini", log=lambda m: None, command="test")
    assert res.steps == 30
    assert res.eval_loss[1] < res.eval_loss[0]
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    assert res.vae_max_error < 1e-3
    for name in ("config.json", "tokenizer.json", "weights.safetensors", "MODEL_CARD.md", "loss.png", "training_log.json"):
        assert (tmp_path / "mini" / name).is_file()
    config = json.loads((tmp_path / "mini" / "config.json").read_text())
    assert config["training"]["transformer_steps"] == 30
    from slotgen.models.miniature import load_miniature

    bundle = load_miniature(tmp_path / "mini")
    assert bundle.slot_phi is not None  # the φ stage ran and shipped its weights
    assert list(bundle.vae.config.latents_mean) == pytest.approx(res.latents_mean)
    assert bundle.settings.prediction == "sample" and bundle.settings.sampler == "euler"
    card = (tmp_path / "mini" / "MODEL_CARD.md").read_text()
    # the exact re-run line carries every non-default size, so the run can be repeated from the card
    assert "--steps 30" in card and "--episodes 4 --batch 2 --clip-chunks 2" in card and "--device" not in card


@pytest.mark.slow
def test_training_is_reproducible_step_for_step(tmp_path):
    cfg = TrainConfig(seed=1, steps=3, episodes=3, batch=2, clip_chunks=2, slots=TINY_SLOTS)
    a = train_miniature(cfg, tmp_path / "a", log=lambda m: None)
    b = train_miniature(TrainConfig(**cfg.to_dict()), tmp_path / "b", log=lambda m: None)
    assert a.losses == b.losses
    assert (tmp_path / "a" / "weights.safetensors").read_bytes() == (tmp_path / "b" / "weights.safetensors").read_bytes()


def test_cli_rejects_bad_budgets(tmp_path):
    for args, needle in ((["--minutes", "0"], "--minutes"), (["--threads", "0"], "--threads"),
                         (["--steps", "0"], "--steps"), (["--device", "tpu"], "--device"),
                         (["--batch", "0"], "--batch"), (["--episodes", "1"], "--episodes")):
        r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), *args])
        assert r.exit_code == 2 and needle in _out(r), (args, _out(r))
        assert "Traceback" not in _out(r)
    assert not (tmp_path / "x").exists()  # rejected before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--device", "cuda"])
    assert r.exit_code == 2 and "--device cuda" in _out(r) and "no CUDA device" in _out(r)


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
    from slotgen.memory.base import ChunkContext
    from slotgen.models.miniature import load_miniature
    from slotgen.train.miniature import CaptionConditioner, dit_forward, install_training_processors

    torch.manual_seed(0)
    bundle = load_miniature()
    n = 4
    clip = _with_latents(build_dataset(1, seed=1, max_gap=0))[0]
    clip.latents = torch.randn(48, n * CHUNK, 16, 16)  # exactly n chunks: the clip starts at chunk 0
    clip.chunk_captions = ["a red circle enters from the left on a blue background", "a blue background",
                           "a green square stays on a white background", "a red star moves up on a gray background"]
    clip.near_entity = clip.near_entity[: n * CHUNK]
    clip.return_chunk = None
    cfg = TrainConfig(batch=1, relocate_prob=0.0, clip_chunks=n, context_noise=0.0)
    tr = bundle.transformer
    cond = CaptionConditioner(bundle.text_encoder, bundle.tokenizer, bundle.settings.text_len)
    b = sample_batch([clip], np.random.default_rng(5), torch.Generator().manual_seed(0), cfg)
    state = install_training_processors(tr)
    with torch.no_grad():
        full = dit_forward(tr, state, b, cond, n)

    policy = WindowMemory(len(tr.blocks), window=10_000)
    engine = StreamingEngine(bundle, policy, EngineOptions(seed=0, fps=16, width=64, height=64, steps=4, shift=5.0))
    R = CHUNK
    for j in range(n):
        emb = engine.text.embeds(clip.chunk_captions[j])
        policy.begin_chunk(ChunkContext(j, j * CHUNK, CHUNK, j, clip.chunk_captions[j]))
        engine.state.epoch += 1
        noisy = b.latents[:, :, R + n * CHUNK + j * CHUNK : R + n * CHUNK + (j + 1) * CHUNK]
        tau = float(b.timesteps[0, (R + n * CHUNK + j * CHUNK) * 16])
        out = engine._forward(noisy, tau, j * CHUNK, emb, commit=False)
        engine._forward(b.latents[:, :, R + j * CHUNK : R + (j + 1) * CHUNK], 0.0, j * CHUNK, emb, commit=True)
        policy.end_chunk()
        torch.testing.assert_close(out, full[:, :, j * CHUNK : (j + 1) * CHUNK], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_memorise_check_scores_the_episodes_it_trained_on(tmp_path):
    """scripts/memorise_check.py (the recipe's positive control, docs/MINIATURE.md): a run trains, then every
    training episode is rendered free-running and analysed; rows name those episodes' seeds."""
    import importlib.util
    from pathlib import Path

    from slotgen.train.miniature import clip_from_episode, training_episodes

    path = Path(__file__).resolve().parents[1] / "scripts" / "memorise_check.py"
    spec = importlib.util.spec_from_file_location("memorise_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", str(tmp_path / "missing")]) == 2  # a one-line error, not a traceback
    out = tmp_path / "report.json"
    assert mod.main(["--out", str(tmp_path / "m"), "--episodes", "2", "--steps", "2", "--seed", "3", "--threads", "1",
                     "--sampler-steps", "1", "--seeds", "7", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["train"]["steps"] == 2 and report["train"]["episodes"] == 2
    assert [r["episode_seed"] for r in report["rows"]] == [300_000, 300_001]
    assert all(0.0 <= r["presence"] <= 1.0 and r["sampler_steps"] == 1 for r in report["rows"])
    # --held-out scores unseen episodes of the folder's own world (a learning-curve point)
    held = tmp_path / "held.json"
    assert mod.main(["--model", str(tmp_path / "m"), "--held-out", "2", "--sampler-steps", "1", "--seeds", "7",
                     "--threads", "1", "--json", str(held)]) == 0
    from slotgen.train.miniature import HELD_OUT_SEED0, held_out_episodes

    report = json.loads(held.read_text())
    assert [r["episode_seed"] for r in report["rows"]] == [HELD_OUT_SEED0, HELD_OUT_SEED0 + 1]
    assert report["train"]["world"] == "standard" and set(report["means"]) >= {"presence", "duplicate_rate"}
    assert held_out_episodes(2, "reduced")[0].config.lanes == 2
    # the episodes it scores are the ones the run trained on
    trained = build_dataset(2, seed=3, max_gap=TrainConfig().max_gap)
    again = [clip_from_episode(ep) for ep in training_episodes(2, 3, TrainConfig().max_gap)]
    assert [c.chunk_captions for c in trained] == [c.chunk_captions for c in again]
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(trained, again))


@pytest.mark.slow
def test_a_resumed_run_continues_step_for_step(tmp_path):
    """`train-miniature --resume DIR`: a run stopped after a checkpoint and resumed writes the same weights
    and losses as the uninterrupted run (same threads), and snapshots are loadable folders."""
    from slotgen.models.miniature import load_miniature
    from slotgen.train.miniature import CHECKPOINT, load_checkpoint

    cfg = dict(seed=2, steps=5, episodes=3, batch=2, clip_chunks=2, world="reduced", slots=TINY_SLOTS, threads=1)
    whole = train_miniature(TrainConfig(**cfg, checkpoint_every=0), tmp_path / "whole", log=lambda m: None)
    assert not (tmp_path / "whole" / CHECKPOINT).exists()
    part = train_miniature(TrainConfig(**cfg, checkpoint_every=2, snapshot_every=2), tmp_path / "split",
                           log=lambda m: None, stop_after=3)
    assert part.steps == 3 and not (tmp_path / "split" / "weights.safetensors").exists()
    assert load_checkpoint(tmp_path / "split")["step"] == 3
    assert load_miniature(tmp_path / "split" / "snapshots" / "step-000002").transformer is not None
    # the stored config wins over the one passed in: a resumed run is the run it continues
    rest = train_miniature(TrainConfig(steps=99, world="standard"), tmp_path / "split", log=lambda m: None, resume=True)
    assert rest.steps == 5 and rest.losses == whole.losses
    assert (tmp_path / "split" / "weights.safetensors").read_bytes() == (tmp_path / "whole" / "weights.safetensors").read_bytes()
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert config["training"]["config"]["world"] == "reduced"
    assert not (tmp_path / "split" / CHECKPOINT).exists()  # a finished run leaves nothing to resume


def test_resume_without_a_checkpoint_and_an_unknown_world_are_one_line_errors(tmp_path):
    for args, needle in ((["--resume"], "no checkpoint"), (["--world", "tiny"], "--world")):
        r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), *args])
        assert r.exit_code == 2 and needle in _out(r), (args, _out(r))
        assert "Traceback" not in _out(r)
    (tmp_path / "bad" / "checkpoint").mkdir(parents=True)
    (tmp_path / "bad" / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "bad"), "--resume"])
    assert r.exit_code == 2 and "cannot read" in _out(r) and "Traceback" not in _out(r)


def test_a_short_time_budget_scales_the_data_and_the_slot_stage():
    """`--minutes 1` must end near a minute: the data and the φ stage (sized for 55 minutes) scale down."""
    from slotgen.train.miniature import fit_to_budget

    short = fit_to_budget(TrainConfig(minutes=1))
    assert short.episodes == 8 and short.slots.episodes == 4 and short.slots.steps == 10
    half = fit_to_budget(TrainConfig(minutes=27.5))
    assert half.episodes == 128 and half.slots.episodes == 24 and half.slots.steps == 200
    kept = TrainConfig(minutes=1, episodes=64)
    kept.slots.steps = 50
    fit_to_budget(kept, given={"episodes", "slots.steps"})
    assert kept.episodes == 64 and kept.slots.steps == 50 and kept.slots.episodes == 4  # what the user set stays
    for cfg in (TrainConfig(minutes=55), TrainConfig(minutes=120), TrainConfig(minutes=1, steps=30)):
        before = cfg.to_dict()
        assert fit_to_budget(cfg).to_dict() == before  # a full budget or an exact step count: unchanged


def test_train_miniature_cli_scales_a_short_budget(tmp_path, monkeypatch):
    import slotgen.train.miniature as mini

    seen = {}
    monkeypatch.setattr(mini, "train_miniature", lambda cfg, out, **kw: seen.update(cfg=cfg) or mini.TrainResult(out=out))
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "x"), "--minutes", "1", "--slot-steps", "7"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"].episodes == 8 and seen["cfg"].slots.steps == 7 and seen["cfg"].slots.episodes == 4
