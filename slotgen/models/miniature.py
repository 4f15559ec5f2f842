"""The embedded miniature: the real Wan stack (diffusers + transformers classes) at toy size.

Everything is built from ``assets/miniature/config.json`` and loaded from ``weights.safetensors`` in
the package, so rendering works offline on any laptop. The weights file is produced by
``python -m slotgen.models.miniature --out slotgen/models/assets/miniature`` (random init with a fixed
seed); a trained miniature replaces the file without changing this loading path. The committed folder
is still the random init of the session-2 configuration (dim-64 transformer, 2 MB): the configs below
(dim 256, 16 MB) are written once a trained model is shipped (docs/MINIATURE.md).

Sizes (64×64 video, 16 fps): VAE 4× spatial / 4× temporal, z_dim 16 → 16×16×16 latents → patch 4 → 4×4 = 16
tokens per latent frame (each token covers 16×16 pixels, as in Wan2.1's 8× VAE + patch 2); transformer
dim 256 (4 heads × 64), 4 layers; UMT5 encoder d_model 32, 32 text tokens. The miniature compresses 4×
in space, not 8× like Wan: an 8× VAE this small did not learn to draw the world's entities within the
training budget (see docs/MINIATURE.md), while the token grid, and so the whole engine and memory, is
the same. The transformer is as wide as a token's patch (16·4·4 = 256 values): a flow-matching model has
to carry the noise of every patch value through its residual stream, and a dim-64 transformer on
256-value patches (the session-2 miniature) never got below flow MSE ≈ 1 and drew noise.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
).split()

TRANSFORMER_CONFIG = dict(
    patch_size=[1, 4, 4],
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                  latents_mean=[0.0] * 16, latents_std=[1.0] * 16)  # training replaces the latent statistics
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
SETTINGS = ModelSettings(steps=4, shift=5.0, chunk_frames=3, fps=16, resolution=(64, 64), text_len=32, vae_stride_s=4)


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
    """Instantiate the three modules from a config dict (random init under the current torch seed)."""
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
    vocab = frozenset(t for t in tokenizer.get_vocab() if t not in SPECIAL_TOKENS)
    bundle = ModelBundle(
        name=config.get("name", "miniature"),
        transformer=transformer.to(device),
        vae=vae.to(device),
        text_encoder=text_encoder.to(device),
        tokenizer=tokenizer,
        settings=settings,
        digest=state_digest(transformer, vae, text_encoder),
        vocabulary=vocab,
    )
    return bundle


def write_miniature(out_dir: str | Path, seed: int = 0, modules=None, name: str = "miniature", extra: dict | None = None) -> Path:
    """Write a miniature folder: config.json, tokenizer.json, weights.safetensors.

    With ``modules=None`` the modules are randomly initialised under ``torch.manual_seed(seed)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(VOCABULARY)
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
    transformer, vae, text_encoder = modules
    tensors = {}
    for prefix, module in (("transformer.", transformer), ("vae.", vae), ("text_encoder.", text_encoder)):
        for k, v in module.state_dict().items():
            tensors[prefix + k] = v.detach().to("cpu", torch.float32).contiguous().clone()
    config["digest"] = state_digest(transformer, vae, text_encoder)
    save_file(tensors, str(out / "weights.safetensors"))
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the miniature model folder (random init, fixed seed).")
    parser.add_argument("--out", default=str(Path(__file__).parent / ASSET_DIR))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_miniature(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
