"""Chunked streaming attention == one full-sequence forward with a block-causal (windowed) mask.

The reference runs diffusers' stock ``WanAttnProcessor`` (absolute RoPE positions from the model's own
``rope`` module) with an explicit attention mask over the whole clip; the streaming side runs the
engine's processors chunk by chunk with the memory policy holding un-roped K/V and window-relative
positions. Equal outputs prove the cache, the position assignment and the window all behave.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from slotgen.engine.generator import EngineOptions, StreamingEngine
from slotgen.memory import SinkMemory, WindowMemory
from tests.conftest import tiny_bundle

F = 3  # latent frames per chunk


class MaskedWanProcessor(WanAttnProcessor):
    """The stock processor with a fixed attention mask (blocks never pass one)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def frame_mask(num_frames: int, tokens_per_frame: int, window: int | None, sink: int = 0) -> torch.Tensor:
    """Boolean (N, N) mask: a query in chunk c sees its own chunk and the memory frames the policy keeps."""
    q = torch.arange(num_frames)
    allowed = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    for qf in q:
        c = int(qf) // F
        start = c * F
        for kf in range(num_frames):
            own_chunk = start <= kf < start + F
            in_window = kf < start and (window is None or kf >= start - window)
            in_sink = kf < min(sink, start)
            allowed[qf, kf] = own_chunk or in_window or in_sink
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def reference_forward(bundle, latents, embeds, timesteps_per_frame, mask):
    tr = bundle.transformer
    procs = {}
    for i in range(len(tr.blocks)):
        procs[f"blocks.{i}.attn1.processor"] = MaskedWanProcessor(mask)
        procs[f"blocks.{i}.attn2.processor"] = WanAttnProcessor()
    tr.set_attn_processor(procs)
    tpf = latents.shape[3] * latents.shape[4] // 4  # tokens per latent frame (patch 2×2)
    t = timesteps_per_frame.repeat_interleave(tpf)[None]  # (1, num_tokens) per-token timesteps
    with torch.no_grad():
        return tr(hidden_states=latents, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]


@pytest.mark.parametrize(
    "policy_factory,window,sink",
    [
        (lambda n: WindowMemory(n, window=10_000), None, 0),  # unbounded: plain block-causal
        (lambda n: WindowMemory(n, window=6), 6, 0),  # chunk-aligned window
        (lambda n: WindowMemory(n, window=4), 4, 0),  # window cuts a chunk in half
    ],
)
def test_streaming_equals_full_masked_forward(policy_factory, window, sink):
    torch.manual_seed(0)
    bundle = tiny_bundle()
    num_chunks = 4
    T = num_chunks * F
    latents = torch.randn(1, 16, T, 4, 6)  # token grid 2×3 per frame
    embeds = torch.randn(1, 8, bundle.transformer.config.text_dim)
    policy = policy_factory(len(bundle.transformer.blocks))
    engine = StreamingEngine(bundle, policy, EngineOptions(seed=0, fps=16, width=48, height=32, steps=4, shift=5.0))
    tau = 625.0

    # streaming: commit chunks 0..c-1 (timestep 0), then predict chunk c at timestep tau
    stream_out = []
    from slotgen.memory.base import ChunkContext

    for c in range(num_chunks):
        ctx = ChunkContext(chunk=c, frame_start=c * F, num_frames=F, prompt_index=0, prompt="p")
        policy.begin_chunk(ctx)
        engine.state.epoch += 1
        chunk = latents[:, :, c * F : (c + 1) * F]
        stream_out.append(engine._forward(chunk, tau, c * F, embeds, commit=False))
        engine._forward(chunk, 0.0, c * F, embeds, commit=True)
        policy.end_chunk()

    tpf = 6
    mask = frame_mask(T, tpf, window, sink)
    for c in range(num_chunks):
        ts = torch.zeros(T)
        ts[c * F : (c + 1) * F] = tau  # chunk c noisy; its context is clean and cannot see it anyway
        # rows of later chunks are irrelevant for chunk c (block-causal), so one call per c suffices
        ref = reference_forward(bundle, latents, embeds, ts, mask)
        torch.testing.assert_close(stream_out[c], ref[:, :, c * F : (c + 1) * F], rtol=1e-4, atol=1e-5)


