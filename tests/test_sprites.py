"""The sprite world (slotgen.world.sprites): token-aligned sprites, exact captions, an exact cell analyser,
its training recipe and its identity bench."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from slotgen.cli import app
from slotgen.world.sprites import (CELL, CHANCE, CHUNK, COLOURS, DOT, MASKS, ROWS, SHAPES, TRAITS, Sprite,
                                   analyse_sprites, draw_cell, held_out_episodes, read_cell, render_sprites,
                                   sprite_episode, storyboard_yaml, training_episodes, with_return_trait)


def test_every_sprite_fills_one_cell_and_reads_back_exactly():
    for shape, mask in MASKS.items():
        assert mask[DOT].all(), f"the dot must lie inside the {shape}"
    for shape, colour, trait in itertools.product(SHAPES, COLOURS, TRAITS):
        frame = np.zeros((64, 64, 3), np.uint8)
        draw_cell(frame, 2, 1, Sprite(shape, colour, trait), trait)
        on = frame.any(-1)
        assert on[2 * CELL : 3 * CELL, CELL : 2 * CELL].sum() == on.sum()  # nothing outside its cell
        r = read_cell(frame[2 * CELL : 3 * CELL, CELL : 2 * CELL])
        assert (r.shape, r.colour, r.trait) == (shape, colour, trait)
    assert not read_cell(np.zeros((CELL, CELL, 3), np.uint8)).sprite


def test_motion_is_whole_cells_at_chunk_boundaries():
    ep = sprite_episode(5)
    frames, labels = render_sprites(ep)
    for c in range(ep.chunks):
        chunk = frames[CHUNK * c : CHUNK * (c + 1)]
        assert (chunk == chunk[0]).all()  # the frames of a chunk are identical
        where = ep.cells[c]
        assert labels[CHUNK * c].any() == (where is not None)
        if where is not None:
            r, col = where
            assert labels[CHUNK * c, r * CELL : (r + 1) * CELL, col * CELL : (col + 1) * CELL].sum() == labels[CHUNK * c].sum()
    steps = [abs(ep.cells[c + 1][1] - ep.cells[c][1]) for c in range(ep.enter_chunk, ep.leave_chunk - 1)]
    assert steps == [1, 1, 1]


def test_captions_name_what_an_entrance_leaves_open_and_never_the_trait_after_it():
    from slotgen.train.miniature import world_vocabulary

    vocab = set(world_vocabulary("sprites"))
    for seed in range(40):
        ep = sprite_episode(seed)
        s, side, row, back_side, back_row, _, _ = ep.script
        enter = ep.captions[ep.enter_chunk]
        trait_words = "no dot" if s.trait == "no" else f"a {s.trait} dot"
        assert enter == f"a {s.colour} {s.shape} with {trait_words} enters from the {side} in the {ROWS[row]} row"
        ret = ep.captions[ep.return_chunk]
        assert ret == f"a {s.colour} {s.shape} returns from the {back_side} in the {ROWS[back_row]} row"
        for c, text in enumerate(ep.captions):
            assert set(re.findall(r"\w+", text)) <= vocab
            if c != ep.enter_chunk:
                assert "dot" not in text and not {"cyan", "pink", "white"} & set(text.split())
    assert CHANCE == 1 / len(TRAITS) <= 1 / 3


def test_held_out_episodes_are_new_combinations():
    train = {ep.script for ep in training_episodes(512, 0)}
    held = held_out_episodes(12)
    assert len({ep.script for ep in held}) == 12 and not train & {ep.script for ep in held}
    assert len(train) > 500  # 4 shapes × 5 colours × 4 traits × 4² rows × 2² sides × 9 gaps × 3 leads: few repeats


def test_ground_truth_scores_one_and_the_analyser_catches_errors():
    for seed in range(6):
        ep = sprite_episode(seed)
        frames, _ = render_sprites(ep)
        rep = analyse_sprites(frames, ep)
        assert (rep.presence, rep.compliance, rep.duplicate_rate, rep.identity_recall, rep.return_seen,
                rep.trait_accuracy) == (1.0, 1.0, 0.0, 1.0, 1.0, 1.0)
        for other in TRAITS:  # a trait swap at the return is caught; nothing else changes
            if other != ep.sprite.trait:
                swapped = analyse_sprites(render_sprites(with_return_trait(ep, other))[0], ep)
                assert swapped.identity_recall == 0.0 and swapped.presence == swapped.compliance == 1.0
    ep = sprite_episode(1)
    frames, _ = render_sprites(ep)
    ghost = frames.copy()
    r, c = ep.cells[ep.return_chunk]
    draw_cell(ghost[CHUNK * ep.return_chunk], (r + 2) % 4, c, ep.sprite, ep.sprite.trait)  # a second copy, one frame
    assert analyse_sprites(ghost, ep).duplicate_rate == pytest.approx(1 / ep.total_frames)
    wrong = np.zeros_like(frames)  # the right cells, the wrong colour
    other = Sprite(ep.sprite.shape, next(k for k in COLOURS if k != ep.sprite.colour), ep.sprite.trait)
    for ch, where in enumerate(ep.cells):
        if where is not None:
            draw_cell(wrong[CHUNK * ch], *where, other, other.trait)
            wrong[CHUNK * ch + 1 : CHUNK * (ch + 1)] = wrong[CHUNK * ch]
    rep = analyse_sprites(wrong, ep)
    assert rep.presence == 1.0 and rep.compliance == 0.0 and rep.identity_recall is None
    assert analyse_sprites(np.zeros_like(frames), ep).presence == 0.0


def test_storyboard_prompts_each_caption_at_its_chunk():
    from slotgen.storyboard import parse_storyboard

    ep = sprite_episode(3)
    sb = parse_storyboard(storyboard_yaml(ep, seed=7, memory={"policy": "slot"}), "<t>")
    assert sb.total_frames == ep.total_frames and sb.seed == 7
    for c in range(ep.chunks):
        assert sb.prompts[sb.prompt_index_at(CHUNK * c / sb.fps)].text == ep.captions[c]


def test_old_worlds_keep_their_recipe_and_vocabulary():
    from slotgen.models.miniature import VOCABULARY
    from slotgen.train.miniature import TrainConfig, world_vocabulary

    for world in ("standard", "reduced"):
        assert TrainConfig.for_world(world) == TrainConfig(world=world)
        assert world_vocabulary(world) == list(VOCABULARY)
    sprites = TrainConfig.for_world("sprites", steps=3)
    assert sprites.sigma_one_prob == 1.0 and sprites.train_text and sprites.steps == 3
    assert sprites.clip_chunks == 3 and sprites.placement_weight == 4.0 and TrainConfig().placement_weight == 1.0


def test_placement_weight_scales_the_entrance_and_return_chunks_only():
    """The sprite recipe weights the chunks that name the row (entrance, return) ×placement_weight, whole
    chunks (background cells included); the same draws with weight 1 give the unscaled weights."""
    import torch

    from slotgen.train.miniature import TrainConfig, sample_batch, sprite_clip
    from slotgen.world.sprites import sprite_episode

    ep = sprite_episode(3, gap=0, lead=0)
    clip = sprite_clip(ep)
    assert clip.placement_chunks == [ep.enter_chunk, ep.return_chunk]
    clip.latents = torch.zeros(48, ep.total_frames, 16, 16).half()
    weights = {}
    for w in (1.0, 4.0):
        cfg = TrainConfig.for_world("sprites", batch=16, placement_weight=w, return_prob=0.0, relocate_prob=0.0)
        b = sample_batch([clip], np.random.default_rng(0), torch.Generator().manual_seed(0), cfg)
        weights[w] = b.weight
    ratio = (weights[4.0] / weights[1.0])[:, 0, :, 0, 0]  # (B, nF): 4 on placement frames, 1 elsewhere
    assert set(ratio.unique().tolist()) == {1.0, 4.0}
    assert torch.equal(weights[4.0] / weights[1.0], ratio[:, None, :, None, None].expand_as(weights[1.0]))


def test_trait_weight_scales_the_dot_cells_of_every_drawn_sprite():
    """The sprite recipe weights the latent cells that overlap the dot's square of every drawn sprite
    ×trait_weight (no-dot sprites too), nothing else; the dot's pixels all lie inside those cells."""
    import torch

    from slotgen.train.miniature import STRIDE_S, TrainConfig, sample_batch, sprite_clip, sprite_trait_cells
    from slotgen.world.sprites import DOT_COLOURS, render_sprites, sprite_episode

    assert TrainConfig.for_world("sprites").trait_weight == 8.0 and TrainConfig().trait_weight == 1.0
    assert TrainConfig.for_world("sprites").trait_from == 2250 and TrainConfig().trait_from == 0
    ep = next(e for e in (sprite_episode(k, gap=0, lead=0) for k in range(20)) if e.sprite.trait != "no")
    cells = sprite_trait_cells(ep)  # (T, 16, 16)
    frames, _ = render_sprites(ep)
    for t in range(ep.total_frames):
        drawn = ep.cells[t // 3] is not None
        assert int(cells[t].sum()) == (2 if drawn else 0)  # the 4×4 dot spans 2 latent cells of 4×4 px
        if drawn:
            dot = np.all(frames[t] == np.array(DOT_COLOURS[ep.sprite.trait], np.uint8), axis=-1)  # (64, 64)
            ys, xs = np.nonzero(dot)
            assert len(ys) == 16 and cells[t][ys // STRIDE_S, xs // STRIDE_S].all()
    clip = sprite_clip(ep)
    clip.latents = torch.zeros(48, ep.total_frames, 16, 16).half()
    weights = {}
    for w in (1.0, 8.0):
        cfg = TrainConfig.for_world("sprites", batch=16, trait_weight=w, return_prob=0.0, relocate_prob=0.0)
        weights[w] = sample_batch([clip], np.random.default_rng(0), torch.Generator().manual_seed(0), cfg).weight
    ratio = weights[8.0] / weights[1.0]  # (B, 1, nF, 16, 16): 8 on the dot's cells, 1 elsewhere
    assert set(ratio.unique().tolist()) == {1.0, 8.0}
    assert int((ratio == 8.0).sum()) > 0 and (ratio == 8.0).sum(dim=(3, 4)).max() == 2


@pytest.mark.slow
def test_sprite_training_repeats_and_resumes_step_for_step(tmp_path):
    """`train-miniature --world sprites --steps N` repeats step for step (text encoder included), a resumed
    run equals the uninterrupted one, and the folder carries its words and its one-step sampler."""
    import json

    import torch

    from slotgen.models.miniature import load_miniature
    from slotgen.train.miniature import TrainConfig, train_miniature

    cfg = dict(steps=4, episodes=3, batch=2, threads=1, checkpoint_every=0)
    a = train_miniature(TrainConfig.for_world("sprites", **cfg), tmp_path / "a", log=lambda m: None)
    r = CliRunner().invoke(app, ["train-miniature", "--out", str(tmp_path / "b"), "--world", "sprites", "--steps", "4",
                                 "--episodes", "3", "--batch", "2", "--threads", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "weights.safetensors").read_bytes() == (tmp_path / "b" / "weights.safetensors").read_bytes()
    part = train_miniature(TrainConfig.for_world("sprites", **{**cfg, "checkpoint_every": 2}), tmp_path / "c",
                           log=lambda m: None, stop_after=2)
    assert part.steps == 2
    rest = train_miniature(TrainConfig(), tmp_path / "c", log=lambda m: None, resume=True)
    assert rest.losses == a.losses
    assert (tmp_path / "c" / "weights.safetensors").read_bytes() == (tmp_path / "a" / "weights.safetensors").read_bytes()
    from slotgen.models.miniature import SPECIAL_TOKENS, VOCABULARY

    bundle = load_miniature(tmp_path / "a")
    assert {"row", "upper", "lower", "no"} <= bundle.vocabulary and bundle.settings.steps == 1
    words = len(SPECIAL_TOKENS) + len(set(VOCABULARY)) + 4
    assert bundle.text_encoder.state_dict()["shared.weight"].shape[0] == words
    # the text encoder was trained: its word embeddings differ from the same run's with it frozen
    frozen = TrainConfig.for_world("sprites", **{**cfg, "steps": 1, "train_text": False})
    train_miniature(frozen, tmp_path / "d", log=lambda m: None)
    te_frozen = load_miniature(tmp_path / "d").text_encoder.state_dict()["shared.weight"]
    assert not torch.equal(te_frozen, bundle.text_encoder.state_dict()["shared.weight"])
    assert json.loads((tmp_path / "a" / "config.json").read_text())["training"]["config"]["world"] == "sprites"
    # scripts/frame_strip.py tiles a sprite episode of the trained folder (its world read from the folder)
    import importlib.util
    from pathlib import Path

    from PIL import Image

    path = Path(__file__).resolve().parents[1] / "scripts" / "frame_strip.py"
    spec = importlib.util.spec_from_file_location("frame_strip", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    png = tmp_path / "strip.png"
    assert mod.main(["--model", str(tmp_path / "a"), "--out", str(png), "--gap", "4"]) == 2  # not whole chunks
    assert mod.main(["--model", str(tmp_path / "a"), "--out", str(png), "--gap", "6", "--every", "6", "--scale", "1"]) == 0
    frames = sprite_episode(900_003, 1).total_frames
    assert Image.open(png).size == (len(range(1, frames, 6)) * 65, 2 * 64 + 2)


@pytest.mark.slow
def test_a_stopped_sprite_run_checkpoints_its_text_encoder_and_resumes(tmp_path):
    """A signal (should_stop) stops a sprite run, whose text encoder is trained, with a checkpoint that
    holds the text encoder, and --resume finishes it (the stop path once crashed on a missing encoder)."""
    import torch

    from slotgen.train.miniature import CHECKPOINT, TrainConfig, train_miniature

    done: list[int] = []
    cfg = TrainConfig.for_world("sprites", steps=3, episodes=3, batch=1, threads=1, checkpoint_every=0)
    part = train_miniature(cfg, tmp_path, log=lambda m: None, should_stop=lambda: len(done) >= 2,
                           on_step=lambda step, budget, loss: done.append(step))
    assert part.interrupted and part.steps == 2
    assert "text_encoder" in torch.load(tmp_path / CHECKPOINT, map_location="cpu", weights_only=True)
    rest = train_miniature(TrainConfig(), tmp_path, log=lambda m: None, resume=True)
    assert rest.steps == 3 and (tmp_path / "weights.safetensors").is_file()


@pytest.mark.slow
def test_sprite_identity_bench_scores_every_policy_on_the_same_episodes():
    from slotgen.bench.sprites import bench_sprite_episodes, run_sprite_identity_bench
    from slotgen.models.miniature import load_miniature

    eps = bench_sprite_episodes([3, 18], 1, 1000)
    assert [it["gap"] for it in eps] == [3, 18] and eps[1]["episode"].absent_frames() == 18
    res = run_sprite_identity_bench(["window", "slot"], [3, 18], 1, bundle=load_miniature(None), past="truth")
    assert res["ground_truth"]["all"]["identity_recall"]["mean"] == 1.0
    assert [row["seed"] for row in res["rows"] if row["policy"] == "window"] == \
        [row["seed"] for row in res["rows"] if row["policy"] == "slot"]
    assert set(res["paired_vs_window"]) == {"slot"}


def test_compliance_rule_needs_compliance_rising_to_target_and_duplicates_falling():
    from slotgen.bench.sprites import compliance_rule

    def pts(comp, dup):
        return [{"steps": s, "compliance": c, "duplicate_rate": d} for s, c, d in zip((200, 400, 600, 800), comp, dup)]

    good = compliance_rule(pts((0.3, 0.5, 0.62, 0.7), (0.6, 0.45, 0.4, 0.3)), 10_000)
    assert good["continue"] and good["compliance_fit"]["b"] > 0
    assert not compliance_rule(pts((0.3, 0.5, 0.62, 0.7), (0.6, 0.65, 0.6, 0.62)), 10_000)["continue"]  # duplicates flat
    assert not compliance_rule(pts((0.5, 0.52, 0.55, 0.56), (0.6, 0.45, 0.4, 0.3)), 10_000)["continue"]  # too slow
    assert not compliance_rule(pts((0.3, 0.5, 0.62, 0.7), (0.6, 0.45, 0.4, 0.3))[:3], 10_000)["continue"]  # 3 points


def test_trait_rule_needs_the_trait_rising_to_target_and_the_layout():
    from slotgen.bench.sprites import trait_rule

    def pts(comp, dup, trait, steps=(200, 400, 600, 800)):
        return [{"steps": s, "compliance": c, "duplicate_rate": d, "trait_accuracy": t}
                for s, c, d, t in zip(steps, comp, dup, trait)]

    layout = ((0.3, 0.5, 0.62, 0.7), (0.6, 0.45, 0.4, 0.3))
    assert trait_rule(pts(*layout, (0.2, 0.4, 0.5, 0.58)), 10_000)["continue"]
    assert not trait_rule(pts(*layout, (0.25, 0.26, 0.24, 0.25)), 10_000)["continue"]  # the trait stays at chance
    assert not trait_rule(pts((0.5, 0.52, 0.55, 0.56), layout[1], (0.2, 0.4, 0.5, 0.58)), 10_000)["continue"]  # layout
    # weighted from a later step: the layout must hold and the trait is fitted on the steps since that step
    late = (2400, 2550, 2700, 2850)
    held = ((0.95, 0.96, 0.94, 0.97), (0.05, 0.04, 0.06, 0.05))
    ok = trait_rule(pts(*held, (0.2, 0.4, 0.5, 0.58), late), 15_000, from_step=2250)
    assert ok["continue"] and ok["trait_fit"]["b"] > 0
    assert not trait_rule(pts(*held, (0.2, 0.22, 0.19, 0.21), late), 15_000, from_step=2250)["continue"]
    lost = ((0.95, 0.8, 0.7, 0.75), (0.05, 0.2, 0.3, 0.25))
    assert "compliance of the last 3" in trait_rule(pts(*lost, (0.2, 0.4, 0.5, 0.58), late), 15_000, from_step=2250)["reason"]
    assert not trait_rule(pts(*held, (0.2, 0.4, 0.5, 0.58), late)[:3], 15_000, from_step=2250)["continue"]


@pytest.mark.slow
def test_trait_weight_starts_at_trait_from(tmp_path):
    """Before ``trait_from`` a run trains exactly as with the dot unweighted; from it on the weight acts."""
    from slotgen.train.miniature import TrainConfig, train_miniature

    cfg = dict(steps=3, episodes=3, batch=2, threads=1, checkpoint_every=0)
    runs = {name: train_miniature(TrainConfig.for_world("sprites", **cfg, **kw), tmp_path / name, log=lambda m: None).losses
            for name, kw in (("unweighted", {"trait_weight": 1.0}), ("later", {"trait_weight": 8.0, "trait_from": 3}),
                             ("from_0", {"trait_weight": 8.0, "trait_from": 0}))}
    assert runs["later"] == runs["unweighted"]
    assert (tmp_path / "later" / "weights.safetensors").read_bytes() == (tmp_path / "unweighted" / "weights.safetensors").read_bytes()
    assert runs["from_0"][0] != runs["unweighted"][0]


def test_sprite_bench_rejects_gaps_that_are_not_whole_chunks():
    r = CliRunner().invoke(app, ["bench", "identity", "--world", "sprites", "--gaps", "4", "--policies", "window"])
    assert r.exit_code == 2 and "multiples of 3" in r.output and "Traceback" not in r.output


def test_the_kill_rule_fit_is_log_linear():
    from slotgen.bench.sprites import fit_log_curve

    fit = fit_log_curve([250, 500, 1000, 2000], [0.1 + 0.1 * k for k in range(4)], [4000])
    assert fit["b"] == pytest.approx(0.1 / np.log(2)) and fit["at"]["4000"] == pytest.approx(0.5)
    assert fit["steps_to_0.9"] == pytest.approx(4000 * 2**4)
    assert fit_log_curve([1, 2], [0.5, 0.4], [3])["steps_to_0.9"] is None
    with pytest.raises(ValueError):
        fit_log_curve([5, 5], [0.1, 0.2], [9])
