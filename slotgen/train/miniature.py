"""Train the embedded miniature's transformer on the shape world (``slotgen train-miniature``).

The miniature's VAE is an exact pixel code (``slotgen.models.miniature.make_exact_vae``), so there is
no VAE stage: episodes are rendered by the world, encoded once with that VAE (1 latent frame per video
frame) and normalised with the data's per-channel statistics, which go into the VAE config as
``latents_mean``/``latents_std``. The text encoder (miniature UMT5) stays randomly initialised and
frozen: each vocabulary word has its own random features, which the transformer learns to read.

**Objective: the engine's causal chunk objective, x0-prediction.** A training sequence is
``[relocated chunk ; clean chunks s..s+n-1 ; noisy copies of those chunks]`` in one full-sequence
forward of the stock ``WanTransformer3DModel`` with a masked ``WanAttnProcessor`` subclass per layer
(no fork). A block-causal mask lets clean chunk i see the relocated chunk and clean chunks ≤ i; noisy
chunk j sees the relocated chunk, clean chunks < j and itself, at the RoPE positions of clean chunk j,
with per-token timesteps (0 for clean, the committed past) — exactly what the engine's streaming
attention shows chunk j (``tests/test_train.py`` checks equality with the engine). Noisy chunk j is
``(1 − σ_j)·x0 + σ_j·ε`` with σ_j per chunk: exactly 1 now and then (the sampler's first step, where
only caption and context say what to draw), otherwise shifted-uniform (most mass at high noise, where
the sampler decides *what* to draw). The transformer outputs x0; the loss is the flow-matching
velocity error expressed through it, ``‖x̂0 − x0‖² / max(σ, 0.4)²`` (the JiT recipe, weight capped at
low noise), weighted up on latent cells near an entity (entities cover a few % of a frame). Half the samples
get a little Gaussian noise on their clean context (still at timestep 0): at inference the committed
past is the model's own output, not the truth.

**Memory in training.** Each chunk reads the caption in force at its first video frame (the engine's
switch rule) through a masked cross-attention. With probability ``return_prob`` a clip is placed over
the protagonist's *return*, and the relocated chunk is a chunk from before it left in which it was
fully inside: the model can only draw the returning entity's hidden traits right by copying them from
that chunk — what sink/bank/slot memory hands back. Otherwise, with probability ``relocate_prob``, a
random earlier chunk is relocated. Up to ``token_drop`` of the relocated tokens are masked out (sparse,
slot-like retrieval).
"""

from __future__ import annotations

import functools
import json
import math
import shlex
import shutil
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
from slotgen.train.slots import SlotTrainConfig, add_slot_phi

SLOT_STAGE_SECONDS = 300.0  # wall time kept back from a time budget for the φ stage (229 s measured on 2 cores)
CHUNK = 3  # latent frames per chunk (= video frames: the exact VAE does not compress time)
STRIDE_S = 4  # pixels per latent cell (the exact VAE's patchify)
TOKENS = 4  # token grid side: 16 latent cells / transformer patch 4
ALL_WORLDS = ("standard", "reduced", "sprites")  # the shape worlds (slotgen.world.scene.WORLDS) and the sprite world


