"""Attention presets pin what every pass of a run attends to, at which RoPE positions, in which pass.

The run: 8 chunks of 3 latent frames, prompt A for chunks 0-1, B from chunk 2 (a switch at latent frame
6, early enough that LongLive rewrites its sink) and C from chunk 6 (frame 18, later). The tables
below are written out from the reference projects' inference code (Self-Forcing 33593df, LongLive
2462895, MemFlow 7ed5147, see engine/presets.py), not computed: each pass is ``(kind, chunk, memory)``
where chunk and memory list ``(latent frame, temporal RoPE position)`` per frame block, in row order.
``gen`` stands for every denoising step and the commit pass of a chunk, which see the same memory.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slotgen.engine.generator import EngineOptions, StreamingEngine
from slotgen.engine.presets import PRESETS, get_preset
from slotgen.memory.registry import resolve_memory
from slotgen.errors import SlotgenError
from slotgen.memory import BankConfig, BankMemory, ChunkContext, KVBlock, build_policy, parse_memory_config
from tests.conftest import tiny_bundle

A, B, C = "a red circle", "a green square", "a blue star"
PROMPTS = [A, A, B, B, B, B, C, C]


def ab(*frames: int) -> list[tuple[int, int]]:
    """Frames at their absolute positions."""
    return [(f, f) for f in frames]


def at(frames, first: int) -> list[tuple[int, int]]:
    """Frames renumbered from ``first`` in order (rank positions)."""
    return [(f, first + i) for i, f in enumerate(frames)]


def R(a: int, b: int) -> list[int]:
    return list(range(a, b))


def run_trace(preset: str, memory: dict, prompts=PROMPTS, bundle=None):
    """Per chunk: the passes it ran, steps and commit merged into one ``gen`` entry."""
    bundle = bundle or tiny_bundle()
    cfg = resolve_memory(parse_memory_config({**memory, "preset": preset}), bundle.settings.preset)
    policy = build_policy(cfg, len(bundle.transformer.blocks))
    engine = StreamingEngine(bundle, policy, EngineOptions(seed=3, fps=16, width=48, height=32, steps=2, shift=5.0,
                                                           preset=cfg.preset))
    engine.state.trace = []
    chunks = []
    for p in prompts:
        start = len(engine.state.trace)
        engine.generate_chunk(prompts.index(p), p)
        passes = engine.state.trace[start:]
        recache = [("recache", e["chunk"], e["memory"]) for e in passes if e["pass"] == "recache"]
        gen = [(e["chunk"], e["memory"]) for e in passes if e["pass"] != "recache"]
        assert len(gen) == 3 and gen[0] == gen[1] == gen[2]  # 2 steps + commit see the same memory
        assert [e["pass"] for e in passes if e["pass"] != "recache"] == ["step", "step", "commit"]
        chunks.append(recache + [("gen", *gen[0])])
    return chunks, engine


def gen(chunk, memory):
    return [("gen", chunk, memory)]


EXPECTED = {
    # Self-Forcing: global attention over its 21-frame cache, then a rolling 21 frames including the
    # chunk (18 past); absolute positions; no re-cache at a prompt switch.
    "self_forcing": [gen(ab(*R(3 * c, 3 * c + 3)), ab(*R(max(0, 3 * c - 18), 3 * c))) for c in range(8)],
    # LongLive: sink 3 + local 12 − 3 (6 past + the chunk); absolute positions; switch at 6 re-runs
    # frames 0-5 in one unmasked pass (sink rewritten), switch at 18 re-runs 9-17 over the old sink.
    "longlive": [
        gen(ab(0, 1, 2), []),
        gen(ab(3, 4, 5), ab(0, 1, 2)),
        [("recache", ab(*R(0, 6)), [])] + gen(ab(6, 7, 8), ab(*R(0, 6))),
        gen(ab(9, 10, 11), ab(*R(0, 9))),
        gen(ab(12, 13, 14), ab(0, 1, 2, *R(6, 12))),
        gen(ab(15, 16, 17), ab(0, 1, 2, *R(9, 15))),
        [("recache", ab(*R(9, 18)), ab(0, 1, 2))] + gen(ab(18, 19, 20), ab(0, 1, 2, *R(12, 18))),
        gen(ab(21, 22, 23), ab(0, 1, 2, *R(15, 21))),
    ],
    # LongLive infinity: the same frames, renumbered by rank (sink 0-2, window, chunk last).
    "longlive_infinity": [
        gen(at([0, 1, 2], 0), []),
        gen(at([3, 4, 5], 3), at([0, 1, 2], 0)),
        [("recache", at(R(0, 6), 0), [])] + gen(at([6, 7, 8], 6), at(R(0, 6), 0)),
        gen(at([9, 10, 11], 9), at(R(0, 9), 0)),
        gen(at([12, 13, 14], 9), at([0, 1, 2, *R(6, 12)], 0)),
        gen(at([15, 16, 17], 9), at([0, 1, 2, *R(9, 15)], 0)),
        [("recache", at(R(9, 18), 3), at([0, 1, 2], 0))] + gen(at([18, 19, 20], 9), at([0, 1, 2, *R(12, 18)], 0)),
        gen(at([21, 22, 23], 9), at([0, 1, 2, *R(15, 21)], 0)),
    ],
    # MemFlow: [sink 3 ; bank slots ; local 9 − 3], absolute positions, no de-duplication; chunks 0, 3, 6
    # record their first frame, which joins the bank at the next offer; re-cache as LongLive, bank kept.
    "memflow": [
        gen(ab(0, 1, 2), []),
        gen(ab(3, 4, 5), ab(0, 1, 2, 0)),
        [("recache", ab(*R(0, 6)), ab(0))] + gen(ab(6, 7, 8), ab(0, 1, 2, 0, 3, 4, 5)),
        gen(ab(9, 10, 11), ab(0, 1, 2, 0, *R(3, 9))),
        gen(ab(12, 13, 14), ab(0, 1, 2, 0, 9, *R(6, 12))),
        gen(ab(15, 16, 17), ab(0, 1, 2, 0, 9, *R(9, 15))),
        [("recache", ab(*R(9, 18)), ab(0, 1, 2, 0, 9))] + gen(ab(18, 19, 20), ab(0, 1, 2, 0, 9, *R(12, 18))),
        gen(ab(21, 22, 23), ab(0, 1, 2, 0, 9, 18, *R(15, 21))),
    ],
    # slotgen's own pattern (the miniature): sink 3 + 9 past frames, rank positions, the window
    # re-cached chunk by chunk (causally) under the new prompt, the sink kept.
    "slotgen": [
        gen(at([0, 1, 2], 0), []),
        gen(at([3, 4, 5], 3), at([0, 1, 2], 0)),
        [("recache", at([3, 4, 5], 3), at([0, 1, 2], 0))] + gen(at([6, 7, 8], 6), at(R(0, 6), 0)),
        gen(at([9, 10, 11], 9), at(R(0, 9), 0)),
        gen(at([12, 13, 14], 12), at(R(0, 12), 0)),
        gen(at([15, 16, 17], 12), at([0, 1, 2, *R(6, 15)], 0)),
        [("recache", at([9, 10, 11], 3), at([0, 1, 2], 0)),
         ("recache", at([12, 13, 14], 6), at([0, 1, 2, 9, 10, 11], 0)),
         ("recache", at([15, 16, 17], 9), at([0, 1, 2, *R(9, 15)], 0))] + gen(at([18, 19, 20], 12),
                                                                               at([0, 1, 2, *R(9, 18)], 0)),
        gen(at([21, 22, 23], 12), at([0, 1, 2, *R(12, 21)], 0)),
    ],
}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_each_preset_attends_to_the_reference_frames_at_the_reference_positions(preset):
    policy = PRESETS[preset].memory.get("policy", "sink")
    chunks, _ = run_trace(preset, {"policy": policy})
    for c, (got, want) in enumerate(zip(chunks, EXPECTED[preset])):
        assert got == want, f"chunk {c}"


def test_slot_runs_on_a_presets_base_and_keeps_absolute_positions():
    """slot under longlive: LongLive's sink/window/re-cache, retrieved items at their own frame positions;
    under longlive_infinity the same memory is renumbered by rank."""
    chunks, engine = run_trace("longlive", {"policy": "slot", "top_k": 4, "budget": 48, "num_slots": 2, "top_r": 2})
    base = EXPECTED["longlive"]
    retrieved = 0
    for c, (got, want) in enumerate(zip(chunks, base)):
        assert [p[0] for p in got] == [p[0] for p in want]
        for (_, g_chunk, g_mem), (_, w_chunk, w_mem) in zip(got, want):
            assert g_chunk == w_chunk
            assert all(f == pos for f, pos in g_mem)  # absolute: every row at its own frame
            assert set(w_mem) <= set(g_mem)  # LongLive's sink + window are all there
            retrieved += len(set(g_mem) - set(w_mem))
    assert retrieved > 0  # items from frames that left the window were attended
    chunks, _ = run_trace("longlive_infinity", {"policy": "slot", "top_k": 4, "budget": 48, "num_slots": 2, "top_r": 2})
    _, chunk, mem = chunks[7][-1]
    distinct = sorted({f for f, _ in mem})  # rank mode: a row's position is its frame's rank (row order is free)
    assert all(p == distinct.index(f) for f, p in mem) and chunk[0][1] == len(distinct)


# -- MemFlow's bank rules, step by step ----------------------------------------------------------------
def _block(frame: int, magnitude: float) -> KVBlock:
    k = torch.full((1, 2, 1, 4), magnitude)  # (B, N=2 tokens, H=1, D=4)
    return KVBlock(k, k.clone(), torch.tensor([frame, frame]), torch.tensor([[0, 0], [0, 1]]))


def test_memflow_bank_offers_ranks_duplicates_and_breaks_ties_by_slot_order():
    pol = BankMemory(1, BankConfig(sink=0, window=3, bank_frames=3, write_every=2))
    pol.configure_stream(PRESETS["memflow"], chunk_frames=1)
    text = torch.ones(1, 5, 1, 4)  # relevance of a slot ∝ its key magnitude
    mags = {0: 1.0, 2: 5.0, 4: 3.0, 6: 4.0, 8: 9.0, 10: 2.0}

    def ctx(c, recache=False):
        return ChunkContext(chunk=c, frame_start=c, num_frames=1, prompt_index=0, prompt="p", recache=recache,
                            text_keys_padded=lambda layer: text, rotate_keys=lambda b: b.k)

    def chunk(c):
        pol.begin_chunk(ctx(c))
        slots = [int(b.frames[0]) for b in pol.slots[0]]
        pol.write(0, _block(c, mags.get(c, 0.0)))
        pol.end_chunk()
        return slots

    # offers at each chunk's first step; chunks 0, 2, 4, ... record their first frame
    assert [chunk(c) for c in range(7)] == [[], [0], [0], [0, 2], [0, 2], [0, 2, 4], [0, 2, 4]]
    assert chunk(7) == [2, 4, 6]  # full: the 2 best of (0, 2, 4) by relevance, then the new frame
    assert chunk(8) == [2, 6, 6]  # frame 6 offered again: it ranks second and is appended again
    assert chunk(9) == [2, 6, 8]  # equal scores (6, 6): the earlier slot stays
    # a prompt switch: the re-cache offer and the first step under the new prompt score with zero
    # text keys (MemFlow resets its cross-attention cache): the first two slots are kept in order
    assert pol.on_prompt_switch(ctx(10)) == [7, 8, 9]
    pol.begin_chunk(ctx(10, recache=True))
    assert [int(b.frames[0]) for b in pol.slots[0]] == [2, 6, 8]  # by relevance it would be [8, 2, 8]
    pol.end_chunk()
    assert chunk(10) == [2, 6, 8]
    assert chunk(11) == [8, 2, 10]  # text keys again: relevance ranks 8 (9.0) over 2 (5.0)
    assert [int(f) for f in pol.read(0).frames.unique_consecutive()] == [8, 2, 10, 11]  # slot 10 and local 10, 11
    assert pol.read(0).frames.tolist().count(10) == 4  # no de-duplication


# -- configuration --------------------------------------------------------------------------------------
def test_presets_fill_the_keys_a_storyboard_leaves_out():
    window = parse_memory_config({"policy": "window"})
    assert resolve_memory(window, "self_forcing").model_dump() == {"policy": "window", "preset": "self_forcing",
                                                                   "window": 21}
    none_given = parse_memory_config({"policy": "sink"}).model_copy()
    object.__setattr__(none_given, "__pydantic_fields_set__", set())  # what a storyboard without memory: holds
    assert resolve_memory(none_given, "memflow").model_dump() == {
        "policy": "bank", "preset": "memflow", "sink": 3, "window": 9, "bank_frames": 3, "write_every": 3}
    own = resolve_memory(parse_memory_config({"policy": "bank", "write_every": 1, "preset": "memflow"}), "slotgen")
    assert (own.preset, own.write_every, own.bank_frames) == ("memflow", 1, 3)
    assert parse_memory_config({"preset": "longlive"}).policy == "sink"  # a preset alone names its policy
    assert resolve_memory(parse_memory_config({"policy": "slot"}), "longlive").window == 9
    with pytest.raises(SlotgenError, match="unknown attention preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown attention preset"):
        parse_memory_config({"policy": "sink", "preset": "nope"})
    with pytest.raises(SlotgenError, match="smaller than a chunk"):
        PRESETS["longlive"].past_window(2, 3)


def test_the_miniature_keeps_its_own_pattern():
    from slotgen.models import load_model

    assert load_model("miniature").settings.preset == "slotgen"
    assert get_preset(None).name == "slotgen"
    assert (PRESETS["slotgen"].rope, PRESETS["slotgen"].recache, PRESETS["slotgen"].window_counts_chunk) == (
        "rank", "chunked", False)


# -- resume and snapshots ---------------------------------------------------------------------------------
RED, GREEN, YELLOW = ("a red circle moves right on a blue background", "a green square enters from the left",
                      "a yellow star moves up on a purple background")


def _story(text: str, name: str):
    from slotgen.storyboard import parse_storyboard

    return parse_storyboard(text, name)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_resume_is_bit_exact_under_every_preset_and_the_snapshot_records_it(preset, miniature, tmp_path):
    """Switches at latent frame 6 (chunk 2) and 15 (chunk 5); the split falls after chunk 3."""
    from slotgen.render import render
    from slotgen.resume import resume
    from slotgen.snapshot import load_snapshot
    from slotgen.video.writer import read_video

    head = f"fps: 16\nresolution: 32x32\nsampler: {{steps: 2}}\nseed: 5\nmemory: {{preset: {preset}}}\n"
    full = _story(head + f"duration: 5\nprompts:\n  - at: 0\n    prompt: {RED}\n  - at: 1.25\n    prompt: {GREEN}\n"
                  f"  - at: 3.5\n    prompt: {YELLOW}\n", "full.yaml")
    render(full, tmp_path / "full.mkv", bundle=miniature)
    part = _story(head + f"duration: 2.5\nprompts:\n  - at: 0\n    prompt: {RED}\n  - at: 1.25\n    prompt: {GREEN}\n",
                  "a.yaml")
    render(part, tmp_path / "a.mkv", bundle=miniature, snapshot=tmp_path / "a.pt")
    snap = load_snapshot(tmp_path / "a.pt")
    assert snap.memory.preset == preset  # the snapshot records the resolved preset and its keys
    assert snap.memory.policy == (PRESETS[preset].memory.get("policy") or "sink")
    more = _story(f"duration: 2.5\nprompts:\n  - at: 0\n    prompt: {GREEN}\n  - at: 1.0\n    prompt: {YELLOW}\n",
                  "more.yaml")
    resume(snap, tmp_path / "b.mkv", storyboard=more, bundle=miniature)
    pieces = np.concatenate([read_video(tmp_path / "a.mkv"), read_video(tmp_path / "b.mkv")])
    assert np.array_equal(pieces, read_video(tmp_path / "full.mkv"))


def test_cli_preset_flag_and_memory_flag_keep_the_preset(tmp_path):
    from slotgen.cli import memory_overrides
    from slotgen.errors import SlotgenError as Err

    def sb(memory: str = ""):
        return _story(f"duration: 1\n{memory}prompts:\n  - at: 0\n    prompt: {RED}\n", "s.yaml")

    plain = memory_overrides(sb(), None, {"preset": "memflow"})
    assert (plain.policy, plain.preset) == ("bank", "memflow")  # no memory section: the preset's policy
    slot = memory_overrides(sb("memory: {preset: longlive}\n"), "slot", {})
    assert (slot.policy, slot.preset) == ("slot", "longlive")  # --memory slot on LongLive's base
    assert memory_overrides(sb(), None, {"window": 5}).policy == "sink"
    with pytest.raises(Err, match="--preset: unknown attention preset 'x'"):
        memory_overrides(sb(), None, {"preset": "x"})


def test_inspect_rebuilds_a_memflow_bank_from_its_snapshot_state():
    """snapshot_policy builds the policy without an engine: the config's preset still selects MemFlow's rules."""
    chunks, engine = run_trace("memflow", {"policy": "bank"}, prompts=PROMPTS[:5])
    state = engine.policy.state_dict()
    rebuilt = build_policy(engine.policy.config, len(engine.bundle.transformer.blocks))
    rebuilt.load_state_dict(state)
    assert rebuilt.stats() == engine.policy.stats()
    assert rebuilt.stats()["bank"][0] == [0, 9]


def test_a_continuation_may_repeat_the_memory_section_it_started_with(miniature, tmp_path):
    from slotgen.errors import StoryboardError
    from slotgen.render import render
    from slotgen.resume import extend_storyboard
    from slotgen.snapshot import load_snapshot

    head = "fps: 16\nresolution: 32x32\nsampler: {steps: 1}\nmemory: {policy: sink, preset: longlive}\n"
    render(_story(head + f"duration: 0.5\nprompts:\n  - at: 0\n    prompt: {RED}\n", "a.yaml"), tmp_path / "a.mkv",
           bundle=miniature, snapshot=tmp_path / "a.pt")
    base = load_snapshot(tmp_path / "a.pt").storyboard
    assert base.memory.model_dump() == {"policy": "sink", "preset": "longlive", "sink": 3, "window": 9}
    same = _story(f"memory: {{policy: sink, preset: longlive}}\nduration: 1\nprompts:\n  - at: 0\n    prompt: {GREEN}\n",
                  "more.yaml")
    assert extend_storyboard(base, same).memory == base.memory
    other = _story(f"memory: {{policy: sink, window: 6}}\nduration: 1\nprompts:\n  - at: 0\n    prompt: {GREEN}\n",
                   "more.yaml")
    with pytest.raises(StoryboardError, match="differs from the snapshot's"):
        extend_storyboard(base, other)
