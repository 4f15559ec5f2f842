"""Model loading: the embedded miniature by name, a pulled folder by name, or a local Wan2.1 folder by path. Never a hub.

``load_model(spec)`` accepts:

* ``"miniature"`` — the embedded toy-size Wan stack shipped in the package (default);
* ``"wan-1.3b-random"`` — the full Wan2.1-T2V-1.3B architecture with random weights (for speed
  benchmarks: speed does not depend on weight values);
* a name ``slotgen pull`` installed (``longlive``, ...): the folder ``$SLOTGEN_HOME/models/NAME`` when no
  path of that name exists (:func:`slotgen.models.pull.resolve_model_path`);
* a local path — a miniature-format folder (``config.json`` + ``weights.safetensors``) or a
  diffusers-format Wan2.1 folder (see ``slotgen.models.wan``), optionally with a causal generator
  ``checkpoint``.

Anything that looks like a hub id (``org/name`` that is not a local path) is refused with a clear
message: loading never downloads (``slotgen pull`` does, once).
"""

from __future__ import annotations

from pathlib import Path

import torch

from slotgen.errors import ModelError
from slotgen.models.bundle import ModelBundle, ModelSettings

BUILTIN_MODELS = ("miniature", "wan-1.3b-random")


def load_model(
    spec: str = "miniature",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    checkpoint: str | Path | None = None,
    preset: str | None = None,
) -> ModelBundle:
    """Load a model bundle from a built-in name or a local path (see module docstring).

    ``preset``: the attention preset to run a Wan2.1 folder with instead of its ``slotgen.json`` one (it
    decides which checkpoint entry is loaded); None keeps the folder's. Other models ignore it.

    A ``device`` this machine lacks (``cuda`` on a CPU build, a missing index) is a one-line
    :class:`~slotgen.errors.SlotgenError` before anything loads."""
    from slotgen.preflight import check_device

    device = check_device(device)
    if spec == "miniature":
        from slotgen.models.miniature import load_miniature

        if checkpoint is not None:
            raise ModelError("--checkpoint applies to Wan2.1 folders, not to the embedded miniature")
        return load_miniature(device=device)
    if spec == "wan-1.3b-random":
        from slotgen.models.wan import build_random_wan

        return build_random_wan(device=device, dtype=dtype)
    from slotgen.models.pull import not_pulled_hint, resolve_model_path

    path = resolve_model_path(spec)
    if path is not None:
        from slotgen.memory.phi_file import attach_phi  # a folder's slot_phi.safetensors is its slot projection

        if (path / "weights.safetensors").is_file() and (path / "config.json").is_file():
            from slotgen.models.miniature import load_miniature

            return load_miniature(path, device=device)  # it picks up the folder's φ itself
        from slotgen.models.wan import load_wan

        return attach_phi(load_wan(path, device=device, dtype=dtype, checkpoint=checkpoint, preset=preset), folder=path)
    hint = not_pulled_hint(spec) or (" (loading never downloads: pass a local folder, or see slotgen pull --list)"
                                     if "/" in spec or spec.startswith("Wan") else "")
    raise ModelError(f"model {spec!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor an existing path{hint}")


__all__ = ["ModelBundle", "ModelSettings", "load_model", "BUILTIN_MODELS"]
