"""BankMemory (MemFlow): capacity, text-relevance compression, write cadence, prompt switch, resume."""

from __future__ import annotations

import io
import math

import torch

from slotgen.memory import SinkMemory
from slotgen.memory.bank import BankConfig, BankMemory, frame_key_means, text_relevance
from slotgen.memory.base import ChunkContext, KVBlock
from tests.test_slot_memory import make_engine, run

H, D = 2, 8
E = torch.eye(D)


def frame_block(frame: int, key_dir: torch.Tensor, tokens: int = 4) -> KVBlock:
    """One latent frame of ``tokens`` rows whose keys all equal ``key_dir`` (D,) in every head."""
    k = key_dir.expand(1, tokens, H, D).clone()  # (1, n, H, D)
    hw = torch.stack([torch.zeros(tokens, dtype=torch.long), torch.arange(tokens)], 1)  # (n, 2)
    return KVBlock(k, -k, torch.full((tokens,), frame), hw)


def commit(policy: BankMemory, chunk: int, block: KVBlock, text_keys: torch.Tensor, recache: bool = False) -> None:
    """One chunk of one latent frame through the protocol (begin → write → end)."""
    policy.begin_chunk(ChunkContext(chunk, chunk, 1, 0, "p", recache=recache, text_keys=lambda layer: text_keys))
    policy.write(0, block)
    policy.end_chunk()


def bank_frames(policy: BankMemory, layer: int = 0) -> list[int]:
    return policy.stats()["bank"][layer]


def test_text_relevance_is_the_memflow_mean_of_dot_products():
    gen = torch.Generator().manual_seed(0)
    text_keys = torch.randn(1, 5, H, D, generator=gen)  # (1, L, H, D)
    block = KVBlock(torch.randn(1, 12, H, D, generator=gen), torch.zeros(1, 12, H, D),
                    torch.tensor([4, 4, 4, 4, 7, 7, 7, 7, 9, 9, 9, 9]), torch.zeros(12, 2, dtype=torch.long))
    frames, means = frame_key_means(block)
    assert frames.tolist() == [4, 7, 9]
    got = text_relevance(text_keys, means)  # (3,)
    for i, f in enumerate(frames):
        k = block.k[:, block.frames == f]  # (1, n, H, D)
        brute = torch.einsum("blhd,bnhd->blhn", text_keys, k).mean() / math.sqrt(D)  # mean over l, h, n
        torch.testing.assert_close(got[i], brute)


def test_overflow_keeps_the_most_text_relevant_frames():
    policy = BankMemory(1, BankConfig(window=1, sink=0, bank_frames=2))
    text_keys = E[0].expand(1, 3, H, D).clone()  # the prompt points along e0
    strengths = [1.0, 3.0, 0.5, 2.0, 2.5, 2.5]
    for c, s in enumerate(strengths):
        commit(policy, c, frame_block(c, s * E[0] + E[1]), text_keys)
        written = strengths[: c + 1]
        best = sorted(range(len(written)), key=lambda i: (-written[i], i))[:2]  # ties keep the older frame
        assert bank_frames(policy) == sorted(best)
        assert policy.bank[0].num_tokens <= 2 * 4
    assert bank_frames(policy) == [1, 4]
    # the window (frame 5) is read once: the banked frame 1, then the window; frame 4 left the window
    assert policy.read(0).frames.unique().tolist() == [1, 4, 5]

    # after a prompt switch the *current* prompt decides: e1-aligned frames now win
    assert policy.on_prompt_switch(ChunkContext(6, 6, 0, 1, "q", recache=True)) == [5]
    assert bank_frames(policy) == [1, 4] and policy.local[0] is None  # bank kept, window dropped
    new_keys = E[1].expand(1, 3, H, D).clone()
    commit(policy, 6, frame_block(6, 0.1 * E[0] + 5.0 * E[1]), new_keys)
    assert bank_frames(policy) == [1, 6]  # under e1, frames 1 and 4 tie (1/sqrt(D)): the older stays
    assert policy.scores[0][6] > policy.scores[0][1] == policy.scores[0][4]


def test_write_every_and_sink_decide_which_frames_are_banked():
    text_keys = E[0].expand(1, 3, H, D).clone()
    policy = BankMemory(1, BankConfig(window=1, sink=2, bank_frames=10, write_every=2))
    for c in range(7):
        commit(policy, c, frame_block(c, E[0]), text_keys)
    assert bank_frames(policy) == [2, 4, 6]  # chunks 0, 2, 4, 6 write; frame 0 is a sink frame
    commit(policy, 8, frame_block(8, E[0]), text_keys, recache=True)  # re-cache passes never write the bank
    assert bank_frames(policy) == [2, 4, 6]


def test_capacity_is_never_exceeded_and_rows_are_never_duplicated():
    policy = BankMemory(2, BankConfig(window=6, sink=3, bank_frames=3))  # window spans 2 chunks
    engine = make_engine(policy, steps=1)
    prompts = ["a red circle", "a green square", "a blue star"]
    read_bank = 0
    for c in range(24):
        p = prompts[c // 8]
        engine.generate_chunk(prompts.index(p), p)
        for layer in range(2):
            assert len(bank_frames(policy, layer)) <= 3
            mem = policy.read(layer)
            cells = mem.frames * 1000 + mem.hw[:, 0] * 100 + mem.hw[:, 1]  # (M,) one id per token
            assert cells.unique().numel() == cells.numel()  # no row attended twice
            local = policy.local[layer].frames if policy.local[layer] is not None else torch.zeros(0, dtype=torch.long)
            read_bank += int((~torch.isin(mem.frames, local) & (mem.frames >= 3)).sum())  # neither sink nor window
    assert read_bank > 0  # bank frames were actually attended


def test_state_dict_round_trip_resumes_bit_exactly():
    prompts = ["a red circle"] * 4 + ["a green square"] * 4
    settings = BankConfig(window=3, sink=0, bank_frames=2)
    full_policy = BankMemory(2, settings)
    full = run(make_engine(full_policy), prompts)
    sink_only = run(make_engine(SinkMemory(2, window=3, sink=0)), prompts)
    assert not all(torch.equal(a, b) for a, b in zip(full, sink_only))  # the bank changes the video

    first = make_engine(BankMemory(2, settings))
    run(first, prompts[:5])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    policy = BankMemory(2)
    resumed = make_engine(policy)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert policy.config == settings
    rest = [resumed.generate_chunk(1, p).latents for p in prompts[5:]]
    assert all(torch.equal(a, b) for a, b in zip(rest, full[5:]))
    assert policy.stats() == full_policy.stats()
    assert policy.nbytes() == full_policy.nbytes() > SinkMemory.nbytes(policy)


def test_config_builds_the_policy_and_rejects_bad_values():
    import pydantic
    import pytest

    from slotgen.memory import build_policy
    from slotgen.memory import BankConfig, parse_memory_config

    policy = build_policy(parse_memory_config({"policy": "bank", "bank_frames": 6, "write_every": "2"}), 3)
    assert isinstance(policy, BankMemory) and policy.config == BankConfig(bank_frames=6, write_every=2)
    assert BankMemory(1).config == BankConfig()  # the config class holds the only defaults
    for bad in [{"bank_frames": 0}, {"write_every": 0}, {"window": 0}, {"sink": -1}, {"top_k": 3}]:
        with pytest.raises(pydantic.ValidationError):
            parse_memory_config({"policy": "bank", **bad})
