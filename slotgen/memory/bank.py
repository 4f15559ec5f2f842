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
    frames, means = frame_key_means_host(block)
    return torch.tensor(frames, dtype=torch.long), means


def frame_key_means_host(block: KVBlock) -> tuple[list[int], torch.Tensor]:
    """:func:`frame_key_means` with the frames as host integers, computed without a device sync when
    every frame of ``block`` is one run of rows (a bank of whole frames): per-run slices, no ``unique``."""
    runs = block.frame_runs
    frames = sorted({f for f, _ in runs})
    if len(frames) == len(runs):  # one run per frame
        k = block.k.float().mean(dim=0)  # (B, N, H, D) → (N, H, D)
        sums = dict(zip((f for f, _ in runs), k.split([n for _, n in runs]), strict=True))
        count = dict(runs)
        return frames, torch.stack([sums[f].sum(dim=0) / count[f] for f in frames])  # (U, H, D)
    frame_t, means = _frame_key_means_device(block)
    return frame_t.tolist(), means


def _frame_key_means_device(block: KVBlock) -> tuple[torch.Tensor, torch.Tensor]:
    frames, inverse = torch.unique(block.frames, sorted=True, return_inverse=True)  # (U,), (N,)
    k = block.k.float().mean(dim=0)  # (B, N, H, D) → (N, H, D)
    sums = torch.zeros(frames.numel(), *k.shape[1:], device=k.device).index_add_(0, inverse, k)  # (U, H, D)
    counts = torch.bincount(inverse, minlength=frames.numel()).to(k.dtype)  # (U,)
    return frames, sums / counts[:, None, None]  # (U, H, D)


