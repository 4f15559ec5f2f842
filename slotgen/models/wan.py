"""Wan2.1-T2V-1.3B for slotgen: a seeded random build for benchmarks, and a local diffusers folder loader.

Everything runs on diffusers' and transformers' stock classes (``WanTransformer3DModel``,
``AutoencoderKLWan``, ``UMT5EncoderModel``); nothing is downloaded (``local_files_only=True``).

``build_random_wan(device, dtype=None, seed=0)``
    The full Wan2.1-T2V-1.3B transformer (1.42 B parameters) and the real Wan2.1 VAE architecture with
    seeded random weights, plus a *small* UMT5 encoder (d_model 4096, one layer) behind the miniature's
    word-level tokenizer. Speed does not depend on weight values, so this is what ``slotgen bench speed``
    runs where real weights are absent. The transformer is built on the meta device and materialised
    directly on ``device`` in its final dtypes, then filled by :func:`fast_init_` (PyTorch's default
    ``nn.Linear``/``nn.Conv`` distributions from one seeded generator on the device): ~12 s on a 2-core
    CPU in fp32 (5.7 GB, mostly first-touch page faults), well under a second on a GPU.

``load_wan(path, device, dtype=None, checkpoint=None, lora=None, ...)``
    A diffusers-format Wan2.1 folder (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` as downloaded) with the
    sub-folders ``transformer/``, ``vae/``, ``text_encoder/`` and ``tokenizer/``, and an optional
    ``slotgen.json`` of :class:`~slotgen.models.bundle.ModelSettings` overrides plus ``name`` and the
    default ``checkpoint`` / ``lora`` / ``lora_alpha`` (paths relative to the folder; arguments win).
    ``checkpoint`` replaces the transformer weights by a causal generator:

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

The transformer is never built by ``from_pretrained`` (which needs ``accelerate`` for its fp32-kept
modules): it is created from ``transformer/config.json`` on the meta device in its final dtypes, and the
weights (the folder's ``*.safetensors``, or the checkpoint) are checked key by key and assigned.

Dtypes: bf16 on CUDA and fp32 elsewhere unless ``dtype`` says otherwise; under bf16 the modules in
``WanTransformer3DModel._keep_in_fp32_modules`` (rope, time_embedder, scale_shift_table, norm1-3) stay
fp32 with diffusers' own name rule. The VAE stays fp32 (the streaming decoder casts
latents to it). The text encoder, used once per distinct prompt, goes to ``text_device`` ("auto": the GPU
when it has >= 40 GiB, else the CPU, since UMT5-XXL alone is 11.4 GB in bf16) in the model dtype.

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
import math
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from slotgen.errors import ModelError
from slotgen.models.bundle import ModelBundle, ModelSettings
from slotgen.models.lora import LoraPair, merge_lora, parse_lora

# --- the Wan2.1-T2V-1.3B architecture --------------------------------------------------------------------
WAN_1_3B_TRANSFORMER: dict = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
WAN_VAE: dict = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
# A cheap stand-in for UMT5-XXL: the real output width (4096) so the transformer's text embedder fits.
RANDOM_TEXT_ENCODER: dict = dict(
    d_model=4096,
    num_layers=1,
    num_heads=2,
    d_kv=64,
    d_ff=256,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
WAN_SETTINGS = ModelSettings(steps=4, shift=5.0, chunk_frames=3, fps=16, resolution=(832, 480), text_len=512,
                             window=12, sink=3)

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")
SETTINGS_FILE = "slotgen.json"
LORA_FILE_NAMES = ("lora.pt", "lora.pth", "lora.safetensors")
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
INIT_SCHEME = "slotgen.fast_init/1"  # bump when fast_init_ changes what a seed produces
TEXT_ON_GPU_MIN_BYTES = 40 * 1024**3  # GPUs at least this large keep UMT5-XXL on the device

# Prefixes removed from checkpoint keys when every key carries them (training wrappers), and wrapper
# segments removed anywhere in a key (FSDP / activation checkpointing).
_COMMON_PREFIXES = ("model.diffusion_model.", "model.", "module.", "_orig_mod.", "diffusion_model.", "transformer.")
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Markers of the two naming schemes (original Wan repository vs diffusers).
_ORIGINAL_MARKERS = (".self_attn.", ".cross_attn.", "head.head.", "head.modulation", "text_embedding.",
                     "time_embedding.", "time_projection.", ".modulation", ".ffn.0.", ".ffn.2.")
_DIFFUSERS_MARKERS = (".attn1.", ".attn2.", "condition_embedder.", "proj_out.", "scale_shift_table", ".ffn.net.")


# --- dtype / device helpers -------------------------------------------------------------------------------
def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _keeps_fp32(name: str, keep: Iterable[str]) -> bool:
    """diffusers' rule: a tensor stays fp32 when a component of its dotted name is a kept module."""
    parts = name.split(".")
    return any(k in parts for k in keep)


