"""Wan2.1-T2V-1.3B for slotgen: a seeded random build for benchmarks, and a local diffusers folder loader.

Everything runs on diffusers' and transformers' stock classes (``WanTransformer3DModel``,
``AutoencoderKLWan``, ``UMT5EncoderModel``); nothing is downloaded (``local_files_only=True``).

``build_random_wan(device, dtype=None, seed=0)``
    The full Wan2.1-T2V-1.3B transformer (1.42 B parameters) and the real Wan2.1 VAE architecture with
    seeded random weights, plus a *small* UMT5 encoder (d_model 4096, one layer) behind the miniature's
    word-level tokenizer. Speed does not depend on weight values, so this is what ``slotgen bench speed``
    runs where real weights are absent. The transformer is built on the meta device and materialised
    directly on ``device`` in its final dtypes, then filled by :func:`fast_init_` (PyTorch's default
    ``nn.Linear``/``nn.Conv`` distributions from one seeded generator on the device); in fp32 it takes
    5.7 GB, and on a CPU most of the build's time is first-touch page faults.

``load_wan(path, device, dtype=None, checkpoint=None, lora=None, ...)``
    A diffusers-format Wan2.1 folder (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` as downloaded) with the
    sub-folders ``transformer/``, ``vae/``, ``text_encoder/`` and ``tokenizer/``, and an optional
    ``slotgen.json`` of :class:`~slotgen.models.bundle.ModelSettings` overrides plus ``name`` and the
    default ``checkpoint`` / ``lora`` / ``lora_alpha`` (paths relative to the folder; arguments win).
    ``checkpoint`` replaces the transformer weights by a causal generator (the formats are in
    :mod:`slotgen.models.wan_checkpoint`); ``slotgen.json`` is read by :mod:`slotgen.models.wan_settings`.

The transformer is never built by ``from_pretrained`` (which needs ``accelerate`` for its fp32-kept
modules): it is created from ``transformer/config.json`` on the meta device in its final dtypes, and the
weights (the folder's ``*.safetensors``, or the checkpoint) are checked key by key and assigned.

Dtypes: bf16 on CUDA and fp32 elsewhere unless ``dtype`` says otherwise; under bf16 the modules in
``WanTransformer3DModel._keep_in_fp32_modules`` (rope, time_embedder, scale_shift_table, norm1-3) stay
fp32 with diffusers' own name rule. The VAE stays fp32 (the streaming decoder casts
latents to it). The text encoder, used once per distinct prompt, goes to ``text_device`` ("auto": the GPU
when it has >= 40 GiB, else the CPU, since UMT5-XXL alone is 11.4 GB in bf16) in the model dtype.

Digest (snapshot identity): sha256 over the transformer config and a fingerprint of every weight file
used (:func:`slotgen.models.wan_checkpoint.folder_digest`). The random build's digest hashes its configs,
seed, init scheme, device type and dtype, which determine its weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from slotgen.errors import ModelError, one_line
from slotgen.models.bundle import ModelBundle, ModelSettings
from slotgen.engine.presets import get_preset
from slotgen.models.wan_checkpoint import aligned, checkpoint_state_dict, folder_digest, weight_files
from slotgen.models.wan_settings import SETTINGS_FILE, WAN_SETTINGS, read_folder_config

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

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")
INIT_SCHEME = "slotgen.fast_init/1"  # bump when fast_init_ changes what a seed produces
TEXT_ON_GPU_MIN_BYTES = 40 * 1024**3  # GPUs at least this large keep UMT5-XXL on the device

# --- dtype / device helpers -------------------------------------------------------------------------------
def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def vae_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The VAE decodes in the model's dtype on CUDA (bf16, as LongLive does: half the memory traffic of
    the 40 TFLOP-a-chunk decode) and in fp32 elsewhere (CPU bf16 convolutions are slower, not faster).
    ``tests/test_hotpath.py`` bounds the bf16 decode's deviation from fp32."""
    return model_dtype if device.type == "cuda" else torch.float32


