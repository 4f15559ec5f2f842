"""Memory policies: where a chunk's K/V goes and what later chunks attend to.

Each policy is one module holding its config, its class and how ``slotgen inspect`` shows it
(:mod:`slotgen.memory.base` states the contract); the modules register themselves with
:mod:`slotgen.memory.registry`, which turns a storyboard's ``memory:`` section into a policy object
(``build_policy(config, num_layers)``). Importing this package registers the built-in policies.
"""

from __future__ import annotations

from slotgen.memory.bank import BankConfig, BankMemory
from slotgen.memory.base import ChunkContext, KVBlock, MemoryPolicy, PolicyConfig
from slotgen.memory.registry import (
    build_policy,
    default_memory,
    parse_memory_config,
    policy_class,
    policy_names,
    register_policy,
)
from slotgen.memory.slot import SlotConfig, SlotMemory
from slotgen.memory.window import SinkConfig, SinkMemory, WindowConfig, WindowMemory

__all__ = ["BankConfig", "BankMemory", "ChunkContext", "KVBlock", "MemoryPolicy", "PolicyConfig", "SinkConfig",
           "SinkMemory", "SlotConfig", "SlotMemory", "WindowConfig", "WindowMemory", "build_policy", "default_memory",
           "parse_memory_config", "policy_class", "policy_names", "register_policy"]