def cast_keeping_fp32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating params/buffers to ``dtype``, except ``model._keep_in_fp32_modules`` (kept fp32).

    Works on the meta device too (no memory is touched there), so a model can be materialised directly
    in its final dtypes.
    """
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype != torch.float32 else []
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            for kind in ("_parameters", "_buffers"):
                tensors = getattr(module, kind)
                for t_name, t in list(tensors.items()):
                    if t is None or not t.is_floating_point():
                        continue
                    full = f"{mod_name}.{t_name}" if mod_name else t_name
                    target = torch.float32 if _keeps_fp32(full, keep) else dtype
                    if t.dtype == target:
                        continue
                    if kind == "_parameters":
                        t.data = t.data.to(target)
                    else:
                        tensors[t_name] = t.to(target)
    return model


def choose_text_device(device: torch.device, requested: str | torch.device | None = "auto",
                       gpu_memory: int | None = None) -> torch.device:
    """Where the text encoder runs: ``requested`` unless it is ``None``/"auto".

    "auto": on CUDA, the GPU when it has at least 40 GiB (``gpu_memory`` bytes, queried when not given),
    else the CPU (UMT5-XXL is 11.4 GB in bf16 and prompts are encoded once); off CUDA, ``device``.
    """
    if requested is not None and str(requested) != "auto":
        try:
            return torch.device(requested)
        except (RuntimeError, TypeError):
            raise ModelError(f"text device {requested!r} is not a torch device; expected e.g. 'cpu', 'cuda' or 'auto'") from None
    if device.type != "cuda":
        return device
    if gpu_memory is None:
        gpu_memory = torch.cuda.get_device_properties(device).total_memory
    return device if gpu_memory >= TEXT_ON_GPU_MIN_BYTES else torch.device("cpu")


# --- fast seeded init ---------------------------------------------------------------------------------------
def fast_init_(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Fill every parameter in place from ``generator``, with PyTorch's default distributions.

    ``nn.Linear``/``nn.Conv*``: weight and bias ~ U(±1/sqrt(fan_in)) (what ``kaiming_uniform_(a=√5)``
    gives); normalisation layers: weight 1, bias 0; any other parameter (``scale_shift_table``,
    embeddings): N(0, 1)/sqrt(last dim), as diffusers initialises ``scale_shift_table``.
    One ``uniform_`` pass per tensor instead of the modules' own ``reset_parameters`` (which computes
    the same bounds through several kernels): ~12 s instead of ~18 s for 1.4 B fp32 parameters on a
    2-core CPU (most of it is first-touch page faults), a fraction of a second on a GPU.
    """
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
                w = module.weight
                fan_in = w.shape[1] * math.prod(w.shape[2:])
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                for p in own.values():
                    p.uniform_(-bound, bound, generator=generator)
                    done.add(id(p))
            elif "norm" in type(module).__name__.lower():
                for name, p in own.items():
                    p.fill_(1.0 if name == "weight" else 0.0)
                    done.add(id(p))
        for p in model.parameters():
            if id(p) in done:
                continue
            p.normal_(0.0, 1.0, generator=generator)
            p.div_(math.sqrt(p.shape[-1]) if p.ndim else 1.0)
            done.add(id(p))
    return model