def cast_vae(vae: torch.nn.Module, device: torch.device | str | None, dtype: torch.dtype) -> torch.nn.Module:
    """``vae.to(device, dtype)`` without diffusers' warning about modules to keep in fp32, which
    ``ModelMixin.to`` prints for any dtype argument even when that list is empty (as it is for
    ``AutoencoderKLWan``); a VAE that does list such modules gets diffusers' own ``to``."""
    if getattr(vae, "_keep_in_fp32_modules", None):
        return vae.to(device, dtype)
    return torch.nn.Module.to(vae, device, dtype)


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
    One ``uniform_`` pass per tensor instead of the modules' own ``reset_parameters``, which computes
    the same bounds through several kernels.
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
        vae = cast_vae(vae, None, vae_dtype(device, dtype))
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


# --- loading a diffusers folder -------------------------------------------------------------------------------
def _load_part(folder: Path, what: str, load: Callable[[], object]) -> object:
    try:
        return load()
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - library loaders raise many types for a bad folder
        raise ModelError(f"{folder}: cannot load the {what} ({type(err).__name__}: {one_line(err)})") from None


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
    preset: str | None = None,
) -> ModelBundle:
    """Load a local diffusers-format Wan2.1 folder, optionally with a causal checkpoint (module docstring).

    ``preset`` overrides the folder's attention preset (``slotgen.json``), which picks the checkpoint entry."""
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
    if preset is not None:
        settings = dataclasses.replace(settings, preset=get_preset(preset).name)
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
    entry = get_preset(settings.preset).weights  # the entry the preset's own project loads
    if checkpoint is None:
        state, transformer_files = checkpoint_state_dict(transformer, tdir, label="transformer weights")
    else:
        state, transformer_files = checkpoint_state_dict(transformer, checkpoint, lora, lora_alpha, entry=entry)
    targets = transformer.state_dict()
    for k in list(state):  # cast tensor by tensor, releasing the source as we go
        state[k] = aligned(state[k].to(targets[k].dtype))
    transformer.load_state_dict(state, strict=True, assign=True)
    del state, targets
    _rebuild_rope(transformer, torch.device("cpu"))
    transformer = transformer.to(device).eval().requires_grad_(False)

    vdir, edir, kdir = root / "vae", root / "text_encoder", root / "tokenizer"
    # low_cpu_mem_usage=False: the default (True) needs accelerate and, without it, prints advice to install
    # it on every load; for the 0.5 GB VAE the plain path costs nothing worth the dependency
    vae = _load_part(vdir, "VAE", lambda: AutoencoderKLWan.from_pretrained(
        str(vdir), torch_dtype=torch.float32, local_files_only=True, low_cpu_mem_usage=False))
    vae = cast_vae(vae, device, vae_dtype(device, dtype)).eval().requires_grad_(False)
    tdev = choose_text_device(device, text_device)
    tdt = text_dtype or dtype
    text_encoder = _load_part(edir, "text encoder", lambda: UMT5EncoderModel.from_pretrained(
        str(edir), dtype=tdt, local_files_only=True))
    text_encoder = text_encoder.to(tdev).eval().requires_grad_(False)
    tokenizer = _load_part(kdir, "tokenizer", lambda: AutoTokenizer.from_pretrained(str(kdir), local_files_only=True))
    _check_geometry(root, transformer, vae, text_encoder, settings)

    digest = folder_digest(
        {"transformer": transformer_files, "vae": weight_files(vdir), "text_encoder": weight_files(edir),
         "tokenizer": sorted(p for p in kdir.rglob("*") if p.is_file())},
        root, digest_mode,
        extra={"transformer_config": {k: v for k, v in transformer.config.items() if not k.startswith("_")},
               "lora_alpha": lora_alpha,
               # the same file holds two generators; the entry loaded is part of the identity (recorded only
               # when it is not the default `generator_ema`, so naming the default changes no digest)
               **({"entry": entry} if checkpoint is not None and entry != "generator_ema" else {})},
    )
    return ModelBundle(name=name, transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       settings=settings, digest=digest, vocabulary=None)


__all__ = [
    "WAN_1_3B_TRANSFORMER", "WAN_VAE", "RANDOM_TEXT_ENCODER", "build_random_wan", "load_wan", "cast_keeping_fp32",
    "choose_text_device", "fast_init_",
]
