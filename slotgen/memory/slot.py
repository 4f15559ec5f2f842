"""SlotMemory: remember objects, not frames (a training-free reading of arXiv 2605.31033).

Per layer the policy holds (all K un-roped, see ``base.py``)::

    sink    first ``sink`` latent frames, forever                 (exactly as SinkMemory)
    local   the last ``window`` latent frames                     (exactly as SinkMemory)
    bank    memory items, at most ``budget`` tokens in total
    slots   this layer's slots of the previous chunk (temporal init) and of every chunk still in
            the local window (visual relevance)

**Write** (commit pass of a non-re-cache chunk; during a re-cache only the local window is refreshed)::

    x      = φ(k)                              # (N, D') default: normalise(mean over heads of k)
    U, A   = slot_attention(x, U_prev)          # (S, D'), (S, N); first chunk: farthest-point init
    item_s = top-R tokens (by A[s]) among the tokens whose argmax slot is s and that are not sink rows
           = their original K/V rows + frames + grid cells, the slot vector U[s], chunk, prompt index,
             created / last-used chunk and a hit counter
    bank  += items; then evict until tokens ≤ budget (see :meth:`SlotMemory.evict`)

**Read** (scored once per chunk in ``begin_chunk``; ``read`` only concatenates)::

    r_text = MemFlow relevance of the item's keys to the prompt's cross-attention text keys
    r_vis  = max cosine between the item's slot vector and the slots of chunks in the local window
    r      = w_text · z(r_text) + w_vis · z(r_vis)          z: z-score over all items of the layer's bank
    rows   = items' rows that are before the chunk and not held by the sink or window
    read   = [sink ; top-K items by r (ties: older item), in frame order ; local window]

The engine gives memory rows the rank of their distinct frame as temporal RoPE position, so the
layout is ``sink frames 0..s-1 | retrieved frames s..s+m-1 (gaps compressed) | window | chunk``.
With ``top_k = 0`` read returns exactly what SinkMemory (or WindowMemory, ``sink = 0``) returns.

**Evict**: value = z(r_text) + recency_weight · exp(−(c − last_used) / recency_decay), computed for
all items (old and new) under the current prompt at chunk c; items are dropped in increasing
(value, id) order until the bank fits its token budget. The budget is never exceeded.

**Prompt switch**: drop the local window (the engine re-caches it); keep the sink, the bank and all slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from slotgen.memory.bank import held_frames, text_relevance
from slotgen.memory.base import ChunkContext, Count, KVBlock, Real, _merge_runs, host_copy
from slotgen.memory.registry import register_policy
from slotgen.memory.slot_attention import Phi, batched_farthest_point_init, batched_slot_attention, default_phi
from slotgen.memory.window import SinkWindowConfig, WindowMemory


class SlotConfig(SinkWindowConfig):
    """SlotMemory: sink + rolling window + a token-budgeted bank of object-level K/V items per layer.

    Each chunk's keys are grouped into slots (slot attention, initialised from the previous chunk's
    slots); each slot stores its ``top_r`` most typical tokens' original K/V as an item. Each chunk
    attends to the ``top_k`` items that best match the prompt and the current scene. ``top_r`` and ``budget``
    left unset follow the model's tokens per latent frame (:meth:`for_frame`: 4 and 96 on the miniature's 16,
    390 and 9360 on Wan2.1's 1560); docs/MEMORY.md lists the rest at full size.
    """

    cli_names = {"num_slots": "slots"}

    policy: Literal["slot"] = "slot"
    num_slots: Count = Field(default=8, ge=1, description="Slots per chunk and layer.")
    iters: Count = Field(default=3, ge=1, description="Slot-attention (soft k-means) iterations per chunk.")
    temperature: Real = Field(default=0.1, gt=0, description="Softmax temperature over slots (features are "
                              "unit vectors: smaller is harder).")
    top_r: Count = Field(default=4, ge=1, description="Tokens (original K/V rows) stored per item (R), at most "
                         "the budget; default a quarter of the model's tokens per latent frame (4 on the miniature).")
    top_k: Count = Field(default=8, ge=0, description="Items retrieved per chunk and layer (K); 0 behaves "
                         "exactly like sink.")
    budget: Count = Field(default=96, ge=1, description="Tokens the bank may hold per layer; default six latent "
                          "frames of the model's tokens (96 on the miniature).")
    w_text: Real = Field(default=0.7, ge=0, description="Weight of the z-scored text relevance in retrieval.")
    w_vis: Real = Field(default=0.3, ge=0, description="Weight of the z-scored visual relevance in retrieval.")
    recency_weight: Real = Field(default=0.5, ge=0, description="Weight of recency of use in the eviction value.")
    recency_decay: Real = Field(default=4.0, gt=0, description="Chunks over which recency decays by a factor e.")
    temporal_init: bool = Field(default=True, description="Initialise slots from the previous chunk's slots "
                                "(off: an ablation).")
    merge: Real = Field(default=0.9, ge=-1, le=1, description="Cosine above which two slots are one (merged; a "
                        "duplicate is re-seeded at the next temporal init); 1 = off.")

    @model_validator(mode="after")
    def _consistent(self) -> "SlotConfig":
        # top_r and budget left unset are resolved per model (for_frame), so only a budget given is checked here
        if self.top_r > self.budget and ("budget" in self.model_fields_set or "top_r" not in self.model_fields_set):
            raise ValueError(f"top_r ({self.top_r}) must not exceed budget ({self.budget}): an item would never fit")
        if self.top_k > 0 and self.w_text + self.w_vis == 0:
            raise ValueError("w_text and w_vis cannot both be 0 when top_k > 0")
        return self

    def for_frame(self, tokens_per_frame: int) -> "SlotConfig":
        """``top_r`` and ``budget`` the section leaves unset, relative to the model's tokens per latent frame
        T: an item holds a quarter frame (R = T/4) and the bank six frames (budget = 6·T), so the K = 8 items
        read per chunk are two frames' worth at any size. With the miniature's T = 16 that is the defaults
        (R 4, budget 96); with Wan2.1 at 832×480 (T = 1560) R 390 and budget 9360."""
        given = self.model_fields_set
        top_r = self.top_r if "top_r" in given else max(1, tokens_per_frame // ITEM_FRACTION)
        budget = self.budget if "budget" in given else BANK_FRAMES * tokens_per_frame
        if "top_r" not in given:
            top_r = min(top_r, budget)
        if top_r > budget:
            raise ValueError(f"top_r ({top_r}) must not exceed budget ({budget}): an item would never fit")
        changes = {k: v for k, v in (("top_r", top_r), ("budget", budget)) if v != getattr(self, k)}
        if not changes:
            return self
        return type(self).model_validate({**self.model_dump(include=set(given)), **changes})


ITEM_FRACTION = 4  # an item holds 1/ITEM_FRACTION of a latent frame's tokens (top_r)
BANK_FRAMES = 6  # the bank holds this many latent frames' worth of tokens (budget)


@dataclass
class SlotItem:
    """One memory item: a slot's top-R tokens of one chunk and layer, with its address and bookkeeping."""

    id: int  # unique, increasing with creation (tie-breaker: smaller id = older)
    rows: KVBlock  # (B, n, H, D) original un-roped K and V rows, their frames (n,) and cells (n, 2)
    slot: torch.Tensor  # (D',) unit slot vector: the item's address
    key_mean: torch.Tensor  # (H, D) float32 mean key over rows and batch (for r_text)
    chunk: int  # chunk that wrote it
    prompt_index: int  # prompt in force when it was written
    created: int  # chunk index at creation
    last_used: int  # chunk index of the last retrieval (``created`` until then)
    hits: int = 0  # number of chunks that retrieved it

    def to_state(self) -> dict:
        return {"id": self.id, "rows": self.rows.to_state(), "slot": host_copy(self.slot), "key_mean": host_copy(self.key_mean),
                "chunk": self.chunk, "prompt_index": self.prompt_index, "created": self.created,
                "last_used": self.last_used, "hits": self.hits}

    @staticmethod
    def from_state(d: dict, device: torch.device | str = "cpu") -> "SlotItem":
        return SlotItem(int(d["id"]), KVBlock.from_state(d["rows"], device), d["slot"].to(device),
                        d["key_mean"].to(device), int(d["chunk"]), int(d["prompt_index"]), int(d["created"]),
                        int(d["last_used"]), int(d["hits"]))