def test_sink_keeps_first_frames_with_window():
    """Sink + window: chunk c sees frames < sink and the last `window` frames; positions compressed."""
    torch.manual_seed(1)
    bundle = tiny_bundle()
    n = len(bundle.transformer.blocks)
    policy = SinkMemory(n, window=3, sink=3)
    engine = StreamingEngine(bundle, policy, EngineOptions(seed=0, fps=16, width=48, height=32, steps=4, shift=5.0))
    latents = torch.randn(1, 16, 5 * F, 4, 6)
    embeds = torch.randn(1, 8, bundle.transformer.config.text_dim)
    from slotgen.memory.base import ChunkContext

    for c in range(5):
        policy.begin_chunk(ChunkContext(c, c * F, F, 0, "p"))
        engine.state.epoch += 1
        engine._forward(latents[:, :, c * F : (c + 1) * F], 0.0, c * F, embeds, commit=True)
        policy.end_chunk()
        held = sorted({int(f) for f in policy.read(0).frames})
        expected = sorted(set(range(min(3, (c + 1) * F))) | set(range(max(3, (c + 1) * F - 3), (c + 1) * F)))
        assert held == expected


def test_positions_stay_inside_a_tiny_rope_table():
    """A video far longer than the RoPE table works, because positions are window-relative."""
    torch.manual_seed(2)
    bundle = tiny_bundle(rope_max_seq_len=8)
    policy = WindowMemory(len(bundle.transformer.blocks), window=3)
    engine = StreamingEngine(bundle, policy, EngineOptions(seed=0, fps=16, width=48, height=32, steps=2, shift=5.0))
    embeds_prompt = "a red circle"
    for _ in range(6):  # 18 latent frames > 8 positions
        res = engine.generate_chunk(0, embeds_prompt)
        assert torch.isfinite(res.latents).all()
    assert engine.next_chunk * F > 8


def test_a_commit_pass_ends_after_the_last_layers_kv():
    """A commit pass is run for its K/V only: it ends once the last block's K/V are in the memory (that
    block's query, cross-attention and FFN and the output head never run), and the memory then holds
    exactly what a commit pass run to the end writes."""
    torch.manual_seed(3)
    bundle = tiny_bundle(num_layers=3)
    tr = bundle.transformer
    latents = torch.randn(1, 16, 2 * F, 4, 6)
    embeds = torch.randn(1, 8, tr.config.text_dim)
    from slotgen.memory.base import ChunkContext

    def commit_two_chunks(to_the_end: bool):
        engine = StreamingEngine(bundle, WindowMemory(3, window=6),
                                 EngineOptions(seed=0, fps=16, width=48, height=32, steps=2, shift=5.0))
        engine._processors[-1].last = not to_the_end
        ran = []
        hooks = [m.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
                 for name, m in (("ffn0", tr.blocks[0].ffn), ("q_last", tr.blocks[-1].attn1.to_q),
                                 ("ffn_last", tr.blocks[-1].ffn), ("head", tr.proj_out))]
        try:
            for c in range(2):
                engine.policy.begin_chunk(ChunkContext(c, c * F, F, 0, "p"))
                engine.state.epoch += 1
                out = engine._forward(latents[:, :, c * F : (c + 1) * F], 0.0, c * F, embeds, commit=True)
                engine.policy.end_chunk()
                assert (out is None) != to_the_end and not engine.state.commit
        finally:
            for h in hooks:
                h.remove()
        return engine.policy.state_dict(), ran

    early, ran_early = commit_two_chunks(False)
    full, ran_full = commit_two_chunks(True)
    assert ran_early == ["ffn0"] * 2 and ran_full == ["ffn0", "q_last", "ffn_last", "head"] * 2
    assert early.keys() == full.keys()
    def tensors(x) -> list[torch.Tensor]:  # every tensor of a nested state, in order
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, dict):
            x = list(x.values())
        return [t for v in x for t in tensors(v)] if isinstance(x, (list, tuple)) else []

    a, b = tensors(early), tensors(full)
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
