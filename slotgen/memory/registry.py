"""The memory-policy registry: a storyboard's ``memory: {policy: NAME, ...}`` → config → policy object.

A policy module registers its class with ``@register_policy`` (see :mod:`slotgen.memory.base` for
the contract). The built-in policies (``window``, ``sink``, ``bank``, ``slot``) register when
:mod:`slotgen.memory` is imported. A policy outside slotgen registers the same way and is found by
name once its module is imported; slotgen imports such modules from

* the ``SLOTGEN_POLICY_MODULES`` environment variable: comma-separated module names
  (``SLOTGEN_POLICY_MODULES=mypkg.mypolicy slotgen render story.yaml``), and
* installed packages' entry points in the group ``slotgen.memory_policies``
  (``[project.entry-points."slotgen.memory_policies"] mypolicy = "mypkg.mypolicy"``).

A storyboard (or a snapshot) only ever names a policy; it never names code to import, so reading a
snapshot executes nothing that the user did not install or list.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any, get_args

from slotgen.errors import SlotgenError
from slotgen.memory.base import MemoryPolicy, PolicyConfig

POLICY_MODULES_ENV = "SLOTGEN_POLICY_MODULES"
ENTRY_POINT_GROUP = "slotgen.memory_policies"
DEFAULT_POLICY = "sink"
"""The policy of a storyboard without a ``memory:`` section (with its defaults)."""

_POLICIES: dict[str, type[MemoryPolicy]] = {}
_discovered: set[str] = set()  # plug-in modules imported so far


class UnknownPolicyError(ValueError):
    """A memory section names no policy (``policy`` is None) or one that is not registered."""

    def __init__(self, policy: object | None):
        self.policy = policy
        names = ", ".join(policy_names())
        super().__init__(f"missing 'policy'; expected one of: {names}" if policy is None
                         else f"unknown memory policy {policy!r}; expected one of: {names}")


def register_policy(cls: type[MemoryPolicy]) -> type[MemoryPolicy]:
    """Class decorator: make ``cls`` selectable as ``policy: <cls.name>``. Returns ``cls``."""
    name, config = cls.__dict__.get("name"), cls.__dict__.get("config_class")
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__qualname__}: a memory policy needs a class attribute `name` (an identifier)")
    if not (isinstance(config, type) and issubclass(config, PolicyConfig)) or config is PolicyConfig:
        raise TypeError(f"{cls.__qualname__}: `config_class` must be its own PolicyConfig subclass")
    tag = config.model_fields["policy"]
    if get_args(tag.annotation) != (name,) or tag.default != name:
        raise TypeError(f"{config.__qualname__}: declare `policy: Literal[{name!r}] = {name!r}`")
    for method in ("from_config", "load_state_dict", "state_dict", "stats", "read", "write"):
        if getattr(cls, method, None) is None:
            raise TypeError(f"{cls.__qualname__}: missing {method}()")
    old = _POLICIES.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"memory policy {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _POLICIES[name] = cls
    return cls


def unregister_policy(name: str) -> None:
    """Forget the policy registered as ``name`` (a plug-in; tests use it to leave the registry as they found it)."""
    cls = _POLICIES.pop(name, None)
    if cls is not None:
        _discovered.discard(cls.__module__)


def _discover() -> None:
    """Import the plug-in modules named by the environment and by entry points (each once)."""
    from importlib.metadata import entry_points

    wanted = [m.strip() for m in os.environ.get(POLICY_MODULES_ENV, "").split(",") if m.strip()]
    for module in wanted:
        if module not in _discovered:
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 - a user's module: report it in one line
                raise SlotgenError(f"{POLICY_MODULES_ENV}: cannot import {module!r} "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
            _discovered.add(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value not in _discovered:
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001
                raise SlotgenError(f"memory policy plug-in {ep.name!r} ({ep.value}) failed to load "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
            _discovered.add(ep.value)


def policy_names() -> tuple[str, ...]:
    """Every registered policy name, built-ins first, in registration order."""
    _discover()
    return tuple(_POLICIES)


def policy_class(name: str) -> type[MemoryPolicy]:
    """The class registered as ``name``; :class:`UnknownPolicyError` if none is."""
    if not isinstance(name, str):
        raise UnknownPolicyError(name)
    if name not in _POLICIES:
        _discover()
    if name not in _POLICIES:
        raise UnknownPolicyError(name)
    return _POLICIES[name]


def config_classes() -> dict[str, type[PolicyConfig]]:
    """Config class of every registered policy, by name (plug-ins discovered first)."""
    return {name: _POLICIES[name].config_class for name in policy_names()}


def registered_configs() -> dict[str, type[PolicyConfig]]:
    """Config class of every policy registered so far, without importing plug-ins."""
    return {name: cls.config_class for name, cls in _POLICIES.items()}


def default_memory() -> PolicyConfig:
    """The memory of a storyboard without a ``memory:`` section: ``sink`` with its defaults."""
    return policy_class(DEFAULT_POLICY).config_class()


def parse_memory_config(data: Mapping[str, Any] | PolicyConfig) -> PolicyConfig:
    """Validate a memory section such as ``{"policy": "window", "window": 8}`` with its policy's config.

    Numeric strings (``"8"``) are accepted, so CLI values pass as they come. A config instance of a
    registered policy is returned as it is.

    A section naming only an attention ``preset`` (``{"preset": "memflow"}``) gets that preset's policy.

    Raises:
        UnknownPolicyError: no ``policy`` key (and no preset), or a policy that is not registered.
        pydantic.ValidationError: not a mapping, an unknown key or a bad value (locations are the
            keys within the section). The storyboard loader turns both into line-numbered errors.
    """
    if isinstance(data, PolicyConfig):
        if isinstance(data, policy_class(data.policy).config_class):
            return data
        data = data.model_dump()
    if not isinstance(data, Mapping):
        return PolicyConfig.model_validate(data)  # raises pydantic's "expected a mapping" error
    if "policy" not in data:
        from slotgen.engine.presets import PRESETS

        preset = PRESETS.get(data.get("preset")) if isinstance(data.get("preset"), str) else None
        if preset is None:
            raise UnknownPolicyError(None)
        data = {"policy": preset.memory.get("policy", DEFAULT_POLICY), **data}  # `preset: X` alone: X's policy
    return policy_class(data["policy"]).config_class.model_validate(dict(data))


def build_policy(config: PolicyConfig | Mapping[str, Any], num_layers: int, phi=None) -> MemoryPolicy:
    """A fresh policy for ``config`` over ``num_layers`` transformer layers.

    ``phi``: the model's learned slot projection (``ModelBundle.slot_phi``), used by ``slot``; None keeps
    the training-free one."""
    config = parse_memory_config(config)
    return policy_class(config.policy).from_config(config, num_layers, phi=phi)


def resolve_memory(config, model_preset: str | None):
    """The memory section to run: ``config`` with its preset fixed and the preset's keys filled in.

    The preset is the section's own ``preset`` key, else ``model_preset`` (the model folder's). Keys the
    storyboard (or a CLI flag) set win; keys it left out take the preset's value where the preset has
    one (e.g. ``window: 21`` under ``self_forcing``); a section that does not even name a policy (no
    ``memory:`` section at all) takes the preset's policy too.
    """
    from slotgen.engine.presets import get_preset

    preset = get_preset(config.preset if config.preset is not None else model_preset)
    given = config.model_dump(include=set(config.model_fields_set))
    data = dict(preset.memory) if "policy" not in config.model_fields_set else {}
    data.setdefault("policy", config.policy)
    if data["policy"] != config.policy:  # the preset's own policy: keep nothing from a section that named none
        given = {}
    fields = policy_class(data["policy"]).config_class.model_fields
    data.update({k: v for k, v in preset.memory.items() if k in fields and k != "policy"})
    data.update(given)
    data["preset"] = preset.name
    return parse_memory_config(data)


__all__ = ["DEFAULT_POLICY", "ENTRY_POINT_GROUP", "POLICY_MODULES_ENV", "UnknownPolicyError", "build_policy",
           "config_classes", "default_memory", "registered_configs", "parse_memory_config", "policy_class", "policy_names",
           "register_policy", "resolve_memory", "unregister_policy"]
