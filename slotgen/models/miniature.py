"""The embedded miniature: the real Wan stack (diffusers + transformers classes) at toy size.

Everything is built from ``assets/miniature/config.json`` and loaded from ``weights.safetensors`` in
the package, so rendering works offline on any laptop. ``slotgen train-miniature`` writes a folder in
the same format (docs/MINIATURE.md is the model card); :func:`write_miniature` with a seed writes the
untrained configuration (random transformer, exact VAE), which tests use.

Sizes (64×64 video, 16 fps):

* **VAE** — ``AutoencoderKLWan`` with Wan2.2's ``patch_size`` 4 (the class rearranges each 4×4 pixel
  block into 48 channels and back), one level, no temporal down-sampling, base_dim 52, z_dim 48, whose
  weights are not learned but *constructed* (:func:`make_exact_vae`): it maps the 48 channels to the
  48 latent channels and back, exact to ~1e-5 (every uint8 pixel of a world video survives encode →
  decode; tested). Learned 4×/8× VAEs at this size misdrew the world's entities (docs/MINIATURE.md);
  a code that loses nothing takes the VAE out of the identity question the benchmark asks. One latent frame is one video frame.
* **Transformer** — ``WanTransformer3DModel`` with patch (1, 4, 4) on the 16×16 latents: 4×4 = 16 tokens
  per frame, each a 16×16-pixel patch (as with Wan2.1's 8× VAE and patch 2), 768 values per token. It predicts the
  clean sample (``prediction = "sample"``, x0): a narrow transformer cannot carry 768 values of noise
  through its residual stream, which a flow (ε − x0) target asks for, but it can output a clean patch,
  which lies on a low-dimensional set (the JiT argument: Li & He, "Back to Basics", 2025). Sampling
  is the Euler flow ODE (``sampler = "euler"``, engine/sampler.py).
* **Text encoder** — ``UMT5EncoderModel`` d_model 32, 2 layers, a word-level tokenizer over
  ``VOCABULARY``, 32 tokens; random init, frozen (each word its own random features).
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slotgen.atomic import atomic_output, atomic_write_bytes
from slotgen.errors import ModelError
from slotgen.models.bundle import ModelBundle, ModelSettings, state_digest

ASSET_DIR = "assets/miniature"

# The miniature's vocabulary: the caption grammar of the synthetic world (see README, "Prompts for the
# miniature"). Words outside it map to [UNK] and the engine warns about them.
SPECIAL_TOKENS = ["[PAD]", "</s>", "[UNK]"]
VOCABULARY = (
    # articles, glue
    "a an the and on from to of in with then again back"
    # colours
    " red green blue yellow white purple orange black gray"
    # shapes
    " circle square triangle star"
    # actions
    " enters leaves moves stays returns comes goes waits out frame"
    # directions / places
    " left right up down top bottom center middle background"
    # counts
    " two one another other second first"
    # the reduced world's lanes and trait introductions (slotgen.world.REDUCED_WORLD)
    " lane large small dot stripe cyan pink"
).split()

TRANSFORMER_CONFIG = dict(
    patch_size=[1, 4, 4],
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=48,
    out_channels=48,
    text_dim=32,
    freq_dim=32,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# Wan2.2-style patchify (4×4 pixels → 48 channels), one level, no down-sampling in time: an exact code
# (make_exact_vae). Training stores the data's per-channel statistics in latents_mean/latents_std, so the
# engine's normalised latents have unit variance.
VAE_CONFIG = dict(base_dim=52, z_dim=48, dim_mult=[1], num_res_blocks=1, temperal_downsample=[], in_channels=48,
                  out_channels=48, patch_size=4, scale_factor_temporal=1, scale_factor_spatial=4,
                  latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
TEXT_CONFIG = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
SETTINGS = ModelSettings(steps=12, shift=3.0, sampler="euler", prediction="sample", chunk_frames=3, fps=16,
                         resolution=(64, 64), text_len=32, vae_stride_t=1, vae_stride_s=4)


# Constants of the exact VAE (make_exact_vae): channel offset, constant channel, RMS-norm gain.
_OFFSET, _CONST, _GAIN = 20.0, 1.0e4, 2.0e3


@torch.no_grad()
def make_exact_vae(vae) -> None:
    """Set an ``AutoencoderKLWan`` of :data:`VAE_CONFIG`'s shape to an exact code, in place.

    With ``patch_size`` p the class itself rearranges each p×p pixel block into channels before the
    encoder and back after the decoder (Wan2.2's patchify), so a code that maps those ``C = 3p²``
    channels to the ``z_dim = C`` latent channels and back loses nothing. Encoder and decoder are the
    same chain: ``conv_in`` → residual block(s) → mid block (attention) → ``norm_out`` (RMS over the D =
    ``base_dim`` channels) → SiLU → ``conv_out``. The construction:

    * ``conv_in`` (current frame, centre tap only) maps the C values ``p`` to channels ``[p + O, K, 0…]``:
      shifted by O = 20, plus a constant channel K = 10⁴;
    * every residual block's ``conv2`` and the attention's ``proj`` are zero, so each block is the
      identity (its residual branch adds exactly 0);
    * ``norm_out`` divides by the channel norm ``‖[p + O, K]‖`` ≈ K (it varies with p by ~1e-5 relative)
      and multiplies by √D · G with G = 2000: every channel lands near 28, where SiLU is the identity to 1e-12;
    * ``conv_out`` takes ``a · (channel_c − (O/K) · constant)``, which removes the offset *with the same
      normaliser* ``s = √D·G/‖·‖``: ``a · s · p_c``, and ``a = ‖[O…, K]‖ / (√D·G)`` makes it ``p_c``. The
      encoder's log-variance channels are a constant −30 (a deterministic code).

    ``quant_conv``/``post_quant_conv`` are identities. Every tap is the current frame, so the code is
    causal and streaming-exact by construction; the decoder's clamp to [−1, 1] is the stock one.
    """
    C, D = vae.config.z_dim, vae.config.base_dim
    if not (vae.config.in_channels == vae.config.out_channels == C and D > C):
        raise ValueError(f"an exact code needs in_channels = out_channels = z_dim < base_dim, got "
                         f"{vae.config.in_channels}/{vae.config.out_channels}/{C}/{D}")
    a = math.sqrt(_CONST**2 + C * _OFFSET**2) / (math.sqrt(D) * _GAIN)
    for p in vae.parameters():
        p.zero_()
    for coder in (vae.encoder, vae.decoder):
        for m in coder.modules():
            if hasattr(m, "gamma") and isinstance(m.gamma, torch.nn.Parameter):
                m.gamma.fill_(1.0)  # RMS norms inside the (zeroed) residual branches: harmless
        conv_in, conv_out = coder.conv_in, coder.conv_out
        for c in range(C):
            conv_in.weight[c, c, -1, 1, 1] = 1.0  # (out, in, t, h, w): current frame, centre tap
            conv_in.bias[c] = _OFFSET
            conv_out.weight[c, c, -1, 1, 1] = a
            conv_out.weight[c, C, -1, 1, 1] = -a * _OFFSET / _CONST
        conv_in.bias[C] = _CONST
        coder.norm_out.gamma.fill_(_GAIN)
    vae.encoder.conv_out.bias[C:] = -30.0  # log-variance: std e^-15, a deterministic code
    vae.quant_conv.weight[:, :, 0, 0, 0] = torch.eye(2 * C)
    vae.post_quant_conv.weight[:, :, 0, 0, 0] = torch.eye(C)


def build_tokenizer(vocabulary: list[str]):
    """A word-level tokenizer (lower-cased, split on whitespace and punctuation) as a HF fast tokenizer."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(vocabulary)))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("removed")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]")


