"""Merging a LoRA adapter into plain state dicts (LongLive / MemFlow ``lora.pt``), without peft.

LongLive and MemFlow release a causal Wan2.1-T2V-1.3B generator as a base checkpoint plus a PEFT LoRA
(rank 256, alpha 256) over every ``nn.Linear`` of the attention blocks. slotgen folds the adapter into
the base weights once, at load time, so the engine runs the stock diffusers model with no adapter code:

    W' = W + scale · (alpha / r) · B @ A        (computed and returned in float32; the loader then casts
                                                 it to the parameter's dtype, so a bf16 base is rounded once)

Accepted key conventions (``read_lora``):

* PEFT: ``<module>.lora_A.weight`` (A, shape (r, in)) and ``<module>.lora_B.weight`` (B, shape (out, r)),
  as written by ``peft.get_peft_model_state_dict``; the adapter-named form ``<module>.lora_A.<adapter>.weight``
  (a raw ``state_dict()`` of a PEFT model) is accepted too, for a single adapter only.
* kohya style: ``<module>.lora_down.weight`` (A), ``<module>.lora_up.weight`` (B) and an optional scalar
  ``<module>.alpha`` per module.
* Module paths may carry wrapper prefixes, removed when present: ``base_model.model.`` (PEFT),
  ``model.`` (Self-Forcing's ``WanDiffusionWrapper``), ``diffusion_model.``, ``module.`` (DDP),
  ``_orig_mod.`` (torch.compile), ``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.`` (FSDP, anywhere).
* The file is a flat dict of those tensors, or a dict holding it under ``generator_lora`` (LongLive's
  training checkpoints), ``lora`` or ``state_dict``. An adapter config may sit beside it under
  ``adapter_config`` / ``lora_config`` / ``config`` with ``lora_alpha`` (or ``alpha``) and ``r`` (or ``rank``).

Alpha, in order of precedence: the caller's ``alpha`` argument; a per-module ``.alpha`` tensor; the
adapter config in the file; else ``alpha = r`` (LongLive's convention: ``lora_alpha = alpha or rank``).

Every problem is a :class:`~slotgen.errors.ModelError` with a one-line message naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from slotgen.errors import ModelError

# Wrapper prefixes stripped from the start of module paths, and wrapper segments removed anywhere.
LEADING_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "model.", "module.", "_orig_mod.")
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
CONTAINER_KEYS = ("generator_lora", "lora", "state_dict")
CONFIG_KEYS = ("adapter_config", "lora_config", "config")

_PEFT_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_KOHYA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>down|up)\.weight$")
_ALPHA_RE = re.compile(r"^(?P<module>.+)\.alpha$")


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear layer: ``down`` = A (r, in), ``up`` = B (out, r), and its alpha if the file says."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def strip_wrappers(name: str) -> str:
    """A module path without training-wrapper prefixes/segments (see module docstring)."""
    for seg in WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    changed = True
    while changed:
        changed = False
        for p in LEADING_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p) :], True
    return name


def _config_alpha(obj: Mapping, source: str) -> float | None:
    for key in CONFIG_KEYS:
        cfg = obj.get(key)
        if cfg is None:
            continue
        if not isinstance(cfg, Mapping):
            raise ModelError(f"LoRA file {source}: '{key}' is a {type(cfg).__name__}, expected a dict with lora_alpha and r")
        for name in ("lora_alpha", "alpha"):
            if name in cfg and cfg[name] is not None:
                try:
                    return float(cfg[name])
                except (TypeError, ValueError):
                    raise ModelError(f"LoRA file {source}: {key}.{name} is {cfg[name]!r}, expected a number") from None
    return None


def parse_lora(obj: object, source: str) -> dict[str, LoraPair]:
    """Group a loaded LoRA object into ``{module path: LoraPair}`` (paths with wrappers stripped)."""
    if not isinstance(obj, Mapping):
        raise ModelError(f"LoRA file {source}: top level is a {type(obj).__name__}, expected a dict of lora_A/lora_B tensors")
    file_alpha = _config_alpha(obj, source)
    tensors: Mapping = obj
    for key in CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            tensors = obj[key]
            file_alpha = file_alpha if file_alpha is not None else _config_alpha(tensors, source)
            break
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    adapters: set[str] = set()
    other: list[str] = []
    for raw_key, value in tensors.items():
        key = str(raw_key)
        if key in CONFIG_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"LoRA file {source}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        m = _PEFT_RE.match(key) or _KOHYA_RE.match(key)
        if m:
            module = strip_wrappers(m.group("module"))
            if m.groupdict().get("adapter"):
                adapters.add(m.group("adapter"))
            target = downs if m.group("which") in ("A", "down") else ups
            if module in target:
                raise ModelError(f"LoRA file {source}: two tensors adapt {module!r} (several adapters?); expected one per layer")
            target[module] = value
            continue
        m = _ALPHA_RE.match(key)
        if m and value.numel() == 1:
            alphas[strip_wrappers(m.group("module"))] = float(value.reshape(()).item())
            continue
        other.append(key)
    if len(adapters) > 1:
        raise ModelError(f"LoRA file {source}: holds adapters {sorted(adapters)}, expected a single adapter")
    if other:
        raise ModelError(f"LoRA file {source}: {len(other)} keys are not LoRA tensors (first: {other[:3]}); "
                         "expected <module>.lora_A.weight / <module>.lora_B.weight")
    if not downs and not ups:
        raise ModelError(f"LoRA file {source}: contains no lora_A/lora_B tensors")
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise ModelError(f"LoRA file {source}: {len(unpaired)} layers have only one of lora_A/lora_B (first: {unpaired[:3]})")
    pairs: dict[str, LoraPair] = {}
    for module in sorted(downs):
        a, b = downs[module], ups[module]
        if a.ndim != 2 or b.ndim != 2:
            raise ModelError(f"LoRA file {source}: {module} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}; "
                             "only linear-layer LoRA (2-D A and B) is supported")
        if b.shape[1] != a.shape[0]:
            raise ModelError(f"LoRA file {source}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                             "expected A (r, in) and B (out, r) with the same rank r")
        pairs[module] = LoraPair(a, b, alphas.get(module, file_alpha))
    return pairs


def merge_lora(
    state_dict: dict[str, torch.Tensor],
    pairs: Mapping[str, LoraPair],
    source: str,
    alpha: float | None = None,
    scale: float = 1.0,
    rename: Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Fold the LoRA ``pairs`` into ``state_dict`` (a new dict; untouched tensors are shared, not copied).

    ``rename`` maps a LoRA module path to the state dict's naming (``None``: same naming). Each target
    weight ``<module>.weight`` must exist with shape (out, in) matching B @ A; merged weights are float32.
    """
    merged = dict(state_dict)
    absent: list[str] = []
    for module, pair in pairs.items():
        key = (rename(module) if rename is not None else module) + ".weight"
        if key not in merged:
            absent.append(module)
            continue
        w = merged[key]
        expected = (int(pair.up.shape[0]), int(pair.down.shape[1]))
        if tuple(w.shape) != expected:
            raise ModelError(f"LoRA file {source}: {module} adapts a {expected[0]}×{expected[1]} layer but the base "
                             f"weight {key} has shape {tuple(w.shape)}; wrong base checkpoint for this LoRA")
        a = alpha if alpha is not None else (pair.alpha if pair.alpha is not None else float(pair.rank))
        factor = scale * a / pair.rank
        delta = pair.up.to(torch.float32) @ pair.down.to(torch.float32)
        merged[key] = w.to(torch.float32) + factor * delta
    if absent:
        raise ModelError(f"LoRA file {source}: {len(absent)} adapted layers are not in the base weights "
                         f"(first: {absent[:3]}); expected paths like blocks.0.self_attn.q")
    return merged


__all__ = ["LoraPair", "parse_lora", "merge_lora", "strip_wrappers"]
