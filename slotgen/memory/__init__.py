"""Memory policies: where a chunk's K/V goes and what later chunks attend to.

``build_policy(config, num_layers)`` turns a validated ``memory:`` section (see ``config.py``) into a
policy object implementing :class:`~slotgen.memory.base.MemoryPolicy`.
"""

from __future__ import annotations

from slotgen.memory.bank import BankMemory, BankSettings
from slotgen.memory.base import ChunkContext, KVBlock, MemoryPolicy
from slotgen.memory.slot import SlotMemory, SlotSettings
from slotgen.memory.window import SinkMemory, WindowMemory


def build_policy(config, num_layers: int, phi=None) -> MemoryPolicy:
    """A fresh policy for ``config`` (a MemoryConfig model) over ``num_layers`` transformer layers.

    ``phi``: the model's learned slot projection (``ModelBundle.slot_phi``), used by ``slot``; None keeps
    the training-free one."""
    if config.policy == "window":
        return WindowMemory(num_layers, window=config.window)
    if config.policy == "sink":
        return SinkMemory(num_layers, window=config.window, sink=config.sink)
    if config.policy == "bank":
        return BankMemory(num_layers, BankSettings(**config.model_dump(exclude={"policy"})))
    if config.policy == "slot":
        return SlotMemory(num_layers, SlotSettings(**config.model_dump(exclude={"policy"})), phi=phi)
    raise ValueError(f"unknown memory policy {config.policy!r}")


__all__ = ["ChunkContext", "KVBlock", "MemoryPolicy", "WindowMemory", "SinkMemory", "BankMemory", "BankSettings",
           "SlotMemory", "SlotSettings", "build_policy"]
