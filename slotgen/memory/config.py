"""Memory policy configuration: which past K/V the transformer attends to while generating a chunk.

A storyboard's ``memory:`` block (or a CLI override) selects one policy by its ``policy`` name; the
other keys configure it. All sizes are counted in *latent* frames (after the VAE's temporal
compression), because that is the unit the K/V cache is stored in.

The configs form a pydantic discriminated union on ``policy``: ``window``, ``sink``, ``bank``
(MemFlow) and ``slot`` (SlotMemory). To add a policy, define another config class with a
``policy: Literal["<name>"]`` field and add it to ``_MEMORY_CONFIG_UNION``; :data:`MEMORY_POLICIES`
and :data:`MEMORY_CONFIG_TYPES` follow automatically. docs/MEMORY.md explains every parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, model_validator


def _reject_bool(value: Any) -> Any:
    """Refuse booleans for integer fields (pydantic would otherwise read ``true`` as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {str(value).lower()}")
    return value


_LatentFrames = Annotated[int, BeforeValidator(_reject_bool)]
_Count = Annotated[int, BeforeValidator(_reject_bool)]  # tokens, slots, items, iterations, chunks
_Real = Annotated[float, BeforeValidator(_reject_bool)]


class WindowConfig(BaseModel):
    """Self-Forcing rolling local window: attend only to the most recent latent frames.

    Fields:
        policy: always ``"window"``; selects this policy.
        window: how many of the most recent latent frames stay in memory (default 12, at least 1).
            Older frames are forgotten, so content that leaves the window can drift.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["window"] = "window"
    window: _LatentFrames = Field(default=12, ge=1)


class SinkConfig(BaseModel):
    """LongLive attention sink: the first latent frames are kept forever, plus a rolling window.

    Fields:
        policy: always ``"sink"``; selects this policy.
        sink: how many latent frames from the very start of the video are kept for the whole
            generation (default 3, at least 0; 0 makes this a plain rolling window).
        window: how many of the most recent latent frames are kept in addition to the sink
            (default 9, at least 1). The window never includes the sink frames themselves.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["sink"] = "sink"
    sink: _LatentFrames = Field(default=3, ge=0)
    window: _LatentFrames = Field(default=9, ge=1)


class BankConfig(BaseModel):
    """MemFlow narrative memory: sink + rolling window + a bank of whole latent frames kept by text relevance.

    Fields:
        policy: always ``"bank"``; selects this policy.
        sink: latent frames from the start of the video kept forever (default 3, at least 0).
        window: most recent latent frames kept besides the sink (default 9, at least 1).
        bank_frames: latent frames the bank holds per layer (default 3, MemFlow's size; at least 1).
            On overflow the frames whose keys best match the current prompt's text keys are kept.
        write_every: the first non-sink latent frame of every ``write_every``-th chunk joins the bank
            (default 1: every chunk; at least 1).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["bank"] = "bank"
    sink: _LatentFrames = Field(default=3, ge=0)
    window: _LatentFrames = Field(default=9, ge=1)
    bank_frames: _LatentFrames = Field(default=3, ge=1)
    write_every: _Count = Field(default=1, ge=1)


class SlotConfig(BaseModel):
    """SlotMemory: sink + rolling window + a token-budgeted bank of object-level K/V items per layer.

    Each chunk's keys are grouped into slots (training-free slot attention, initialised from the
    previous chunk's slots); each slot stores its ``top_r`` most typical tokens' original K/V as an
    item. Each chunk attends to the ``top_k`` items that best match the prompt and the current scene.
    Defaults suit the miniature (16 tokens per latent frame); docs/MEMORY.md lists full-size values.

    Fields:
        policy: always ``"slot"``; selects this policy.
        sink: latent frames from the start of the video kept forever (default 3, at least 0).
        window: most recent latent frames kept besides the sink (default 9, at least 1).
        num_slots: slots per chunk and layer (default 8, at least 1).
        iters: slot-attention (soft k-means) iterations per chunk (default 3, at least 1).
        temperature: softmax temperature over slots; features are unit vectors, so smaller is harder
            (default 0.1, greater than 0).
        top_r: tokens stored per item (default 4, at least 1, at most ``budget``).
        top_k: items retrieved per chunk and layer (default 8, at least 0; 0 behaves exactly like ``sink``).
        budget: tokens the bank may hold per layer (default 96 = 6 miniature frames; at least 1).
        w_text: weight of the z-scored text relevance in retrieval (default 0.7, at least 0).
        w_vis: weight of the z-scored visual relevance in retrieval (default 0.3, at least 0).
        recency_weight: weight of recency of use in the eviction value (default 0.5, at least 0).
        recency_decay: chunks over which recency decays by a factor e (default 4.0, greater than 0).
        temporal_init: initialise slots from the previous chunk's slots (default true; false is an ablation).
        merge: cosine above which two slots count as one: merged after slot attention, and a duplicate
            re-seeded at the next temporal init (default 0.9, in [-1, 1]; 1 turns both off).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["slot"] = "slot"
    sink: _LatentFrames = Field(default=3, ge=0)
    window: _LatentFrames = Field(default=9, ge=1)
    num_slots: _Count = Field(default=8, ge=1)
    iters: _Count = Field(default=3, ge=1)
    temperature: _Real = Field(default=0.1, gt=0)
    top_r: _Count = Field(default=4, ge=1)
    top_k: _Count = Field(default=8, ge=0)
    budget: _Count = Field(default=96, ge=1)
    w_text: _Real = Field(default=0.7, ge=0)
    w_vis: _Real = Field(default=0.3, ge=0)
    recency_weight: _Real = Field(default=0.5, ge=0)
    recency_decay: _Real = Field(default=4.0, gt=0)
    temporal_init: bool = True
    merge: _Real = Field(default=0.9, ge=-1, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> "SlotConfig":
        if self.top_r > self.budget:
            raise ValueError(f"top_r ({self.top_r}) must not exceed budget ({self.budget}): an item would never fit")
        if self.top_k > 0 and self.w_text + self.w_vis == 0:
            raise ValueError("w_text and w_vis cannot both be 0 when top_k > 0")
        return self


_MEMORY_CONFIG_UNION = Union[WindowConfig, SinkConfig, BankConfig, SlotConfig]

MemoryConfig = Annotated[_MEMORY_CONFIG_UNION, Field(discriminator="policy")]
"""Any memory policy config; pydantic picks the class from the ``policy`` key."""

MEMORY_CONFIG_TYPES: dict[str, type[BaseModel]] = {
    get_args(cls.model_fields["policy"].annotation)[0]: cls for cls in get_args(_MEMORY_CONFIG_UNION)
}
"""Config class for each policy name, in declaration order."""

MEMORY_POLICIES: tuple[str, ...] = tuple(MEMORY_CONFIG_TYPES)
"""Names accepted for ``policy``."""

DEFAULT_MEMORY: MemoryConfig = SinkConfig(policy="sink")
"""The policy used when a storyboard has no ``memory:`` block: a sink with its defaults."""

_MEMORY_ADAPTER: TypeAdapter[MemoryConfig] = TypeAdapter(MemoryConfig)


def parse_memory_config(data: Mapping[str, Any] | BaseModel) -> MemoryConfig:
    """Validate a memory config given as a mapping (e.g. ``{"policy": "window", "window": 8}``).

    Numeric strings such as ``"8"`` are accepted, so CLI ``key=value`` pairs can be passed as-is.
    An existing config instance is revalidated and returned.

    Raises:
        pydantic.ValidationError: on an unknown or missing policy, an unknown key or a bad value.
            The storyboard loader turns these into line-numbered
            :class:`~slotgen.errors.StoryboardError`.
    """
    return _MEMORY_ADAPTER.validate_python(data)


__all__ = [
    "BankConfig",
    "DEFAULT_MEMORY",
    "MEMORY_CONFIG_TYPES",
    "MEMORY_POLICIES",
    "MemoryConfig",
    "SinkConfig",
    "SlotConfig",
    "WindowConfig",
    "parse_memory_config",
]