def _rows(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """x[idx] for a host list of indices, without turning the list into a tensor (a host → device copy)."""
    return x if idx == list(range(x.shape[0])) else torch.stack([x[i] for i in idx])


def _kept(u: torch.Tensor, threshold: float) -> torch.Tensor:
    """For each slot of u (L, S, D') the lowest-index kept slot within cosine ``threshold`` of it (itself
    if none) → (L, S) long. Slot s is kept when no earlier kept slot is that close. A loop over the S slots
    of batched device ops: nothing is read back to the host."""
    un = F.normalize(u.float(), dim=-1)
    cos = un @ un.transpose(1, 2)  # (L, S, S)
    L, S = u.shape[:2]
    keep = [torch.zeros(L, dtype=torch.long, device=u.device)]  # slot 0 is always kept
    kept = [torch.ones(L, dtype=torch.bool, device=u.device)]
    for s in range(1, S):
        close = (cos[:, s, :s] > threshold) & torch.stack(kept, dim=1)  # (L, s) earlier kept slots near s
        has = close.any(dim=1)  # (L,)
        first = close.to(torch.uint8).argmax(dim=1)  # (L,) lowest such index (argmax: first maximum)
        keep.append(torch.where(has, first, s))
        kept.append(~has)
    return torch.stack(keep, dim=1)  # (L, S)


def reseed_duplicates(prev: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Temporal init (S, D') from the previous chunk's slots ``prev``, where every slot that duplicates a
    lower-index one (cosine > threshold: it would be merged) is re-seeded farthest-point style on this
    chunk's features x (N, D'). Without it, slots that settled on the background (most of every frame)
    stay there and a newly visible entity gets none. A threshold of 1 or more keeps ``prev`` as it is."""
    return batched_reseed_duplicates(prev[None], x[None], threshold)[0]


def batched_reseed_duplicates(prev: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`reseed_duplicates` for a batch: prev (L, S, D'), x (L, N, D') → (L, S, D'), no host sync."""
    if threshold >= 1.0:
        return prev
    S = prev.shape[1]
    keep = _kept(prev, threshold)  # (L, S)
    dup = keep != torch.arange(S, device=keep.device)  # (L, S) slots to re-seed
    out = F.normalize(prev.float(), dim=-1)  # (L, S, D')
    sim = (x @ out.transpose(1, 2)).masked_fill(dup[:, None, :], -float("inf"))  # (L, N, S) kept slots only
    nearest = 1.0 - sim.max(dim=2).values  # (L, N) cosine distance to the nearest kept slot
    slots = list(out.unbind(1))  # S × (L, D')
    for s in range(S):
        t = torch.argmax(nearest, dim=1)  # (L,) ties → lowest token index
        xt = x.gather(1, t[:, None, None].expand(-1, 1, x.shape[2]))  # (L, 1, D')
        d = dup[:, s]  # (L,)
        slots[s] = torch.where(d[:, None], xt[:, 0], slots[s])
        nearest = torch.where(d[:, None], torch.minimum(nearest, 1.0 - (x * xt).sum(-1)), nearest)  # (L, N)
    return torch.stack(slots, dim=1)  # (L, S, D')


def merge_slots(u: torch.Tensor, a: torch.Tensor, threshold: float) -> torch.Tensor:
    """Assignments (S, N) after merging near-duplicate slots of u (S, D'): slot s joins the lowest-index slot
    j < s that is itself kept and has cos(u_s, u_j) > threshold; its row of a is added to j's and zeroed.
    A threshold of 1 or more merges nothing (then ``a`` is returned unchanged)."""
    return batched_merge_slots(u[None], a[None], threshold)[0]


def batched_merge_slots(u: torch.Tensor, a: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`merge_slots` for a batch: u (L, S, D'), a (L, S, N) → (L, S, N)."""
    if threshold >= 1.0:
        return a
    target = _kept(u, threshold)  # (L, S) slot → the slot that owns its mass
    return torch.zeros_like(a).scatter_add_(1, target[:, :, None].expand_as(a), a)  # merged rows are all zero


def zscore(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x − mean) / std over a 1-D tensor (population std); all zeros when std < eps or fewer than 2 values.
    Decided on the device (``torch.where``), so it never waits for the value of std."""
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std(unbiased=False)
    return torch.where(std < eps, torch.zeros_like(x), (x - x.mean()) / std)  # (I,)


@dataclass
class SlotScores:
    """Relevance of every item of a layer's bank (aligned with the bank's item list), all (I,)."""

    r_text: torch.Tensor  # raw MemFlow text relevance
    r_vis: torch.Tensor  # raw max cosine to the window's slots
    z_text: torch.Tensor  # z-scored over the bank
    z_vis: torch.Tensor
    r: torch.Tensor  # w_text · z_text + w_vis · z_vis


@register_policy
class SlotMemory(WindowMemory):
    """Sink + local window + a token-budgeted bank of slot-addressed K/V items. See the module docstring."""

    name = "slot"
    config_class = SlotConfig
    inspect_schema = {
        "slots": {"type": "integer"}, "items": {"type": "integer"}, "bank_tokens": {"type": "integer"},
        "budget": {"type": "integer"}, "budget_use": {"type": "number"}, "mean_age": {"type": "number"},
        "max_age": {"type": "number"}, "hits": {"type": "integer"},
        "retrieved": {"type": "array", "items": {"type": "integer"}}, "relevance": {"type": "object"},
    }
    inspect_columns = (
        ("slots", lambda row: str(row["slots"])),
        ("items", lambda row: str(row["items"])),
        ("bank tokens", lambda row: str(row["bank_tokens"])),
        ("budget use", lambda row: f"{row['budget_use']:.0%}"),
        ("mean age", lambda row: f"{row['mean_age']:.1f}"),
        ("max age", lambda row: f"{row['max_age']:.0f}"),
        ("hits", lambda row: str(row["hits"])),
        ("retrieved", lambda row: str(len(row["retrieved"]))),
        ("best r", lambda row: f"{max(row['relevance'].values()):.2f}" if row["relevance"] else "-"),
    )

    def __init__(self, num_layers: int, config: SlotConfig | None = None, phi: Phi | None = None):
        config = config or SlotConfig()
        super().__init__(num_layers, window=config.window, sink=config.sink)
        self.config = config
        self.phi: Phi = phi if phi is not None else default_phi  # hook for a learned projection
        self.phi_info: dict | None = None  # which φ (digest, source: memory.phi_file.phi_record), set by the renderer
        self.items: list[list[SlotItem]] = [[] for _ in range(num_layers)]  # ordered by id
        self.prev_slots: list[torch.Tensor | None] = [None] * num_layers  # (S, D') last chunk's slots
        # slots of chunks still in the local window: (first frame, last frame, slots (S, D'))
        self.window_slots: list[list[tuple[int, int, torch.Tensor]]] = [[] for _ in range(num_layers)]
        self.retrieved: list[KVBlock | None] = [None] * num_layers  # rows chosen in begin_chunk
        self.next_id = 0
        self.now = 0  # chunk index of the latest non-re-cache chunk
        self.evicted = [0] * num_layers  # items evicted so far
        # for stats / inspect: the last chunk's token → slot argmax and the last retrieval
        self.last_assign: list[dict | None] = [None] * num_layers  # {"slot": (N,), "frames": (N,), "hw": (N, 2)}
        self.last_retrieved: list[list[int]] = [[] for _ in range(num_layers)]  # item ids, best first
        self.last_scores: list[dict[int, tuple[float, float, float]]] = [{} for _ in range(num_layers)]

    @classmethod
    def from_config(cls, config: SlotConfig, num_layers: int, *, phi: Phi | None = None) -> "SlotMemory":
        return cls(num_layers, config, phi=phi)

    @classmethod
    def inspect_layer(cls, stats: dict, layer: int) -> dict:
        if layer >= len(stats.get("layers", [])):
            return {}
        lay = stats["layers"][layer]
        return dict(
            slots=int(lay["num_slots"]), items=int(lay["items"]), bank_tokens=int(lay["tokens"]),
            budget=int(lay["budget"]), budget_use=float(lay["budget_use"]), mean_age=float(lay["mean_age"]),
            max_age=float(lay["max_age"]), hits=int(sum(lay["hits"])), retrieved=[int(x) for x in lay["retrieved"]],
            relevance={k: float(v["r"]) for k, v in lay.get("scores", {}).items()},
        )

    # -- scoring ------------------------------------------------------------------------------------
    def _text_keys(self, layer: int, ctx: ChunkContext) -> torch.Tensor | None:
        return ctx.text_keys(layer) if ctx.text_keys is not None else None

    def score_items(self, layer: int, ctx: ChunkContext) -> SlotScores:
        """r_text, r_vis, their z-scores and the fused score r for every item of ``layer`` (bank order)."""
        items = self.items[layer]
        s = self.config
        key_means = torch.stack([it.key_mean for it in items])  # (I, H, D)
        r_text = text_relevance(self._text_keys(layer, ctx), key_means)  # (I,)
        slots = F.normalize(torch.stack([it.slot for it in items]).float(), dim=-1)  # (I, D')
        if self.window_slots[layer]:
            current = F.normalize(torch.cat([u for _, _, u in self.window_slots[layer]]).float(), dim=-1)  # (M, D')
            r_vis = (slots @ current.T).max(dim=1).values  # (I, D') @ (D', M) → (I, M) → (I,)
        else:
            r_vis = torch.zeros_like(r_text)  # (I,)
        z_text, z_vis = zscore(r_text), zscore(r_vis)  # (I,), (I,)
        return SlotScores(r_text, r_vis, z_text, z_vis, s.w_text * z_text + s.w_vis * z_vis)

    def recency(self, item: SlotItem, chunk: int) -> float:
        """exp(−(chunk − last_used) / recency_decay) ∈ (0, 1]: 1 for an item used (or made) at ``chunk``."""
        return math.exp(-max(chunk - item.last_used, 0) / self.config.recency_decay)

    # -- protocol -----------------------------------------------------------------------------------
    # Every decision that needs device values is taken once per chunk for all layers: begin_chunk scores
    # all banks and copies the scores to the host once; the commit pass only stashes each layer's block,
    # and end_chunk groups all layers' tokens at once (one copy of item sizes and token picks) and
    # evicts (one copy of eviction values). Item rows carry host ``runs``, so visibility is host logic.
    def begin_chunk(self, ctx: ChunkContext) -> None:
        super().begin_chunk(ctx)
        if not ctx.recache:
            self.now = ctx.chunk
        self._pending: list[tuple[int, KVBlock]] = []
        layers = [layer for layer in range(self.num_layers) if self.items[layer]]
        for layer in range(self.num_layers):
            if not self.items[layer]:
                self.last_scores[layer], self.last_retrieved[layer], self.retrieved[layer] = {}, [], None
        if not layers:
            return
        key = (ctx.prompt, tuple(tuple(it.id for it in self.items[layer]) for layer in layers))
        if getattr(self, "_table", None) is None or self._table[0] != key:  # scores change only with the bank
            scores = [self.score_items(layer, ctx) for layer in layers]  # or the prompt (window slots: in end_chunk)
            self._table = (key, torch.cat([torch.stack([sc.r_text, sc.r_vis, sc.r], dim=1) for sc in scores]).tolist())
        table = self._table[1]  # (ΣI, 3) host values, one copy per chunk (re-cache groups reuse it)
        pos = 0
        for layer in layers:
            n = len(self.items[layer])
            self.retrieved[layer] = self._retrieve(layer, ctx, table[pos: pos + n])
            pos += n

    def _retrieve(self, layer: int, ctx: ChunkContext, table: list[list[float]]) -> KVBlock | None:
        """Pick the top-K eligible items by r (host values ``table``: r_text, r_vis, r per item), count
        their hits (not during a re-cache), return their visible rows in frame order."""
        items = self.items[layer]
        self.last_scores[layer] = {it.id: tuple(row) for it, row in zip(items, table)}
        if self.config.top_k == 0:
            self.last_retrieved[layer] = []
            return None
        held = held_frames(self.sink_rows[layer], self.local[layer])  # host integers

        def visible(f: int) -> bool:  # not yet attended: before the chunk, not in sink or window
            return f < ctx.frame_start and f not in held

        first_frame = [min((f for f, _ in it.rows.frame_runs if visible(f)), default=None) for it in items]
        r = [row[2] for row in table]
        eligible = [i for i in range(len(items)) if first_frame[i] is not None]  # items with a visible row
        ranked = sorted(eligible, key=lambda i: (-r[i], items[i].id))[: self.config.top_k]  # best first
        self.last_retrieved[layer] = [items[i].id for i in ranked]
        if not ctx.recache:
            for i in ranked:
                items[i].hits += 1
                items[i].last_used = ctx.chunk
        in_frame_order = sorted(ranked, key=lambda i: (first_frame[i], items[i].id))
        return KVBlock.cat([items[i].rows.select_frames(visible) for i in in_frame_order])

    def read(self, layer: int) -> KVBlock | None:
        return KVBlock.cat([self.sink_rows[layer], self.retrieved[layer], self.local[layer]])

    def write(self, layer: int, block: KVBlock) -> None:
        super().write(layer, block)  # the local window / sink, exactly as SinkMemory
        if not self.ctx.recache:
            self._pending.append((layer, block))  # grouped in end_chunk, all layers at once

    def end_chunk(self) -> None:
        pending, self._pending = getattr(self, "_pending", []), []
        if pending:
            self._table = None  # window slots change: r_vis must be recomputed
        groups: dict[tuple, list[tuple[int, KVBlock]]] = {}
        for layer, block in pending:  # layers whose features have the same shape are grouped together
            x = self.phi(layer, block.k.float().mean(dim=0))  # (B, N, H, D) → (N, H, D) → (N, D')
            groups.setdefault(tuple(x.shape), []).append((layer, block, x))
        for group in groups.values():
            self._write_group(group, self.ctx)
        over = [layer for layer, _ in pending if sum(it.rows.num_tokens for it in self.items[layer]) > self.config.budget]
        self._evict_layers(over, self.ctx)
        super().end_chunk()

    def _write_group(self, group: list, ctx: ChunkContext) -> None:
        """Slot attention, merging and item making for layers whose features x have one shape (L, N, D')."""
        s = self.config
        layers = [layer for layer, _, _ in group]
        x = torch.stack([x for _, _, x in group])  # (L, N, D')
        L, N, _ = x.shape
        temporal = [s.temporal_init and self.prev_slots[layer] is not None and self.prev_slots[layer].shape[1] == x.shape[2]
                     for layer in layers]
        init = [None] * L
        if any(temporal):
            idx = [i for i in range(L) if temporal[i]]
            prev = torch.stack([self.prev_slots[layers[i]].to(x.device) for i in idx])  # (L', S, D')
            for i, u0 in zip(idx, batched_reseed_duplicates(prev, _rows(x, idx), s.merge).unbind(0)):
                init[i] = u0
        if not all(temporal):
            idx = [i for i in range(L) if not temporal[i]]
            for i, u0 in zip(idx, batched_farthest_point_init(_rows(x, idx), s.num_slots).unbind(0)):
                init[i] = u0
        u, a = batched_slot_attention(x, torch.stack(init), s.iters, s.temperature)  # (L, S, D'), (L, S, N)
        a = batched_merge_slots(u, a, s.merge)  # (L, S, N): a merged slot's mass moves to its lowest-index twin
        owner = a.argmax(dim=1)  # (L, N) argmax slot per token, ties → lower slot

        # top-R owned, non-sink tokens per slot (ties → lower index), in token order; sizes and picks → host once
        S, R = u.shape[1], min(s.top_r, N)
        runs = group[0][1].frame_runs  # the same chunk in every layer
        sink_rows = sum(n for f, n in runs if f < self.sink)  # frame-major: the sink rows come first
        eligible = (owner[:, None, :] == torch.arange(S, device=owner.device)[None, :, None]) \
            & (torch.arange(N, device=owner.device) >= sink_rows)  # (L, S, N)
        weight = torch.where(eligible, a, -1.0)  # (L, S, N), a ≥ 0 where eligible
        top_w, top_i = torch.sort(weight, dim=2, descending=True, stable=True)  # (L, S, N)
        valid = top_w[:, :, :R] >= 0  # (L, S, R)
        chosen = torch.sort(torch.where(valid, top_i[:, :, :R], N), dim=2).values  # (L, S, R) ascending, N = none
        host = torch.cat([valid.sum(2).flatten(), chosen.flatten()]).tolist()  # the group's one copy
        sizes, picks = host[: L * S], host[L * S:]
        row_frame = [f for f, n in runs for _ in range(n)]  # (N,) host frame of each token
        lo, hi = runs[0][0], runs[-1][0]

        for i, (layer, block, _) in enumerate(group):
            self.prev_slots[layer] = u[i]
            self.last_assign[layer] = {"slot": owner[i], "frames": block.frames, "hw": block.hw}
            local = self.local[layer]
            oldest_local = min(f for f, _ in local.frame_runs) if local is not None else lo
            self.window_slots[layer] = [w for w in self.window_slots[layer] if w[1] >= oldest_local] + [(lo, hi, u[i])]
            idx = chosen[i].clamp_max(N - 1).flatten()  # (S·R,) invalid picks point at a real row, never read
            gk, gv, gf, ghw = block.k[:, idx], block.v[:, idx], block.frames[idx], block.hw[idx]  # (B, S·R, ...)
            km = gk.float().mean(dim=0)  # (S·R, H, D)
            for slot in range(S):
                n = sizes[i * S + slot]
                if n == 0:
                    continue
                a0 = slot * R
                tokens = picks[(i * S + slot) * R: (i * S + slot) * R + n]
                rows = KVBlock(gk[:, a0:a0 + n], gv[:, a0:a0 + n], gf[a0:a0 + n], ghw[a0:a0 + n],
                               _merge_runs((row_frame[t], 1) for t in tokens))  # (B, n, H, D) original rows
                self.items[layer].append(SlotItem(
                    id=self.next_id, rows=rows, slot=u[i, slot], key_mean=km[a0:a0 + n].mean(dim=0),  # (H, D)
                    chunk=ctx.chunk, prompt_index=ctx.prompt_index, created=ctx.chunk, last_used=ctx.chunk,
                ))
                self.next_id += 1

    def eviction_values(self, layer: int, ctx: ChunkContext) -> torch.Tensor:
        """value_i = z(r_text)_i + recency_weight · recency_i for every item of ``layer`` → (I,)."""
        items = self.items[layer]
        key_means = torch.stack([it.key_mean for it in items])  # (I, H, D)
        z_text = zscore(text_relevance(self._text_keys(layer, ctx), key_means))  # (I,)
        rec = torch.tensor([self.recency(it, ctx.chunk) for it in items], device=z_text.device)  # (I,)
        return z_text + self.config.recency_weight * rec  # (I,)

    def evict(self, layer: int, ctx: ChunkContext) -> None:
        """Drop items in increasing (value, id) order until the bank holds ≤ budget tokens."""
        self._evict_layers([layer], ctx)

    def _evict_layers(self, layers: list[int], ctx: ChunkContext) -> None:
        """:meth:`evict` for several layers with one device → host copy (z-scored text relevance); the
        recency term is host arithmetic in float32, as :meth:`eviction_values` computes it."""
        layers = [layer for layer in layers if sum(it.rows.num_tokens for it in self.items[layer]) > self.config.budget]
        if not layers:
            return
        z = [zscore(text_relevance(self._text_keys(layer, ctx), torch.stack([it.key_mean for it in self.items[layer]])))
             for layer in layers]
        z_host = torch.cat(z).tolist()  # (ΣI,): one copy
        w = np.float32(self.config.recency_weight)
        pos = 0
        for layer in layers:
            items = self.items[layer]
            values = [float(np.float32(z_host[pos + i]) + w * np.float32(self.recency(it, ctx.chunk)))
                      for i, it in enumerate(items)]
            pos += len(items)
            total = sum(it.rows.num_tokens for it in items)
            order = sorted(range(len(items)), key=lambda i: (values[i], items[i].id))
            dropped = set()
            for i in order:
                if total <= self.config.budget:
                    break
                dropped.add(i)
                total -= items[i].rows.num_tokens
            self.items[layer] = [it for i, it in enumerate(items) if i not in dropped]
            self.evicted[layer] += len(dropped)

    def on_prompt_switch(self, ctx: ChunkContext) -> list[int]:
        return super().on_prompt_switch(ctx)  # drops the local window only; sink, bank and slots stay

    # -- introspection / persistence ------------------------------------------------------------------
    def stats(self) -> dict:
        out = super().stats()
        s = self.config
        layers = []
        for layer in range(self.num_layers):
            items = self.items[layer]
            tokens = sum(it.rows.num_tokens for it in items)
            ages = [self.now - it.created for it in items]
            assign = self.last_assign[layer]
            layers.append({
                "num_slots": s.num_slots,
                "items": len(items),
                "tokens": tokens,
                "budget": s.budget,
                "budget_use": tokens / s.budget,
                "mean_age": sum(ages) / len(ages) if ages else 0.0,
                "max_age": max(ages) if ages else 0,
                "evicted": self.evicted[layer],
                "item_ids": [it.id for it in items],
                "hits": [it.hits for it in items],
                "item_frames": [sorted({int(f) for f in it.rows.frames}) for it in items],
                "scores": {str(i): {"r_text": t, "r_vis": v, "r": r} for i, (t, v, r) in self.last_scores[layer].items()},
                "retrieved": list(self.last_retrieved[layer]),
                "assignment": None if assign is None else {
                    "slot": assign["slot"].tolist(), "frames": assign["frames"].tolist(), "hw": assign["hw"].tolist()},
            })
        out.update({"settings": s.settings(), "slot_phi": self.phi_info, "chunk": self.now, "layers": layers,
                    "bytes": self.nbytes(),
                    "tokens_per_layer": [t + lay["tokens"] for t, lay in zip(out["tokens_per_layer"], layers)]})
        return out

    def state_dict(self) -> dict:
        out = super().state_dict()
        out.update({
            "settings": self.config.settings(),
            **({"phi_info": dict(self.phi_info)} if self.phi_info else {}),
            "items": [[it.to_state() for it in items] for items in self.items],
            "prev_slots": [host_copy(u) if u is not None else None for u in self.prev_slots],
            "window_slots": [[[lo, hi, host_copy(u)] for lo, hi, u in ws] for ws in self.window_slots],
            "next_id": self.next_id,
            "now": self.now,
            "evicted": list(self.evicted),
            "last_assign": [None if a is None else {k: host_copy(v) for k, v in a.items()} for a in self.last_assign],
            "last_retrieved": [list(r) for r in self.last_retrieved],
            "last_scores": [[[i, *v] for i, v in sc.items()] for sc in self.last_scores],
        })
        return out

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        super().load_state_dict(state, device)
        self.config = SlotConfig(**state["settings"])
        self.phi_info = dict(state["phi_info"]) if state.get("phi_info") else self.phi_info
        self.items = [[SlotItem.from_state(d, device) for d in items] for items in state["items"]]
        self.prev_slots = [u.to(device) if u is not None else None for u in state["prev_slots"]]
        self.window_slots = [[(int(lo), int(hi), u.to(device)) for lo, hi, u in ws] for ws in state["window_slots"]]
        self.next_id, self.now = int(state["next_id"]), int(state["now"])
        self.evicted = [int(e) for e in state["evicted"]]
        self.last_assign = [None if a is None else {k: v.to(device) for k, v in a.items()} for a in state["last_assign"]]
        self.last_retrieved = [[int(i) for i in r] for r in state["last_retrieved"]]
        self.last_scores = [{int(i): (float(t), float(v), float(r)) for i, t, v, r in sc} for sc in state["last_scores"]]
        self.retrieved = [None] * self.num_layers  # recomputed by the next begin_chunk
        self._table = None

    def nbytes(self) -> int:
        extra = sum(it.rows.nbytes() + it.slot.numel() * it.slot.element_size() + it.key_mean.numel() * it.key_mean.element_size()
                    for items in self.items for it in items)
        extra += sum(u.numel() * u.element_size() for u in self.prev_slots if u is not None)
        extra += sum(u.numel() * u.element_size() for ws in self.window_slots for _, _, u in ws)
        return super().nbytes() + extra
