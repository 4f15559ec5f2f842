"""A local Hugging Face cache in huggingface_hub's own layout, for offline ``slotgen pull`` tests.

huggingface_hub's cache (``huggingface_hub.constants.HF_HUB_CACHE``) holds, per repository,
``models--ORG--NAME/blobs/<etag>`` (the bytes), ``snapshots/<commit>/<path>`` (a relative symbolic link to
the blob) and ``refs/<revision>`` (the commit a branch points at). With ``HF_HUB_OFFLINE=1``,
``hf_hub_download`` and ``snapshot_download`` resolve from it exactly as after a real download.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.test_wan_loading import diffusers_to_original, lora_tensors, tiny_transformer, write_tiny_wan

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_file(cache: Path, repo: str, path: str, data: bytes, commit: str = COMMIT) -> Path:
    """Put ``data`` at ``repo``/``path`` in the cache, as ``hf_hub_download`` leaves a finished download."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / commit / path
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return link


def add_folder(cache: Path, repo: str, folder: Path, prefix: str = "") -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            add_file(cache, repo, prefix + str(p.relative_to(folder)), p.read_bytes())


def torch_bytes(obj, tmp: Path) -> bytes:
    path = tmp / "obj.pt"
    torch.save(obj, path)
    return path.read_bytes()


def original_state(model) -> dict:
    return {"model." + k: v for k, v in diffusers_to_original(model.state_dict()).items()}


def build_hub_cache(cache: Path, work: Path) -> dict:
    """Wan2.1 (tiny: transformer sharded with an index, VAE, UMT5 text encoder, tokenizer), Self-Forcing,
    LongLive and MemFlow repositories with tiny random weights under the real key and file names.
    Returns the transformers each checkpoint should load (for the tests' comparisons)."""
    wan = work / "wan"
    base = write_tiny_wan(wan, max_shard_size="20KB")  # the transformer sharded + index, as the real repository
    (wan / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (wan / "scheduler").mkdir()
    (wan / "scheduler" / "scheduler_config.json").write_text("{}")
    add_folder(cache, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", wan)

    sf_ema, sf_gen = tiny_transformer(11), tiny_transformer(12)
    add_file(cache, "gdhe17/Self-Forcing", "checkpoints/self_forcing_dmd.pt", torch_bytes(
        {"generator_ema": original_state(sf_ema), "generator": original_state(sf_gen)}, work))
    models = {"wan-base": base, "self-forcing": sf_ema}
    for name, repo, base_path, lora_path, seed in (
            ("longlive", "Efficient-Large-Model/LongLive-1.3B", "models/longlive_base.pt", "models/lora.pt", 21),
            ("memflow", "KlingTeam/MemFlow", "base.pt", "lora.pt", 31)):
        generator = tiny_transformer(seed)
        lora = lora_tensors(generator, seed=seed)
        peft = {}
        for module, (a, b) in lora.items():
            peft[f"base_model.model.{module}.lora_A.weight"] = a
            peft[f"base_model.model.{module}.lora_B.weight"] = b
        add_file(cache, repo, base_path, torch_bytes({"generator": original_state(generator)}, work))
        add_file(cache, repo, lora_path, torch_bytes({"generator_lora": peft}, work))
        models[name] = (generator, lora)
    return models


def blob_of(cache: Path, repo: str, path: str) -> Path:
    link = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT / path
    return link.resolve()


__all__ = ["add_file", "build_hub_cache", "blob_of", "COMMIT", "save_file"]
