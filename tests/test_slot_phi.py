"""Slot projections φ as files of their own (slot_phi.safetensors), learned without labels, and slot
settings relative to the model's tokens per latent frame."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from slotgen.cli import app
from slotgen.errors import SlotgenError
from slotgen.memory.phi_file import PHI_FILE, attach_phi, phi_digest, read_phi, save_phi
from slotgen.memory.slot import SlotConfig
from slotgen.memory.slot_attention import LinearPhi
from slotgen.models import load_model
from slotgen.storyboard import parse_storyboard
from slotgen.train.slots_unsup import (KeyChunk, UnsupConfig, contrast_loss, reconstruction_loss, similarity_loss,
                                      temporal_loss, train_unsupervised)

ASSETS = Path(__file__).resolve().parents[1] / "slotgen" / "models" / "assets" / "miniature"
SB = "prompts:\n  - {at: 0s, prompt: a red circle stays on a blue background}\nduration: %s\nmemory: {policy: slot}\n"


def _out(r) -> str:
    return r.stderr if hasattr(r, "stderr") else r.output


# -- files keep their mode; the model's files stay the model's ----------------------------------------------
def test_atomic_output_gives_the_mode_a_plain_file_would_have(tmp_path):
    from safetensors.torch import save_file

    from slotgen.atomic import atomic_output

    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))  # safetensors creates its file 0o600
        assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "w.safetensors", 0o640)
        with atomic_output(tmp_path / "w.safetensors") as tmp:  # a replaced file keeps its own mode
            save_file({"a": torch.ones(2)}, str(tmp))
        assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_write_miniature_refuses_a_tokenizer_that_does_not_fit_the_text_encoder(tmp_path):
    from slotgen.models.miniature import write_miniature

    b = load_model("miniature")  # its text encoder has fewer rows than today's VOCABULARY gives
    with pytest.raises(ValueError, match="token rows"):
        write_miniature(tmp_path / "m", modules=(b.transformer, b.vae, b.text_encoder))
    assert not (tmp_path / "m" / "weights.safetensors").exists()
    from slotgen.train.slots import phi_tensors

    write_miniature(tmp_path / "m", modules=(b.transformer, b.vae, b.text_encoder), tokenizer=b.tokenizer,
                    slot_phi=phi_tensors(b.slot_phi))
    assert load_model(str(tmp_path / "m")).digest == b.digest


@pytest.mark.slow
def test_train_slots_leaves_the_model_files_byte_identical_and_renders_still_work(tmp_path):
    folder = tmp_path / "mini"
    shutil.copytree(ASSETS, folder)
    before = {p.name: (p.read_bytes(), p.stat().st_mode) for p in folder.iterdir()}
    r = CliRunner().invoke(app, ["train-slots", "--model", str(folder), "--supervised", "--episodes", "2", "--steps", "2",
                                 "--batch", "4", "--threads", "1", "-q"])
    assert r.exit_code == 0, _out(r)
    for name, (data, mode) in before.items():  # config, tokenizer, weights: untouched
        assert (folder / name).read_bytes() == data and (folder / name).stat().st_mode == mode, name
    assert (folder / PHI_FILE).stat().st_mode & 0o044  # readable by others, like the weights
    bundle = load_model(str(folder))
    assert phi_digest(bundle.slot_phi) == read_phi(folder / PHI_FILE).digest  # the folder picks up its φ
    assert read_phi(folder / PHI_FILE).config["mode"] == "supervised"
    r = CliRunner().invoke(app, ["render", str(_storyboard(tmp_path, "0.2s")), "--model", str(folder), "-o",
                                 str(tmp_path / "a.mp4"), "-q"])
    assert r.exit_code == 0, _out(r)


def _storyboard(tmp_path, duration: str) -> Path:
    p = tmp_path / "sb.yaml"
    p.write_text(SB % duration)
    return p


# -- slot settings relative to the model ----------------------------------------------------------------
def test_slot_sizes_follow_the_tokens_per_frame_and_keep_the_miniature_values():
    c = SlotConfig()
    assert c.for_frame(16) is c  # the miniature: 16 tokens per frame → the defaults, nothing changes
    wan = c.for_frame(1560)  # Wan2.1 at 832×480
    assert (wan.top_r, wan.budget, wan.top_k) == (390, 9360, 8)
    assert SlotConfig(budget=500).for_frame(1560).top_r == 390 and SlotConfig(budget=300).for_frame(1560).top_r == 300
    assert SlotConfig(top_r=7).for_frame(1560).budget == 9360
    assert SlotConfig(top_r=500).top_r == 500  # fits the relative budget; checked when resolved
    with pytest.raises(ValueError, match="must not exceed budget"):
        SlotConfig(top_r=500).for_frame(16)


def test_a_render_on_a_wan_with_many_tokens_per_frame_resolves_and_shows_its_slot_sizes():
    from slotgen.render import Renderer
    from tests.test_wan_loading import tiny_random

    import dataclasses

    bundle = tiny_random()  # stride 16: a model made for 256×128 has 16×8 = 128 tokens per latent frame
    bundle = dataclasses.replace(bundle, settings=dataclasses.replace(bundle.settings, resolution=(256, 128)))
    sb = parse_storyboard(SB % "0.5s" + "resolution: 64x64\n", "<t>")  # relative to the model, not the render
    r = Renderer(sb, bundle=bundle)
    m = r.storyboard.memory
    assert (m.top_r, m.budget, m.top_k) == (32, 768, 8) and r.policy.config.top_r == 32
    line = r.memory_line()
    assert "top_r 32" in line and "budget 768" in line and "model's 128 tokens" in line and "training-free" in line
    from slotgen.render import resolved_storyboard

    plain = parse_storyboard(SB % "0.5s" + "resolution: 32x32\n", "<t>")
    mini = Renderer(plain, bundle=load_model("miniature"))  # what it runs and snapshots: exactly as before
    assert mini.storyboard.to_yaml() == resolved_storyboard(plain, "slotgen").to_yaml()
    assert (mini.storyboard.memory.top_r, mini.storyboard.memory.budget) == (4, 96)


# -- φ files ------------------------------------------------------------------------------------------------
def _phi(layers: int, width: int, seed: int = 0) -> LinearPhi:
    g = torch.Generator().manual_seed(seed)
    return LinearPhi([torch.randn(8, width, generator=g) for _ in range(layers)])


def test_phi_files_are_checked_against_the_model(tmp_path):
    from slotgen.errors import ModelError

    b = load_model("miniature")
    width = 128
    save_phi(tmp_path / "ok.safetensors", _phi(4, width), model_digest=b.digest, model_name=b.name, config={"x": 1})
    got = attach_phi(b, tmp_path / "ok.safetensors")
    assert phi_digest(got.slot_phi) == phi_digest(_phi(4, width)) and got.slot_phi_source.endswith("ok.safetensors")
    save_phi(tmp_path / "other.safetensors", _phi(4, width), model_digest="f" * 64, model_name="x", config={})
    with pytest.raises(ModelError, match="was trained on model 'x'"):
        attach_phi(b, tmp_path / "other.safetensors")
    save_phi(tmp_path / "three.safetensors", _phi(3, width), model_digest=b.digest, model_name=b.name, config={})
    with pytest.raises(ModelError, match="has 3 layers but model 'miniature' has 4"):
        attach_phi(b, tmp_path / "three.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ModelError, match="not a safetensors file"):
        attach_phi(b, tmp_path / "junk.safetensors")
    r = CliRunner().invoke(app, ["render", str(_storyboard(tmp_path, "0.2s")), "--slot-phi",
                                 str(tmp_path / "other.safetensors"), "-o", str(tmp_path / "a.mp4"), "-q"])
    assert r.exit_code == 2 and _out(r).count("\n") == 1 and "was trained on model" in _out(r)


@pytest.mark.slow
def test_snapshots_record_the_phi_and_resume_refuses_another(tmp_path):
    b = load_model("miniature")
    phi = tmp_path / "phi.safetensors"
    save_phi(phi, _phi(4, 128, seed=1), model_digest=b.digest, model_name=b.name, config={})
    sb = _storyboard(tmp_path, "0.4s")
    r = CliRunner().invoke(app, ["render", str(sb), "--slot-phi", str(phi), "-o", str(tmp_path / "a.mp4"),
                                 "--snapshot", str(tmp_path / "a.pt")])
    assert r.exit_code == 0, _out(r)
    assert "top_r 4" in _out(r) and str(phi) in _out(r)  # the render's first lines: resolved sizes and φ
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "a.pt")])
    assert r.exit_code == 0 and phi_digest(_phi(4, 128, seed=1))[:12] in r.output.replace("\n", "")
    more = ["resume", str(tmp_path / "a.pt"), "-p", "a red circle stays", "-d", "0.2s", "-q"]
    r = CliRunner().invoke(app, more + ["-o", str(tmp_path / "b.mp4")])  # the recorded φ file is found again
    assert r.exit_code == 0, _out(r)
    r = CliRunner().invoke(app, more + ["-o", str(tmp_path / "c.mp4"), "--slot-phi", "training-free"])
    assert r.exit_code == 2 and "was rendered with slot φ" in _out(r) and _out(r).count("\n") == 1


# -- the unsupervised objective -----------------------------------------------------------------------------
def test_reconstruction_prefers_slots_that_follow_the_keys():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    target = centres[y][None]  # (1, N, W) unit keys in three groups
    u = torch.eye(3, 4)[None]  # (1, S=3, D'=4)
    dec_w, dec_b = torch.zeros(16, 4), torch.zeros(16)
    dec_w[:, :3] = centres.T  # slot s decodes to centre s
    follows = F.one_hot(y, 3).float().T[None]  # (1, S, N)
    crossed = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), 3).float().T[None]
    assert float(reconstruction_loss(follows, u, target, dec_w, dec_b)) < 1e-6
    assert float(reconstruction_loss(crossed, u, target, dec_w, dec_b)) > 0.5


def test_the_temporal_term_rewards_slots_that_follow_key_correspondences():
    g = torch.Generator().manual_seed(1)
    keys = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    order = torch.tensor([2, 0, 3, 1])  # frame 1 holds frame 0's tokens, moved
    target = torch.cat([keys, keys[order]])[None]  # (1, 2·4, W)
    slot0 = torch.tensor([0, 0, 1, 1])  # two objects of two tokens each
    a_true = F.one_hot(torch.cat([slot0, slot0[order]]), 2).float().T[None]  # (1, S, 8): each object keeps its slot
    a_wrong = F.one_hot(torch.cat([slot0, 1 - slot0[order]]), 2).float().T[None]
    a_true, a_wrong = 0.9 * a_true + 0.05, 0.9 * a_wrong + 0.05  # soft, as slot attention gives
    assert float(temporal_loss(a_true, target, 2, 0.1)) < float(temporal_loss(a_wrong, target, 2, 0.1)) - 1.0


def test_slot_contrast_rewards_slots_that_stay_themselves_and_differ_from_each_other():
    g = torch.Generator().manual_seed(2)
    u = F.normalize(torch.randn(2, 4, 8, generator=g), dim=-1)  # (B, S, D') slots of a chunk
    kept = F.normalize(u + 0.05 * torch.randn(2, 4, 8, generator=g), dim=-1)  # the next chunk: the same slots
    swapped = kept[:, [1, 0, 2, 3]]  # slots 0 and 1 traded their content
    split = u.clone()
    split[:, 1] = split[:, 0]  # one thing over two slots: indistinguishable
    assert float(contrast_loss(u, kept, 0.1)) < 0.05
    assert float(contrast_loss(u, swapped, 0.1)) > float(contrast_loss(u, kept, 0.1)) + 2.0
    assert float(contrast_loss(split, split, 0.1)) > float(contrast_loss(u, u, 0.1)) + 0.3


def test_the_similarity_target_rewards_slots_that_hold_tokens_with_similar_keys():
    g = torch.Generator().manual_seed(4)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    target = F.normalize(centres[y] + 0.05 * torch.randn(8, 16, generator=g), dim=-1)[None]  # (1, N, W)
    follows = 0.9 * F.one_hot(y, 3).float().T[None] + 0.05  # (1, S, N) soft, as slot attention gives
    crossed = 0.9 * F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), 3).float().T[None] + 0.05
    one = torch.ones(1, 3, 8) / 3  # every token in every slot alike: no grouping
    good = float(similarity_loss(follows, target, 0.1))
    assert good < float(similarity_loss(crossed, target, 0.1)) - 0.5
    assert good < float(similarity_loss(one, target, 0.1)) - 0.3


def test_standardised_features_make_phi_blind_to_each_key_channels_scale(tmp_path):
    bundle = load_model("miniature")
    chunks = _key_chunks(2, 3)
    scale = torch.ones(32)
    scale[::3] = 4.0  # a power of two: the float16 keys scale exactly
    scaled = [KeyChunk([k * scale.half() for k in c.keys], c.frames, c.cells, c.source) for c in chunks]

    def fit(data, target):
        out = tmp_path / f"phi{len(list(tmp_path.iterdir()))}.safetensors"
        cfg = UnsupConfig(seed=0, steps=5, batch=4, dim=8, target=target)
        return train_unsupervised(bundle, [Path("s")] * 2, out, cfg, kind="videos", chunks=data,
                                  log=lambda m: None, checkpoint_every=0).phi

    k = chunks[0].keys[0].float()
    for target, blind in (("standardised", True), ("keys", False)):
        a, b = fit(chunks, target)(0, k), fit(scaled, target)(0, k * scale)
        assert torch.allclose(a, b, atol=1e-3) == blind, target  # W · diag(1/σ) is what the file holds
    assert not torch.equal(fit(chunks, "similarity").weights[0], fit(chunks, "keys").weights[0])
    with pytest.raises(SlotgenError, match="--target: expected one of keys, standardised, similarity"):
        UnsupConfig(target="pixels").validate()


def test_train_slots_cli_names_a_bad_target_in_one_line(tmp_path):
    r = CliRunner().invoke(app, ["train-slots", "--model", "miniature", "--videos", str(tmp_path), "--out",
                                 str(tmp_path / "phi.safetensors"), "--target", "pixels"])
    assert r.exit_code != 0 and "--target: expected one of" in _out(r) and "Traceback" not in _out(r)


def _key_chunks(n_sources: int, per_source: int, seed: int = 3) -> list:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(4, 32, generator=g), dim=-1)
    out = []
    for src in range(n_sources):
        for _ in range(per_source):
            y = torch.randint(0, 4, (2 * 8,), generator=g)  # F = 2 frames of 8 cells, four kinds of token
            k = centres[y] + 0.3 * torch.randn(16, 32, generator=g)
            out.append(KeyChunk([k.half(), k.flip(-1).half()], 2, 8, src))
    return out


def test_the_default_objective_is_reconstruction_only():
    assert UnsupConfig().temporal_weight == 0.0 and UnsupConfig().contrast_weight == 0.0 and UnsupConfig().slots == 0


def test_slot_contrast_pairs_consecutive_chunks_of_one_source_and_changes_what_is_learned(tmp_path):
    bundle = load_model("miniature")
    chunks = _key_chunks(2, 3)

    def fit(data, **kw):
        out = tmp_path / f"phi{len(list(tmp_path.iterdir()))}.safetensors"
        cfg = UnsupConfig(seed=0, steps=3, batch=4, dim=8, temporal_weight=0.0, **kw)
        return train_unsupervised(bundle, [Path("s")] * 2, out, cfg, kind="videos", chunks=data,
                                  log=lambda m: None, checkpoint_every=0)

    plain, contrast = fit(chunks), fit(chunks, contrast_weight=1.0)
    assert not torch.equal(plain.phi.weights[0], contrast.phi.weights[0])  # the term reaches φ
    assert contrast.losses[0] > plain.losses[0] + 0.5  # the InfoNCE of 8 slots is in the loss
    assert torch.equal(fit(chunks, contrast_weight=1.0).phi.weights[1], contrast.phi.weights[1])  # repeats
    assert not torch.equal(fit(chunks, slots=3).phi.weights[0], plain.phi.weights[0])  # a training slot count
    lonely = [KeyChunk(c.keys, c.frames, c.cells, i) for i, c in enumerate(chunks)]  # no two of one source
    with pytest.raises(SlotgenError, match="consecutive chunks of one source"):
        fit(lonely, contrast_weight=1.0)


def _clips(folder: Path, n: int, frames: int = 12, size=(64, 64), fps: int = 16) -> Path:
    from slotgen.video.writer import MP4Writer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        video = np.zeros((frames, size[1], size[0], 3), np.uint8)
        for t in range(frames):  # a square crossing a flat background
            video[t, :, :] = (30, 60, 200)
            x = (4 * t + 8 * i) % (size[0] - 16)
            video[t, 20:36, x:x + 16] = rng.integers(150, 255, 3)
        with MP4Writer(folder / f"clip{i}.mp4", fps=fps, size=size) as w:
            w.write(video)
    return folder


@pytest.mark.slow
def test_train_slots_without_labels_stops_on_a_signal_and_resumes_to_the_same_phi(tmp_path):
    clips = _clips(tmp_path / "clips", 3)
    (clips / "broken.mp4").write_bytes(b"no video here")
    base = [sys.executable, "-m", "slotgen", "train-slots", "--model", "miniature", "--videos", str(clips),
            "--steps", "6", "--batch", "4", "--threads", "1"]
    env = {**os.environ, "SLOTGEN_TRAIN_SLOTS_HOLD": "1"}
    p = subprocess.Popen(base + ["--out", str(tmp_path / "a.safetensors")], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, stdin=subprocess.PIPE)
    lines = []
    for line in p.stdout:  # stop during the key collection
        lines.append(line)
        if line.startswith("keys ["):
            p.send_signal(signal.SIGTERM)
            p.stdin.write("\n")
            p.stdin.flush()
            break
    out = "".join(lines) + p.communicate(timeout=120)[0]
    assert p.returncode == 143, out
    assert "broken.mp4: cannot read it as a video" in out and "interrupted: checkpoint" in out
    assert (tmp_path / "a.checkpoint.pt").is_file() and not (tmp_path / "a.safetensors").exists()
    r = subprocess.run(base + ["--out", str(tmp_path / "a.safetensors"), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming at source 1/4" in r.stdout and "ETA" in r.stdout
    assert not (tmp_path / "a.checkpoint.pt").exists()
    r = subprocess.run(base + ["--out", str(tmp_path / "b.safetensors")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = read_phi(tmp_path / "a.safetensors"), read_phi(tmp_path / "b.safetensors")
    assert a.digest == b.digest and a.config["mode"] == "unsupervised"  # interrupted or not: the same φ
    assert a.model_digest == load_model("miniature").digest


@pytest.mark.slow
def test_wan_1_3b_random_clips_to_phi_to_a_render_its_snapshot_and_resume(tmp_path):
    """The whole path at real shapes (30 layers, 12 heads × 128), small resolution: clips → φ file →
    a render that uses it → a snapshot that records it → resume (and a resume with another φ refused)."""
    from slotgen.errors import SnapshotError
    from slotgen.memory.phi_file import attach_phi
    from slotgen.render import render
    from slotgen.resume import resume
    from slotgen.snapshot import load_snapshot
    from slotgen.train.slots_unsup import UnsupConfig, train_slots

    bundle = load_model("wan-1.3b-random")
    clips = _clips(tmp_path / "clips", 1, frames=15, size=(96, 64), fps=24)  # resized and resampled to 16 fps
    logs: list[str] = []
    out = train_slots("wan-1.3b-random", tmp_path / "phi.safetensors", UnsupConfig(steps=2, batch=2, cells=8),
                      videos=clips, size=(64, 64), bundle=bundle, log=logs.append)
    assert any("24 fps resampled to the model's 16 fps" in m for m in logs), logs
    assert any("96x64 resized to the model's 64x64" in m for m in logs), logs
    pf = read_phi(out)
    assert len(pf.phi.weights) == 30 and pf.phi.weights[0].shape == (32, 1536) and pf.model_digest == bundle.digest

    sb = parse_storyboard(SB % "0.5s" + "resolution: 64x64\nsampler: {steps: 1}\n", "<wan>")  # 2 forwards a chunk
    with_phi = attach_phi(bundle, out)
    rep = render(sb, tmp_path / "a.mp4", bundle=with_phi, snapshot=tmp_path / "a.pt")
    assert rep.memory_stats["slot_phi"] == {"digest": pf.digest, "source": str(out.resolve())}
    assert rep.memory_stats["settings"]["top_r"] == 390  # a quarter of the model's 1560 tokens per frame
    snap = load_snapshot(tmp_path / "a.pt")
    assert snap.model["slot_phi"]["digest"] == pf.digest
    with pytest.raises(SnapshotError, match="was rendered with slot φ"):
        resume(snap, tmp_path / "x.mp4", prompt="a red circle stays", duration=0.5, bundle=bundle, slot_phi="training-free")
    more = resume(snap, tmp_path / "b.mp4", prompt="a red circle stays", duration=0.5, bundle=bundle)  # φ found again
    assert more.frames > 0 and more.memory_stats["slot_phi"]["digest"] == pf.digest


def test_a_wan_folder_uses_its_own_phi_file(tmp_path_factory):
    from tests.test_wan_loading import tiny_folder as _fixture  # noqa: F401 - the folder builder below

    folder = _fixture.__wrapped__(tmp_path_factory)
    bundle = load_model(str(folder))
    assert bundle.slot_phi is None
    cfg = bundle.transformer.config
    phi = _phi(len(bundle.transformer.blocks), cfg.num_attention_heads * cfg.attention_head_dim)
    save_phi(folder / PHI_FILE, phi, model_digest=bundle.digest, model_name=bundle.name, config={})
    again = load_model(str(folder))
    assert phi_digest(again.slot_phi) == phi_digest(phi) and again.slot_phi_source == str((folder / PHI_FILE).resolve())
    assert again.digest == bundle.digest
