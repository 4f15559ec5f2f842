"""Train the embedded miniature on the shape world: VAE, then the causal chunk transformer.

Stages (see docs/MINIATURE.md for the model card):

a. **VAE** – ``AutoencoderKLWan`` with the miniature config, trained on short world clips (5-frame
   entity-centred crops tiled into mosaics; every third step whole 17-frame clips) with pixel-weighted
   L1 + MSE reconstruction and a tiny KL term. Afterwards the per-channel
   mean/std of the posterior means over the dataset are stored as ``latents_mean``/``latents_std`` in
   the VAE config, so the engine's normalised latent space has roughly unit variance.
b. **VAE on warm caches** (optional, ``warm_steps``) – 8 frames after a 1–49-frame warm-up that fills the
   causal caches under no_grad, so long videos do not drift; with ``warm_encoder=False`` only the decoder
   (the latents stay those of stage a). The **text encoder** (miniature UMT5) stays randomly initialised
   and frozen: each vocabulary word has its own random embedding, and the transformer learns to read
   those features.
c. **Transformer** – the engine's causal chunk objective. Episodes are encoded once to normalised
   latents. A training sequence is ``[relocated context ; clean chunks s..s+n-1 ; noisy chunks]``:
   the clean half is the committed past (timestep 0), the noisy half holds every chunk j again,
   flow-matching noised at σ_j drawn from the engine's warped schedule (1, .9375, .8333, .625) or, now
   and then, uniformly. A block-causal mask lets clean chunk i see the relocated context and clean
   chunks ≤ i; noisy chunk j sees the relocated context, clean chunks < j and itself — exactly what
   the engine's streaming attention shows chunk j. Noisy chunk j has the temporal RoPE positions of
   clean chunk j. The relocated context (optional per sample) is an earlier chunk placed right before
   the clip, as sink/bank/slot memory hands it back; a random subset of its tokens is dropped by the
   mask (sparse, slot-like retrieval). Every chunk is conditioned on the caption in force at its first
   video frame (the engine's switch rule); the loss is MSE on the flow ``v = ε − x0`` of the noisy
   tokens, weighted up on the latent cells an entity touches.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from slotgen.errors import SlotgenError

SCHEDULE_SIGMAS = (1.0, 0.9375, 0.8333333, 0.625)  # FlowSchedule(4, 5.0).sigmas()
CHUNK = 3  # latent frames per chunk
STRIDE_T = 4
PATCH = 4  # transformer patch side (TRANSFORMER_CONFIG patch_size (1, 4, 4)); checked in train_miniature


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the model card)."""

    minutes: float = 50.0  # wall-clock budget of both stages (used when step counts are not given)
    seed: int = 0
    steps_vae: Optional[int] = None  # explicit step counts make a run exactly reproducible
    steps_dit: Optional[int] = None
    vae_fraction: float = 0.4  # share of the budget for the VAE
    episodes: int = 128  # world episodes in the dataset
    max_gap: int = 24  # longest absence gap (video frames) of a training episode; longer absences are
    # trained through relocated context (an earlier chunk placed right before the clip)
    vae_batch: int = 24
    vae_frames: int = 5
    vae_crop: Optional[int] = 32  # entity-centred crops for the short clips (long clips stay whole frames),
    vae_mosaic: int = 2  # tiled 2×2 into 64×64 mosaics (vae_batch counts crops)
    vae_long_every: int = 3  # every n-th VAE step uses long clips instead (caches across several chunks:
    vae_long_frames: int = 17  # 5-frame clips alone left long videos drifting, held-out L1 0.35)
    vae_long_batch: int = 2
    vae_warm_frames: int = 0  # 1 + 4k > 0: the long steps instead train 8 frames that follow this many warm-up
    # frames (caches filled under no_grad: warm_cache_reconstruct), i.e. frames deep inside a video.
    # 0 (the default, as in the recorded runs) = off. The recorded 4× VAE drifts past its 17-frame clips.
    vae_lr: float = 2e-3
    vae_noise: Optional[float] = 0.0  # None: sample the posterior; a number: z = mean + noise · N(0, 1). Posterior
    # sampling (std ≈ 1 early on, as the KL weight is tiny) drowned the entities in noise: a deterministic code
    kl_weight: float = 1e-6
    vae_entity_weight: float = 4.0  # extra reconstruction weight on entity pixels (world label maps): entities
    vae_marking_weight: float = 10.0  # cover ~5 % of a frame, and an unweighted loss reconstructed only the
    # background (2026-11-25 run: 0 % entity presence); markings (the hidden traits) get more still
    warm_steps: int = 0  # stage b: fine-tune the VAE on frames deep inside videos: each step reconstructs 8 frames
    # after a warm-up of warm_lengths frames (one of, drawn per step; 1 ≈ a cold start) that fills the causal
    # caches under no_grad. Stage a's clips (≤ 17 frames, empty caches) left long videos drifting in colour.
    warm_lengths: tuple[int, ...] = (1, 17, 33, 49)
    warm_encoder: bool = True  # False: decoder only (encoder frozen: latents, and so the transformer, unchanged)
    warm_lr: float = 5e-4
    vae_from: Optional[str] = None  # a trained miniature folder whose VAE (and latent statistics) to reuse:
    # stage a is skipped. Every stage draws from its own seeded streams, so a run with vae_from = the output
    # of a run with the same seed and VAE settings trains the transformer exactly as that run did.
    dit_batch: int = 8
    dit_entity_weight: float = 4.0  # extra flow-loss weight on latent cells an entity touches (~10 % of cells)
    dit_lr: float = 1e-3
    clip_chunks: int = 4  # chunks per training clip (12 latent frames)
    relocate_prob: float = 0.5  # chance a sample gets an earlier chunk as relocated context
    token_drop: float = 0.5  # max fraction of relocated-context tokens dropped (sparse retrieval)
    uniform_sigma_prob: float = 0.4  # σ ~ U(0.02, 1) instead of the schedule: also fits longer sampler schedules
    threads: int = 1  # 1 thread: on a shared 2-core machine OpenMP spin contention makes 2 threads ~5x slower
    device: str = "cpu"  # where the modules and batches live ("cuda", "cuda:1", ...). Data, batch sampling and
    # every random draw stay on the CPU (seeded CPU generators), so a batch is the same on any device; only the
    # arithmetic moves. CUDA kernels are not bit-reproducible run to run, so GPU runs repeat closely, not exactly.

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Reject settings a run would only trip over later (after a long stage), with the CLI flag named."""
        if self.threads < 1:
            raise SlotgenError(f"--threads must be at least 1, got {self.threads}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise SlotgenError(f"--device: expected cpu, cuda or cuda:N, got {self.device!r}") from None
        if dev.type not in ("cpu", "cuda"):
            raise SlotgenError(f"--device: expected cpu, cuda or cuda:N, got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SlotgenError(f"--device {self.device}: this torch build sees no CUDA device "
                               f"(torch {torch.__version__}, cuda available: False)")
        for name, v in (("--vae-batch", self.vae_batch), ("--dit-batch", self.dit_batch)):
            if v < 1:
                raise SlotgenError(f"{name} must be at least 1, got {v}")
        if self.vae_warm_frames < 0 or (self.vae_warm_frames and (self.vae_warm_frames - 1) % 4):
            raise SlotgenError(f"--vae-warm-frames must be 0 or 1 + 4k (e.g. 33, 49), got {self.vae_warm_frames}")
        if self.warm_steps < 0:
            raise SlotgenError(f"--warm-steps must be 0 or more, got {self.warm_steps}")
        bad = [w for w in self.warm_lengths if w < 1 or (w - 1) % 4]
        if self.warm_steps and (bad or not self.warm_lengths):
            raise SlotgenError(f"warm-up lengths must be 1 + 4k, got {list(self.warm_lengths)}")


@dataclass
class TrainResult:
    out: Path
    vae_losses: list[float] = field(default_factory=list)
    warm_losses: list[float] = field(default_factory=list)
    warm_steps: int = 0
    warm_seconds: float = 0.0
    dit_losses: list[float] = field(default_factory=list)
    vae_steps: int = 0
    dit_steps: int = 0
    vae_seconds: float = 0.0
    dit_seconds: float = 0.0
    data_seconds: float = 0.0
    latents_mean: list[float] = field(default_factory=list)
    latents_std: list[float] = field(default_factory=list)
    recon_l1: float = float("nan")  # mean |x − x̂| (0–1 scale) of the final VAE on held-out clips
    vae_eval: tuple[float, float] = (float("nan"), float("nan"))  # loss on a fixed batch before / after
    dit_eval: tuple[float, float] = (float("nan"), float("nan"))


# ------------------------------------------------------------------------------------------------
# Data


@dataclass
class WorldClip:
    """One rendered episode: frames in [-1, 1] as (3, T, H, W) float16 and a caption per chunk."""

    frames: torch.Tensor
    chunk_captions: list[str]
    pixel_class: Optional[torch.Tensor] = None  # (1, T, H, W) uint8: 0 background, 1 entity, 2 marking
    latents: Optional[torch.Tensor] = None  # (z, L, h, w) normalised, filled after the VAE stage
    entity_cells: Optional[torch.Tensor] = None  # (L, H/4, W/4) bool: latent cells an entity touches


def latent_entity_cells(pixel_class: torch.Tensor, stride_t: int = STRIDE_T, stride_s: int = 4) -> torch.Tensor:
    """(1, T, H, W) pixel classes → (L, H/s, W/s) bool: the latent cells whose video frames (1 for the
    first latent frame, 4 for each later one) show an entity pixel, dilated by one cell (edges, motion)."""
    m = (pixel_class[0] > 0).float()  # (T, H, W)
    T = m.shape[0]
    groups = [m[:1]] + [m[1 + stride_t * i : 1 + stride_t * (i + 1)] for i in range((T - 1) // stride_t)]
    g = torch.stack([x.amax(0) for x in groups])[:, None]  # (L, 1, H, W)
    cells = F.max_pool2d(g, stride_s)  # (L, 1, H/s, W/s)
    return F.max_pool2d(cells, 3, 1, 1)[:, 0] > 0


def chunk_first_frame(chunk: int) -> int:
    return 0 if chunk == 0 else 1 + STRIDE_T * (CHUNK - 1) + STRIDE_T * CHUNK * (chunk - 1)


def random_episode(rng: np.random.Generator, seed: int, max_gap: int):
    from slotgen.world import exit_return_episode

    gaps = [g for g in (0, 12, 24, 36, 48, 60, 72, 96) if g <= max_gap]
    gap = int(rng.choice(gaps))
    n = int(rng.choice([1, 1, 2, 2, 3]))
    similar = n >= 2 and rng.random() < 0.35
    return exit_return_episode(seed=seed, gap_frames=gap, n_entities=n, similar=similar)


def build_dataset(n: int, seed: int, max_gap: int) -> list[WorldClip]:
    from slotgen.world import render_episode
    from slotgen.world.grammar import episode_prompts
    from slotgen.world.scene import MARKING_COLOURS

    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        ep = random_episode(rng, seed * 100_000 + i, max_gap)
        rendered = render_episode(ep)
        frames = torch.from_numpy(rendered.frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0).half()
        T = frames.shape[1]
        marking = np.zeros(rendered.truth.labels.shape, dtype=bool)
        for rgb in MARKING_COLOURS.values():
            marking |= (rendered.frames == np.asarray(rgb, np.uint8)).all(-1)
        pixel_class = np.where(marking, 2, (rendered.truth.labels > 0).astype(np.uint8)).astype(np.uint8)
        cues = episode_prompts(ep)
        L = 1 + (T - 1) // STRIDE_T
        captions = []
        for c in range(L // CHUNK):
            f0 = chunk_first_frame(c)
            captions.append(next(cue.text for cue in cues if cue.start <= f0 < cue.end))
        pixel_class = torch.from_numpy(pixel_class)[None]
        clips.append(WorldClip(frames, captions, pixel_class, entity_cells=latent_entity_cells(pixel_class)))
    return clips


# ------------------------------------------------------------------------------------------------
# Attention with a mask and explicit RoPE positions (stock Wan processor, no fork)


class TrainState:
    """Shared by every layer's processor for one forward: boolean mask and RoPE tables."""

    mask: Optional[torch.Tensor] = None  # (B, 1, N, N) True = may attend
    cross_mask: Optional[torch.Tensor] = None  # (B, 1, N, L_text) True = may attend
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # cos, sin (1, N, 1, D)


