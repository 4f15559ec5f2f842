"""Attention presets: the exact attention pattern a causal Wan checkpoint was trained and released with.

A preset is one name for everything that decides *which past frames a chunk sees, at which RoPE
positions, and what happens at a prompt switch*, plus which weights entry of a checkpoint is loaded.
A model folder names its preset in ``slotgen.json`` (``"preset": "longlive"``); a storyboard may name
another in its ``memory:`` section (``preset: memflow``), and any memory key it sets overrides the
preset's value (:func:`slotgen.memory.registry.resolve_memory`). The embedded miniature uses
``slotgen``, the semantics it was trained with.

=================  =============  ==========  ===================  ==========  =====================
preset             window counts  RoPE        prompt switch        bank rules  weights entry
=================  =============  ==========  ===================  ==========  =====================
slotgen            past frames    rank        chunked re-cache     slotgen     generator_ema
self_forcing       + the chunk    absolute    none (cache kept)    slotgen     generator_ema
longlive           + the chunk    absolute    one-pass re-cache    slotgen     generator
longlive_infinity  + the chunk    rank        one-pass re-cache    slotgen     generator
memflow            + the chunk    absolute    one-pass re-cache    memflow     generator
=================  =============  ==========  ===================  ==========  =====================

* **window counts**: ``past`` — ``window`` is the number of past latent frames kept besides the sink;
  ``+ the chunk`` — ``window`` counts the chunk being generated too (LongLive's ``local_attn_size``
  minus its sink, MemFlow's local 9, Self-Forcing's 21-frame cache), so ``window − chunk_frames``
  past frames are kept.
* **RoPE**: ``absolute`` — every key and query is rotated at its absolute latent-frame index (the
  sink stays at 0…2 while the query's position grows, retrieved frames keep theirs); positions must
  stay inside the model's RoPE table (1024 latent frames for Wan2.1), as in the reference code.
  ``rank`` — memory frames are renumbered by rank (oldest = 0), the chunk follows: unlimited length.
* **prompt switch**: ``chunked`` — the local window is dropped and re-run chunk by chunk at t = 0
  under the new prompt, causally, the sink kept. ``one_pass`` (LongLive) — the last ``window``
  frames are re-run at t = 0 under the new prompt in **one pass without a mask** (every re-cached
  frame sees all the others and the sink); when the video is still short enough that the sink falls
  inside that span (``f − window ≤ sink``, i.e. ``f ≤ 12`` with LongLive's numbers) the whole video so
  far is re-run and the sink itself is rewritten. ``none`` — Self-Forcing has no prompt switch: the
  cache is kept and the new prompt drives the following chunks.
* **bank rules** (policy ``bank`` only): ``memflow`` is MemFlow's own bank (see
  :mod:`slotgen.memory.bank`); ``slotgen`` is slotgen's de-duplicated variant.
* **weights entry**: which entry of a ``{generator, generator_ema}`` checkpoint is loaded, as each
  project's inference configuration does (Self-Forcing's README runs ``--use_ema``; LongLive's and
  MemFlow's configs set ``use_ema: false``); the other entry is used when the preferred one is absent.

Past Self-Forcing's reach (its released cache holds 21 latent frames and its code stops there),
``self_forcing`` keeps rolling: the last 21 frames including the chunk, at absolute positions —
exactly what Self-Forcing's own code does with ``local_attn_size: 21``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from slotgen.errors import SlotgenError


@dataclass(frozen=True)
class Preset:
    name: str
    window_counts_chunk: bool
    rope: Literal["rank", "absolute"]
    recache: Literal["chunked", "one_pass", "none"]
    bank: Literal["slotgen", "memflow"]
    weights: Literal["generator_ema", "generator"]
    memory: dict[str, Any] = field(default_factory=dict)  # memory keys the preset sets unless the storyboard does
    reference: str = ""

    def past_window(self, window: int, chunk_frames: int) -> int:
        """Past latent frames kept in the local window for a ``window`` key under this preset."""
        if not self.window_counts_chunk:
            return window
        if window < chunk_frames:
            raise SlotgenError(f"memory window {window} is smaller than a chunk ({chunk_frames} latent frames); under "
                               f"preset {self.name!r} the window counts the chunk being generated")
        return window - chunk_frames


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("slotgen", False, "rank", "chunked", "slotgen", "generator_ema",
           reference="slotgen's own pattern (the embedded miniature is trained with it)"),
    Preset("self_forcing", True, "absolute", "none", "slotgen", "generator_ema",
           {"policy": "window", "window": 21},
           reference="Self-Forcing 33593df, configs/self_forcing_dmd.yaml with --use_ema"),
    Preset("longlive", True, "absolute", "one_pass", "slotgen", "generator",
           {"policy": "sink", "sink": 3, "window": 9},
           reference="LongLive 2462895, configs/longlive_inference.yaml / longlive_interactive_inference.yaml"),
    Preset("longlive_infinity", True, "rank", "one_pass", "slotgen", "generator",
           {"policy": "sink", "sink": 3, "window": 9},
           reference="LongLive 2462895, configs/longlive_inference_infinity.yaml (use_infinite_attention)"),
    Preset("memflow", True, "absolute", "one_pass", "memflow", "generator",
           {"policy": "bank", "sink": 3, "window": 9, "bank_frames": 3, "write_every": 3},
           reference="MemFlow 7ed5147, configs/interactive_inference.yaml"),
)}
DEFAULT_PRESET = "slotgen"


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def get_preset(name: str | None) -> Preset:
    """The preset called ``name`` (None: :data:`DEFAULT_PRESET`); a one-line error for an unknown name."""
    name = DEFAULT_PRESET if name is None else name
    if name not in PRESETS:
        raise SlotgenError(f"unknown attention preset {name!r}; expected one of: {', '.join(PRESETS)}")
    return PRESETS[name]


__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "get_preset", "preset_names"]