def _rebuild_rope(transformer: torch.nn.Module, device: torch.device) -> None:
    """Recreate the non-persistent RoPE tables (they are computed in ``__init__``, not stored)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    cfg = transformer.config
    with torch.device(device):
        transformer.rope = WanRotaryPosEmbed(cfg.attention_head_dim, tuple(cfg.patch_size), cfg.rope_max_seq_len)
    persistent = set(transformer.state_dict())
    stray = [n for n, _ in transformer.named_buffers() if n not in persistent and not n.startswith("rope.")]
    if stray:  # a diffusers change added computed buffers we would leave uninitialised
        raise RuntimeError(f"WanTransformer3DModel has non-persistent buffers slotgen does not rebuild: {stray}")


def _meta_transformer(config: Mapping, dtype: torch.dtype):
    """A WanTransformer3DModel on the meta device, already in its final (mixed) dtypes."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(dict(config))
    return cast_keeping_fp32(model, dtype).eval().requires_grad_(False)


# --- the random build ---------------------------------------------------------------------------------------
def build_random_wan(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0,
                     transformer_config: Mapping | None = None, vae_config: Mapping | None = None,
                     text_config: Mapping | None = None, settings: ModelSettings | None = None) -> ModelBundle:
    """Wan2.1-T2V-1.3B with seeded random weights (see module docstring); built directly on ``device``.

    The config arguments exist for tests (a tiny model through the same code path); by default the
    real Wan2.1-T2V-1.3B transformer and VAE architectures are built.
    """
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from slotgen.models.miniature import SPECIAL_TOKENS, VOCABULARY, build_tokenizer

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    tcfg = dict(transformer_config or WAN_1_3B_TRANSFORMER)
    vcfg = dict(vae_config or WAN_VAE)
    tokenizer = build_tokenizer(VOCABULARY)
    ecfg = {**(text_config or RANDOM_TEXT_ENCODER), "vocab_size": len(tokenizer.get_vocab())}
    if ecfg["d_model"] != tcfg["text_dim"]:
        raise ModelError(f"random Wan: text encoder width {ecfg['d_model']} differs from the transformer's text_dim "
                         f"{tcfg['text_dim']}; expected equal")

    transformer = _meta_transformer(tcfg, dtype)
    transformer.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    fast_init_(transformer, generator)
    _rebuild_rope(transformer, device)

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**vcfg).eval().requires_grad_(False)
        torch.manual_seed(seed + 2)
        text_encoder = UMT5EncoderModel(UMT5Config(**ecfg)).eval().requires_grad_(False)

    identity = json.dumps({"scheme": INIT_SCHEME, "seed": seed, "transformer": tcfg, "vae": vcfg, "text": ecfg,
                           "device": device.type, "dtype": str(dtype)}, sort_keys=True)
    return ModelBundle(
        name="wan-1.3b-random",
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        settings=settings or WAN_SETTINGS,
        digest=hashlib.sha256(identity.encode()).hexdigest(),
        vocabulary=frozenset(t for t in tokenizer.get_vocab() if t not in SPECIAL_TOKENS),
    )


# --- reading weight files safely ----------------------------------------------------------------------------
def _one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _refusal(path: Path, err: Exception) -> ModelError:
    """One line for a pickle that ``torch.load(weights_only=True)`` rejects."""
    text = str(err)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return ModelError(f"{path}: refused to unpickle: it references {m.group(1)}, which would run code; slotgen loads "
                          "checkpoints only with torch.load(weights_only=True) or safetensors (re-save the tensors in a "
                          "trusted environment)")
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", text, re.S)
    reason = _one_line(detail.group(1), 80) if detail else "unsupported content"
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
            raise ModelError(f"{path}: not a valid safetensors file ({_one_line(err)})") from None
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
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({_one_line(err)}); expected a torch.save "
                         "file of tensors") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, ImportError) as err:
        reason = _one_line(err) or "the file is empty or truncated"
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {reason}); expected a complete "
                         "torch.save file (is it truncated or corrupted?)") from None


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
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
            raise ModelError(f"{index[0]}: unreadable shard index ({_one_line(err)}); expected a 'weight_map' object") from None
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors weights; expected a diffusers transformer folder")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_weights_file(f))  # type: ignore[arg-type]
    return tensors