class MaskedRopeProcessor(WanAttnProcessor):
    """diffusers' ``WanAttnProcessor`` with an attention mask and engine-style RoPE positions."""

    def __init__(self, state: TrainState):
        super().__init__()
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, None, self.state.mask, self.state.rotary)


class MaskedCrossProcessor(WanAttnProcessor):
    """Cross-attention where each token reads only its own chunk's caption block (one text per chunk)."""

    def __init__(self, state: TrainState):
        super().__init__()
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.state.cross_mask, None)


def install_training_processors(transformer) -> TrainState:
    state = TrainState()
    procs = {}
    for i in range(len(transformer.blocks)):
        procs[f"blocks.{i}.attn1.processor"] = MaskedRopeProcessor(state)
        procs[f"blocks.{i}.attn2.processor"] = MaskedCrossProcessor(state)
    transformer.set_attn_processor(procs)
    return state


# ------------------------------------------------------------------------------------------------
# Stage a: VAE


def vae_batch(clips: list[WorldClip], rng: np.random.Generator, batch: int, frames: int,
              class_weights: tuple[float, float, float] = (1.0, 1.0, 1.0), crop: Optional[int] = None,
              mosaic: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``frames`` frames: pixels (B, 3, frames, S, S) and per-pixel loss weights
    (B, 1, frames, S, S) looked up from each pixel's class (background, entity, marking).

    With ``crop`` the window is a ``crop × crop`` square placed around a random entity visible in the
    window's middle frame (jittered so the entity lands anywhere in the crop, partly cut included), or
    anywhere when no entity is visible. The VAE is convolutional (its mid-block attention has no position
    code), so crops train the same weights; entity-centred crops put ~6× more entity pixels into each
    step than whole frames, where entities cover ~5 % of the pixels. With ``mosaic = g`` every g×g crops
    are tiled into one frame-sized mosaic (``batch`` counts crops), so the VAE's mid-block attention
    sees as many positions as on whole frames (crops alone taught it a colour shift on whole frames).
    """
    table = torch.tensor(class_weights)
    if crop is not None and mosaic:
        batch = -(-batch // mosaic**2) * mosaic**2  # whole mosaics
    out, weights = [], []
    for _ in range(batch):
        clip = clips[int(rng.integers(len(clips)))]
        _, T, H, W = clip.frames.shape
        s = int(rng.integers(0, T - frames + 1))
        y0 = x0 = 0
        size_y, size_x = H, W
        if crop is not None and crop < min(H, W):
            size_y = size_x = crop
            y0, x0 = _entity_crop(clip, s + frames // 2, crop, rng)
        window = (slice(None), slice(s, s + frames), slice(y0, y0 + size_y), slice(x0, x0 + size_x))
        out.append(clip.frames[window].float())
        if clip.pixel_class is None:
            weights.append(torch.ones(1, frames, size_y, size_x))
        else:
            weights.append(table[clip.pixel_class[window].long()])
    x, wts = torch.stack(out), torch.stack(weights)
    if crop is not None and mosaic:
        x, wts = _tile(x, mosaic), _tile(wts, mosaic)
    return x, wts


def _entity_crop(clip: WorldClip, frame: int, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a crop around a random entity pixel of ``frame`` (jittered), or anywhere."""
    _, _, H, W = clip.frames.shape
    ys = xs = np.empty(0)
    if clip.pixel_class is not None:
        ys, xs = np.nonzero(clip.pixel_class[0, frame].numpy())
    if len(ys) == 0:
        return int(rng.integers(0, H - crop + 1)), int(rng.integers(0, W - crop + 1))
    k = int(rng.integers(len(ys)))  # a random entity pixel: larger entities are picked more often
    cy = int(ys[k]) + int(rng.integers(-crop // 3, crop // 3 + 1))
    cx = int(xs[k]) + int(rng.integers(-crop // 3, crop // 3 + 1))
    return int(np.clip(cy - crop // 2, 0, H - crop)), int(np.clip(cx - crop // 2, 0, W - crop))


def _tile(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B·grid², C, T, s, s) → (B, C, T, grid·s, grid·s): crops laid out row by row into mosaics."""
    n, C, T, s, _ = x.shape
    x = x.reshape(n // grid**2, grid, grid, C, T, s, s)  # (B, gy, gx, C, T, s, s)
    return x.permute(0, 3, 4, 1, 5, 2, 6).reshape(n // grid**2, C, T, grid * s, grid * s)


def vae_loss(vae, x: torch.Tensor, weights: torch.Tensor, kl_weight: float, generator: torch.Generator,
             noise: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    """Weighted L1 + MSE reconstruction (weights (B, 1, T, H, W) broadcast over RGB) + kl_weight · KL."""
    posterior = vae.encode(x).latent_dist
    scale = posterior.std if noise is None else noise
    z = posterior.mean + scale * torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return _weighted_loss(_decode_train(vae, z) - x, weights, kl, kl_weight)


def _weighted_loss(err: torch.Tensor, weights: torch.Tensor, kl: torch.Tensor, kl_weight: float
                   ) -> tuple[torch.Tensor, dict]:
    """Pixel-weighted mean L1 + MSE of ``err`` (B, 3, T, H, W) with weights (B, 1, T, H, W), + kl_weight · kl."""
    norm = weights.sum() * err.shape[1]
    rec_l1 = (err.abs() * weights).sum() / norm
    rec_mse = (err.pow(2) * weights).sum() / norm
    loss = rec_l1 + rec_mse + kl_weight * kl
    return loss, {"l1": rec_l1.item(), "mse": rec_mse.item(), "kl": kl.item(), "plain_l1": err.abs().mean().item()}


def _decode_train(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae._decode`` without the final clamp (so gradients flow everywhere)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(i == 0)))
    vae.clear_cache()
    return torch.cat(outs, dim=2)


def warm_vae_loss(vae, warm: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, kl_weight: float
                  ) -> tuple[torch.Tensor, dict]:
    """:func:`vae_loss` for frames after a warm-up (deterministic code; the KL term reduces to 0.5·μ²)."""
    x_hat, mu = warm_cache_reconstruct(vae, warm, x)
    return _weighted_loss(x_hat - x, weights, 0.5 * mu.pow(2).mean(), kl_weight)


def warm_cache_reconstruct(vae, warm: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct ``x`` as frames that come *after* ``warm`` in one causal video: (x̂, posterior means).

    ``warm`` (B, 3, 1 + 4k, H, W) runs through encoder and decoder under ``no_grad`` only to fill their
    causal caches; ``x`` (B, 3, 4m, H, W) then runs with gradients, continuing those caches (truncated
    backprop through time). x̂ equals the last 4m frames of encoding and decoding ``cat(warm, x)`` in
    one pass (tested), so training sees the cache states of frames deep inside a video — which plain
    clips, always starting from an empty cache, never show (the drift recorded in docs/MINIATURE.md).
    """
    assert (warm.shape[2] - 1) % 4 == 0 and x.shape[2] % 4 == 0, (warm.shape, x.shape)
    vae.clear_cache()

    def encode_group(frames: torch.Tensor) -> torch.Tensor:
        vae._enc_conv_idx = [0]
        return vae.encoder(frames, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx)

    def decode_frame(z_frame: torch.Tensor, first: bool) -> torch.Tensor:
        vae._conv_idx = [0]
        return vae.decoder(z_frame, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=first)

    with torch.no_grad():  # warm-up: fill encoder caches, then decoder caches with the warm latents
        enc = [encode_group(warm[:, :, :1])]
        enc += [encode_group(warm[:, :, 1 + 4 * i : 5 + 4 * i]) for i in range((warm.shape[2] - 1) // 4)]
        warm_mu = vae.quant_conv(torch.cat(enc, 2)).chunk(2, dim=1)[0]  # (B, z, 1 + k, h, w)
        warm_z = vae.post_quant_conv(warm_mu)
        for i in range(warm_z.shape[2]):
            decode_frame(warm_z[:, :, i : i + 1], i == 0)
    enc = torch.cat([encode_group(x[:, :, 4 * i : 4 * i + 4]) for i in range(x.shape[2] // 4)], 2)
    mu = vae.quant_conv(enc).chunk(2, dim=1)[0]  # (B, z, m, h, w)
    z = vae.post_quant_conv(mu)
    out = torch.cat([decode_frame(z[:, :, i : i + 1], False) for i in range(z.shape[2])], 2)
    vae.clear_cache()
    return out, mu


def finetune_warm(vae, clips: list[WorldClip], cfg: TrainConfig, class_weights: tuple[float, float, float],
                  rng: np.random.Generator, log: Callable[[str], None] = print) -> list[float]:
    """Stage b: train the VAE (or, with ``warm_encoder=False``, only ``post_quant_conv`` + decoder) on frames
    that follow a warm-up of the causal caches.

    Stage a trains on clips of ≤ 17 frames that start from empty caches, but a causal encoder/decoder
    streaming a long video runs on caches filled by everything before: states stage a never shows (the
    recorded 4× VAE drifts in colour after 20–40 frames). Each step draws a warm-up length from
    ``cfg.warm_lengths`` and reconstructs the 8 frames after it (:func:`warm_vae_loss`, truncated
    backpropagation: the warm-up runs under no_grad).
    """
    vae.requires_grad_(False)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    if cfg.warm_encoder:
        params += list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=cfg.warm_lr, weight_decay=0.0)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.warm_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(cfg.warm_lr, step, step / cfg.warm_steps, max(1, min(50, cfg.warm_steps // 5)))
        warm = int(rng.choice(cfg.warm_lengths))
        x, wts = vae_batch(clips, rng, cfg.vae_long_batch, warm + 8, class_weights)  # (B, 3, warm + 8, H, W)
        x, wts = to_device(cfg.device, x, wts)
        loss, parts = warm_vae_loss(vae, x[:, :, :warm], x[:, :, warm:], wts[:, :, warm:], cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step == 0:
            log(f"warm-cache step {step + 1}: loss {loss.item():.4f} plain l1 {parts['plain_l1']:.4f} "
                f"(warm-up {warm} frames, {time.perf_counter() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_clip(vae, frames: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] → raw posterior means (z, L, h, w)."""
    return vae.encode(frames[None].float().to(vae.device)).latent_dist.mean[0].cpu()


@torch.no_grad()
def encode_all(vae, clips: list[WorldClip], batch: int = 8) -> list[torch.Tensor]:
    """Posterior means of every clip, batching clips of equal length (faster on CPU)."""
    out: list[Optional[torch.Tensor]] = [None] * len(clips)
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(clips):
        by_len.setdefault(c.frames.shape[1], []).append(i)
    for idx in by_len.values():
        for k in range(0, len(idx), batch):
            group = idx[k : k + batch]
            frames = torch.stack([clips[i].frames.float() for i in group]).to(vae.device)
            z = vae.encode(frames).latent_dist.mean.cpu()  # latents live on the CPU with the data
            for j, i in enumerate(group):
                out[i] = z[j]
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# Stage c: transformer


def rope_for(transformer, t: torch.Tensor, hw: torch.Tensor):
    from slotgen.engine.attention import RopeTable

    dev = transformer.rope.freqs_cos.device
    return RopeTable(transformer.rope)(t.to(dev), hw.to(dev))


def token_coords(frame_positions: list[int], th: int, tw: int) -> tuple[torch.Tensor, torch.Tensor]:
    fr = torch.tensor(frame_positions).repeat_interleave(th * tw)
    rows = torch.arange(th).repeat_interleave(tw).repeat(len(frame_positions))
    cols = torch.arange(tw).repeat(th * len(frame_positions))
    return fr, torch.stack([rows, cols], 1)


def sample_dit_batch(clips: list[WorldClip], rng: np.random.Generator, gen: torch.Generator, cfg: TrainConfig,
                     text_embeds: Callable[[str], torch.Tensor]):
    """Build one batch. Returns latents (B, C, Ftot, h, w), timesteps (B, N), masks (B, 1, N, N), the target
    flow on the noisy frames (B, C, n·CHUNK, h, w), its loss weights (B, 1, n·CHUNK, h, w: 1 + dit_entity_weight
    on cells an entity touches), the captions per chunk, RoPE coordinates and frame group ids."""
    n = cfg.clip_chunks
    B = cfg.dit_batch
    seqs = []
    h = w = None
    for _ in range(B):
        clip = clips[int(rng.integers(len(clips)))]
        lat = clip.latents  # (C, L, h, w)
        C, L, h, w = lat.shape
        n_chunks = L // CHUNK
        s = int(rng.integers(0, max(1, n_chunks - n + 1)))
        chunks = list(range(s, min(s + n, n_chunks)))
        while len(chunks) < n:  # short episodes (never with the defaults): repeat the last chunk index
            chunks.append(chunks[-1])
        reloc = None
        if s > 0 and rng.random() < cfg.relocate_prob:
            reloc = int(rng.integers(0, s))
        seqs.append((clip, chunks, reloc))
    th, tw = h // PATCH, w // PATCH
    tpf = th * tw
    R = CHUNK  # relocated frames (always reserved, masked out when absent)
    Ftot = R + 2 * n * CHUNK
    N = Ftot * tpf
    lat_batch = torch.zeros(B, C, Ftot, h, w)
    tsteps = torch.zeros(B, N)
    mask = torch.zeros(B, 1, N, N, dtype=torch.bool)
    target = torch.zeros(B, C, n * CHUNK, h, w)
    loss_w = torch.ones(B, 1, n * CHUNK, h, w)  # flow-loss weight per latent cell of the noisy frames
    # frame-level "group" ids: reloc = 0, clean chunk i = 1 + i, noisy chunk j = 1 + n + j
    grp = torch.tensor([0] * R + [1 + i for i in range(n) for _ in range(CHUNK)]
                       + [1 + n + j for j in range(n) for _ in range(CHUNK)])
    g_tok = grp.repeat_interleave(tpf)  # (N,)
    # base mask between groups
    gq, gk = g_tok[:, None], g_tok[None, :]
    clean_q = (gq >= 1) & (gq <= n)
    noisy_q = gq > n
    base = torch.zeros(N, N, dtype=torch.bool)
    base |= (gq == 0) & (gk == 0)  # relocated chunk: block-causal within itself
    base |= clean_q & (gk == 0)
    base |= clean_q & (gk >= 1) & (gk <= gq)
    base |= noisy_q & (gk == 0)
    base |= noisy_q & (gk >= 1) & (gk <= n) & (gk < gq - n)
    base |= noisy_q & (gk == gq)
    embeds = []
    for b, (clip, chunks, reloc) in enumerate(seqs):
        lat = clip.latents
        m = base.clone()
        if reloc is not None:
            lat_batch[b, :, :R] = lat[:, reloc * CHUNK : (reloc + 1) * CHUNK]
            drop = float(rng.random()) * cfg.token_drop
            keep = torch.from_numpy(rng.random(R * tpf) >= drop)
            keep_cols = torch.ones(N, dtype=torch.bool)
            keep_cols[: R * tpf] = keep
            m &= keep_cols[None, :] | (g_tok[:, None] == 0)  # context queries still see themselves
            m[: R * tpf, : R * tpf] = base[: R * tpf, : R * tpf]
        else:
            m[:, : R * tpf] = False
            m[: R * tpf, : R * tpf] = torch.eye(R * tpf, dtype=torch.bool)  # unused rows: attend to self
        clean = torch.cat([lat[:, c * CHUNK : (c + 1) * CHUNK] for c in chunks], dim=1)  # (C, nF, h, w)
        lat_batch[b, :, R : R + n * CHUNK] = clean
        noise = torch.randn(clean.shape, generator=gen)
        sig = []
        for j in range(n):
            if rng.random() < cfg.uniform_sigma_prob:
                sig.append(float(rng.uniform(0.02, 1.0)))
            else:
                sig.append(float(SCHEDULE_SIGMAS[int(rng.integers(len(SCHEDULE_SIGMAS)))]))
        sig_f = torch.tensor(sig).repeat_interleave(CHUNK)[None, :, None, None]  # (1, nF, 1, 1)
        lat_batch[b, :, R + n * CHUNK :] = (1 - sig_f) * clean + sig_f * noise
        target[b] = noise - clean
        if clip.entity_cells is not None:
            cells = torch.cat([clip.entity_cells[c * CHUNK : (c + 1) * CHUNK] for c in chunks])  # (nF, h, w)
            loss_w[b, 0] += cfg.dit_entity_weight * cells.float()
        tsteps[b, (R + n * CHUNK) * tpf :] = (torch.tensor(sig).repeat_interleave(CHUNK * tpf) * 1000.0)
        mask[b, 0] = m
        # captions: block 0 = relocated chunk's, block 1 + i = clip chunk i's (clean and noisy copies)
        caps = [clip.chunk_captions[reloc if reloc is not None else chunks[0]]] + [clip.chunk_captions[c] for c in chunks]
        embeds.append(caps)
    # RoPE positions: reloc frames 0..R-1, clean chunk i frames R + 3i.., noisy chunk j = clean chunk j
    pos = list(range(R)) + [R + f for f in range(n * CHUNK)] + [R + f for f in range(n * CHUNK)]
    t_pos, hw = token_coords(pos, th, tw)
    return lat_batch, tsteps, mask, target, loss_w, embeds, (t_pos, hw), grp


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of w · (pred − target)² with per-cell weights (B, 1, F, h, w) broadcast over channels."""
    return ((pred - target).pow(2) * weights).sum() / (weights.sum() * pred.shape[1])


class CaptionConditioner:
    """Prompt embeddings (engine style: fixed length, padding rows zeroed), cached per caption."""

    def __init__(self, text_encoder, tokenizer, text_len: int):
        self.te, self.tok, self.len = text_encoder, tokenizer, text_len
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, text: str) -> torch.Tensor:
        if text not in self.cache:
            t = self.tok(text, max_length=self.len, padding="max_length", truncation=True, add_special_tokens=True,
                         return_attention_mask=True, return_tensors="pt")
            ids, am = t.input_ids.to(self.te.device), t.attention_mask.to(self.te.device)
            h = self.te(ids, am).last_hidden_state
            self.cache[text] = (h * am[..., None].to(h.dtype))[0]
        return self.cache[text]


def caption_blocks(grp: torch.Tensor, n: int) -> torch.Tensor:
    """Caption block index of every frame group: reloc → 0, clean i → 1 + i, noisy j → 1 + j."""
    return torch.where(grp > n, grp - n, grp)


def dit_forward(transformer, state: TrainState, lat, tsteps, mask, rope, cond_chunks: list[list[str]],
                conditioner: CaptionConditioner, grp: torch.Tensor, n: int, tpf: int):
    """Full-sequence forward; each chunk reads its own caption (as the engine conditions each chunk
    on the caption in force at its first frame)."""
    state.mask = mask
    state.rotary = rope_for(transformer, *rope)
    embeds = torch.stack([torch.cat([conditioner(c) for c in caps]) for caps in cond_chunks])  # (B, (n+1)·Lt, d)
    Lt = embeds.shape[1] // (n + 1)
    blk_tok = caption_blocks(grp, n).repeat_interleave(tpf)  # (N,)
    blk_txt = torch.arange(n + 1).repeat_interleave(Lt)  # (L,)
    state.cross_mask = (blk_tok[:, None] == blk_txt[None, :])[None, None].expand(lat.shape[0], 1, -1, -1).to(lat.device)
    return transformer(hidden_states=lat, timestep=tsteps, encoder_hidden_states=embeds, return_dict=False)[0]


# ------------------------------------------------------------------------------------------------
# Driver


def to_device(device: str | torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Batches are built on the CPU from seeded CPU generators; this moves them to the training device."""
    return tuple(t.to(device, non_blocking=True) for t in tensors)


class _Budget:
    """Step counter that stops at an explicit step count or a wall-clock deadline."""

    def __init__(self, steps: Optional[int], seconds: float):
        self.steps, self.seconds = steps, max(seconds, 1.0)
        self.t0 = time.perf_counter()
        self.done = 0

    def progress(self) -> float:
        if self.steps is not None:
            return self.done / max(self.steps, 1)
        return (time.perf_counter() - self.t0) / self.seconds

    def more(self) -> bool:
        if self.steps is not None:
            return self.done < self.steps
        return self.done == 0 or self.progress() < 1.0


def _lr(base: float, step: int, progress: float, warmup: int = 50) -> float:
    warm = min(1.0, (step + 1) / warmup)
    return base * warm * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def train_miniature(cfg: TrainConfig, out: str | Path, log: Callable[[str], None] = print,
                    command: Optional[str] = None) -> TrainResult:
    """Run both stages and write a miniature folder (config, tokenizer, weights, MODEL_CARD.md, loss.png)."""
    from diffusers import AutoencoderKLWan

    from slotgen.models.miniature import (SETTINGS, TEXT_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, VOCABULARY,
                                          build_modules, build_tokenizer, write_miniature)

    cfg.validate()  # before any stage runs: a bad stage-b setting must not surface after stage a
    t_start = time.perf_counter()
    total_s = cfg.minutes * 60.0
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    if dev.type == "cuda":  # TF32 matmuls/convolutions: the Hopper/Ampere fast path for fp32 training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # one seeded stream per stage, so skipping stage a (vae_from) leaves stage c's draws unchanged
    rng_vae, gen_vae = np.random.default_rng([cfg.seed, 1]), torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    rng_dit, gen_dit = np.random.default_rng([cfg.seed, 2]), torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    out = Path(out)
    res = TrainResult(out=out)

    tokenizer = build_tokenizer(VOCABULARY)
    config = {"transformer": TRANSFORMER_CONFIG, "vae": VAE_CONFIG,
              "text_encoder": {**TEXT_CONFIG, "vocab_size": len(tokenizer.get_vocab())}}
    transformer, vae, text_encoder = build_modules(config)  # built on the CPU (same init on any device)
    assert tuple(transformer.config.patch_size[1:]) == (PATCH, PATCH), transformer.config.patch_size
    transformer, vae, text_encoder = transformer.to(dev), vae.to(dev), text_encoder.to(dev)

    log(f"data: rendering {cfg.episodes} world episodes")
    clips = build_dataset(cfg.episodes, cfg.seed, cfg.max_gap)
    held_out = clips[-max(2, cfg.episodes // 20):]
    train_clips = clips[: len(clips) - len(held_out)] or clips
    res.data_seconds = time.perf_counter() - t_start
    class_weights = (1.0, 1.0 + cfg.vae_entity_weight, 1.0 + cfg.vae_entity_weight + cfg.vae_marking_weight)

    # ---- a. VAE
    eval_rng = np.random.default_rng(cfg.seed + 1)
    vae_fixed = to_device(dev, *vae_batch(clips, eval_rng, min(cfg.vae_batch, 6), cfg.vae_frames, class_weights))

    def vae_eval() -> float:
        with torch.no_grad():
            return vae_loss(vae, *vae_fixed, cfg.kl_weight, torch.Generator().manual_seed(cfg.seed + 2),
                            cfg.vae_noise)[0].item()

    if cfg.vae_from is not None:
        vae = load_trained_vae(cfg.vae_from).to(dev)
        source = json.loads((Path(cfg.vae_from) / "training_log.json").read_text()) \
            if (Path(cfg.vae_from) / "training_log.json").is_file() else {}
        res.vae_losses = list(source.get("vae_losses", []))  # the source run's curve, for the card
        res.vae_steps, res.vae_seconds = int(source.get("vae_steps", 0)), float(source.get("vae_seconds", 0.0))
        res.warm_losses = list(source.get("warm_losses", []))  # and its stage b, if it had one
        res.warm_steps, res.warm_seconds = int(source.get("warm_steps", 0)), float(source.get("warm_seconds", 0.0))
        res.vae_eval = (vae_eval(), vae_eval())
        log(f"vae: reusing {cfg.vae_from} (stage a skipped)")
    else:
        vae.train().requires_grad_(True)
        res.vae_eval = (vae_eval(), float("nan"))
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        budget = _Budget(cfg.steps_vae, cfg.vae_fraction * total_s - res.data_seconds)
        warm = 50 if cfg.steps_vae is None else max(1, min(50, cfg.steps_vae // 5))
        t0 = time.perf_counter()
        while budget.more():
            for g in opt.param_groups:
                g["lr"] = _lr(cfg.vae_lr, budget.done, budget.progress(), warm)
            long_step = cfg.vae_long_every and budget.done % cfg.vae_long_every == cfg.vae_long_every - 1
            if long_step and cfg.vae_warm_frames:
                W = cfg.vae_warm_frames
                x, wts = vae_batch(train_clips, rng_vae, cfg.vae_long_batch, W + 8, class_weights)
                x, wts = to_device(dev, x, wts)
                loss, parts = warm_vae_loss(vae, x[:, :, :W], x[:, :, W:], wts[:, :, W:], cfg.kl_weight)
            else:
                if long_step:
                    x, wts = vae_batch(train_clips, rng_vae, cfg.vae_long_batch, cfg.vae_long_frames, class_weights)
                else:
                    x, wts = vae_batch(train_clips, rng_vae, cfg.vae_batch, cfg.vae_frames, class_weights,
                                       cfg.vae_crop, cfg.vae_mosaic)
                x, wts = to_device(dev, x, wts)
                loss, parts = vae_loss(vae, x, wts, cfg.kl_weight, gen_vae, cfg.vae_noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            res.vae_losses.append(loss.item())
            budget.done += 1
            if budget.done % 50 == 0 or budget.done == 1:
                log(f"vae step {budget.done}: loss {loss.item():.4f} l1 {parts['l1']:.4f} "
                    f"plain l1 {parts['plain_l1']:.4f} kl {parts['kl']:.1f} ({time.perf_counter() - t0:.0f} s)")
        res.vae_steps, res.vae_seconds = budget.done, time.perf_counter() - t0
        res.vae_eval = (res.vae_eval[0], vae_eval())
        vae.eval().requires_grad_(False)

    # ---- b. VAE on warm caches (optional)
    if cfg.warm_steps:
        rng_warm = np.random.default_rng([cfg.seed, 3])
        t0 = time.perf_counter()
        losses = finetune_warm(vae, train_clips, cfg, class_weights, rng_warm, log)
        res.warm_losses += losses  # after the source run's, with vae_from
        res.warm_steps += len(losses)
        res.warm_seconds += time.perf_counter() - t0

    # latent statistics over the data → config (rebuild the VAE with them, load the weights)
    raw = encode_all(vae, clips)
    flat = torch.cat([r.flatten(1) for r in raw], dim=1)  # (z, total)
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-4)
    res.latents_mean, res.latents_std = [float(v) for v in mean], [float(v) for v in std]
    vae_config = {**VAE_CONFIG, "latents_mean": res.latents_mean, "latents_std": res.latents_std}
    sd = vae.state_dict()
    vae = AutoencoderKLWan(**vae_config)
    vae.load_state_dict(sd)
    vae = vae.to(dev).eval().requires_grad_(False)
    for c, r in zip(clips, raw):
        c.latents = (r - mean[:, None, None, None]) / std[:, None, None, None]
    with torch.no_grad():  # held-out reconstruction through the normalised path
        errs = []
        for c in held_out:
            z = c.latents[None] * std[None, :, None, None, None] + mean[None, :, None, None, None]
            xh = vae.decode(z.to(dev)).sample.clamp(-1, 1)
            errs.append(float((xh - c.frames[None].float().to(dev)).abs().mean() / 2.0))
        res.recon_l1 = float(np.mean(errs))
    log(f"vae done: {res.vae_steps} steps, held-out L1 {res.recon_l1:.4f} (0-1 scale)")

    # ---- c. transformer
    conditioner = CaptionConditioner(text_encoder, tokenizer, SETTINGS.text_len)
    state = install_training_processors(transformer)
    transformer.train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.dit_lr, weight_decay=0.01)
    remaining = total_s - (time.perf_counter() - t_start) - 20.0
    budget = _Budget(cfg.steps_dit, remaining)
    warm = 50 if cfg.steps_dit is None else max(1, min(50, cfg.steps_dit // 5))
    n = cfg.clip_chunks
    fixed = sample_dit_batch(clips, np.random.default_rng(cfg.seed + 3), torch.Generator().manual_seed(cfg.seed + 4),
                             cfg, conditioner)
    fixed = (*to_device(dev, *fixed[:5]), *fixed[5:])  # lat, ts, mask, target, loss_w on the device

    def dit_eval() -> float:
        lat, ts, mask, target, loss_w, caps, rope, grp = fixed
        tpf = (lat.shape[3] // PATCH) * (lat.shape[4] // PATCH)
        with torch.no_grad():
            pred = dit_forward(transformer, state, lat, ts, mask, rope, caps, conditioner, grp, n, tpf)
        return weighted_mse(pred[:, :, CHUNK + n * CHUNK :], target, loss_w).item()

    res.dit_eval = (dit_eval(), float("nan"))
    t0 = time.perf_counter()
    while budget.more():
        for g in opt.param_groups:
            g["lr"] = _lr(cfg.dit_lr, budget.done, budget.progress(), warm)
        lat, ts, mask, target, loss_w, caps, rope, grp = sample_dit_batch(train_clips, rng_dit, gen_dit, cfg,
                                                                          conditioner)
        lat, ts, mask, target, loss_w = to_device(dev, lat, ts, mask, target, loss_w)
        tpf = (lat.shape[3] // PATCH) * (lat.shape[4] // PATCH)
        pred = dit_forward(transformer, state, lat, ts, mask, rope, caps, conditioner, grp, n, tpf)
        loss = weighted_mse(pred[:, :, CHUNK + n * CHUNK :], target, loss_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        res.dit_losses.append(loss.item())
        budget.done += 1
        if budget.done % 50 == 0 or budget.done == 1:
            log(f"transformer step {budget.done}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    res.dit_steps, res.dit_seconds = budget.done, time.perf_counter() - t0
    res.dit_eval = (res.dit_eval[0], dit_eval())
    transformer.eval().requires_grad_(False)
    # back to the stock processors: the saved model carries no training state
    transformer.set_attn_processor(WanAttnProcessor())
    transformer, vae, text_encoder = transformer.cpu(), vae.cpu(), text_encoder.cpu()  # saved from the CPU

    write_miniature(out, modules=(transformer, vae, text_encoder), name="miniature",
                    extra={"vae": vae_config, "training": {"config": cfg.to_dict(), "vae_steps": res.vae_steps,
                                                           "warm_steps": res.warm_steps,
                                                           "transformer_steps": res.dit_steps,
                                                           "vae_eval": list(res.vae_eval), "dit_eval": list(res.dit_eval)}})
    write_loss_png(out / "loss.png", res)
    (out / "training_log.json").write_text(json.dumps({
        "vae_steps": res.vae_steps, "vae_seconds": res.vae_seconds, "warm_steps": res.warm_steps,
        "warm_seconds": res.warm_seconds, "warm_losses": res.warm_losses, "dit_steps": res.dit_steps,
        "dit_seconds": res.dit_seconds, "vae_losses": res.vae_losses, "dit_losses": res.dit_losses}) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(cfg, res, command))
    log(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")
    return res


def load_trained_vae(folder: str | Path):
    """The VAE of a trained miniature folder, through the regular loading path (latent statistics are
    recomputed from the data afterwards, which gives the same numbers for the same VAE and dataset)."""
    from slotgen.models.miniature import load_miniature

    return load_miniature(folder).vae.eval().requires_grad_(False)


def _smooth(values: list[float], k: int) -> list[float]:
    if not values:
        return []
    k = max(1, min(k, len(values)))
    c = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    return list((c[k:] - c[:-k]) / k)


def write_loss_png(path: Path, res: TrainResult, size: tuple[int, int] = (960, 300)) -> None:
    """A panel per stage (VAE, decoder if trained, transformer): raw loss (light) and moving average (dark), log-scaled y."""
    from PIL import Image, ImageDraw

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    panels = [("VAE loss (L1+MSE+KL)", res.vae_losses)]
    if res.warm_losses:
        panels.append(("VAE on warm caches", res.warm_losses))
    panels.append(("transformer flow MSE (weighted)", res.dit_losses))
    pw = W // len(panels)
    for p, (title, vals) in enumerate(panels):
        x0, y0, x1, y1 = p * pw + 50, 25, p * pw + pw - 10, H - 30
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, 5), title, fill="black")
        if not vals:
            continue
        logs = np.log10(np.maximum(np.asarray(vals, float), 1e-6))
        lo, hi = float(logs.min()), float(logs.max())
        hi = hi if hi > lo else lo + 1.0

        def pt(i, v, n=len(vals)):
            return (x0 + (x1 - x0) * i / max(n - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))

        d.line([pt(i, v) for i, v in enumerate(logs)], fill=(170, 190, 235), width=1)
        sm = np.log10(np.maximum(_smooth(vals, max(1, len(vals) // 30)), 1e-6))
        off = len(vals) - len(sm)
        d.line([pt(i + off, v) for i, v in enumerate(sm)], fill=(20, 40, 160), width=2)
        d.text((x0 - 45, y0), f"{10 ** hi:.3g}", fill="black")
        d.text((x0 - 45, y1 - 10), f"{10 ** lo:.3g}", fill="black")
        d.text((x0, y1 + 5), "step 0", fill="black")
        d.text((x1 - 60, y1 + 5), f"step {len(vals)}", fill="black")
    img.save(path)


def _tail(vals: list[float], k: int = 50) -> float:
    return float(np.mean(vals[-k:])) if vals else float("nan")


def model_card(cfg: TrainConfig, res: TrainResult, command: Optional[str]) -> str:
    from slotgen.models.miniature import TEXT_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG

    cmd = command or "slotgen train-miniature " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    repro = (f"slotgen train-miniature --out DIR --seed {cfg.seed} --steps-vae {res.vae_steps} "
             + (f"--vae-warm-frames {cfg.vae_warm_frames} " if cfg.vae_warm_frames else "")
             + (f"--warm-steps {res.warm_steps} " if res.warm_steps else "")
             + ("--warm-decoder-only " if res.warm_steps and not cfg.warm_encoder else "")
             + f"--steps-dit {res.dit_steps} --minutes {cfg.minutes:g} --threads {cfg.threads}"
             + (f" --episodes {cfg.episodes}" if cfg.episodes != TrainConfig.episodes else "")
             + (f" --vae-batch {cfg.vae_batch}" if cfg.vae_batch != TrainConfig.vae_batch else "")
             + (f" --dit-batch {cfg.dit_batch}" if cfg.dit_batch != TrainConfig.dit_batch else "")
             + (f" --device {cfg.device}" if cfg.device != "cpu" else ""))
    code = ("z sampled from the posterior" if cfg.vae_noise is None
            else "z = posterior mean" + (f" + {cfg.vae_noise:g}·N(0, 1)" if cfg.vae_noise else ""))
    long = (f"every {cfg.vae_long_every}rd step 8 frames after {cfg.vae_warm_frames} warm-up frames ×{cfg.vae_long_batch}"
            if cfg.vae_warm_frames else
            f"every {cfg.vae_long_every}rd step whole {cfg.vae_long_frames}-frame clips ×{cfg.vae_long_batch}")
    vae_desc = (f"pixel-weighted L1 + MSE (background 1, entity {1 + cfg.vae_entity_weight:g}, marking "
                f"{1 + cfg.vae_entity_weight + cfg.vae_marking_weight:g}) + {cfg.kl_weight:g}·KL, {code}, "
                f"{cfg.vae_frames}-frame clips ×{cfg.vae_batch}"
                + (f" as entity-centred {cfg.vae_crop}×{cfg.vae_crop} crops" if cfg.vae_crop else "")
                + f", {long}")
    if cfg.vae_from:
        vae_desc += f"; **reused from `{cfg.vae_from}`** (a run with the same seed and VAE settings)"
    return f"""# Model card: slotgen miniature (trained on the shape world)

Produced by `{cmd}`.

Exact re-run (explicit step counts make the run independent of machine speed; the learning-rate
schedule then follows steps, so the numbers can differ slightly from a time-budgeted run):
`{repro}`

## Architecture (unchanged miniature configs; loading path unchanged)

- transformer: diffusers `WanTransformer3DModel` {json.dumps(TRANSFORMER_CONFIG)}
- VAE: `AutoencoderKLWan` {json.dumps({k: v for k, v in VAE_CONFIG.items() if not k.startswith('latents_')})} + learned `latents_mean`/`latents_std`
- text encoder: `UMT5EncoderModel` {json.dumps(TEXT_CONFIG)}, **random init, frozen** (seed {cfg.seed}):
  each vocabulary word has its own random embedding and the transformer learns to read these features.
- 64×64 video at 16 fps; 3 latent frames per chunk (9 video frames for the first chunk, 12 later).

## Data

{cfg.episodes} seeded episodes of the shape world (`slotgen.world.exit_return_episode`, seeds
`{cfg.seed}·100000 + i`): 1–3 entities (35 % of multi-entity episodes with a same-kind "similar"
companion), absence gaps 0–{cfg.max_gap} video frames, captions from the world grammar. The last
{max(2, cfg.episodes // 20)} episodes are held out for the VAE reconstruction number.

## Training

| stage | steps | seconds | batch | lr | final loss (mean of last 50 steps) |
|---|---|---|---|---|---|
| VAE ({vae_desc}) | {res.vae_steps} | {res.vae_seconds:.0f} | {cfg.vae_batch} | {cfg.vae_lr:g} | {_tail(res.vae_losses):.4f} |
| VAE on warm caches (stage b: {'encoder and decoder' if cfg.warm_encoder else 'decoder only'}; 8 frames after a warm-up of {'/'.join(map(str, cfg.warm_lengths))} frames, same weighted loss) | {res.warm_steps} | {res.warm_seconds:.0f} | {cfg.vae_long_batch} | {cfg.warm_lr:g} | {_tail(res.warm_losses):.4f} |
| transformer (flow MSE, entity cells ×{1 + cfg.dit_entity_weight:g}, causal chunks) | {res.dit_steps} | {res.dit_seconds:.0f} | {cfg.dit_batch} | {cfg.dit_lr:g} | {_tail(res.dit_losses):.4f} |

- VAE held-out reconstruction: mean |x − x̂| = {res.recon_l1:.4f} (pixel range 0–1).
- Loss on a fixed seeded batch, before → after: VAE {res.vae_eval[0]:.4f} → {res.vae_eval[1]:.4f};
  transformer {res.dit_eval[0]:.4f} → {res.dit_eval[1]:.4f}.
- Transformer objective: clips of {cfg.clip_chunks} chunks; a sequence is `[relocated chunk ; clean
  chunks ; noisy chunks]` with a block-causal mask (noisy chunk j sees the relocated chunk, clean chunks
  < j and itself; RoPE positions of clean chunk j), per-token timesteps (0 for clean), σ from the engine's
  schedule (1, .9375, .8333, .625) or uniform with probability {cfg.uniform_sigma_prob}; with probability
  {cfg.relocate_prob} an earlier chunk is relocated before the clip with up to {cfg.token_drop:.0%} of its
  tokens masked out (what sink/bank/slot memory hands back). Each chunk reads its own caption (the one in
  force at its first video frame).
- Optimiser AdamW, warm-up 50 steps, cosine decay to 5 %, grad-norm clip 1.0, {cfg.threads} CPU threads.
- Latent statistics: mean {np.round(res.latents_mean, 3).tolist()}, std {np.round(res.latents_std, 3).tolist()}.
- Data rendering: {res.data_seconds:.0f} s.

Loss curves: `loss.png`. Training config: {json.dumps(cfg.to_dict())}
"""
