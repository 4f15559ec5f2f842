"""Same-run cost of slot merging at full Wan shapes: sink vs slot (merge 0.9) vs slot (merge off), random K/V.

Run: OMP_NUM_THREADS=1 python scripts/slot_merge_cost.py (results: docs/BENCHMARKS.md).
"""
import time, statistics, torch
torch.set_num_threads(1)
from slotgen.bench.policy_cost import FULL
from slotgen.memory import build_policy
from slotgen.memory.base import ChunkContext, KVBlock
from slotgen.memory.registry import parse_memory_config
cfgs = {"sink": {"policy": "sink"}, "slot_m0.9": {"policy": "slot", "num_slots": 16, "top_r": 96, "top_k": 32, "budget": 9360, "merge": 0.9},
        "slot_m1.0": {"policy": "slot", "num_slots": 16, "top_r": 96, "top_k": 32, "budget": 9360, "merge": 1.0}}
L, H, D, th, tw, F = 4, FULL["heads"], FULL["head_dim"], 30, 52, 3
mems = {k: build_policy(parse_memory_config(c), L) for k, c in cfgs.items()}
g = torch.Generator().manual_seed(0); text = torch.randn(1, FULL["text_tokens"], H, D, generator=g)
times = {k: [] for k in cfgs}
for c in range(10):
    n = F * th * tw
    frames = torch.arange(c * F, (c + 1) * F).repeat_interleave(th * tw)
    hw = torch.stack([torch.arange(th).repeat_interleave(tw).repeat(F), torch.arange(tw).repeat(th * F)], 1)
    ks = [torch.randn(1, n, H, D, generator=g) for _ in range(L)]; vs = [torch.randn(1, n, H, D, generator=g) for _ in range(L)]
    for k, mem in mems.items():
        ctx = ChunkContext(chunk=c, frame_start=c * F, num_frames=F, prompt_index=0, prompt="p", text_keys=lambda layer: text)
        t0 = time.perf_counter(); mem.begin_chunk(ctx)
        for layer in range(L):
            mem.read(layer); mem.write(layer, KVBlock(ks[layer], vs[layer], frames, hw))
        mem.end_chunk(); times[k].append(time.perf_counter() - t0)
for k in cfgs: print(k, "ms per chunk (median of last 5) %.0f" % (1000 * statistics.median(times[k][5:])))