def world_vocabulary(world: str) -> list[str]:
    """The tokenizer's words for a model of ``world``: the miniature's vocabulary, plus the sprite world's words."""
    from slotgen.models.miniature import VOCABULARY
    from slotgen.world.sprites import SPRITE_WORDS

    return list(VOCABULARY) + (list(SPRITE_WORDS) if world == "sprites" else [])


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the model card)."""

    minutes: float = 55.0  # wall-clock budget (used when steps is not given)
    seed: int = 0
    world: str = "standard"  # the world the episodes come from: standard, reduced (slotgen.world.WORLDS) or sprites
    steps: Optional[int] = None  # an explicit step count makes a run exactly reproducible
    episodes: int = 256  # world episodes in the dataset
    max_gap: int = 24  # longest absence gap (video frames) of a training episode; longer absences are
    # trained through relocated context (the pre-leave chunk placed right before the clip)
    batch: int = 8
    lr: float = 1e-3
    clip_chunks: int = 4  # noisy chunks per sample (12 frames of clean context at most)
    return_prob: float = 0.5  # a clip over the protagonist's return, with its pre-leave chunk relocated
    relocate_prob: float = 0.5  # otherwise: chance of a random earlier chunk as relocated context
    token_drop: float = 0.8  # max fraction of relocated tokens masked out (sparse retrieval)
    sigma_one_prob: float = 0.25  # σ = 1 exactly: what the sampler's first step sees (only the caption and the
    # context tell what to draw there; a run without it does not learn to read the background colour)
    sigma_shift: float = 3.0  # otherwise σ = shift·u / (1 + (shift − 1)·u), u ~ U(0, 1): median 0.75
    min_sigma_weight: float = 0.4  # loss weight 1 / max(σ, this)²: at most 6.25
    context_noise: float = 0.1  # half the samples get N(0, s²) noise with s ~ U(0, this) on the clean context
    # (still at timestep 0): the committed past the engine feeds back is the model's own, imperfect output
    entity_weight: float = 4.0  # extra loss weight on latent cells with a pixel within 2 px of an entity
    placement_weight: float = 1.0  # loss weight ×this on every frame of a chunk whose caption places the entity
    # (the sprite world's entrance and return, the only chunks naming its row; the shape worlds have none marked)
    trait_weight: float = 1.0  # loss weight ×this on the latent cells that hold a drawn sprite's trait (the sprite
    # world's dot, 4×4 of a cell's 16×16 pixels: without it the dot's error is ~1/16 of the sprite's)
    trait_from: int = 0  # the step from which trait_weight applies (before it: 1), so the layout is learnt first
    slots: SlotTrainConfig = field(default_factory=SlotTrainConfig)  # the last stage: SlotMemory's φ (train/slots.py)
    threads: int = 1  # 1 thread: on a shared 2-core machine OpenMP spin contention makes 2 threads slower
    checkpoint_every: int = 250  # steps between resumable checkpoints (DIR/checkpoint/; `--resume DIR`); 0: none
    snapshot_every: int = 0  # steps between loadable miniature folders DIR/snapshots/step-N (a learning curve); 0: none
    train_text: bool = False  # also train the text encoder (its word embeddings): a fresh model's own words
    device: str = "cpu"  # where the modules and batches live ("cuda", "cuda:1", ...). Data, batch sampling and
    # every random draw stay on the CPU (seeded CPU generators), so a batch is the same on any device; only the
    # arithmetic moves. CUDA kernels are not bit-reproducible run to run, so GPU runs repeat closely, not exactly.

    def __post_init__(self) -> None:
        if isinstance(self.slots, dict):  # from to_dict() / a model card's JSON
            self.slots = SlotTrainConfig(**self.slots)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_world(cls, world: str, **kw) -> "TrainConfig":
        """The recipe for ``world``: the shape worlds' defaults, or for ``sprites`` the one-step x0
        regression (σ = 1 for every noisy chunk: with a deterministic world the conditional mean is the
        answer) with a trained text encoder (attribute words the text path can tell apart), clips of 3
        chunks (the 9-frame window the engine's context holds), the entrance and return chunks, the
        only ones that name the sprite's row, weighted ×4 in the loss, and from step 2250 on (when the
        layout is learnt) the latent cells holding the sprite's dot (its trait) weighted ×8."""
        if world == "sprites":
            kw = {"sigma_one_prob": 1.0, "train_text": True, "episodes": 512, "clip_chunks": 3, "placement_weight": 4.0,
                  "trait_weight": 8.0, "trait_from": 2250, **kw}
        return cls(world=world, **kw)

    def validate(self) -> None:
        """Reject settings a run would only trip over later, with the CLI flag named."""
        self.slots.validate()
        if self.threads < 1:
            raise SlotgenError(f"--threads must be at least 1, got {self.threads}")
        if not self.placement_weight > 0:
            raise SlotgenError(f"--placement-weight must be positive, got {self.placement_weight}")
        if not self.trait_weight > 0:
            raise SlotgenError(f"--trait-weight must be positive, got {self.trait_weight}")
        if self.trait_from < 0:
            raise SlotgenError(f"--trait-from must be at least 0, got {self.trait_from}")
        if not self.minutes > 0:
            raise SlotgenError(f"--minutes must be positive, got {self.minutes}")
        if self.world not in ALL_WORLDS:
            raise SlotgenError(f"--world: expected one of {', '.join(ALL_WORLDS)}, got {self.world!r}")
        for name, v, low in (("--steps", self.steps, 1), ("--episodes", self.episodes, 2), ("--batch", self.batch, 1),
                             ("--clip-chunks", self.clip_chunks, 1), ("--checkpoint-every", self.checkpoint_every, 0),
                             ("--snapshot-every", self.snapshot_every, 0)):
            if v is not None and v < low:
                raise SlotgenError(f"{name} must be at least {low}, got {v}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise SlotgenError(f"--device: expected cpu, cuda or cuda:N, got {self.device!r}") from None
        if dev.type not in ("cpu", "cuda"):
            raise SlotgenError(f"--device: expected cpu, cuda or cuda:N, got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SlotgenError(f"--device {self.device}: this torch build sees no CUDA device "
                               f"(torch {torch.__version__}, cuda available: False)")


@dataclass
class TrainResult:
    out: Path
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    latents_mean: list[float] = field(default_factory=list)
    latents_std: list[float] = field(default_factory=list)
    vae_max_error: float = float("nan")  # max |decode(encode(x)) − x| on 8 clips' first 16 frames ([-1, 1])
    eval_loss: tuple[float, float] = (float("nan"), float("nan"))  # on a fixed batch, before / after
    interrupted: bool = False  # should_stop ended the run: its checkpoint resumes it (`--resume`)


# ------------------------------------------------------------------------------------------------
# Data


@dataclass
class WorldClip:
    """One rendered episode: frames, per-chunk captions, loss weights and where its return is."""

    frames: torch.Tensor  # (3, T, H, W) float16 in [-1, 1]
    chunk_captions: list[str]  # caption in force at each chunk's first frame
    near_entity: torch.Tensor  # (T, h, w) bool: latent cells with a pixel within 2 px of an entity
    return_chunk: Optional[int] = None  # chunk holding the protagonist's return start (chunk-aligned)
    before_chunks: list[int] = field(default_factory=list)  # chunks before its leave with it fully inside
    latents: Optional[torch.Tensor] = None  # (C, T, h, w) normalised latents, filled after encoding
    placement_chunks: list[int] = field(default_factory=list)  # chunks whose caption places the entity (row, side)
    trait_cells: Optional[torch.Tensor] = None  # (T, h, w) bool: latent cells holding a drawn sprite's trait (dot)


def chunk_first_frame(chunk: int) -> int:
    return CHUNK * chunk


def random_episode(rng: np.random.Generator, seed: int, max_gap: int, world: str = "standard"):
    """One training episode: a random gap ≤ ``max_gap``, 1–3 entities (1–2 in a 2-lane world), 35 % of
    multi-entity episodes with a same-kind look-alike companion."""
    from slotgen.world.scene import exit_return_episode, world_named

    spec = world_named(world)
    gaps = [g for g in (0, 12, 24, 36, 48, 60, 72, 96) if g <= max_gap]
    gap = int(rng.choice(gaps))
    n = int(rng.choice([1, 1, 2, 2, 3] if spec.config.lanes >= 3 else [1, 1, 2]))
    similar = n >= 2 and rng.random() < 0.35
    return exit_return_episode(seed=seed, gap_frames=gap, n_entities=n, similar=similar, world=spec)


def clip_from_episode(ep) -> WorldClip:
    """Render an episode and record its captions per chunk, entity neighbourhoods and return event."""
    from slotgen.world import render_episode
    from slotgen.world.grammar import episode_prompts

    rendered = render_episode(ep)
    frames = torch.from_numpy(rendered.frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0).half()  # (3, T, H, W)
    T = frames.shape[1]
    ent = torch.from_numpy(rendered.truth.labels > 0).float()[:, None]  # (T, 1, H, W)
    near = F.max_pool2d(F.max_pool2d(ent, 5, 1, 2), STRIDE_S)[:, 0] > 0  # dilated by 2 px, per latent cell
    cues = episode_prompts(ep)
    captions = [next(cue.text for cue in cues if cue.start <= chunk_first_frame(c) < cue.end) for c in range(T // CHUNK)]
    starts = ep.segment_starts
    ret = next((starts[i] for i, s in enumerate(ep.segments) if s.action == "return" and s.entity == 0), None)
    leave = next((starts[i] for i, s in enumerate(ep.segments) if s.action == "leave" and s.entity == 0), None)
    inside = ep.trajectory.inside[:, 0]
    before = [] if leave is None else [c for c in range(leave // CHUNK) if inside[c * CHUNK : (c + 1) * CHUNK].all()]
    return WorldClip(frames, captions, near, None if ret is None else ret // CHUNK, before)


def training_episodes(n: int, seed: int, max_gap: int, world: str = "standard") -> list:
    """The ``n`` world episodes a run with ``--seed seed`` trains on (episode seeds ``seed·100000 + i``)."""
    rng = np.random.default_rng(seed)
    return [random_episode(rng, seed * 100_000 + i, max_gap, world) for i in range(n)]


HELD_OUT_SEED0 = 900_000
"""Episode seeds of held-out evaluation episodes (:func:`held_out_episodes`): outside every training run's
``seed·100000 + i`` for seeds 0..8 and episodes < 100000."""


def held_out_episodes(n: int, world: str = "standard", max_gap: int = 24) -> list:
    """``n`` episodes no training run sees (seeds ``HELD_OUT_SEED0 + i``), drawn like training episodes (for
    ``sprites``: new scripts, none of them in a 512-episode seed-0 run)."""
    if world == "sprites":
        from slotgen.world.sprites import held_out_episodes as sprite_held_out

        return sprite_held_out(n)
    rng = np.random.default_rng(HELD_OUT_SEED0)
    return [random_episode(rng, HELD_OUT_SEED0 + i, max_gap, world) for i in range(n)]


def sprite_clip(ep) -> WorldClip:
    """A sprite-world episode as a training clip: each chunk's caption, the cells near the sprite, its return
    chunk and the chunks before its exit (it is always wholly inside a cell)."""
    from slotgen.world.sprites import render_sprites

    frames, labels = render_sprites(ep)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0).half()  # (3, T, H, W)
    ent = torch.from_numpy(labels).float()[:, None]  # (T, 1, H, W)
    near = F.max_pool2d(F.max_pool2d(ent, 5, 1, 2), STRIDE_S)[:, 0] > 0
    before = [c for c in range(ep.leave_chunk) if ep.cells[c] is not None]
    return WorldClip(video, list(ep.captions), near, ep.return_chunk, before,
                     placement_chunks=[ep.enter_chunk, ep.return_chunk], trait_cells=sprite_trait_cells(ep))


def sprite_trait_cells(ep) -> torch.Tensor:
    """(T, h, w) bool: the latent cells (STRIDE_S × STRIDE_S pixels) that overlap the trait's pixels (the dot's
    4×4 square) of every cell the sprite is drawn in, whether or not it has a dot (no dot must be drawn too)."""
    from slotgen.world.sprites import CELL, DOT, SIZE

    region = torch.zeros(ep.total_frames, 1, SIZE, SIZE)  # (T, 1, H, W) pixels of the dot square
    for c, where in enumerate(ep.cells):
        if where is not None:
            r, q = where
            rows, cols = DOT
            region[c * CHUNK : (c + 1) * CHUNK, 0, r * CELL + rows.start : r * CELL + rows.stop,
                   q * CELL + cols.start : q * CELL + cols.stop] = 1.0
    return F.max_pool2d(region, STRIDE_S)[:, 0] > 0  # (T, h, w)


def build_dataset(n: int, seed: int, max_gap: int, world: str = "standard") -> list[WorldClip]:
    if world == "sprites":
        from slotgen.world.sprites import training_episodes as sprite_episodes

        return [sprite_clip(ep) for ep in sprite_episodes(n, seed)]
    return [clip_from_episode(ep) for ep in training_episodes(n, seed, max_gap, world)]


@torch.no_grad()
def encode_clip(vae, frames: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] → raw latents (C, T, h, w) through ``vae.encode``."""
    return encode_all(vae, [frames])[0]


@torch.no_grad()
def encode_all(vae, videos: list[torch.Tensor], batch: int = 32) -> list[torch.Tensor]:
    """Raw latents of every video through ``vae.encode``, batching videos of equal length (the encoder's
    per-call overhead dominates at this size). Wan's encoder takes 1 + 4k frames: a video is padded with
    copies of its last frame to that length and its latents cut back (the exact VAE's latent t depends on
    frame t alone)."""
    out: list[Optional[torch.Tensor]] = [None] * len(videos)
    by_len: dict[int, list[int]] = {}
    for i, v in enumerate(videos):
        by_len.setdefault(v.shape[1], []).append(i)
    for T, idx in by_len.items():
        pad = (-(T - 1)) % 4
        for k in range(0, len(idx), batch):
            group = idx[k : k + batch]
            x = torch.stack([videos[i].float() for i in group])  # (B, 3, T, H, W)
            if pad:
                x = torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1, -1)], 2)
            z = vae.encode(x.to(vae.device)).latent_dist.mean[:, :, :T].cpu()
            for j, i in enumerate(group):
                out[i] = z[j]
    return out  # type: ignore[return-value]


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


def rope_for(transformer, t: torch.Tensor, hw: torch.Tensor):
    from slotgen.engine.attention import RopeTable

    dev = transformer.rope.freqs_cos.device
    return RopeTable(transformer.rope)(t.to(dev), hw.to(dev))


def token_coords(frame_positions: list[int], th: int, tw: int) -> tuple[torch.Tensor, torch.Tensor]:
    fr = torch.tensor(frame_positions).repeat_interleave(th * tw)
    rows = torch.arange(th).repeat_interleave(tw).repeat(len(frame_positions))
    cols = torch.arange(tw).repeat(th * len(frame_positions))
    return fr, torch.stack([rows, cols], 1)


# ------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, R + 2nF, H, W): [relocated ; clean ; noisy]
    timesteps: torch.Tensor  # (B, N) per token, 0 for clean
    mask: torch.Tensor  # (B, 1, N, N) bool
    x0: torch.Tensor  # (B, C, nF, H, W) the clean target of the noisy frames
    sigma: torch.Tensor  # (B, 1, nF, 1, 1) noise level of each noisy frame
    weight: torch.Tensor  # (B, 1, nF, H, W) per-pixel loss weight
    captions: list[list[str]]  # per sample: relocated chunk's caption, then each clip chunk's
    rope: tuple[torch.Tensor, torch.Tensor]  # temporal positions (N,), grid cells (N, 2)
    groups: torch.Tensor  # (R + 2nF,) frame group ids: reloc 0, clean chunk i 1 + i, noisy chunk j 1 + n + j

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in ("latents", "timesteps", "mask", "x0", "sigma", "weight")),
                     self.captions, self.rope, self.groups)


@functools.lru_cache(maxsize=4)
def base_mask(n: int, tpf: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame group ids (R + 2nF,) and the block-causal token mask (N, N) of a training sequence (built once
    per shape; callers clone before changing it)."""
    R = CHUNK
    grp = torch.tensor([0] * R + [1 + i for i in range(n) for _ in range(CHUNK)]
                       + [1 + n + j for j in range(n) for _ in range(CHUNK)])
    g = grp.repeat_interleave(tpf)  # (N,)
    gq, gk = g[:, None], g[None, :]
    clean_q, noisy_q = (gq >= 1) & (gq <= n), gq > n
    m = (gq == 0) & (gk == 0)  # relocated chunk: sees itself
    m |= clean_q & (gk == 0)
    m |= clean_q & (gk >= 1) & (gk <= gq)  # clean chunk i: clean chunks <= i
    m |= noisy_q & (gk == 0)
    m |= noisy_q & (gk >= 1) & (gk <= n) & (gk < gq - n)  # noisy chunk j: clean chunks < j
    m |= noisy_q & (gk == gq)  # and itself
    return grp, m


def sample_sigma(rng: np.random.Generator, cfg: TrainConfig) -> float:
    if rng.random() < cfg.sigma_one_prob:
        return 1.0
    u = float(rng.uniform(0.0, 1.0))
    return cfg.sigma_shift * u / (1.0 + (cfg.sigma_shift - 1.0) * u)


def sample_batch(clips: list[WorldClip], rng: np.random.Generator, gen: torch.Generator, cfg: TrainConfig,
                 trait_weight: Optional[float] = None) -> Batch:
    """One seeded batch of training sequences (see the module docstring); ``trait_weight`` overrides
    ``cfg.trait_weight`` (the training loop passes 1 before ``cfg.trait_from``). The weight draws nothing
    from ``rng`` or ``gen``, so the same seeds give the same sequences whatever it is."""
    trait_weight = cfg.trait_weight if trait_weight is None else trait_weight
    n, B, R = cfg.clip_chunks, cfg.batch, CHUNK
    C, _, H, W = clips[0].latents.shape
    tpf = TOKENS * TOKENS  # tokens per latent frame
    grp, base = base_mask(n, tpf)
    g_tok = grp.repeat_interleave(tpf)
    Ftot, N, nF = R + 2 * n * CHUNK, (R + 2 * n * CHUNK) * tpf, n * CHUNK
    lat = torch.zeros(B, C, Ftot, H, W)
    ts = torch.zeros(B, N)
    mask = torch.zeros(B, 1, N, N, dtype=torch.bool)
    x0 = torch.zeros(B, C, nF, H, W)
    sigma = torch.zeros(B, 1, nF, 1, 1)
    weight = torch.ones(B, 1, nF, H, W)
    captions = []
    for b in range(B):
        clip = clips[int(rng.integers(len(clips)))]
        L = clip.latents.shape[1] // CHUNK  # whole chunks in the episode
        reloc = None
        if clip.return_chunk is not None and clip.before_chunks and rng.random() < cfg.return_prob:
            r = min(clip.return_chunk, L - n)
            s = int(rng.integers(max(0, r - n + 1), r + 1))  # the clip covers the return's first chunk
            reloc = int(clip.before_chunks[int(rng.integers(len(clip.before_chunks)))])
        else:
            s = int(rng.integers(0, L - n + 1))
            if s > 0 and rng.random() < cfg.relocate_prob:
                reloc = int(rng.integers(0, s))
        m = base.clone()
        if reloc is not None:
            lat[b, :, :R] = clip.latents[:, reloc * CHUNK : (reloc + 1) * CHUNK]
            drop = float(rng.random()) * cfg.token_drop
            keep = torch.ones(N, dtype=torch.bool)
            keep[: R * tpf] = torch.from_numpy(rng.random(R * tpf) >= drop)
            m &= keep[None, :] | (g_tok[:, None] == 0)  # relocated queries still see themselves
        else:
            m[:, : R * tpf] = False
            m[: R * tpf, : R * tpf] = torch.eye(R * tpf, dtype=torch.bool)  # unused rows: attend to self
        clean = clip.latents[:, s * CHUNK : (s + n) * CHUNK].float()  # (C, nF, H, W)
        noise = torch.randn(clean.shape, generator=gen)
        sig = torch.tensor([sample_sigma(rng, cfg) for _ in range(n)]).repeat_interleave(CHUNK)  # (nF,)
        context = clean
        if cfg.context_noise > 0 and rng.random() < 0.5:
            scale = float(rng.uniform(0.0, cfg.context_noise))
            context = clean + scale * torch.randn(clean.shape, generator=gen)
        lat[b, :, R : R + nF] = context
        lat[b, :, R + nF :] = (1 - sig[None, :, None, None]) * clean + sig[None, :, None, None] * noise
        x0[b] = clean
        sigma[b, 0, :, 0, 0] = sig
        weight[b, 0] += cfg.entity_weight * clip.near_entity[s * CHUNK : (s + n) * CHUNK].float()
        for c in clip.placement_chunks:  # the whole chunk: drawing in a row the caption did not name costs too
            if s <= c < s + n:
                weight[b, 0, (c - s) * CHUNK : (c - s + 1) * CHUNK] *= cfg.placement_weight
        if clip.trait_cells is not None and trait_weight != 1.0:  # (nF, h, w): the dot's cells ×trait_weight
            weight[b, 0] *= 1.0 + (trait_weight - 1.0) * clip.trait_cells[s * CHUNK : (s + n) * CHUNK].float()
        ts[b, (R + nF) * tpf :] = sig.repeat_interleave(tpf) * 1000.0
        mask[b, 0] = m
        captions.append([clip.chunk_captions[reloc if reloc is not None else s]]
                        + [clip.chunk_captions[c] for c in range(s, s + n)])
    # RoPE positions: relocated frames 0..R-1 right before the clip, clean chunk i at R + 3i.., noisy j = clean j
    pos = list(range(R)) + [R + f for f in range(nF)] * 2
    return Batch(lat, ts, mask, x0, sigma, weight, captions, token_coords(pos, TOKENS, TOKENS), grp)


def x0_loss(pred: torch.Tensor, batch: Batch, min_sigma: float = 0.4) -> torch.Tensor:
    """Weighted ‖x̂0 − x0‖² / max(σ, min_sigma)²: the velocity error of an x0-predicting flow model, with
    its weight capped at low noise (where the error is cheap to fix and the analyser cannot see it)."""
    w = batch.weight / batch.sigma.clamp_min(min_sigma) ** 2  # (B, 1, nF, H, W)
    return ((pred - batch.x0).pow(2) * w).sum() / (w.sum() * pred.shape[1])


class CaptionConditioner:
    """Prompt embeddings (engine style: fixed length, padding rows zeroed), cached per caption."""

    def __init__(self, text_encoder, tokenizer, text_len: int, trainable: bool = False):
        self.te, self.tok, self.len = text_encoder, tokenizer, text_len
        self.trainable = trainable  # embeddings change every step: cached for one step only (new_step)
        self.cache: dict[str, torch.Tensor] = {}

    def new_step(self) -> None:
        if self.trainable:
            self.cache.clear()

    def __call__(self, text: str) -> torch.Tensor:
        if text not in self.cache:
            t = self.tok(text, max_length=self.len, padding="max_length", truncation=True, add_special_tokens=True,
                         return_attention_mask=True, return_tensors="pt")
            ids, am = t.input_ids.to(self.te.device), t.attention_mask.to(self.te.device)
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                h = self.te(ids, am).last_hidden_state
            self.cache[text] = (h * am[..., None].to(h.dtype))[0]
        return self.cache[text]


def caption_blocks(grp: torch.Tensor, n: int) -> torch.Tensor:
    """Caption block index of every frame group: reloc → 0, clean i → 1 + i, noisy j → 1 + j."""
    return torch.where(grp > n, grp - n, grp)


def dit_forward(transformer, state: TrainState, batch: Batch, conditioner: CaptionConditioner, n: int) -> torch.Tensor:
    """Full-sequence forward → the prediction for the noisy frames (B, C, nF, H, W). Each chunk reads its
    own caption (as the engine conditions each chunk on the caption in force at its first frame)."""
    lat = batch.latents
    tpf = TOKENS * TOKENS
    state.mask = batch.mask
    state.rotary = rope_for(transformer, *batch.rope)
    conditioner.new_step()
    embeds = torch.stack([torch.cat([conditioner(c) for c in caps]) for caps in batch.captions])  # (B, (n+1)·Lt, d)
    Lt = embeds.shape[1] // (n + 1)
    blk_tok = caption_blocks(batch.groups, n).repeat_interleave(tpf)  # (N,)
    blk_txt = torch.arange(n + 1).repeat_interleave(Lt)  # (L,)
    state.cross_mask = (blk_tok[:, None] == blk_txt[None, :])[None, None].expand(lat.shape[0], 1, -1, -1).to(lat.device)
    out = transformer(hidden_states=lat, timestep=batch.timesteps, encoder_hidden_states=embeds.to(lat.device),
                      return_dict=False)[0]
    return out[:, :, CHUNK + n * CHUNK :]


# ------------------------------------------------------------------------------------------------
# Driver


class _Budget:
    """Step counter that stops at an explicit step count or a wall-clock deadline."""

    def __init__(self, steps: Optional[int], seconds: float, done: int = 0, elapsed: float = 0.0):
        self.steps, self.seconds = steps, max(seconds, 1.0)
        self.t0 = time.perf_counter() - elapsed  # a resumed run continues the clock where it stopped
        self.done = done

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def progress(self) -> float:
        if self.steps is not None:
            return self.done / max(self.steps, 1)
        return (time.perf_counter() - self.t0) / self.seconds

    def more(self) -> bool:
        if self.steps is not None:
            return self.done < self.steps
        return self.done == 0 or self.progress() < 1.0


def debug_step_line(step: int) -> None:
    """With ``SLOTGEN_DEBUG_CHUNKS=1``: one line per finished step on stderr (after that step's checkpoint);
    with ``SLOTGEN_DEBUG_HOLD_AFTER_STEP=K`` the run then waits for a line on stdin after step ``K`` (tests
    that stop a run at a known step, as :func:`slotgen.render.debug_chunk_line` does for renders)."""
    import os

    if os.environ.get("SLOTGEN_DEBUG_CHUNKS") == "1":
        print(f"slotgen-step {step}", file=sys.stderr, flush=True)
        if os.environ.get("SLOTGEN_DEBUG_HOLD_AFTER_STEP") == str(step):
            sys.stdin.readline()


def _lr(base: float, step: int, progress: float, warmup: int = 50) -> float:
    warm = min(1.0, (step + 1) / warmup)
    return base * warm * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


CHECKPOINT = "checkpoint/state.pt"
"""Where a run keeps its resumable state, relative to its output folder."""


def save_checkpoint(out: Path, cfg: TrainConfig, res: TrainResult, budget: "_Budget", transformer, opt,
                    rng: np.random.Generator, gen: torch.Generator, command: Optional[str], text_encoder=None) -> Path:
    """Everything a run needs to continue step for step (one file, written atomically): the config,
    step count, losses, training seconds, transformer and optimiser state, and both random generators.
    Loaded with ``torch.load(weights_only=True)``: tensors and plain Python values only, no code."""
    from slotgen.atomic import atomic_output

    path = out / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": 1, "config": cfg.to_dict(), "step": budget.done, "elapsed": budget.elapsed(),
        "losses": list(res.losses), "eval_loss0": res.eval_loss[0], "data_seconds": res.data_seconds,
        "command": command or "", "rng": json.dumps(rng.bit_generator.state), "gen": gen.get_state(),
        "transformer": {k: v.detach().cpu() for k, v in transformer.state_dict().items()},
        "optimizer": opt.state_dict(),
        **({"text_encoder": {k: v.detach().cpu() for k, v in text_encoder.state_dict().items()}} if cfg.train_text else {}),
    }
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(out: Path) -> dict:
    """A run's checkpoint (:func:`save_checkpoint`); a one-line :class:`SlotgenError` when there is none."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise SlotgenError(f"--resume {out}: no checkpoint there (expected {path}; a run writes one every "
                           f"--checkpoint-every steps)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is a user error, not a traceback
        raise SlotgenError(f"--resume {out}: cannot read {path} ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise SlotgenError(f"--resume {out}: {path} is not a slotgen training checkpoint")
    return state


DEFAULT_MINUTES = 55.0
"""The budget the default data size (TrainConfig.episodes) and slot stage (SlotTrainConfig) are sized for."""


def fit_to_budget(cfg: TrainConfig, given: set[str] = frozenset()) -> TrainConfig:
    """A time-budgeted run (no ``steps``) shorter than :data:`DEFAULT_MINUTES` scales what is not counted
    in steps with its budget, so it ends near its budget: the episodes rendered as data and the slot
    stage's episodes and steps (the defaults are sized for 55 minutes: 162 s of data, ~230 s of slot
    stage on 2 cores). Fields named in ``given`` (set by the user: ``episodes``, ``slots.episodes``,
    ``slots.steps``) are kept."""
    scale = cfg.minutes / DEFAULT_MINUTES
    if cfg.steps is not None or scale >= 1.0:
        return cfg
    if "episodes" not in given:
        cfg.episodes = max(8, round(cfg.episodes * scale))
    if "slots.episodes" not in given:
        cfg.slots.episodes = max(4, round(cfg.slots.episodes * scale))
    if "slots.steps" not in given:
        cfg.slots.steps = max(10, round(cfg.slots.steps * scale))
    return cfg


def train_miniature(cfg: TrainConfig, out: str | Path, log: Callable[[str], None] = print,
                    command: Optional[str] = None, *, resume: bool = False,
                    stop_after: Optional[int] = None, should_stop: Optional[Callable[[], bool]] = None,
                    on_step: Optional[Callable[[int, "_Budget", float], None]] = None) -> TrainResult:
    """Train the transformer and write a miniature folder (config, tokenizer, weights, MODEL_CARD.md, loss.png).

    Every ``cfg.checkpoint_every`` steps the run's state goes to ``out/checkpoint/state.pt``. With
    ``resume`` the run in ``out`` continues from there with the config it was started with (``cfg`` is
    ignored) and repeats, step for step, what an uninterrupted run does. ``stop_after``: checkpoint and
    return after that many steps without writing the model (one sitting of a longer run). ``should_stop``
    (polled before every step, e.g. a signal guard) does the same and sets ``interrupted``; ``on_step(step,
    budget, loss)`` follows the steps (a progress bar). A run that completes removes its checkpoint."""
    from diffusers import AutoencoderKLWan

    from slotgen.models.miniature import (SETTINGS, TEXT_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, build_modules,
                                          build_tokenizer, make_exact_vae, write_miniature)

    ckpt = load_checkpoint(Path(out)) if resume else None
    if ckpt is not None:
        cfg = TrainConfig(**ckpt["config"])
        command = ckpt["command"] or command
        log(f"resuming {out} at step {ckpt['step']} ({ckpt['elapsed']:.0f} s trained)")
    cfg.validate()
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    if dev.type == "cuda":  # TF32 matmuls: the Hopper/Ampere fast path for fp32 training
        torch.backends.cuda.matmul.allow_tf32 = True
    rng, gen = np.random.default_rng([cfg.seed, 2]), torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    out = Path(out)
    res = TrainResult(out=out)

    vocabulary = world_vocabulary(cfg.world)
    tokenizer = build_tokenizer(vocabulary)
    # one-step regression (σ = 1 always) samples in one Euler step
    settings = {"settings": {**SETTINGS.to_dict(), "steps": 1}} if cfg.sigma_one_prob >= 1.0 else {}
    config = {"transformer": TRANSFORMER_CONFIG, "vae": VAE_CONFIG,
              "text_encoder": {**TEXT_CONFIG, "vocab_size": len(tokenizer.get_vocab())}}
    transformer, vae, text_encoder = build_modules(config)  # built on the CPU (same init on any device)
    make_exact_vae(vae)

    log(f"data: rendering {cfg.episodes} {cfg.world} world episodes")
    clips = build_dataset(cfg.episodes, cfg.seed, cfg.max_gap, cfg.world)
    raw = encode_all(vae, [c.frames for c in clips])  # (C, T, h, w) each
    res.vae_max_error = max(float((vae.decode(r[None, :, :16]).sample[0] - c.frames[:, :16].float()).abs().max())
                            for r, c in zip(raw[:8], clips[:8]))  # decode(encode(x)) against x, first 16 frames
    flat = torch.cat([r.flatten(1) for r in raw], dim=1)  # (C, total)
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-4)
    res.latents_mean, res.latents_std = [float(v) for v in mean], [float(v) for v in std]
    for c, r in zip(clips, raw):
        c.latents = ((r - mean[:, None, None, None]) / std[:, None, None, None]).half()
    del raw, flat  # float32 copies of every latent: gigabytes at 512 episodes
    vae_config = {**VAE_CONFIG, "latents_mean": res.latents_mean, "latents_std": res.latents_std}
    sd = vae.state_dict()
    vae = AutoencoderKLWan(**vae_config)
    vae.load_state_dict(sd)
    vae.eval().requires_grad_(False)
    res.data_seconds = time.perf_counter() - t_start
    log(f"data ready in {res.data_seconds:.0f} s (exact VAE: max |x - decode(encode(x))| {res.vae_max_error:.1e})")

    transformer, text_encoder = transformer.to(dev), text_encoder.to(dev)
    conditioner = CaptionConditioner(text_encoder, tokenizer, 32, trainable=cfg.train_text)
    state = install_training_processors(transformer)
    transformer.train().requires_grad_(True)
    params = list(transformer.parameters())
    if cfg.train_text:
        text_encoder.train().requires_grad_(True)
        params += list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    scale = min(1.0, cfg.minutes / DEFAULT_MINUTES)  # a short budget keeps back a share for the rest, not 320 s
    budget = _Budget(cfg.steps, cfg.minutes * 60.0 - res.data_seconds - (20.0 + SLOT_STAGE_SECONDS) * scale)
    warm = 50 if cfg.steps is None else max(1, min(50, cfg.steps // 5))
    n = cfg.clip_chunks
    fixed = sample_batch(clips, np.random.default_rng(cfg.seed + 3), torch.Generator().manual_seed(cfg.seed + 4), cfg).to(dev)

    def evaluate() -> float:
        with torch.no_grad():
            return x0_loss(dit_forward(transformer, state, fixed, conditioner, n), fixed, cfg.min_sigma_weight).item()

    def snapshot() -> None:  # a loadable miniature folder of the weights now (no φ): a point of a learning curve
        folder = out / "snapshots" / f"step-{budget.done:06d}"
        write_miniature(folder, modules=(transformer, vae, text_encoder), name="miniature", vocabulary=vocabulary,
                        extra={**settings, "vae": vae_config, "training": {"config": cfg.to_dict(), "transformer_steps": budget.done,
                                                               "seconds": budget.elapsed()}})
        log(f"snapshot {folder}")

    if ckpt is not None:
        transformer.load_state_dict(ckpt["transformer"])
        if cfg.train_text:
            text_encoder.load_state_dict(ckpt["text_encoder"])
        opt.load_state_dict(ckpt["optimizer"])
        rng.bit_generator.state = json.loads(ckpt["rng"])
        gen.set_state(ckpt["gen"])
        res.losses = list(ckpt["losses"])
        res.eval_loss = (float(ckpt["eval_loss0"]), float("nan"))
        budget = _Budget(cfg.steps, budget.seconds, done=int(ckpt["step"]), elapsed=float(ckpt["elapsed"]))
    else:
        res.eval_loss = (evaluate(), float("nan"))
    t0 = budget.t0
    while budget.more():
        if should_stop is not None and should_stop():  # before a step: the checkpoint holds every step done
            save_checkpoint(out, cfg, res, budget, transformer, opt, rng, gen, command, text_encoder)
            res.steps, res.seconds, res.interrupted = budget.done, budget.elapsed(), True
            log(f"stopped after step {budget.done}; continue with --resume {out}")
            return res
        for g in opt.param_groups:
            g["lr"] = _lr(cfg.lr, budget.done, budget.progress(), warm)
        trait_weight = cfg.trait_weight if budget.done >= cfg.trait_from else 1.0
        batch = sample_batch(clips, rng, gen, cfg, trait_weight=trait_weight).to(dev)
        loss = x0_loss(dit_forward(transformer, state, batch, conditioner, n), batch, cfg.min_sigma_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        res.losses.append(loss.item())
        budget.done += 1
        if budget.done % 50 == 0 or budget.done == 1:
            log(f"step {budget.done}: loss {np.mean(res.losses[-50:]):.4f} ({time.perf_counter() - t0:.0f} s)")
        stopping = stop_after is not None and budget.done >= stop_after and budget.more()
        if cfg.snapshot_every and budget.done % cfg.snapshot_every == 0:
            snapshot()
        if stopping or (cfg.checkpoint_every and budget.done % cfg.checkpoint_every == 0):
            save_checkpoint(out, cfg, res, budget, transformer, opt, rng, gen, command, text_encoder)
        if on_step is not None:
            on_step(budget.done, budget, res.losses[-1])
        debug_step_line(budget.done)
        if stopping:
            res.steps, res.seconds = budget.done, budget.elapsed()
            log(f"stopped after step {budget.done}; continue with --resume {out}")
            return res
    res.steps, res.seconds = budget.done, time.perf_counter() - t0
    res.eval_loss = (res.eval_loss[0], evaluate())
    transformer.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    transformer.set_attn_processor(WanAttnProcessor())  # the saved model carries no training state
    transformer, text_encoder = transformer.cpu(), text_encoder.cpu()

    write_miniature(out, modules=(transformer, vae, text_encoder), name="miniature", vocabulary=vocabulary,
                    extra={**settings, "vae": vae_config, "training": {"config": cfg.to_dict(), "transformer_steps": res.steps,
                                                           "eval_loss": list(res.eval_loss)}})
    write_loss_png(out / "loss.png", res)
    (out / "training_log.json").write_text(json.dumps({"steps": res.steps, "seconds": res.seconds,
                                                       "data_seconds": res.data_seconds, "losses": res.losses}) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(cfg, res, command))
    if cfg.world == "sprites":  # φ is trained on the shape worlds' masks; the sprite world's slot policy uses its default φ
        log("slots: no φ stage for the sprite world")
    else:
        add_slot_phi(out, cfg.slots, log=log, command=command)  # SlotMemory's φ on the trained transformer's keys
    shutil.rmtree(out / Path(CHECKPOINT).parent, ignore_errors=True)  # the run is complete: nothing to resume
    log(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")
    return res


def _smooth(values: list[float], k: int) -> list[float]:
    if not values:
        return []
    k = max(1, min(k, len(values)))
    c = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    return list((c[k:] - c[:-k]) / k)


def write_loss_png(path: Path, res: TrainResult, size: tuple[int, int] = (640, 300)) -> None:
    """The training loss: raw (light) and moving average (dark), log-scaled y."""
    from PIL import Image, ImageDraw

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    vals = res.losses
    x0, y0, x1, y1 = 50, 25, W - 10, H - 30
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text((x0, 5), "transformer loss: weighted |x0_hat - x0|^2 / sigma^2", fill="black")
    if vals:
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


def _data_text(cfg: TrainConfig) -> str:
    if cfg.world == "sprites":
        return (f"{cfg.episodes} seeded episodes of the sprite world (`slotgen.world.sprites.sprite_episode`, seeds "
                f"`{cfg.seed}·100000 + i`; docs/MINIATURE.md): one sprite in one 16×16 cell, one cell a chunk, the "
                "entrance caption naming side, row, colour, shape and dot, the dot never named after it; 0–8 empty "
                "chunks of absence. The text encoder's word embeddings are trained with the transformer.")
    return (f"{cfg.episodes} seeded episodes of the `{cfg.world}` shape world (`slotgen.world.exit_return_episode`, "
            f"seeds `{cfg.seed}·100000 + i`; docs/WORLD.md): one entity per lane at most (35 % of multi-entity "
            f"episodes with a same-kind \"similar\" companion), absence gaps 0–{cfg.max_gap} video frames, captions "
            "from the world grammar.")


def model_card(cfg: TrainConfig, res: TrainResult, command: Optional[str]) -> str:
    from slotgen.models.miniature import SETTINGS, TEXT_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG

    cmd = command or "slotgen train-miniature " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    defaults = TrainConfig()
    named = ("world", "episodes", "batch", "clip_chunks", "placement_weight", "trait_weight", "trait_from")
    flags = "".join(f" --{k.replace('_', '-')} {getattr(cfg, k)}" for k in named if getattr(cfg, k) != getattr(defaults, k))
    repro = (f"slotgen train-miniature --out DIR --seed {cfg.seed} --steps {res.steps} --threads {cfg.threads}{flags}"
             + (f" --device {cfg.device}" if cfg.device != "cpu" else ""))
    return f"""# Model card: slotgen miniature (trained on the shape world)

Produced by `{cmd}`.

Exact re-run (an explicit step count makes the run independent of machine speed; the learning-rate
schedule then follows steps, so the numbers can differ slightly from a time-budgeted run):
`{repro}`

## Architecture (miniature configs; loading path `slotgen.models.miniature.load_miniature`)

- transformer: diffusers `WanTransformer3DModel` {json.dumps(TRANSFORMER_CONFIG)}; predicts x0
  (`prediction: {SETTINGS.prediction}`), sampled with the `{SETTINGS.sampler}` sampler, {SETTINGS.steps} steps, shift {SETTINGS.shift:g}
- VAE: `AutoencoderKLWan` {json.dumps({k: v for k, v in VAE_CONFIG.items() if not k.startswith('latents_')})},
  **constructed, not trained** (`make_exact_vae`: an exact code of each 4×4 pixel block); max |x − decode(encode(x))| on
  8 training clips (first 16 frames): {res.vae_max_error:.1e} on the [−1, 1] scale. Latent statistics of the data: mean
  {np.round(res.latents_mean, 4).tolist()}, std {np.round(res.latents_std, 4).tolist()}
- text encoder: `UMT5EncoderModel` {json.dumps(TEXT_CONFIG)}, {"**trained with the transformer** from a random init" if cfg.train_text else "**random init, frozen**"} (seed {cfg.seed}):
  each vocabulary word has its own {"learned" if cfg.train_text else "random"} embedding, which the transformer learns to read.
- 64×64 video at 16 fps; 3 latent frames = 3 video frames per chunk.

## Data

{_data_text(cfg)}

## Training

| steps | seconds | batch | lr | final loss (mean of last 50 steps) | fixed-batch loss before → after |
|---|---|---|---|---|---|
| {res.steps} | {res.seconds:.0f} | {cfg.batch} | {cfg.lr:g} | {_tail(res.losses):.4f} | {res.eval_loss[0]:.4f} → {res.eval_loss[1]:.4f} |

- Objective: clips of {cfg.clip_chunks} chunks; a sequence is `[relocated chunk ; clean chunks ; noisy chunks]`
  with a block-causal mask (noisy chunk j sees the relocated chunk, clean chunks < j and itself; RoPE
  positions of clean chunk j), per-token timesteps (0 for clean); σ per chunk 1 with probability
  {cfg.sigma_one_prob:g}, else {cfg.sigma_shift:g}u/(1 + {cfg.sigma_shift - 1:g}u), u ~ U(0, 1); loss
  ‖x̂0 − x0‖²/max(σ, {cfg.min_sigma_weight:g})², latent cells within 2 px of an entity weighted ×{1 + cfg.entity_weight:g};
  half the samples get N(0, s²), s ~ U(0, {cfg.context_noise:g}), on their clean context; chunks whose caption
  places the entity (entrance, return) weighted ×{cfg.placement_weight:g}; the latent cells of a drawn sprite's trait
  (the sprite world's dot) weighted ×{cfg.trait_weight:g}{f' from step {cfg.trait_from} on (×1 before)' if cfg.trait_from else ''}.
- Memory: with probability {cfg.return_prob:g} the clip covers the protagonist's return and the relocated chunk is
  one from before it left (it is fully inside); otherwise, with probability {cfg.relocate_prob:g}, a random
  earlier chunk. Up to {cfg.token_drop:.0%} of the relocated tokens are masked out.
- Optimiser AdamW (β 0.9/0.95, weight decay 0.01), warm-up 50 steps, cosine decay to 5 %, grad-norm clip 1.0,
  {cfg.threads} CPU thread(s) on `{cfg.device}`.
- Data rendering and encoding: {res.data_seconds:.0f} s.

Loss curve: `loss.png`. Training config: {json.dumps(cfg.to_dict())}
"""
