"""Wan2.1 weight files: reading them safely, the checkpoint formats, key naming, and fingerprints.

A causal generator ``checkpoint`` (:func:`checkpoint_state_dict`) replaces a Wan2.1 folder's transformer weights:

* a Self-Forcing style ``.pt`` (``{"generator_ema" | "generator": {"model.<original Wan key>": tensor}}``;
  ``generator_ema`` is preferred), converted with diffusers' own
  ``convert_wan_transformer_to_diffusers``;
* a LongLive / MemFlow pair: ``checkpoint="longlive_base.pt", lora="lora.pt"``, or
  ``checkpoint=FOLDER`` holding ``lora.pt`` (or ``lora.safetensors``) and exactly one other weights
  file (the base). The LoRA is merged at load time (see :mod:`slotgen.models.lora`);
* a diffusers-named ``.safetensors`` file or a diffusers transformer folder (``config.json`` +
  ``*.safetensors``), loaded as is;
* any flat ``{key: tensor}`` dict in original or diffusers naming.

Every checkpoint must provide exactly the model's weights: a missing or unexpected key (other than
the ones diffusers itself ignores, ``norm_added_q``) or a shape mismatch is an error, as is a pickle
that ``torch.load(weights_only=True)`` refuses (it would need to run code).

Digest (snapshot identity): sha256 over the transformer config and a *fingerprint* of every weight file
used: relative name, size, the full safetensors header (names, dtypes, shapes, offsets) and 64 blocks of
64 KiB sampled evenly through the data (the whole file when smaller than 4 MiB). That reads ~4 MiB per
file instead of 17 GB, and tells apart any two different trainings or files, though not a deliberate
single-byte edit; ``digest_mode="full"`` hashes every byte. The random build's digest hashes its configs,
seed, init scheme, device type and dtype, which determine its weights.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from slotgen.errors import ModelError, one_line
from slotgen.models.lora import LoraPair, merge_lora, parse_lora

LORA_FILE_NAMES = ("lora.pt", "lora.pth", "lora.safetensors")
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
# Prefixes removed from checkpoint keys when every key carries them (training wrappers), and wrapper
# segments removed anywhere in a key (FSDP / activation checkpointing).
_COMMON_PREFIXES = ("model.diffusion_model.", "model.", "module.", "_orig_mod.", "diffusion_model.", "transformer.")
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Markers of the two naming schemes (original Wan repository vs diffusers).
_ORIGINAL_MARKERS = (".self_attn.", ".cross_attn.", "head.head.", "head.modulation", "text_embedding.",
                     "time_embedding.", "time_projection.", ".modulation", ".ffn.0.", ".ffn.2.")
_DIFFUSERS_MARKERS = (".attn1.", ".attn2.", "condition_embedder.", "proj_out.", "scale_shift_table", ".ffn.net.")


# --- reading weight files safely ----------------------------------------------------------------------------
def _refusal(path: Path, err: Exception) -> ModelError:
    """One line for a pickle that ``torch.load(weights_only=True)`` rejects."""
    text = str(err)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return ModelError(f"{path}: refused to unpickle: it references {m.group(1)}, which would run code; slotgen loads "
                          "checkpoints only with torch.load(weights_only=True) or safetensors (re-save the tensors in a "
                          "trusted environment)")
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", text, re.S)
    reason = one_line(detail.group(1), 80) if detail else "unsupported content"
    return ModelError(f"{path}: refused to unpickle: torch.load(weights_only=True) rejects it ({reason}); expected a "
                      "torch.save file of tensors or a .safetensors file (plain pickles and corrupted files are not loaded)")


def read_weights_file(path: Path) -> object:
    """Load a ``.safetensors`` file or a torch pickle with ``weights_only=True`` (mmap when possible), on CPU."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found; expected a .pt/.pth/.safetensors file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(f"{path}: not a valid safetensors file ({one_line(err)})") from None
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Weights only load failed" in str(err):
            raise _refusal(path, err) from None
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({one_line(err)}); expected a torch.save "
                         "file of tensors") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, ImportError) as err:
        reason = one_line(err) or "the file is empty or truncated"
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {reason}); expected a complete "
                         "torch.save file (is it truncated or corrupted?)") from None


def aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``t``, copied when its CPU memory is misaligned (safetensors mmaps tensors at 8-byte offsets).

    Misaligned weights make CPU kernels take other SIMD paths: slower, and not bit-identical to the
    same model built in memory.
    """
    if t.device.type == "cpu" and t.data_ptr() % alignment:
        return t.clone()
    return t


def _read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers model folder (single file or sharded with an index)."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{index[0]}: unreadable shard index ({one_line(err)}); expected a 'weight_map' object") from None
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors weights; expected a diffusers transformer folder")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_weights_file(f))  # type: ignore[arg-type]
    return tensors


def _select_generator(obj: object, source: str, entry: str = "generator_ema") -> dict[str, torch.Tensor]:
    """The generator's flat state dict inside a loaded checkpoint object: ``entry`` (``generator_ema`` or
    ``generator``, what the attention preset's project loads) when present, else the other one."""
    if not isinstance(obj, Mapping):
        raise ModelError(f"checkpoint {source}: top level is a {type(obj).__name__}, expected a dict "
                         "(Self-Forcing/LongLive {'generator_ema'|'generator': ...} or a flat state dict)")
    chosen: object = None
    other = "generator" if entry == "generator_ema" else "generator_ema"
    for key in (entry, other, "model", "state_dict"):
        if isinstance(obj.get(key), Mapping) and len(obj[key]) > 0:
            chosen = obj[key]
            break
    if chosen is None:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            chosen = obj
        elif "generator_lora" in obj:
            raise ModelError(f"checkpoint {source}: holds only LoRA weights ('generator_lora'); pass it as the LoRA "
                             "next to a base checkpoint")
        else:
            keys = sorted(map(str, obj.keys()))[:5]
            raise ModelError(f"checkpoint {source}: top-level keys {keys} — expected 'generator_ema' or 'generator' "
                             "(Self-Forcing / LongLive) or a flat dict of tensors")
    state: dict[str, torch.Tensor] = {}
    for k, v in chosen.items():  # type: ignore[union-attr]
        if not isinstance(v, torch.Tensor):
            raise ModelError(f"checkpoint {source}: entry {str(k)!r} is a {type(v).__name__}, expected a tensor")
        state[str(k)] = v
    return state


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper segments anywhere and prefixes shared by every key (``model.`` from Self-Forcing)."""
    out = {}
    for k, v in state.items():
        for seg in _WRAPPER_SEGMENTS:
            k = k.replace(seg, "")
        out[k] = v
    changed = True
    while changed and out:
        changed = False
        for p in _COMMON_PREFIXES:
            if all(k.startswith(p) for k in out):
                out = {k[len(p) :]: v for k, v in out.items()}
                changed = True
                break
    return out


def naming_of(keys: Iterable[str], source: str) -> str:
    """'original' (Wan repository names), 'diffusers', or a ModelError when neither or both."""
    keys = list(keys)
    orig = any(m in k for k in keys for m in _ORIGINAL_MARKERS)
    diff = any(m in k for k in keys for m in _DIFFUSERS_MARKERS)
    if orig and diff:
        raise ModelError(f"{source}: mixes original Wan and diffusers key names; expected one naming")
    if not orig and not diff:
        raise ModelError(f"{source}: keys are neither original Wan nor diffusers transformer names (first: {keys[:3]})")
    return "original" if orig else "diffusers"


def to_diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan key names → diffusers names, with diffusers' own converter (keys only; tensors shared)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(state))  # the converter pops from its argument


def rename_original_paths(paths: Iterable[str]) -> dict[str, str]:
    """Original module paths (``blocks.0.self_attn.q``) → diffusers paths (``blocks.0.attn1.to_q``)."""
    paths = list(paths)
    tags = {p + ".weight": torch.tensor(i) for i, p in enumerate(paths)}
    converted = to_diffusers_names(tags)
    out = {}
    for new_key, tag in converted.items():
        out[paths[int(tag)]] = new_key[: -len(".weight")]
    return out


def _ignored_unexpected(model_cls) -> tuple[str, ...]:
    return tuple(getattr(model_cls, "_keys_to_ignore_on_load_unexpected", None) or ())


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                     label: str = "checkpoint", converted: bool = False) -> dict[str, torch.Tensor]:
    """``state`` restricted to the model's keys; shape mismatches, missing or unexpected keys are errors.

    ``converted``: the keys were renamed from the original Wan naming (the messages say so).
    """
    names = " (diffusers names, after conversion)" if converted else ""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ignore = _ignored_unexpected(type(model))
    for k, v in state.items():
        if k in expected and tuple(v.shape) != expected[k]:
            raise ModelError(f"{label} {source}: {k}{names} has shape {tuple(v.shape)} but the model expects "
                             f"{expected[k]}; wrong architecture (the model is built from transformer/config.json)")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not any(re.search(p, k) for p in ignore))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        raise ModelError(f"{label} {source}: {' and '.join(parts)} weights{names}; expected exactly the keys of "
                         "WanTransformer3DModel for transformer/config.json")
    return {k: state[k] for k in expected}


# --- checkpoints --------------------------------------------------------------------------------------------
def resolve_checkpoint(checkpoint: str | Path, lora: str | Path | None) -> tuple[Path, Path | None]:
    """(weights path, LoRA path or None): expands a LongLive-style folder of base + ``lora.pt``."""
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.exists():
        raise ModelError(f"checkpoint {ckpt} does not exist; expected a .pt/.safetensors file or a folder")
    lora_path = Path(lora).expanduser() if lora is not None else None
    if lora_path is not None and not lora_path.is_file():
        raise ModelError(f"LoRA file {lora_path} does not exist; expected a PEFT lora.pt or .safetensors")
    if ckpt.is_dir() and not (ckpt / "config.json").is_file():
        found = [ckpt / n for n in LORA_FILE_NAMES if (ckpt / n).is_file()]
        if not found:
            raise ModelError(f"checkpoint folder {ckpt}: neither a diffusers transformer folder (config.json) nor a "
                             f"LongLive layout ({' / '.join(LORA_FILE_NAMES)} + one base weights file)")
        if len(found) > 1:
            raise ModelError(f"checkpoint folder {ckpt}: several LoRA files {[f.name for f in found]}; expected one")
        bases = sorted(p for p in ckpt.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES and p != found[0])
        if len(bases) != 1:
            raise ModelError(f"checkpoint folder {ckpt}: {len(bases)} base weight files {[b.name for b in bases]} "
                             f"beside {found[0].name}; expected exactly one")
        if lora_path is not None:
            raise ModelError(f"checkpoint folder {ckpt} already holds {found[0].name}; do not pass a LoRA as well")
        return bases[0], found[0]
    return ckpt, lora_path


def read_checkpoint(path: Path, entry: str = "generator_ema") -> dict[str, torch.Tensor]:
    """The generator state dict of a checkpoint file or diffusers folder, wrappers stripped (names unchanged)."""
    if path.is_dir():
        state = _read_safetensors_folder(path)
    else:
        state = _select_generator(read_weights_file(path), str(path), entry)
    if not state:
        raise ModelError(f"checkpoint {path}: contains no tensors")
    return _strip_prefixes(state)


def checkpoint_state_dict(model: torch.nn.Module, checkpoint: str | Path, lora: str | Path | None = None,
                          lora_alpha: float | None = None, lora_scale: float = 1.0,
                          label: str = "checkpoint", entry: str = "generator_ema",
                          ) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The transformer state dict a checkpoint (+ LoRA) defines, in diffusers names, checked against ``model``.

    ``entry``: the preferred weights of a ``{generator, generator_ema}`` checkpoint. Returns the state dict
    and the files it came from (for the digest).
    """
    path, lora_path = resolve_checkpoint(checkpoint, lora)
    state = read_checkpoint(path, entry)
    converted = naming_of(state, f"{label} {path}") == "original"
    if converted:
        state = to_diffusers_names(state)
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"] if path.is_dir() else [path]
    if lora_path is not None:
        pairs: dict[str, LoraPair] = parse_lora(read_weights_file(lora_path), str(lora_path))
        rename: Callable[[str], str] | None = None
        if naming_of((p + ".weight" for p in pairs), f"LoRA file {lora_path}") == "original":
            table = rename_original_paths(pairs)
            rename = table.__getitem__
        state = merge_lora(state, pairs, str(lora_path), alpha=lora_alpha, scale=lora_scale, rename=rename)
        files.append(lora_path)
    return check_state_dict(model, state, str(path), label, converted), files


