"""Streaming self-attention for diffusers' stock ``WanTransformer3DModel``.

We do not fork the model. Each block's ``attn1`` gets its own :class:`StreamingAttnProcessor`
(installed with ``transformer.set_attn_processor``; ``attn2``, cross-attention, gets a
:class:`CachedCrossAttnProcessor`: the stock arithmetic with the text K/V kept per prompt). All processors share one :class:`StreamState` that the engine sets before each
transformer call: the memory policy, the chunk's token coordinates and whether this is the commit pass.

Inside a processor call (chunk of N tokens, memory of M rows, H heads of size D)::

    q, k, v   = norm(to_q x), norm(to_k x), to_v x          # (B, N, H, D), k un-roped
    mem       = policy.read(layer)                          # (B, M, H, D) un-roped K, V + frame ids
    positions = rank of each distinct memory frame, then the chunk's frames after them
    K = [rope(mem.k) ; rope(k)],  V = [mem.v ; v]           # (B, M + N, H, D)
    out = SDPA(rope(q), K, V)                               # the chunk sees all memory and itself
    if commit: policy.write(layer, (k, v, frames, hw))      # un-roped K/V goes to memory

**Positions** (engine-assigned, all in :func:`assign_positions`; the attention preset picks the mode,
see ``engine/presets.py``): ``rank`` — the temporal RoPE position of a memory row is the rank of its
latent frame among the distinct frames held for that layer (oldest = 0) and the chunk's frames follow
right after, so length is unlimited (LongLive's *infinity* layout; a contiguous window is the
Self-Forcing/LongLive layout shifted to start at 0); ``absolute`` — every row and query sits at its
absolute latent frame (Self-Forcing, LongLive, MemFlow: the sink stays at 0…2, retrieved frames keep
their positions). Spatial positions are the token's grid cell. Positions must fit the model's RoPE
table (``rope_max_seq_len``): under ``absolute`` that bounds the video at 1024 latent frames for Wan2.1,
as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from slotgen.errors import SlotgenError
from slotgen.memory.base import KVBlock, MemoryPolicy, _runs_of as runs_of


@dataclass
class StreamState:
    """Shared, mutable per-call state; the engine sets it, processors read it."""

    memory: MemoryPolicy | None = None
    frames: torch.Tensor | None = None  # (N,) absolute latent frame of each chunk token
    hw: torch.Tensor | None = None  # (N, 2) grid cell of each chunk token
    commit: bool = False  # True on the timestep-0 pass whose K/V is written to memory
    epoch: int = 0  # bumped by the engine whenever memory may have changed (new chunk)
    rope_mode: str = "rank"  # "rank" or "absolute" (assign_positions)
    recache: bool = False  # True during a re-cache pass (for the trace)
    trace: list | None = None  # when a list: layer 0 appends what each pass attends to (tests, inspection)
    runs: tuple | None = None  # host mirror of ``frames``: ((frame, tokens), ...) (see KVBlock.runs)
    text: object = None  # the prompt's embeddings tensor of this call: cross-attention K/V are cached per it
    check: Callable[[], None] | None = None  # called before every block's self-attention (a live retake check)


class RopeTable:
    """Cos/sin lookup for (t, h, w) token positions from the model's own RoPE buffers."""

    def __init__(self, rope: torch.nn.Module):
        self.max_len = rope.max_seq_len
        split = [rope.t_dim, rope.h_dim, rope.w_dim]
        self.cos = rope.freqs_cos.split(split, dim=1)  # 3 × (max_len, d_i), pair-repeated
        self.sin = rope.freqs_sin.split(split, dim=1)

    def check(self, largest: int) -> None:
        """Refuse a position past the table (the caller knows ``largest`` on the host: no device access)."""
        if largest >= self.max_len:
            raise SlotgenError(
                f"RoPE position {largest} exceeds the model's table of {self.max_len}; "
                "use a smaller memory window/budget or resolution"
            )

    def __call__(self, t: torch.Tensor, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: (N,) temporal positions, hw: (N, 2) → cos, sin of shape (1, N, 1, D).

        Positions are not range-checked here (that would ask the device); callers :meth:`check`
        the largest position from host integers."""
        cos = torch.cat([self.cos[0][t], self.cos[1][hw[:, 0]], self.cos[2][hw[:, 1]]], dim=-1)  # (N, D)
        sin = torch.cat([self.sin[0][t], self.sin[1][hw[:, 0]], self.sin[2][hw[:, 1]]], dim=-1)
        return cos[None, :, None, :], sin[None, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding, the same arithmetic as diffusers' WanAttnProcessor.

    x: (B, N, H, D); cos/sin: (1, N, 1, D) with each frequency repeated for the pair.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, H, D/2) each
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def frame_ranks(frames: torch.Tensor) -> torch.Tensor:
    """(M,) rank of each row's frame among the distinct frames (oldest = 0), on the device, no sync.

    Equal to ``torch.unique(frames, return_inverse=True)[1]`` without the device → host copy that
    ``unique`` needs for its output size."""
    ordered, order = torch.sort(frames, stable=True)  # (M,), (M,)
    new = torch.ones_like(ordered, dtype=torch.bool)  # (M,) row starts a new distinct frame
    new[1:] = ordered[1:] != ordered[:-1]
    rank_sorted = torch.cumsum(new, 0) - 1  # (M,) rank in sorted order
    return torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (M,) back to row order


def assign_positions(mem_frames: torch.Tensor | None, chunk_frames: torch.Tensor, mode: str = "rank",
                     num_distinct: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Temporal RoPE positions of the memory rows and the chunk's tokens (module docstring).

    mem_frames: (M,) absolute frames of memory rows (or None); chunk_frames: (N,) absolute frames
    (ascending). ``rank``: rank of each distinct memory frame (on the device, no sync), then the chunk's
    frames; ``absolute``: the frames themselves. num_distinct: the number of distinct memory frames when
    the caller knows it on the host (``rank`` only; otherwise it is read from the device).
    Returns (M,) and (N,) long positions.
    """
    if mode == "absolute":
        return mem_frames, chunk_frames
    offsets = chunk_frames - chunk_frames[:1]  # (N,) frame within the chunk
    if mem_frames is None or mem_frames.numel() == 0:
        return None, offsets
    mem_rank = frame_ranks(mem_frames)  # (M,)
    if num_distinct is None:
        num_distinct = int(mem_rank.max()) + 1
    return mem_rank, offsets + num_distinct


class CommitDone(Exception):
    """Raised by the last layer's processor in a commit pass once its K/V are in the memory: the rest of
    the forward (that layer's attention, cross-attention and FFN, the output head) is never used."""


class StreamingAttnProcessor:
    """Self-attention over [memory ; chunk] with engine-assigned RoPE positions (one per layer)."""

    def __init__(self, layer: int, state: StreamState, rope: RopeTable, last: bool = False):
        self.layer = layer
        self.last = last  # the model's last block: a commit pass ends after its K/V (CommitDone)
        self.state = state
        self.rope = rope
        self._cache_epoch = -1
        self._cache: tuple | None = None  # (K buffer, V buffer, chunk positions, memory rows) for this epoch
        self._cache_rows: tuple | None = None  # (frames, positions, hw) of the memory rows in this epoch (trace)
        self._cache_chunk_pos: torch.Tensor | None = None  # the chunk's temporal positions in this epoch (trace)

    def _memory(self, chunk_frames: torch.Tensor, chunk_hw: torch.Tensor, like: torch.Tensor):
        """The layer's attention plan for this epoch: K/V buffers with the roped memory rows filled in,
        and the RoPE cos/sin of the chunk's own tokens.

        Built once per epoch (a chunk's memory does not change between its denoising steps and its
        commit pass): buffers of shape (B, M + N, H, D) whose first M rows hold the roped memory K and
        the memory V, so each call only copies the chunk's own N rows in (no per-step concatenation),
        and the chunk's RoPE table, so no forward looks positions up again. Nothing here reads the
        device: positions are ranks computed on it, their bound comes from the host's ``runs``.
        """
        st = self.state
        n = chunk_frames.numel()
        if self._cache_epoch != st.epoch or self._cache is None or self._cache[0].shape[1] - self._cache[3] != n:
            mem = st.memory.read(self.layer) if st.memory is not None else None
            mem_runs = mem.frame_runs if mem is not None else ()  # host integers
            chunk_runs = st.runs if st.runs is not None else runs_of(chunk_frames)  # the engine always sets runs
            distinct = len({f for f, _ in mem_runs})
            if st.rope_mode == "absolute":  # positions are the frames themselves
                largest = max(f for f, _ in (*mem_runs, *chunk_runs))
            else:  # ranks of the distinct memory frames, then the chunk's frames
                largest = distinct + len({f for f, _ in chunk_runs}) - 1
            self.rope.check(largest)
            mem_pos, chunk_pos = assign_positions(mem.frames if mem is not None else None, chunk_frames, st.rope_mode,
                                                  distinct)
            m = 0 if mem is None else mem.num_tokens
            B, _, H, D = like.shape
            K = like.new_empty(B, m + n, H, D)  # (B, M + N, H, D)
            V = like.new_empty(B, m + n, H, D)
            if mem is not None:
                cos, sin = self.rope(mem_pos, mem.hw)
                K[:, :m] = apply_rope(mem.k.to(like.dtype), cos, sin)  # roped memory keys
                V[:, :m] = mem.v.to(like.dtype)
            self._cache = (K, V, self.rope(chunk_pos, chunk_hw), m)
            self._cache_rows = (mem.frames, mem_pos, mem.hw) if mem is not None else None  # for the trace
            self._cache_chunk_pos = chunk_pos
            self._cache_epoch = st.epoch
        return self._cache

    def _trace(self, chunk_pos: torch.Tensor) -> None:
        """Record which frames this pass attends to and at which temporal positions (layer 0 only;
        reads the device: tests and inspection only, never on the hot path)."""
        st = self.state
        rows = self._cache_rows

        def per_frame(frames, pos, hw):  # (frame, position) per frame block: a block starts at grid cell (0, 0)
            out: list[tuple[int, int]] = []
            starts = (hw == 0).all(dim=1).tolist()
            for pair, start in zip(zip(frames.tolist(), pos.tolist()), starts):
                if not out or out[-1] != pair or start:
                    out.append(pair)
            return out

        st.trace.append({
            "pass": "recache" if st.recache else ("commit" if st.commit else "step"),
            "chunk": per_frame(st.frames, chunk_pos, st.hw),
            "memory": per_frame(*rows) if rows is not None else [],
        })

    @torch.compiler.disable  # per-chunk Python state: dynamo would guard on it and recompile every chunk
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        st = self.state
        if st.check is not None:  # may raise, abandoning the forward before this block changes anything
            st.check()
        x = hidden_states  # (B, N, C)
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))  # (B, N, H, D) un-roped
        v = attn.to_v(x).unflatten(2, (attn.heads, -1))  # (B, N, H, D)

        K, V, (cos, sin), m = self._memory(st.frames, st.hw, k)
        if st.trace is not None and self.layer == 0:
            self._trace(self._cache_chunk_pos)
        if st.commit and self.last and st.memory is not None:
            # a commit pass (the chunk's, or a re-cache's) is run for its K/V only: after the last layer's
            # are written nothing of the forward is used, so it ends here (the engine catches CommitDone)
            st.memory.write(self.layer, KVBlock(k.detach(), v.detach(), st.frames, st.hw, st.runs))
            raise CommitDone
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))  # (B, N, H, D)
        q_r = apply_rope(q, cos, sin)
        K[:, m:] = apply_rope(k, cos, sin)  # (B, M + N, H, D): [memory ; chunk]
        V[:, m:] = v

        out = F.scaled_dot_product_attention(q_r.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2))  # (B, H, N, D)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # (B, N, H·D)

        if st.commit and st.memory is not None:
            st.memory.write(self.layer, KVBlock(k.detach(), v.detach(), st.frames, st.hw, st.runs))
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class CachedCrossAttnProcessor:
    """Cross-attention (``attn2``) whose text K/V are computed once per prompt and layer.

    The text context is the same for every forward of every chunk under one prompt (Self-Forcing and
    LongLive cache it likewise), so ``norm_k(to_k(ctx))`` and ``to_v(ctx)`` are kept and reused while
    ``state.text`` is the same embeddings tensor; a new prompt (a switch, or another stream's prompt)
    replaces them. The arithmetic is the stock ``WanAttnProcessor``'s for text-to-video (no image
    context, no mask), so outputs are bit-identical to it; anything else falls back to the stock one.
    """

    def __init__(self, state: StreamState):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.state = state
        self.stock = WanAttnProcessor()
        self._text: object = None  # the embeddings tensor the cached K/V belong to
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def clear(self) -> None:
        self._text, self._kv = None, None

    @torch.compiler.disable  # the cache is keyed by Python object identity: kept out of compiled graphs
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        st = self.state
        if (st.text is None or encoder_hidden_states is None or attention_mask is not None or rotary_emb is not None
                or attn.add_k_proj is not None):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if self._text is not st.text or self._kv is None:
            ctx = encoder_hidden_states  # (B, L, C) the projected text context
            if attn.fused_projections:
                key, value = attn.to_kv(ctx).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(ctx), attn.to_v(ctx)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))  # (B, L, H, D)
            self._kv = (key, value.unflatten(2, (attn.heads, -1)))  # (B, L, H, D) each
            self._text = st.text
        key, value = self._kv
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, N, H, D)
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self.stock._attention_backend, parallel_config=None)
        out = out.flatten(2, 3).type_as(query)  # (B, N, H·D)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def install_streaming_processors(transformer, state: StreamState) -> list[StreamingAttnProcessor]:
    """Give every block's attn1 its own streaming processor and attn2 its own text-K/V-caching one."""
    rope = RopeTable(transformer.rope)
    processors: dict[str, object] = {}
    streaming = []
    for i in range(len(transformer.blocks)):
        p = StreamingAttnProcessor(i, state, rope, last=i == len(transformer.blocks) - 1)
        streaming.append(p)
        processors[f"blocks.{i}.attn1.processor"] = p
        processors[f"blocks.{i}.attn2.processor"] = CachedCrossAttnProcessor(state)
    transformer.set_attn_processor(processors)
    return streaming
