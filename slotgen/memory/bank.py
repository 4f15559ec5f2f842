"""MemFlow's narrative memory: sink + local window + a small bank of whole latent frames.

Per layer the policy holds (all K un-roped, see ``base.py``)::

    sink    first ``sink`` latent frames, forever                       (as SinkMemory)
    local   the last ``window`` latent frames                           (as SinkMemory)
    bank    up to ``bank_frames`` whole latent frames, chosen by text relevance

Write (non-re-cache commits of chunks ``c`` with ``c % write_every == 0``): the chunk's first latent
frame that is not a sink frame joins the bank (all its rows). When the bank then holds more than
``bank_frames`` frames it is compressed: every held frame is scored with the *current* prompt's
cross-attention text keys (:func:`text_relevance`) and the ``bank_frames`` best are kept (ties keep
the older frame). Bank frames are scored and compressed per layer, so layers may keep different frames.

Read: ``[sink ; bank frames neither held by sink/window nor at/after the chunk ; local window]``.
The engine positions rows by the rank of their distinct frames, so bank frames sit between the sink
and the window in frame order, gaps compressed.

Prompt switch: drop the local window (the engine re-caches it), keep sink and bank.

Under the ``memflow`` attention preset (``engine/presets.py``) the bank follows MemFlow's own rules
instead (MemFlow 7ed5147, ``configs/interactive_inference.yaml``), per layer:

* the bank is an ordered list of up to ``bank_frames`` frame slots; read is
  ``[sink ; every slot ; local]`` with no de-duplication (a slot may hold a sink or window frame, or
  the same frame twice) and absolute positions (the preset's RoPE);
* the commit pass of chunk ``c`` with ``c % write_every == 0`` (not a re-cache) records the chunk's
  *first* frame (frame 0 included) as the pending frame; it enters the bank at the next offer;
* an offer happens at the first denoising step of every chunk and at a re-cache pass: while at most
  ``bank_frames`` frames were ever recorded, the pending frame (re)takes slot ``recorded − 1``; after
  that the ``bank_frames − 1`` slots with the highest relevance are kept, best first, and the pending
  frame is appended — so until a new frame is recorded the same frame is offered again at every step 0;
* relevance of a slot: the mean over all ``text_len`` text tokens (padding included), heads and the
  slot's tokens of ⟨cross-attention text key, key rotated at its absolute frame⟩ / √D;
* at a prompt switch MemFlow resets its cross-attention cache before re-caching, so the re-cache
  offer and the first step-0 offer under the new prompt score every slot 0. Tie rule: equal scores
  keep the earlier slot first (a stable sort); with all scores 0 the first ``bank_frames − 1`` slots
  are kept in order, which is what ``torch.topk`` returns for MemFlow's 3-slot bank on CPU;
* bank keys are never recomputed (a re-cache rewrites sink and window, not the bank).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from slotgen.memory.base import ChunkContext, Count, KVBlock, LatentFrames
from slotgen.memory.registry import register_policy
from slotgen.memory.window import SinkWindowConfig, WindowMemory


class BankConfig(SinkWindowConfig):
    """MemFlow narrative memory: sink + rolling window + a bank of whole latent frames kept by text relevance.

    On overflow the bank keeps the frames whose keys best match the current prompt's text keys.
    """

    policy: Literal["bank"] = "bank"
    bank_frames: LatentFrames = Field(default=3, ge=1, description="Latent frames held in the bank per "
                                      "layer (MemFlow: 3).")
    write_every: Count = Field(default=1, ge=1, description="A chunk's first non-sink frame joins the bank "
                               "every N chunks.")


def text_relevance(text_keys: torch.Tensor | None, key_means: torch.Tensor) -> torch.Tensor:
    """MemFlow relevance of I groups of visual keys to a prompt → (I,) float32.

    text_keys: (B, L, H, D) cross-attention keys of the prompt's tokens; key_means: (I, H, D) the mean
    un-roped self-attention key of each group (over its tokens and batch). The score is
    ``mean_{l, h, n} <t_{l,h}, k_{n,h}> / sqrt(D)`` (mean over text tokens l, heads h and the group's
    tokens n); the dot product is bilinear, so it equals ``mean_h <mean_l t_{l,h}, mean_n k_{n,h}> / sqrt(D)``,
    which is what is computed. Without text keys (None) every score is 0.
    """
    if text_keys is None:
        return torch.zeros(key_means.shape[0], device=key_means.device)
    t = text_keys.float().mean(dim=(0, 1)).to(key_means.device)  # (B, L, H, D) → (H, D)
    return (key_means.float() * t).sum(dim=-1).mean(dim=-1) / math.sqrt(key_means.shape[-1])  # (I, H, D) → (I,)


def frame_key_means(block: KVBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct frames of ``block`` (U,) ascending and the mean key of each frame (U, H, D), float32."""
    frames, inverse = torch.unique(block.frames, sorted=True, return_inverse=True)  # (U,), (N,)
    k = block.k.float().mean(dim=0)  # (B, N, H, D) → (N, H, D)
    sums = torch.zeros(frames.numel(), *k.shape[1:], device=k.device).index_add_(0, inverse, k)  # (U, H, D)
    counts = torch.bincount(inverse, minlength=frames.numel()).to(k.dtype)  # (U,)
    return frames, sums / counts[:, None, None]  # (U, H, D)


