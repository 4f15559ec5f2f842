"""What the engine needs from a model: the three diffusers/transformers modules plus its settings.

A :class:`ModelBundle` is built by a loader (`slotgen.models.load_model`): the embedded miniature, or
a local Wan2.1 folder. The engine never cares which.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import torch


RETIRED_SETTINGS = ("window", "sink")
"""Keys older model settings carried (memory defaults that nothing read): older snapshots, slotgen.json files
and miniature configs may hold them; they are ignored (a storyboard's ``memory:`` section sets them)."""


@dataclass(frozen=True)
class ModelSettings:
    """Sampling and geometry defaults that come with a model (a storyboard may override some)."""

    steps: int = 4  # few-step Self-Forcing schedule: timesteps 1000·(1 - i/steps)
    shift: float = 5.0  # sigma warp σ' = shift·σ / (1 + (shift - 1)·σ)
    sampler: str = "self_forcing"  # or "euler": the flow ODE (engine/sampler.py)
    prediction: str = "flow"  # what the transformer outputs: "flow" v = ε − x0 (Wan) or "sample" x0
    chunk_frames: int = 3  # latent frames generated per chunk
    fps: int = 16
    resolution: tuple[int, int] = (64, 64)  # (width, height) default
    text_len: int = 32  # tokens per prompt (Wan: 512); padding rows are zeroed
    vae_stride_t: int = 4  # T latent frames <-> 1 + 4(T - 1) video frames
    vae_stride_s: int = 8  # pixels per latent cell
    preset: str = "slotgen"  # attention preset the weights were trained with (engine/presets.py)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resolution"] = list(self.resolution)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSettings":
        d = dict(d)
        if "resolution" in d:
            d["resolution"] = tuple(d["resolution"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def __post_init__(self) -> None:
        from slotgen.engine.sampler import PREDICTIONS, SAMPLERS

        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        from slotgen.engine.presets import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")


@dataclass
class ModelBundle:
    """A loaded text-to-video stack ready for the engine."""

    name: str
    transformer: torch.nn.Module  # diffusers WanTransformer3DModel
    vae: torch.nn.Module  # diffusers AutoencoderKLWan
    text_encoder: torch.nn.Module  # transformers UMT5EncoderModel
    tokenizer: object  # transformers PreTrainedTokenizerFast (or any HF tokenizer)
    settings: ModelSettings
    digest: str = ""  # identity of the weights (sha256 over the state dicts), for snapshots
    vocabulary: frozenset[str] | None = field(default=None)  # known words (word-level tokenizers)
    slot_phi: object | None = None  # a learned slot projection (memory.slot_attention.LinearPhi) shipped with the weights
    slot_phi_source: str | None = None  # where slot_phi came from: a slot_phi.safetensors path, None = the weights

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    @property
    def stride(self) -> int:
        """Pixels per transformer token side: VAE stride × patch size (16 for Wan2.1)."""
        return self.settings.vae_stride_s * self.patch_size[1]

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype


def state_digest(*modules: torch.nn.Module, extra: dict[str, torch.Tensor] | None = None) -> str:
    """A sha256 over every tensor of the modules' state dicts (names, shapes, dtypes and bytes), then of
    ``extra`` (named tensors outside the modules, such as a learned slot projection)."""
    h = hashlib.sha256()
    for sd in [m.state_dict() for m in modules] + ([extra] if extra else []):
        for name, t in sorted(sd.items()):
            t = t.detach().to("cpu").contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
