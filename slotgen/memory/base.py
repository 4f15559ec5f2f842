"""The memory-policy interface: where a chunk's K/V goes, and what the next chunk attends to.

Per chunk the engine calls, in order::

    begin_chunk(ctx)            # a new chunk (or a re-cache group) is about to be processed
    read(layer)   × layers × passes   # K/V to prepend to the chunk's own K/V in self-attention
    write(layer, block) × layers      # the commit pass (timestep 0) hands over the chunk's clean K/V
    end_chunk()

and on a prompt switch ``on_prompt_switch(ctx)``, which drops what must be recomputed with the new
prompt and returns those latent-frame indices; the engine re-runs them (LongLive KV re-cache) as
commit passes, each wrapped in ``begin_chunk(ctx with recache=True)`` / ``end_chunk()``.

Keys are stored **un-roped** (after ``norm_k``), with each row's absolute latent frame and (row, col)
grid cell; the engine assigns RoPE positions at read time (see ``engine/attention.py``), so memory
contents never depend on how long the video is.

A policy is one module: a :class:`PolicyConfig` subclass (its storyboard keys, defaults and checks),
a :class:`MemoryPolicy` subclass naming that config in ``config_class``, and
``@register_policy`` (:mod:`slotgen.memory.registry`) on the class. Everything else (storyboard
validation, CLI flags, snapshots, ``slotgen inspect``, benchmarks) reads the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator


def _reject_bool(value: Any) -> Any:
    """Refuse booleans for numeric fields (pydantic would otherwise read ``true`` as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {str(value).lower()}")
    return value


LatentFrames = Annotated[int, BeforeValidator(_reject_bool)]
"""A count of latent frames (the unit the K/V cache is stored in)."""
Count = Annotated[int, BeforeValidator(_reject_bool)]
"""A count of tokens, slots, items, iterations or chunks."""
Real = Annotated[float, BeforeValidator(_reject_bool)]


class PolicyConfig(BaseModel):
    """A policy's ``memory:`` section: the single source of its keys, defaults and checks.

    A subclass declares ``policy: Literal["<name>"] = "<name>"`` and one pydantic field per key
    (``Field(default, ge=..., description=...)``; the description is the CLI flag's help). Every key
    becomes a ``slotgen render`` flag ``--<key>`` (underscores as dashes) unless ``cli_names`` renames it.
    Numeric strings such as ``"8"`` are accepted, so CLI values can be passed as they come.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cli_names: ClassVar[dict[str, str]] = {}
    """Field → flag name where the flag is not the field's name (``{"num_slots": "slots"}``)."""

    policy: str
    preset: str | None = Field(default=None, description="Attention preset (slotgen, self_forcing, longlive, "
                               "longlive_infinity, memflow); default: the model's.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        from slotgen.engine.presets import PRESETS

        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown attention preset {value!r}; expected one of: {', '.join(PRESETS)}")
        return value

    def settings(self) -> dict[str, Any]:
        """The keys besides ``policy``, as plain data (what a policy's ``state_dict`` records)."""
        return self.model_dump(exclude={"policy"})

    def for_frame(self, tokens_per_frame: int) -> "PolicyConfig":
        """This section with the keys it leaves to the model's geometry resolved for ``tokens_per_frame``
        tokens per latent frame (a render calls it once); by default nothing depends on it."""
        return self


Runs = tuple[tuple[int, int], ...]
"""Host mirror of a block's row frames, run-length coded in row order: ``((frame, rows), ...)``."""


def _runs_of(frames: torch.Tensor) -> Runs:
    """Run-length code of a 1-D frame tensor (a device → host copy: only where no host mirror exists)."""
    values, counts = torch.unique_consecutive(frames, return_counts=True)
    return tuple(zip(values.tolist(), counts.tolist()))


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU holding only its own elements: a view into a larger buffer (rows sliced out of a
    chunk's tensor) is copied, so ``torch.save`` does not write the whole buffer behind it."""
    t = t.cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _merge_runs(runs) -> Runs:
    out: list[list[int]] = []
    for f, n in runs:
        if n <= 0:
            continue
        if out and out[-1][0] == f:
            out[-1][1] += n
        else:
            out.append([f, n])
    return tuple((f, n) for f, n in out)


@dataclass
class KVBlock:
    """Rows of self-attention memory for one layer.

    k, v:   (B, N, H, D)  un-roped keys (after norm_k) and values
    frames: (N,)          absolute latent-frame index of each row (long)
    hw:     (N, 2)        (row, col) token-grid cell of each row (long)
    runs:   the same frames on the host, run-length coded (``((frame, rows), ...)`` in row order).

    ``runs`` lets policies decide which frames to keep with host integers alone: on a GPU, selecting
    rows by a boolean mask over ``frames`` (or asking ``frames.max()``) stalls the host until the
    device catches up. The engine creates blocks with ``runs`` filled in; a block built without it gets
    it computed from ``frames`` on first use (one device → host copy).
    """

    k: torch.Tensor
    v: torch.Tensor
    frames: torch.Tensor
    hw: torch.Tensor
    runs: Runs | None = field(default=None, compare=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def frame_runs(self) -> Runs:
        """``((frame, rows), ...)`` in row order (computed from ``frames`` once if not given)."""
        if self.runs is None:
            self.runs = _runs_of(self.frames) if self.frames.numel() else ()
        return self.runs

    def host_frames(self) -> list[int]:
        """Distinct frames held, ascending (host integers, no device access when ``runs`` is known)."""
        return sorted({f for f, _ in self.frame_runs})

    def select(self, index: torch.Tensor) -> "KVBlock":
        """Rows at ``index`` (a 1-D long tensor or boolean mask over N)."""
        return KVBlock(self.k[:, index], self.v[:, index], self.frames[index], self.hw[index])

    def rows(self, start: int, stop: int) -> "KVBlock":
        """Rows ``[start, stop)`` as views (no copy, no device access)."""
        runs, pos = [], 0
        for f, n in self.frame_runs:
            lo, hi = max(pos, start), min(pos + n, stop)
            if hi > lo:
                runs.append((f, hi - lo))
            pos += n
        return KVBlock(self.k[:, start:stop], self.v[:, start:stop], self.frames[start:stop], self.hw[start:stop],
                       _merge_runs(runs))

    def select_frames(self, keep: Callable[[int], bool]) -> "KVBlock | None":
        """The rows whose frame satisfies ``keep`` (decided on the host from ``runs``), in row order; None if none."""
        spans: list[list[int]] = []  # merged [start, stop) row ranges
        pos = 0
        for f, n in self.frame_runs:
            if keep(f):
                if spans and spans[-1][1] == pos:
                    spans[-1][1] = pos + n
                else:
                    spans.append([pos, pos + n])
            pos += n
        if not spans:
            return None
        if len(spans) == 1 and spans[0] == [0, self.num_tokens]:
            return self
        return KVBlock.cat([self.rows(a, b) for a, b in spans])

    @staticmethod
    def cat(blocks: list["KVBlock"]) -> "KVBlock | None":
        blocks = [b for b in blocks if b is not None and b.num_tokens > 0]
        if not blocks:
            return None
        if len(blocks) == 1:
            return blocks[0]
        runs = None
        if all(b.runs is not None for b in blocks):
            runs = _merge_runs(r for b in blocks for r in b.runs)
        return KVBlock(
            torch.cat([b.k for b in blocks], 1),  # (B, ΣN, H, D)
            torch.cat([b.v for b in blocks], 1),
            torch.cat([b.frames for b in blocks]),
            torch.cat([b.hw for b in blocks]),
            runs,
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.frames, self.hw))

    def to_state(self) -> dict:
        return {"k": host_copy(self.k), "v": host_copy(self.v), "frames": host_copy(self.frames), "hw": host_copy(self.hw)}

    @staticmethod
    def from_state(d: dict, device: torch.device | str = "cpu") -> "KVBlock":
        runs = _runs_of(d["frames"]) if d["frames"].numel() else ()  # from the host copy, before moving
        return KVBlock(d["k"].to(device), d["v"].to(device), d["frames"].to(device), d["hw"].to(device), runs)


@dataclass
class ChunkContext:
    """What a policy may know about the chunk being generated."""

    chunk: int  # chunk index (re-cache groups carry the index of the chunk they came from)
    frame_start: int  # first absolute latent frame of the chunk
    num_frames: int  # latent frames in the chunk
    prompt_index: int  # index of the storyboard prompt in force
    prompt: str
    recache: bool = False  # True while re-running past frames after a prompt switch
    # text_keys(layer) -> (B, L, H, D) cross-attention keys of the prompt (padding rows removed),
    # computed lazily and cached per prompt by the engine; used for text relevance (MemFlow, slot).
    text_keys: Callable[[int], torch.Tensor] | None = field(default=None, repr=False)
    # text_keys_padded(layer) -> (B, text_len, H, D): the same keys over all text_len rows, padding included
    # (what Wan's cross-attention cache holds; MemFlow scores against it).
    text_keys_padded: Callable[[int], torch.Tensor] | None = field(default=None, repr=False)
    # rotate_keys(block) -> (B, N, H, D): the block's keys rotated at their absolute frame index (MemFlow's
    # bank stores such keys and scores them).
    rotate_keys: Callable[[KVBlock], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def frame_end(self) -> int:
        return self.frame_start + self.num_frames


class MemoryPolicy(ABC):
    """A bounded self-attention memory. Subclasses keep per-layer state; see the module docstring.

    The whole contract:

    * class attributes ``name`` (the storyboard's ``policy:`` value) and ``config_class`` (its
      :class:`PolicyConfig`); :meth:`from_config` builds a fresh policy from a validated config;
    * the chunk protocol (module docstring): ``begin_chunk``, ``read``, ``write``, ``end_chunk``,
      ``on_prompt_switch``, ``recache_span``;
    * ``stats()``: JSON data with at least ``policy``, ``tokens_per_layer`` (one int per layer) and
      ``bytes``; ``slotgen inspect`` also shows ``frames_seen``, ``sink_frames`` and ``local_frames``
      when present, and the columns of :meth:`inspect_layer`;
    * ``state_dict()`` / ``load_state_dict(state, device=...)``: the full state as tensors and plain
      data (a snapshot stores it; loaded with ``torch.load(weights_only=True)``), restored onto
      ``device``; after a restore the policy continues bit-identically;
    * ``nbytes()``.
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig

    inspect_schema: ClassVar[dict[str, dict]] = {}
    """JSON-schema properties of the per-layer keys :meth:`inspect_layer` adds to the inspect report."""
    inspect_columns: ClassVar[tuple[tuple[str, Callable[[dict], str]], ...]] = ()
    """``(title, cell(layer_row) -> str)`` for each extra column of the ``slotgen inspect`` table."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    @classmethod
    def from_config(cls, config: PolicyConfig, num_layers: int, *, phi: Any = None) -> "MemoryPolicy":
        """A fresh policy for ``config`` over ``num_layers`` layers. ``phi``: the model's learned slot
        projection (``ModelBundle.slot_phi``) or None; a policy that has no use for it ignores it."""
        return cls(num_layers, config)  # type: ignore[call-arg]

    @classmethod
    def inspect_layer(cls, stats: dict, layer: int) -> dict:
        """Extra fields of layer ``layer``'s row in the inspect report, from this policy's ``stats()``."""
        return {}

    def configure_stream(self, preset: Any, chunk_frames: int) -> None:
        """Called once by the engine before the first chunk: the attention preset in force
        (:class:`slotgen.engine.presets.Preset`) and the latent frames per chunk. A policy built on the
        local window reads the window counting, re-cache and bank rules from it; others may ignore it."""
        self.preset = preset
        self.chunk_frames = chunk_frames

    # -- the chunk protocol ---------------------------------------------------------------------
    def begin_chunk(self, ctx: ChunkContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def read(self, layer: int) -> KVBlock | None:
        """K/V rows the current chunk attends to before its own rows (None: nothing)."""

    @abstractmethod
    def write(self, layer: int, block: KVBlock) -> None:
        """Receive the current chunk's clean (commit-pass) K/V for ``layer``."""

    def end_chunk(self) -> None:
        pass

    @abstractmethod
    def on_prompt_switch(self, ctx: ChunkContext) -> list[int]:
        """Drop entries to recompute under the new prompt; return their latent-frame indices (ascending)."""

    @abstractmethod
    def recache_span(self) -> int:
        """How many recent clean latent frames the engine must keep so a re-cache can run."""

    # -- introspection and persistence ------------------------------------------------------------
    @abstractmethod
    def stats(self) -> dict:
        """Cheap statistics (no forward passes): JSON-serialisable."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Full state as tensors / plain Python (loadable with ``torch.load(weights_only=True)``)."""

    @abstractmethod
    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        """Restore ``state_dict()``'s output, with tensors on ``device``; raise ValueError when it does not fit."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of K/V (and metadata tensors) held."""
