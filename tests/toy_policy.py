"""A memory policy defined outside slotgen, in this one file: what a researcher writes to add a policy.

``stride``: the last ``window`` latent frames plus every ``stride``-th older frame, at most ``keep`` of
them (the newest). On a prompt switch the window is dropped and re-cached; the strided frames stay.
It is written against :class:`slotgen.memory.base.MemoryPolicy` alone (no built-in policy as base), so
the test that uses it (tests/test_policy_plugin.py) checks the whole contract. Select it with
``SLOTGEN_POLICY_MODULES=tests.toy_policy`` and ``memory: {policy: stride}``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from slotgen.memory.base import ChunkContext, Count, KVBlock, LatentFrames, MemoryPolicy, PolicyConfig
from slotgen.memory.registry import register_policy


class StrideConfig(PolicyConfig):
    """Local window + every ``stride``-th older latent frame (at most ``keep``)."""

    policy: Literal["stride"] = "stride"
    window: LatentFrames = Field(default=6, ge=1, description="Local window in latent frames.")
    stride: Count = Field(default=3, ge=1, description="Keep older frames whose index is a multiple of this.")
    keep: Count = Field(default=4, ge=0, description="Older frames kept at most (the newest).")


@register_policy
class StrideMemory(MemoryPolicy):
    name = "stride"
    config_class = StrideConfig
    inspect_schema = {"kept_frames": {"type": "array", "items": {"type": "integer"}}}
    inspect_columns = (("kept frames", lambda row: " ".join(map(str, row["kept_frames"])) or "-"),)

    def __init__(self, num_layers: int, config: StrideConfig):
        super().__init__(num_layers)
        self.config = config
        self.rows: list[KVBlock | None] = [None] * num_layers

    def _local(self, frames: torch.Tensor) -> torch.Tensor:
        return frames > int(frames.max()) - self.config.window  # (N,) rows of the newest `window` frames

    def read(self, layer: int) -> KVBlock | None:
        return self.rows[layer]

    def write(self, layer: int, block: KVBlock) -> None:
        rows = KVBlock.cat([self.rows[layer], block])
        local = self._local(rows.frames)
        strided = ~local & (rows.frames % self.config.stride == 0)  # (N,)
        older = torch.unique(rows.frames[strided])  # ascending
        kept = older[max(0, older.numel() - self.config.keep):] if self.config.keep else older[:0]
        self.rows[layer] = rows.select(local | torch.isin(rows.frames, kept))

    def on_prompt_switch(self, ctx: ChunkContext) -> list[int]:
        rows = self.rows[0]
        if rows is None:
            return []
        dropped = sorted({int(f) for f in rows.frames[self._local(rows.frames)]})
        self.rows = [None if r is None else r.select(~self._local(r.frames)) for r in self.rows]
        self.rows = [None if r is None or r.num_tokens == 0 else r for r in self.rows]
        return dropped

    def recache_span(self) -> int:
        return self.config.window

    def frames_held(self, layer: int) -> list[int]:
        rows = self.rows[layer]
        return [] if rows is None else sorted({int(f) for f in rows.frames})

    def stats(self) -> dict:
        return {"policy": self.name, "tokens_per_layer": [0 if r is None else r.num_tokens for r in self.rows],
                "bytes": self.nbytes(), "frames": [self.frames_held(i) for i in range(self.num_layers)]}

    @classmethod
    def inspect_layer(cls, stats: dict, layer: int) -> dict:
        return {"kept_frames": [int(f) for f in stats["frames"][layer]]}

    def state_dict(self) -> dict:
        return {"policy": self.name, "settings": self.config.settings(),
                "rows": [None if r is None else r.to_state() for r in self.rows]}

    def load_state_dict(self, state: dict, device: torch.device | str) -> None:  # no default: callers pass it
        if state.get("policy") != self.name or len(state["rows"]) != self.num_layers:
            raise ValueError(f"state is for policy {state.get('policy')!r} with {len(state['rows'])} layers")
        self.config = StrideConfig(**state["settings"])
        self.rows = [None if d is None else KVBlock.from_state(d, device) for d in state["rows"]]

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.rows if r is not None)
