"""A Wan2.1 folder's ``slotgen.json``: model settings, a display name and default causal weights.

Without the file a folder gets :data:`WAN_SETTINGS` (Wan2.1-T2V-1.3B's sampling and geometry) and its
folder name. The keys ``window`` and ``sink`` of older files are accepted and ignored
(:data:`~slotgen.models.bundle.RETIRED_SETTINGS`): a storyboard's ``memory:`` section sets them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slotgen.errors import ModelError, one_line
from slotgen.models.bundle import RETIRED_SETTINGS, ModelSettings

SETTINGS_FILE = "slotgen.json"
WAN_SETTINGS = ModelSettings(steps=4, shift=5.0, chunk_frames=3, fps=16, resolution=(832, 480), text_len=512)
"""Wan2.1-T2V-1.3B's settings: the Self-Forcing few-step schedule, 3 latent frames per chunk, 832×480 at 16 fps."""

_INT_FIELDS = {"steps": 1, "chunk_frames": 1, "fps": 1, "text_len": 1, "vae_stride_t": 1, "vae_stride_s": 1}


@dataclass(frozen=True)
class FolderConfig:
    """What ``slotgen.json`` says: model settings, a display name and default causal weights."""

    settings: ModelSettings
    name: str
    checkpoint: Path | None = None  # resolved against the folder
    lora: Path | None = None
    lora_alpha: float | None = None


def read_folder_config(root: Path) -> FolderConfig:
    """``slotgen.json`` of a model folder, validated; Wan2.1 defaults and the folder name without it.

    Keys: any :class:`ModelSettings` field, ``name``, and ``checkpoint`` / ``lora`` / ``lora_alpha``
    (paths relative to the folder): the causal weights to use when the caller names none, so a folder
    can carry its generator and render through ``--model PATH`` alone. ``preset`` names the attention
    preset of those weights (``engine/presets.py``): it is every storyboard's default and decides which
    entry of a ``{generator, generator_ema}`` checkpoint is loaded.
    """
    path = root / SETTINGS_FILE
    if not path.is_file():
        return FolderConfig(WAN_SETTINGS, root.name)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); expected an object of model settings") from None
    except OSError as err:
        raise ModelError(f"{path}: unreadable ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: top level is a {type(data).__name__}, expected an object of model settings")
    loading = {"name", "checkpoint", "lora", "lora_alpha"}
    known = set(ModelSettings.__dataclass_fields__) | loading
    unknown = sorted(set(data) - known - set(RETIRED_SETTINGS))
    if unknown:
        raise ModelError(f"{path}: unknown keys {unknown}; expected some of {sorted(known)}")
    for key, minimum in _INT_FIELDS.items():
        if key in data and (type(data[key]) is not int or data[key] < minimum):
            raise ModelError(f"{path}: '{key}' is {data[key]!r}, expected an integer >= {minimum}")
    for key in ("shift", "lora_alpha"):
        if key in data and (not isinstance(data[key], (int, float)) or isinstance(data[key], bool) or data[key] <= 0):
            raise ModelError(f"{path}: '{key}' is {data[key]!r}, expected a number > 0")
    from slotgen.engine.presets import PRESETS
    from slotgen.engine.sampler import PREDICTIONS, SAMPLERS

    for key, allowed in (("sampler", SAMPLERS), ("prediction", PREDICTIONS), ("preset", tuple(PRESETS))):
        if key in data and data[key] not in allowed:
            raise ModelError(f"{path}: '{key}' is {data[key]!r}, expected one of {list(allowed)}")
    if "resolution" in data:
        r = data["resolution"]
        if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int and x > 0 for x in r)):
            raise ModelError(f"{path}: 'resolution' is {r!r}, expected [width, height] in pixels")
    for key in ("name", "checkpoint", "lora"):
        if key in data and not (isinstance(data[key], str) and data[key]):
            raise ModelError(f"{path}: '{key}' is {data[key]!r}, expected a non-empty string")
    if "lora" in data and "checkpoint" not in data:
        raise ModelError(f"{path}: 'lora' needs a 'checkpoint' (the base weights it adapts)")
    settings = ModelSettings.from_dict({**WAN_SETTINGS.to_dict(), **{k: v for k, v in data.items() if k not in loading}})
    return FolderConfig(
        settings=settings,
        name=data.get("name", root.name),
        checkpoint=(root / data["checkpoint"]) if "checkpoint" in data else None,
        lora=(root / data["lora"]) if "lora" in data else None,
        lora_alpha=float(data["lora_alpha"]) if "lora_alpha" in data else None,
    )