# --- digests --------------------------------------------------------------------------------------------------
def fingerprint_file(path: Path, mode: str = "sampled", blocks: int = 64, block_size: int = 64 * 1024) -> bytes:
    """sha256 of a weights file: full bytes, or size + safetensors header + evenly sampled blocks."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        if mode == "full" or size <= blocks * block_size:
            for chunk in iter(lambda: f.read(16 * 1024 * 1024), b""):
                h.update(chunk)
            return h.digest()
        start = 0
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            if 0 < n < size:
                f.seek(0)
                h.update(f.read(8 + n))
                start = 8 + n
        span = size - start - block_size
        for i in range(blocks):
            f.seek(start + (span * i) // (blocks - 1))
            h.update(f.read(block_size))
    return h.digest()


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))


def folder_digest(parts: Mapping[str, Iterable[Path]], root: Path, mode: str, extra: Mapping | None = None) -> str:
    """sha256 over each part's files (relative names + fingerprints) and ``extra`` (JSON)."""
    h = hashlib.sha256(b"slotgen.wan.digest/1")
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for part, files in parts.items():
        h.update(part.encode())
        for f in files:
            try:
                rel = str(f.relative_to(root))
            except ValueError:
                rel = f.name
            h.update(rel.encode())
            h.update(fingerprint_file(f, mode))
    return h.hexdigest()
