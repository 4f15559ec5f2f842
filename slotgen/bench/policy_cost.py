"""Cost of a memory policy's own bookkeeping per chunk, at full Wan2.1-1.3B shapes, without the model.

``slotgen bench policy-cost [--resolution 832x480] [--chunks 12] [--policies window,sink,bank,slot]``

Feeds ``write`` and ``read`` of ``--layers`` layers (default 4; layers are independent, so the cost
scales by 30 / layers) the K/V shapes of a real chunk (3 latent frames; 1560 tokens per frame at
832×480; 12 heads × 128) from a fixed random generator, with a prompt's
cross-attention text keys for the relevance scores, and times ``begin_chunk`` + 30 × (``read`` +
``write``) + ``end_chunk``. What a policy adds to a chunk beyond this is the attention over the extra
rows it returns (``read`` size, reported as ``rows_read``), which costs like window rows.

Noise-robust on a shared machine: all policies run in one process, alternating chunk by chunk, and
the per-chunk medians are compared.
"""

from __future__ import annotations

import statistics
import time

import torch

from slotgen.memory import KVBlock, build_policy
from slotgen.memory.base import ChunkContext
from slotgen.memory.registry import parse_memory_config

FULL = dict(layers=30, heads=12, head_dim=128, text_tokens=64)


def run(resolution: tuple[int, int], chunks: int, policies: list[str], full_size_slot: bool, layers: int = 4,
        seed: int = 0, on_item=None) -> list[dict]:
    w, h = resolution
    th, tw = h // 16, w // 16  # token grid (VAE 8× · patch 2)
    F = 3
    L, H, D = layers, FULL["heads"], FULL["head_dim"]  # layers are independent: cost scales × 30 / L
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, FULL["text_tokens"], H, D, generator=g)  # (1, L_text, H, D)
    configs = {}
    for p in policies:
        cfg = {"policy": p}
        if p == "slot" and full_size_slot:  # docs/MEMORY.md's full-size suggestion
            cfg.update(num_slots=16, top_r=96, top_k=32, budget=9360)
        configs[p] = parse_memory_config(cfg)
    mems = {p: build_policy(c, L) for p, c in configs.items()}
    times: dict[str, list[float]] = {p: [] for p in policies}
    rows: dict[str, int] = {}
    for c in range(chunks):
        if on_item is not None:
            on_item(f"chunk {c + 1} of {chunks}")
        n = F * th * tw
        frames = torch.arange(c * F, (c + 1) * F).repeat_interleave(th * tw)  # (N,)
        hw = torch.stack([torch.arange(th).repeat_interleave(tw).repeat(F), torch.arange(tw).repeat(th * F)], 1)
        ks = [torch.randn(1, n, H, D, generator=g) for _ in range(L)]  # (1, N, H, D) per layer
        vs = [torch.randn(1, n, H, D, generator=g) for _ in range(L)]
        for p, mem in mems.items():
            ctx = ChunkContext(chunk=c, frame_start=c * F, num_frames=F, prompt_index=0, prompt="p",
                               text_keys=lambda layer: text)
            t0 = time.perf_counter()
            mem.begin_chunk(ctx)
            for layer in range(L):
                got = mem.read(layer)
                mem.write(layer, KVBlock(ks[layer], vs[layer], frames, hw))
            mem.end_chunk()
            times[p].append(time.perf_counter() - t0)
            rows[p] = 0 if got is None else got.num_tokens
    out = []
    for p in policies:
        steady = times[p][len(times[p]) // 2 :]  # after memories have filled
        ms = 1000 * statistics.median(steady)
        out.append({"policy": p, "layers": L, "ms_per_chunk": ms, "ms_per_chunk_30_layers": ms * FULL["layers"] / L,
                    "rows_read_last_layer": rows[p],
                    "memory_mb": mems[p].nbytes() / 2**20, "config": configs[p].model_dump()})
    return out