def held_frames(*blocks: KVBlock | None) -> torch.Tensor:
    """Distinct frames of the given blocks (sink rows, local window) as a 1-D long tensor."""
    parts = [b.frames for b in blocks if b is not None]
    return torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)


@register_policy
class BankMemory(WindowMemory):
    """MemFlow narrative memory: sink + local window + text-relevance-compressed frame bank. See module doc."""

    name = "bank"
    config_class = BankConfig
    inspect_schema = {"bank_frames": {"type": "array", "items": {"type": "integer"}},
                      "relevance": {"type": "object"}}
    inspect_columns = (
        ("bank frames", lambda row: " ".join(map(str, row["bank_frames"])) or "-"),
        ("relevance", lambda row: " ".join(f"{float(v):.2f}" for v in row["relevance"].values()) or "-"),
    )

    def __init__(self, num_layers: int, config: BankConfig | None = None):
        config = config or BankConfig()
        super().__init__(num_layers, window=config.window, sink=config.sink)
        self.config = config
        self.bank: list[KVBlock | None] = [None] * num_layers  # rows of the banked frames
        self.scores: list[dict[int, float]] = [{} for _ in range(num_layers)]  # frame → last relevance
        # MemFlow rules (preset memflow): ordered slots per layer, the pending recorded frame, counters
        self.slots: list[list[KVBlock]] = [[] for _ in range(num_layers)]
        self.pending: list[KVBlock | None] = [None] * num_layers
        self.recorded = 0  # frames recorded so far (MemFlow's bank end index / frame tokens)
        self.fresh_prompt = False  # the cross-attention cache was just reset by a prompt switch
        self._recording = False

    @property
    def memflow(self) -> bool:
        """MemFlow's own rules: the engine's preset says so (or, before an engine configured this policy,
        e.g. when ``slotgen inspect`` rebuilds it from a snapshot, the config's resolved preset)."""
        if self.preset is not None:
            return self.preset.bank == "memflow"
        return self.config.preset == "memflow"

    @classmethod
    def from_config(cls, config: BankConfig, num_layers: int, *, phi=None) -> "BankMemory":
        return cls(num_layers, config)

    @classmethod
    def inspect_layer(cls, stats: dict, layer: int) -> dict:
        if layer >= len(stats.get("bank", [])):
            return {}
        scores = stats.get("bank_scores", [])
        return {"bank_frames": [int(f) for f in stats["bank"][layer]],
                "relevance": {k: float(v) for k, v in (scores[layer] if layer < len(scores) else {}).items()}}

    # -- protocol -----------------------------------------------------------------------------------
    def _bank_rows(self, layer: int) -> KVBlock | None:
        """Bank rows not already attended (sink / window) and strictly before the current chunk."""
        bank = self.bank[layer]
        if bank is None:
            return None
        ctx = getattr(self, "ctx", None)
        start = ctx.frame_start if ctx is not None else self.frames_seen
        held = held_frames(self.sink_rows[layer], self.local[layer]).to(bank.frames.device)  # (Uh,)
        keep = (bank.frames < start) & ~torch.isin(bank.frames, held)  # (N,)
        return bank.select(keep) if keep.any() else None

    def read(self, layer: int) -> KVBlock | None:
        if self.memflow:
            return KVBlock.cat([self.sink_rows[layer], *self.slots[layer], self.local[layer]])
        return KVBlock.cat([self.sink_rows[layer], self._bank_rows(layer), self.local[layer]])

    def begin_chunk(self, ctx: ChunkContext) -> None:
        super().begin_chunk(ctx)
        if self.memflow:
            self._offer(ctx)

    def _offer(self, ctx: ChunkContext) -> None:
        """MemFlow's bank update at a chunk's first step and at a re-cache pass (module docstring)."""
        if self.recorded > 0:
            blind = ctx.recache or self.fresh_prompt  # MemFlow's cross-attention cache is all zeros here
            for layer in range(self.num_layers):
                slots, new = self.slots[layer], self.pending[layer]
                if self.recorded <= self.config.bank_frames:
                    self.slots[layer] = slots[: self.recorded - 1] + [new]
                    continue
                score = self._slot_scores(layer, slots, ctx, blind)  # (S,)
                self.scores[layer] = {int(b.frames[0]): float(x) for b, x in zip(slots, score)}
                keep = torch.sort(score, descending=True, stable=True).indices[: self.config.bank_frames - 1]
                self.slots[layer] = [slots[i] for i in keep.tolist()] + [new]
        if not ctx.recache:
            self.fresh_prompt = False

    def _slot_scores(self, layer: int, slots: list[KVBlock], ctx: ChunkContext, blind: bool) -> torch.Tensor:
        """MemFlow relevance of each slot: mean over text tokens (padding included), heads and the slot's
        tokens of <text key, rotated key> / sqrt(D); all 0 when ``blind``. Returns (S,) float32."""
        if blind or ctx.text_keys_padded is None or ctx.rotate_keys is None:
            return torch.zeros(len(slots))
        means = torch.stack([ctx.rotate_keys(b).float().mean(dim=(0, 1)) for b in slots])  # (S, H, D)
        return text_relevance(ctx.text_keys_padded(layer), means).cpu()

    def end_chunk(self) -> None:
        super().end_chunk()
        if self._recording:
            self.recorded += 1
            self._recording = False

    def write(self, layer: int, block: KVBlock) -> None:
        super().write(layer, block)
        ctx = self.ctx
        if ctx.recache or ctx.chunk % self.config.write_every:
            return
        if self.memflow:  # the chunk's first frame waits for the next offer
            self.pending[layer] = block.select(block.frames == ctx.frame_start)
            self._recording = True
            return
        candidates = block.frames[block.frames >= self.sink]  # (N',) rows outside the sink
        if candidates.numel() == 0:
            return
        frame = int(candidates.min())  # the chunk's first non-sink frame
        bank = self.bank[layer]
        if bank is not None and bool((bank.frames == frame).any()):
            return
        self.bank[layer] = KVBlock.cat([bank, block.select(block.frames == frame)])
        self._compress(layer, ctx)

    def _compress(self, layer: int, ctx: ChunkContext) -> None:
        """Keep the ``bank_frames`` frames most relevant to the current prompt (ties: older frame)."""
        bank = self.bank[layer]
        frames, means = frame_key_means(bank)  # (U,), (U, H, D)
        text_keys = ctx.text_keys(layer) if ctx.text_keys is not None else None
        score = text_relevance(text_keys, means)  # (U,)
        self.scores[layer] = {int(f): float(s) for f, s in zip(frames, score)}
        if frames.numel() <= self.config.bank_frames:
            return
        order = torch.sort(score, descending=True, stable=True).indices  # (U,) best first, ties → older
        kept = frames[order[: self.config.bank_frames]]  # (bank_frames,)
        self.bank[layer] = bank.select(torch.isin(bank.frames, kept))

    def on_prompt_switch(self, ctx: ChunkContext) -> list[int]:
        self.fresh_prompt = self.memflow
        return super().on_prompt_switch(ctx)  # drops the local window (one-pass: maybe the sink); the bank stays

    # -- introspection / persistence ------------------------------------------------------------------
    def stats(self) -> dict:
        out = super().stats()
        out.update({
            "bank_frames": self.config.bank_frames,
            "write_every": self.config.write_every,
            "bank": ([[int(b.frames[0]) for b in slots] for slots in self.slots] if self.memflow else
                     [sorted({int(f) for f in b.frames.unique()}) if b is not None else [] for b in self.bank]),
            "bank_scores": [{str(f): s for f, s in sc.items()} for sc in self.scores],
            "tokens_per_layer": [t + (b.num_tokens if b is not None else 0) + sum(x.num_tokens for x in slots)
                                 for t, b, slots in zip(out["tokens_per_layer"], self.bank, self.slots)],
            "bytes": self.nbytes(),
        })
        return out

    def state_dict(self) -> dict:
        out = super().state_dict()
        out.update({
            "settings": self.config.settings(),
            "bank": [b.to_state() if b is not None else None for b in self.bank],
            "scores": [[[f, s] for f, s in sorted(sc.items())] for sc in self.scores],
            "memflow": {"slots": [[b.to_state() for b in slots] for slots in self.slots],
                        "pending": [b.to_state() if b is not None else None for b in self.pending],
                        "recorded": self.recorded, "fresh_prompt": self.fresh_prompt},
        })
        return out

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        super().load_state_dict(state, device)
        self.config = BankConfig(**state["settings"])
        self.bank = [KVBlock.from_state(d, device) if d is not None else None for d in state["bank"]]
        self.scores = [{int(f): float(s) for f, s in sc} for sc in state["scores"]]
        mf = state.get("memflow")
        if mf is not None:
            self.slots = [[KVBlock.from_state(d, device) for d in slots] for slots in mf["slots"]]
            self.pending = [KVBlock.from_state(d, device) if d is not None else None for d in mf["pending"]]
            self.recorded, self.fresh_prompt = int(mf["recorded"]), bool(mf["fresh_prompt"])

    def nbytes(self) -> int:
        extra = sum(b.nbytes() for slots in self.slots for b in slots) + sum(b.nbytes() for b in self.pending if b)
        return super().nbytes() + sum(b.nbytes() for b in self.bank if b is not None) + extra
