"""Frame-based local memories: Self-Forcing's rolling window and LongLive's sink + window.

``window``: the last ``window`` latent frames' K/V. ``sink``: additionally the first ``sink`` latent
frames of the video, kept forever (attention sink), with the local window counted without them.

The attention preset (``engine/presets.py``, handed over by the engine in :meth:`configure_stream`)
decides whether ``window`` counts the chunk being generated (then ``window − chunk_frames`` past
frames are kept) and what a prompt switch does: ``chunked`` drops the local window (the sink stays)
and asks the engine to re-cache it chunk by chunk; ``one_pass`` (LongLive) asks for the last
``window`` frames in one pass, and for every frame so far — the sink included, which is then
rewritten — while ``frame_start − window ≤ sink``; ``none`` (Self-Forcing) keeps everything.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from slotgen.memory.base import ChunkContext, KVBlock, LatentFrames, MemoryPolicy, PolicyConfig
from slotgen.memory.registry import register_policy


class WindowConfig(PolicyConfig):
    """Self-Forcing rolling local window: attend only to the most recent latent frames.

    Older frames are forgotten, so content that leaves the window can drift.
    """

    policy: Literal["window"] = "window"
    window: LatentFrames = Field(default=12, ge=1, description="Local window in latent frames.")


class SinkWindowConfig(PolicyConfig):
    """The keys of every policy built on LongLive's sink + window (``sink``, ``bank``, ``slot``)."""

    sink: LatentFrames = Field(default=3, ge=0, description="First latent frames kept forever.")
    window: LatentFrames = Field(default=9, ge=1, description="Local window in latent frames.")


class SinkConfig(SinkWindowConfig):
    """LongLive attention sink: the first latent frames are kept forever, plus a rolling window.

    ``sink`` 0 makes this a plain rolling window; the window never includes the sink frames.
    """

    policy: Literal["sink"] = "sink"


@register_policy
class WindowMemory(MemoryPolicy):
    """Rolling local window of the most recent ``window`` latent frames (Self-Forcing)."""

    name = "window"
    config_class = WindowConfig

    def __init__(self, num_layers: int, window: int, sink: int = 0):
        super().__init__(num_layers)
        if window < 1:
            raise ValueError("window must be at least 1 latent frame")
        self.window = window
        self.sink = sink
        self.local: list[KVBlock | None] = [None] * num_layers  # rows of the last `keep` frames
        self.sink_rows: list[KVBlock | None] = [None] * num_layers  # rows of frames < sink
        self.frames_seen = 0  # one past the newest frame written
        self.preset = None  # set by the engine (configure_stream); None: slotgen's own pattern

    @property
    def keep(self) -> int:
        """Past latent frames kept in the local window (the preset may count the chunk in ``window``)."""
        return self.window if self.preset is None else self.preset.past_window(self.window, self.chunk_frames)

    def configure_stream(self, preset, chunk_frames: int) -> None:
        super().configure_stream(preset, chunk_frames)
        self.keep  # noqa: B018 - a window smaller than a chunk under a counting preset fails here, before any chunk

    @property
    def recache_mode(self) -> str:
        return "chunked" if self.preset is None else self.preset.recache

    @classmethod
    def from_config(cls, config, num_layers: int, *, phi=None) -> "WindowMemory":
        return cls(num_layers, window=config.window, sink=getattr(config, "sink", 0))

    # -- protocol -----------------------------------------------------------------------------------
    def read(self, layer: int) -> KVBlock | None:
        return KVBlock.cat([self.sink_rows[layer], self.local[layer]])

    def write(self, layer: int, block: KVBlock) -> None:
        # which frames go where is decided on the host from block.runs: no device access
        if any(f < self.sink for f, _ in block.frame_runs):
            self.sink_rows[layer] = KVBlock.cat([self.sink_rows[layer], block.select_frames(lambda f: f < self.sink)])
            block = block.select_frames(lambda f: f >= self.sink)
        local = KVBlock.cat([self.local[layer], block])
        if local is not None:
            newest = max(f for f, _ in local.frame_runs)
            local = local.select_frames(lambda f: f > newest - self.keep)  # keep `keep` past frames (None: none)
        self.local[layer] = local
        if layer == self.num_layers - 1 and block is not None and block.num_tokens:
            self.frames_seen = max(self.frames_seen, max(f for f, _ in block.frame_runs) + 1)

    def on_prompt_switch(self, ctx: ChunkContext) -> list[int]:
        if self.recache_mode == "none":  # Self-Forcing: no re-cache, the cache is kept
            return []
        if self.recache_mode == "one_pass":  # LongLive: the last `window` frames, the sink too while f - window <= sink
            f = ctx.frame_start
            start = f - self.window
            if start <= self.sink:
                start = 0
                self.sink_rows = [None] * self.num_layers
            self.local = [None] * self.num_layers
            return list(range(max(start, 0), f))
        frames = self.local[0].host_frames() if self.local[0] is not None else []
        self.local = [None] * self.num_layers
        return frames

    def recache_span(self) -> int:
        if self.recache_mode == "none":
            return 0
        if self.recache_mode == "one_pass":
            return self.sink + self.window
        return self.window

    # -- introspection / persistence ------------------------------------------------------------------
    def _frames(self, blocks: list[KVBlock | None]) -> list[int]:
        b = blocks[0]
        return b.host_frames() if b is not None else []

    def stats(self) -> dict:
        return {
            "policy": self.name,
            "window": self.window,
            "sink": self.sink,
            "frames_seen": self.frames_seen,
            "sink_frames": self._frames(self.sink_rows),
            "local_frames": self._frames(self.local),
            "tokens_per_layer": [(b.num_tokens if b else 0) + (s.num_tokens if s else 0)
                                 for b, s in zip(self.local, self.sink_rows)],
            "bytes": self.nbytes(),
        }

    def state_dict(self) -> dict:
        def pack(blocks):
            return [b.to_state() if b is not None else None for b in blocks]

        return {"policy": self.name, "window": self.window, "sink": self.sink, "frames_seen": self.frames_seen,
                "local": pack(self.local), "sink_rows": pack(self.sink_rows)}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if state.get("policy") != self.name or len(state["local"]) != self.num_layers:
            raise ValueError(f"state is for policy {state.get('policy')!r} with {len(state['local'])} layers")
        self.window, self.sink, self.frames_seen = int(state["window"]), int(state["sink"]), int(state["frames_seen"])
        self.local = [KVBlock.from_state(d, device) if d is not None else None for d in state["local"]]
        self.sink_rows = [KVBlock.from_state(d, device) if d is not None else None for d in state["sink_rows"]]

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.local + self.sink_rows if b is not None)


@register_policy
class SinkMemory(WindowMemory):
    """LongLive: the first ``sink`` latent frames kept forever plus a local window of ``window`` frames."""

    name = "sink"
    config_class = SinkConfig