def _select_generator(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The generator's flat state dict inside a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        raise ModelError(f"checkpoint {source}: top level is a {type(obj).__name__}, expected a dict "
                         "(Self-Forcing/LongLive {'generator_ema'|'generator': ...} or a flat state dict)")
    chosen: object = None
    for key in ("generator_ema", "generator", "model", "state_dict"):
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


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The generator state dict of a checkpoint file or diffusers folder, wrappers stripped (names unchanged)."""
    if path.is_dir():
        state = _read_safetensors_folder(path)
    else:
        state = _select_generator(read_weights_file(path), str(path))
    if not state:
        raise ModelError(f"checkpoint {path}: contains no tensors")
    return _strip_prefixes(state)


def checkpoint_state_dict(model: torch.nn.Module, checkpoint: str | Path, lora: str | Path | None = None,
                          lora_alpha: float | None = None, lora_scale: float = 1.0,
                          label: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The transformer state dict a checkpoint (+ LoRA) defines, in diffusers names, checked against ``model``.

    Returns the state dict and the files it came from (for the digest).
    """
    path, lora_path = resolve_checkpoint(checkpoint, lora)
    state = read_checkpoint(path)
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


def _weight_files(folder: Path) -> list[Path]:
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


# --- settings ---------------------------------------------------------------------------------------------
_INT_FIELDS = {"steps": 1, "chunk_frames": 1, "fps": 1, "text_len": 1, "vae_stride_t": 1, "vae_stride_s": 1,
               "window": 1, "sink": 0}


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
    can carry its generator and render through ``--model PATH`` alone.
    """
    path = root / SETTINGS_FILE
    if not path.is_file():
        return FolderConfig(WAN_SETTINGS, root.name)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); expected an object of model settings") from None
    except OSError as err:
        raise ModelError(f"{path}: unreadable ({_one_line(err)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: top level is a {type(data).__name__}, expected an object of model settings")
    loading = {"name", "checkpoint", "lora", "lora_alpha"}
    known = set(ModelSettings.__dataclass_fields__) | loading
    unknown = sorted(set(data) - known)
    if unknown:
        raise ModelError(f"{path}: unknown keys {unknown}; expected some of {sorted(known)}")
    for key, minimum in _INT_FIELDS.items():
        if key in data and (type(data[key]) is not int or data[key] < minimum):
            raise ModelError(f"{path}: '{key}' is {data[key]!r}, expected an integer >= {minimum}")
    for key in ("shift", "lora_alpha"):
        if key in data and (not isinstance(data[key], (int, float)) or isinstance(data[key], bool) or data[key] <= 0):
            raise ModelError(f"{path}: '{key}' is {data[key]!r}, expected a number > 0")
    from slotgen.engine.sampler import PREDICTIONS, SAMPLERS

    for key, allowed in (("sampler", SAMPLERS), ("prediction", PREDICTIONS)):
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


# --- loading a diffusers folder -------------------------------------------------------------------------------
def _load_part(folder: Path, what: str, load: Callable[[], object]) -> object:
    try:
        return load()
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - library loaders raise many types for a bad folder
        raise ModelError(f"{folder}: cannot load the {what} ({type(err).__name__}: {_one_line(err)})") from None


def _check_geometry(root: Path, transformer, vae, text_encoder, settings: ModelSettings) -> None:
    tc, vc = transformer.config, vae.config
    if tc.in_channels != vc.z_dim or tc.out_channels != vc.z_dim:
        raise ModelError(f"{root}: transformer in/out channels {tc.in_channels}/{tc.out_channels} differ from the VAE's "
                         f"z_dim {vc.z_dim}; expected equal")
    d_model = text_encoder.config.d_model
    if d_model != tc.text_dim:
        raise ModelError(f"{root}: text encoder width {d_model} differs from the transformer's text_dim {tc.text_dim}; "
                         "expected equal")
    stride_t = 2 ** sum(bool(x) for x in vc.temperal_downsample)
    stride_s = 2 ** (len(vc.dim_mult) - 1)
    if (stride_t, stride_s) != (settings.vae_stride_t, settings.vae_stride_s):
        raise ModelError(f"{root}: the VAE compresses {stride_t}× in time and {stride_s}× in space but the settings say "
                         f"{settings.vae_stride_t}×/{settings.vae_stride_s}×; fix vae_stride_t/vae_stride_s in {SETTINGS_FILE}")


def load_wan(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    checkpoint: str | Path | None = None,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    text_device: str | torch.device | None = "auto",
    text_dtype: torch.dtype | None = None,
    digest_mode: str = "sampled",
) -> ModelBundle:
    """Load a local diffusers-format Wan2.1 folder, optionally with a causal checkpoint (module docstring)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = Path(path).expanduser()
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if digest_mode not in ("sampled", "full"):
        raise ModelError(f"digest mode {digest_mode!r} is not 'sampled' or 'full'")
    if not root.is_dir():
        raise ModelError(f"model folder {root} does not exist; expected a diffusers-format Wan2.1 folder")
    missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise ModelError(f"model folder {root} lacks the sub-folder(s) {', '.join(s + '/' for s in missing)}; expected "
                         f"{', '.join(s + '/' for s in SUBFOLDERS)} (as in Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
    folder = read_folder_config(root)
    settings, name = folder.settings, folder.name
    if checkpoint is None and lora is None and folder.checkpoint is not None:  # the folder's own causal weights
        checkpoint, lora = folder.checkpoint, folder.lora
    lora_alpha = lora_alpha if lora_alpha is not None else folder.lora_alpha
    if lora is not None and checkpoint is None:
        raise ModelError(f"LoRA {lora} needs a base checkpoint (checkpoint=...); expected the pair base.pt + lora.pt")

    tdir = root / "transformer"
    config = _load_part(tdir, "transformer config", lambda: WanTransformer3DModel.load_config(
        str(tdir), local_files_only=True))
    transformer = _meta_transformer(config, dtype)
    # Without a checkpoint the folder's own weights are "the checkpoint": one loading path for both.
    if checkpoint is None:
        state, transformer_files = checkpoint_state_dict(transformer, tdir, label="transformer weights")
    else:
        state, transformer_files = checkpoint_state_dict(transformer, checkpoint, lora, lora_alpha)
    targets = transformer.state_dict()
    for k in list(state):  # cast tensor by tensor, releasing the source as we go
        state[k] = _aligned(state[k].to(targets[k].dtype))
    transformer.load_state_dict(state, strict=True, assign=True)
    del state, targets
    _rebuild_rope(transformer, torch.device("cpu"))
    transformer = transformer.to(device).eval().requires_grad_(False)

    vdir, edir, kdir = root / "vae", root / "text_encoder", root / "tokenizer"
    vae = _load_part(vdir, "VAE", lambda: AutoencoderKLWan.from_pretrained(
        str(vdir), torch_dtype=torch.float32, local_files_only=True))
    vae = vae.to(device).eval().requires_grad_(False)
    tdev = choose_text_device(device, text_device)
    tdt = text_dtype or dtype
    text_encoder = _load_part(edir, "text encoder", lambda: UMT5EncoderModel.from_pretrained(
        str(edir), dtype=tdt, local_files_only=True))
    text_encoder = text_encoder.to(tdev).eval().requires_grad_(False)
    tokenizer = _load_part(kdir, "tokenizer", lambda: AutoTokenizer.from_pretrained(str(kdir), local_files_only=True))
    _check_geometry(root, transformer, vae, text_encoder, settings)

    digest = folder_digest(
        {"transformer": transformer_files, "vae": _weight_files(vdir), "text_encoder": _weight_files(edir),
         "tokenizer": sorted(p for p in kdir.rglob("*") if p.is_file())},
        root, digest_mode,
        extra={"transformer_config": {k: v for k, v in transformer.config.items() if not k.startswith("_")},
               "lora_alpha": lora_alpha},
    )
    return ModelBundle(name=name, transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       settings=settings, digest=digest, vocabulary=None)


__all__ = [
    "WAN_1_3B_TRANSFORMER", "WAN_VAE", "WAN_SETTINGS", "RANDOM_TEXT_ENCODER", "build_random_wan", "load_wan",
    "cast_keeping_fp32", "choose_text_device", "fast_init_", "checkpoint_state_dict", "read_weights_file",
    "naming_of", "to_diffusers_names", "rename_original_paths", "fingerprint_file",
]