def build_modules(config: dict):
    """Instantiate the three modules from a config dict (random init under the current torch seed; the
    miniature's VAE is then set exact by the caller, :func:`make_exact_vae`)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    transformer = WanTransformer3DModel(**config["transformer"])
    vae = AutoencoderKLWan(**config["vae"])
    text_cfg = dict(config["text_encoder"])
    text_encoder = UMT5EncoderModel(UMT5Config(**text_cfg))
    for m in (transformer, vae, text_encoder):
        m.eval().requires_grad_(False)
    return transformer, vae, text_encoder


def _asset_path(directory: str | Path | None) -> Path:
    if directory is not None:
        return Path(directory)
    return Path(str(resources.files("slotgen.models").joinpath(ASSET_DIR)))


def load_miniature(directory: str | Path | None = None, device: str | torch.device = "cpu") -> ModelBundle:
    """Load the embedded miniature (or a miniature-format folder) from safetensors; nothing is fetched."""
    from transformers import PreTrainedTokenizerFast

    root = _asset_path(directory)
    for name in ("config.json", "tokenizer.json", "weights.safetensors"):
        if not (root / name).is_file():
            raise ModelError(f"miniature model folder {root} lacks {name}")
    config = json.loads((root / "config.json").read_text())
    with torch.device("meta"):
        transformer, vae, text_encoder = build_modules(config)
    tensors = load_file(str(root / "weights.safetensors"))
    for prefix, module in (("transformer.", transformer), ("vae.", vae), ("text_encoder.", text_encoder)):
        sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
        # UMT5 ties encoder.embed_tokens to shared: both names are stored, none may be missing.
        if missing or unexpected:
            raise ModelError(f"{root / 'weights.safetensors'}: {prefix[:-1]} weights do not match its config "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    # Non-persistent buffers (RoPE tables) were created on the meta device: rebuild them for real.
    transformer.rope.__init__(
        transformer.config.attention_head_dim, transformer.config.patch_size, transformer.config.rope_max_seq_len
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), pad_token="[PAD]",
                                        eos_token="</s>", unk_token="[UNK]")
    settings = ModelSettings.from_dict(config.get("settings", {}))
    from slotgen.memory.slot_attention import LinearPhi

    phi_state = {k: v for k, v in tensors.items() if k.startswith("slot_phi.")}
    slot_phi = LinearPhi.from_state_dict(phi_state, len(transformer.blocks)) if phi_state else None
    if phi_state and slot_phi is None:
        raise ModelError(f"{root / 'weights.safetensors'}: slot_phi weights must cover all {len(transformer.blocks)} layers")
    vocab = frozenset(t for t in tokenizer.get_vocab() if t not in SPECIAL_TOKENS)
    bundle = ModelBundle(
        name=config.get("name", "miniature"),
        transformer=transformer.to(device),
        vae=vae.to(device),
        text_encoder=text_encoder.to(device),
        tokenizer=tokenizer,
        settings=settings,
        digest=state_digest(transformer, vae, text_encoder, extra=phi_state or None),
        vocabulary=vocab,
        slot_phi=slot_phi,
    )
    if directory is not None:  # a folder's own slot_phi.safetensors (slotgen train-slots) is its slot projection
        from slotgen.memory.phi_file import attach_phi

        bundle = attach_phi(bundle, folder=root)
    return bundle


def write_miniature(out_dir: str | Path, seed: int = 0, modules=None, name: str = "miniature", extra: dict | None = None,
                    slot_phi: dict[str, torch.Tensor] | None = None, tokenizer=None,
                    vocabulary: list[str] | None = None) -> Path:
    """Write a miniature folder: config.json, tokenizer.json, weights.safetensors.

    With ``modules=None`` the modules are randomly initialised under ``torch.manual_seed(seed)``.
    ``slot_phi``: weights-file entries of a learned slot projection (``slotgen.train.slots.phi_tensors``).
    ``tokenizer``: the one the text encoder in ``modules`` was trained with (default: a new one over
    ``vocabulary``, itself :data:`VOCABULARY` unless given: a model trained on the sprite world adds that
    world's words); its size must be the text encoder's vocabulary size, or a render would index past the
    embedding table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tokenizer(VOCABULARY if vocabulary is None else vocabulary)
    if modules is not None and modules[2].config.vocab_size != len(tokenizer.get_vocab()):
        raise ValueError(f"the text encoder has {modules[2].config.vocab_size} token rows but the tokenizer "
                         f"{len(tokenizer.get_vocab())} words; pass the tokenizer it was trained with")
    config = {
        "name": name,
        "transformer": TRANSFORMER_CONFIG,
        "vae": VAE_CONFIG,
        "text_encoder": {**TEXT_CONFIG, "vocab_size": len(tokenizer.get_vocab())},
        "settings": SETTINGS.to_dict(),
        **(extra or {}),
    }
    if modules is None:
        torch.manual_seed(seed)
        modules = build_modules(config)
        make_exact_vae(modules[1])
    transformer, vae, text_encoder = modules
    tensors = {}
    for prefix, module in (("transformer.", transformer), ("vae.", vae), ("text_encoder.", text_encoder)):
        for k, v in module.state_dict().items():
            tensors[prefix + k] = v.detach().to("cpu", torch.float32).contiguous().clone()
    tensors.update(slot_phi or {})
    config["digest"] = state_digest(transformer, vae, text_encoder, extra=slot_phi or None)
    # each file lands atomically (weights first, config last: a reader never sees a config whose digest
    # names weights that are not there yet)
    with atomic_output(out / "weights.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with atomic_output(out / "tokenizer.json") as tmp:
        tokenizer.backend_tokenizer.save(str(tmp))
    atomic_write_bytes(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return out