def held_frames(*blocks: KVBlock | None) -> set[int]:
    """Distinct frames of the given blocks (sink rows, local window), from their host ``runs``."""
    return {f for b in blocks if b is not None for f, _ in b.frame_runs}


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
        self._to_compress: list[int] = []  # layers whose bank grew this chunk (scored in end_chunk)
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
        held = held_frames(self.sink_rows[layer], self.local[layer])  # host integers
        return bank.select_frames(lambda f: f < start and f not in held)

    def read(self, layer: int) -> KVBlock | None:
        if self.memflow:
            return KVBlock.cat([self.sink_rows[layer], *self.slots[layer], self.local[layer]])
        return KVBlock.cat([self.sink_rows[layer], self._bank_rows(layer), self.local[layer]])

    def begin_chunk(self, ctx: ChunkContext) -> None:
        super().begin_chunk(ctx)
        if self.memflow:
            self._offer(ctx)

    def _offer(self, ctx: ChunkContext) -> None:
        """MemFlow's bank update at a chunk's first step and at a re-cache pass (module docstring).

        Decided once for all layers from host integers: the scores of every layer's slots are copied
        to the host together (one device → host copy per offer, none while the bank is filling or the
        text keys are blind), then each layer keeps its ``bank_frames − 1`` best slots on the host."""
        if self.recorded > 0:
            if self.recorded <= self.config.bank_frames:
                for layer in range(self.num_layers):
                    self.slots[layer] = self.slots[layer][: self.recorded - 1] + [self.pending[layer]]
            else:
                blind = ctx.recache or self.fresh_prompt  # MemFlow's cross-attention cache is all zeros here
                scores = self._slot_scores(ctx, blind)  # per layer, S host floats
                for layer, score in enumerate(scores):
                    slots = self.slots[layer]
                    self.scores[layer] = {b.frame_runs[0][0]: x for b, x in zip(slots, score)}
                    order = sorted(range(len(slots)), key=lambda i: -score[i])  # stable: best first, ties → earlier
                    keep = order[: self.config.bank_frames - 1]
                    self.slots[layer] = [slots[i] for i in keep] + [self.pending[layer]]
        if not ctx.recache:
            self.fresh_prompt = False

    def _slot_scores(self, ctx: ChunkContext, blind: bool) -> list[list[float]]:
        """MemFlow relevance of each layer's slots: mean over text tokens (padding included), heads and the
        slot's tokens of <text key, rotated key> / sqrt(D); all 0 when ``blind``. Per layer, S floats
        (float32 values), computed on the device for all layers and copied to the host at once."""
        if blind or ctx.text_keys_padded is None or ctx.rotate_keys is None:
            return [[0.0] * len(slots) for slots in self.slots]
        per_layer = []
        for layer, slots in enumerate(self.slots):
            means = torch.stack([ctx.rotate_keys(b).float().mean(dim=(0, 1)) for b in slots])  # (S, H, D)
            per_layer.append(text_relevance(ctx.text_keys_padded(layer), means))  # (S,)
        values = torch.cat(per_layer).tolist()  # the offer's one sync: Σ S scores
        out, pos = [], 0
        for slots in self.slots:
            out.append(values[pos: pos + len(slots)])
            pos += len(slots)
        return out

    def write(self, layer: int, block: KVBlock) -> None:
        super().write(layer, block)
        ctx = self.ctx
        if ctx.recache or ctx.chunk % self.config.write_every:
            return
        if self.memflow:  # the chunk's first frame waits for the next offer (rows chosen on the host)
            self.pending[layer] = block.select_frames(lambda f: f == ctx.frame_start)
            self._recording = True
            return
        candidates = [f for f, _ in block.frame_runs if f >= self.sink]  # frames outside the sink
        if not candidates:
            return
        frame = min(candidates)  # the chunk's first non-sink frame
        bank = self.bank[layer]
        if bank is not None and frame in held_frames(bank):
            return
        self.bank[layer] = KVBlock.cat([bank, block.select_frames(lambda f: f == frame)])
        self._to_compress.append(layer)

    def end_chunk(self) -> None:
        """Score and compress the banks that grew, all layers at once: one device → host copy per chunk;
        under MemFlow's rules count the frame this chunk recorded (it enters at the next offer)."""
        layers, self._to_compress = self._to_compress, []
        if layers:
            self._compress(layers, self.ctx)
        super().end_chunk()
        if self._recording:
            self.recorded += 1
            self._recording = False

    def _compress(self, layers: list[int], ctx: ChunkContext) -> None:
        """Keep the ``bank_frames`` frames most relevant to the current prompt (ties: older frame)."""
        frames, scores = [], []
        for layer in layers:
            f, means = frame_key_means_host(self.bank[layer])  # U host ints, (U, H, D)
            text_keys = ctx.text_keys(layer) if ctx.text_keys is not None else None
            frames.append(f)
            scores.append(text_relevance(text_keys, means))  # (U,)
        values = torch.cat(scores).tolist()  # the chunk's one sync: Σ U scores
        pos = 0
        for layer, f in zip(layers, frames):
            score = values[pos: pos + len(f)]
            pos += len(f)
            self.scores[layer] = dict(zip(f, score))
            if len(f) <= self.config.bank_frames:
                continue
            order = sorted(range(len(f)), key=lambda i: -score[i])  # stable: best first, ties → older
            kept = {f[i] for i in order[: self.config.bank_frames]}
            self.bank[layer] = self.bank[layer].select_frames(lambda x: x in kept)

    def on_prompt_switch(self, ctx: ChunkContext) -> list[int]:
        self.fresh_prompt = self.memflow
        return super().on_prompt_switch(ctx)  # drops the local window (one-pass: maybe the sink); the bank stays

    # -- introspection / persistence ------------------------------------------------------------------
    def stats(self) -> dict:
        out = super().stats()
        out.update({
            "bank_frames": self.config.bank_frames,
            "write_every": self.config.write_every,
            "bank": ([[b.frame_runs[0][0] for b in slots] for slots in self.slots] if self.memflow else
                     [b.host_frames() if b is not None else [] for b in self.bank]),
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
