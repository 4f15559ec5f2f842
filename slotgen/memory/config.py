"""Memory policy configuration: which past K/V the transformer attends to while generating a chunk.

A storyboard's ``memory:`` block (or a CLI override) selects one policy by its ``policy`` name; the
other keys configure it. All sizes are counted in *latent* frames (after the VAE's temporal
compression), because that is the unit the K/V cache is stored in.

The configs form a pydantic discriminated union on ``policy``. To add a policy (``bank``, ``slot``),
define another config class with a ``policy: Literal["<name>"]`` field and add it to
``_MEMORY_CONFIG_UNION``; :data:`MEMORY_POLICIES` and :data:`MEMORY_CONFIG_TYPES` follow
automatically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter


def _reject_bool(value: Any) -> Any:
    """Refuse booleans for integer fields (pydantic would otherwise read ``true`` as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {str(value).lower()}")
    return value


_LatentFrames = Annotated[int, BeforeValidator(_reject_bool)]


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


_MEMORY_CONFIG_UNION = Union[WindowConfig, SinkConfig]

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
    "DEFAULT_MEMORY",
    "MEMORY_CONFIG_TYPES",
    "MEMORY_POLICIES",
    "MemoryConfig",
    "SinkConfig",
    "WindowConfig",
    "parse_memory_config",
]
