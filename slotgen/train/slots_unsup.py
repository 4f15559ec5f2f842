"""Train SlotMemory's slot projection φ without labels, on a model's own keys (``slotgen train-slots``).

Object-centric learning finds objects without masks by training slot attention on frozen
self-supervised features: DINOSAUR (Seitzer et al., "Bridging the Gap to Real-World Object-Centric
Learning", ICLR 2023) reconstructs frozen DINO features from the slots; VideoSAUR (Zadaianchuk et al.,
"Object-Centric Learning for Real-World Videos by Predicting Temporal Feature Similarities", NeurIPS
2023, arXiv 2306.04829) adds a loss on the features' similarity across neighbouring frames; SlotContrast
(arXiv 2412.14295) contrasts slots over time. A video diffusion transformer's un-roped self-attention
keys are frozen features too, and they are what SlotMemory's slots route on. Our adaptation:

* **Features.** Each layer's un-roped keys ``k`` (N, H, D) of every chunk a render commits: the memory
  policy's ``write`` hands them over on the engine's commit pass (timestep 0, the chunk's clean latents),
  re-cache passes excluded. Sources: the model's own renders of storyboards (:func:`storyboard_chunks`)
  or clips (:func:`video_chunks`: decoded with the project's video reader, encoded with the model's VAE,
  committed chunk by chunk with :meth:`StreamingEngine.generate_chunk` ``latents=``, as ``bench identity
  --past truth`` forces its ground-truth past). At most ``cells`` grid cells per latent frame are kept,
  the same cells in every frame of a chunk (seeded), so the temporal term compares like with like.
* **φ_l(k) = normalise(W_l · flatten(k))** per layer (:class:`~slotgen.memory.slot_attention.LinearPhi`),
  grouped by the policy's own slot attention (its iterations and temperature, farthest-point init as
  on a first chunk; its slot count unless ``slots`` sets another): ``U, A = slot_attention(φ(k))``, A (S, N).
* **Reconstruction** (DINOSAUR): decode every token's unit key from the slots, mixed by the assignment:
  ``k̂_n = Σ_s A[s, n] · (W_dec U_s + b)``; loss = mean over tokens of ‖k̂_n − k_n/‖k_n‖‖². The slots must
  carry what the keys say, and tokens may share a slot only where one vector explains their keys.
* **Temporal similarity** (VideoSAUR, weight ``temporal_weight``): for neighbouring latent frames
  t, t+1 of a chunk, the keys' affinity ``P_ij = softmax_j(cos(k_i^t, k_j^{t+1}) / τ_t)`` is the target
  for the transition the slots imply, ``Q_ij = Σ_s A[s, i] · A[s, j] / Σ_j' A[s, j']`` (leave token i
  by its slot, land on a token of the next frame in proportion to that slot's mass there); loss =
  cross-entropy −Σ_j P_ij log Q_ij, averaged over i. Tokens a key correspondence links across time are
  pushed into one slot.
* **Slot contrast** (SlotContrast, weight ``contrast_weight``): pairs of consecutive chunks of one
  source. The first is grouped from farthest-point seeds, the second from the first's slots (the
  policy's temporal init), so slot s of both chunks is meant to be one thing. InfoNCE over the batch's
  slots: ``logits = U¹ (U²)ᵀ / τ_c`` over all B·S slots of each chunk, the target of slot s of pair b
  is slot s of the same pair's next chunk, symmetric (both directions averaged). Every other slot, of
  this chunk and of the other pairs, is a negative: slots must stay what they were and differ from one
  another, which an assignment that splits one thing over several slots cannot do.

* **Other targets** (``target``, :data:`TARGETS`): ``standardised`` has φ read every key channel over its
  standard deviation (folded into W when φ is returned) and the slots reconstruct z-scored keys;
  ``similarity`` replaces the reconstruction by :func:`similarity_loss` (VideoSAUR's feature-similarity
  target within a chunk, τ ``temporal_tau``).

No ground-truth mask enters anything here. The supervised mode (``slotgen train-slots --supervised``,
:mod:`slotgen.train.slots`) remains for the miniature's benchmark.

The run is resumable: a checkpoint beside the output holds the keys collected so far (sources done)
and, once training, the parameters, the optimiser and the batch generator. It is written after every
source and every ``checkpoint_every`` steps (what ``kill -9`` resumes from), and when ``should_stop``
asks for a stop (:class:`Stopped`; the CLI's SIGINT, SIGTERM and SIGHUP). With the same seed and thread
count a run, interrupted or not, repeats exactly. With ``SLOTGEN_DEBUG_CHUNKS=1`` each step prints
``slotgen-step N`` on stderr after its checkpoint, and ``SLOTGEN_DEBUG_HOLD_AFTER_STEP=N`` holds the run
there until a line arrives on stdin (:func:`slotgen.train.miniature.debug_step_line`; the stop tests).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from slotgen.errors import SlotgenError
from slotgen.memory.slot import SlotConfig
from slotgen.memory.slot_attention import LinearPhi, batched_farthest_point_init, batched_slot_attention

CHECKPOINT_FORMAT = "slotgen-train-slots-checkpoint"
#: What the slots are trained to explain: ``keys`` (unit keys, linear decoder), ``standardised`` (each key
#: channel standardised over the collected keys, for φ's input as a per-channel scale folded into W at the
#: end, for the target as a z-score), ``similarity`` (each token's key-affinity row within its chunk).
TARGETS = ("keys", "standardised", "similarity")


@dataclass
class UnsupConfig:
    """Everything that determines an unsupervised φ run (stored in the φ file's header and the checkpoint)."""

    seed: int = 0
    dim: int = 32  # D', the slot feature size
    steps: int = 400
    batch: int = 32  # chunks per step
    lr: float = 3e-3
    temporal_weight: float = 0.0  # 0: reconstruction only (the default: the term lowered purity on the selection set)
    temporal_tau: float = 0.1  # τ_t of the keys' affinity across frames
    contrast_weight: float = 0.0  # slot contrast across consecutive chunks (0: off)
    contrast_tau: float = 0.1  # τ_c of the slot InfoNCE
    slots: int = 0  # slots while training (0: the policy's, 8); fewer make φ group coarser
    target: str = "keys"  # what the slots must explain (TARGETS)
    cells: int = 256  # grid cells kept per latent frame (all when the frame has fewer)
    max_chunks: int = 2000  # chunks collected at most (the keys stay in memory and in the checkpoint)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise SlotgenError(f"--target: expected one of {', '.join(TARGETS)}, got {self.target!r}")
        for name, v, low in (("--dim", self.dim, 2), ("--steps", self.steps, 1), ("--batch", self.batch, 1),
                             ("--cells", self.cells, 2), ("--max-chunks", self.max_chunks, 1),
                             ("slots", self.slots, 0)):
            if v < low:
                raise SlotgenError(f"{name} must be at least {low}, got {v}")
        if not self.contrast_tau > 0 or self.contrast_weight < 0:
            raise SlotgenError(f"the slot-contrast τ must be positive and --contrast-weight non-negative, got "
                               f"{self.contrast_tau}, {self.contrast_weight}")
        if not self.lr > 0 or not self.temporal_tau > 0 or self.temporal_weight < 0:
            raise SlotgenError(f"--lr and the temporal τ must be positive and --temporal-weight non-negative, got "
                               f"{self.lr}, {self.temporal_tau}, {self.temporal_weight}")


@dataclass
class KeyChunk:
    """One committed chunk's keys: per layer (F·c, H·D) float16, frame-major (c cells of frame 0, then 1, ...)."""

    keys: list[torch.Tensor]
    frames: int  # F latent frames
    cells: int  # c cells per frame
    source: int = -1  # index of the source it came from (consecutive chunks of one source pair up); -1 unknown


class Stopped(Exception):
    """A signal stopped the run after writing its checkpoint; ``exit_code`` 130 (SIGINT/SIGHUP) or 143 (SIGTERM)."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 143 if signum == signal.SIGTERM else 130
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")


# -- features ---------------------------------------------------------------------------------------------
def _cell_pick(tokens_per_frame: int, cells: int, rng: np.random.Generator) -> torch.Tensor:
    if tokens_per_frame <= cells:
        return torch.arange(tokens_per_frame)
    return torch.from_numpy(np.sort(rng.choice(tokens_per_frame, size=cells, replace=False)))


def spy_commits(policy, tokens_per_frame: int, cells: int, rng: np.random.Generator, out: list[KeyChunk],
                source: int = -1) -> None:
    """Make ``policy`` hand a copy of every commit pass's keys to ``out`` (one :class:`KeyChunk` per chunk;
    re-cache passes are skipped). The policy itself behaves exactly as before."""
    write, end_chunk = policy.write, policy.end_chunk
    pending: dict[int, torch.Tensor] = {}

    def spy_write(layer, block):
        if not policy.ctx.recache:
            pending[layer] = block.k.float().mean(dim=0)  # (B, N, H, D) → (N, H, D)
        write(layer, block)

    def spy_end():
        if pending:
            n = pending[0].shape[0]
            frames = n // tokens_per_frame
            pick = _cell_pick(tokens_per_frame, cells, rng)  # (c,) the same cells in every frame
            rows = (torch.arange(frames)[:, None] * tokens_per_frame + pick[None]).flatten()  # (F·c,)
            keys = [pending[layer][rows].flatten(1).to(torch.float16).cpu() for layer in sorted(pending)]
            out.append(KeyChunk(keys, frames, len(pick), source))
            pending.clear()
        end_chunk()

    policy.write, policy.end_chunk = spy_write, spy_end


def storyboard_chunks(bundle, path: Path, cfg: UnsupConfig, rng: np.random.Generator,
                      limit: Optional[int] = None, source: int = -1) -> list[KeyChunk]:
    """Render ``path`` with ``bundle`` (its own memory section, seed and prompts; frames are not decoded) and
    return every committed chunk's keys (the first ``limit`` chunks only, when given)."""
    from slotgen.render import Renderer
    from slotgen.storyboard import load_storyboard

    sb = load_storyboard(path)
    renderer = Renderer(sb, bundle=bundle)
    out: list[KeyChunk] = []
    th, tw = renderer.engine.token_hw
    spy_commits(renderer.policy, th * tw, cfg.cells, rng, out, source)
    for _ in renderer.engine.run(renderer.storyboard, decode=False):
        if limit is not None and len(out) >= limit:
            break
    return out


def read_clip(path: Path, size: tuple[int, int], fps: int, note: Callable[[str], None]) -> np.ndarray:
    """A clip as uint8 (T, H, W, 3) at the model's ``size`` (W, H) and ``fps``: other sizes are resized
    (bilinear, antialiased), other frame rates resampled to the nearest frame; each says so in one line.
    An unreadable file raises a one-line :class:`SlotgenError`."""
    from slotgen.video.writer import probe_video, read_video

    try:
        info = probe_video(path)
        frames = read_video(path)
    except SlotgenError:
        raise
    except Exception as err:  # noqa: BLE001 - PyAV raises many types for a file that is not a video
        raise SlotgenError(f"{path}: cannot read it as a video ({type(err).__name__})") from None
    W, H = size
    src_fps = info["fps"] or fps
    if abs(src_fps - fps) > 1e-3:
        t = np.arange(int(len(frames) * fps / src_fps))
        frames = frames[np.minimum(np.round(t * src_fps / fps).astype(int), len(frames) - 1)]
        note(f"{path.name}: {src_fps:g} fps resampled to the model's {fps} fps (nearest frame)")
    if frames.shape[1:3] != (H, W):
        note(f"{path.name}: {frames.shape[2]}x{frames.shape[1]} resized to the model's {W}x{H}")
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, h, w)
        x = F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return frames


@torch.no_grad()
def video_chunks(bundle, path: Path, cfg: UnsupConfig, rng: np.random.Generator, prompt: str, size: tuple[int, int],
                 note: Callable[[str], None], limit: Optional[int] = None, source: int = -1) -> list[KeyChunk]:
    """Encode a clip with the model's VAE and commit it chunk by chunk through the engine (the render's
    commit pass, with ``prompt``); return every chunk's keys (the first ``limit`` only, when given). A
    clip too short for one chunk gives none."""
    from slotgen.bench.identity import ground_truth_latents
    from slotgen.engine.generator import EngineOptions, StreamingEngine
    from slotgen.memory import build_policy
    from slotgen.memory.registry import default_memory, resolve_memory

    s = bundle.settings
    frames = read_clip(path, size, s.fps, note)
    st = s.vae_stride_t
    usable = 1 + ((len(frames) - 1) // st) * st if st > 1 else len(frames)  # whole latent frames only
    if limit is not None:  # encode no more than the chunks wanted: latent frames 0 .. limit·F − 1
        usable = min(usable, 1 + (limit * bundle.settings.chunk_frames - 1) * st)
    lat = ground_truth_latents(bundle, frames[:usable])  # (1, C, L, h, w) normalised
    memory = resolve_memory(default_memory(), s.preset)
    policy = build_policy(memory, len(bundle.transformer.blocks))
    engine = StreamingEngine(bundle, policy, EngineOptions(seed=cfg.seed, fps=s.fps, width=size[0], height=size[1],
                                                           steps=s.steps, shift=s.shift, preset=memory.preset))
    th, tw = engine.token_hw
    out: list[KeyChunk] = []
    spy_commits(policy, th * tw, cfg.cells, rng, out, source)
    Fc = engine.geometry.chunk_frames
    for c in range(lat.shape[2] // Fc):
        if limit is not None and len(out) >= limit:
            break
        engine.generate_chunk(0, prompt, latents=lat[:, :, c * Fc:(c + 1) * Fc], decode=False)
    if not out:
        note(f"{path.name}: {len(frames)} frames make no whole chunk of {Fc} latent frames; skipped")
    return out


def list_sources(storyboards: Optional[Path], videos: Optional[Path]) -> list[Path]:
    """The files to learn from, sorted: ``*.yaml``/``*.yml`` in ``storyboards`` or ``*.mp4``/``*.mkv``/
    ``*.webm``/``*.mov`` in ``videos`` (exactly one of the two)."""
    if (storyboards is None) == (videos is None):
        raise SlotgenError("give one of --storyboards DIR (the model's own renders) or --videos DIR (clips)")
    root, exts, flag = (storyboards, (".yaml", ".yml"), "--storyboards") if storyboards is not None else \
        (videos, (".mp4", ".mkv", ".webm", ".mov"), "--videos")
    if not root.is_dir():
        raise SlotgenError(f"{flag} {root}: not a directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise SlotgenError(f"{flag} {root}: no {'/'.join(exts)} files in it")
    return files


# -- the objective ----------------------------------------------------------------------------------------
def reconstruction_loss(a: torch.Tensor, u: torch.Tensor, target: torch.Tensor, dec_w: torch.Tensor,
                        dec_b: torch.Tensor) -> torch.Tensor:
    """DINOSAUR-style: a (B, S, N) assignments, u (B, S, D') slots, target (B, N, W) unit keys, a linear
    decoder (W, D') + (W,). Mean over tokens of the squared error of k̂ = Aᵀ (U W_decᵀ + b)."""
    per_slot = u @ dec_w.T + dec_b  # (B, S, W)
    recon = a.transpose(1, 2) @ per_slot  # (B, N, S) @ (B, S, W) → (B, N, W)
    return ((recon - target) ** 2).sum(-1).mean()


def temporal_loss(a: torch.Tensor, target: torch.Tensor, frames: int, tau: float) -> torch.Tensor:
    """VideoSAUR-style similarity consistency (module docstring). a (B, S, F·c), target (B, F·c, W) unit
    keys, frame-major. Mean over the F−1 neighbouring frame pairs and their tokens."""
    B, S, N = a.shape
    c = N // frames
    losses = []
    for t in range(frames - 1):
        now, nxt = slice(t * c, (t + 1) * c), slice((t + 1) * c, (t + 2) * c)
        p = torch.softmax(target[:, now] @ target[:, nxt].transpose(1, 2) / tau, dim=-1)  # (B, c, c) keys' affinity
        a_next = a[:, :, nxt] / a[:, :, nxt].sum(-1, keepdim=True).clamp_min(1e-8)  # (B, S, c) each slot's mass there
        q = a[:, :, now].transpose(1, 2) @ a_next  # (B, c, S) @ (B, S, c) → (B, c, c), rows sum to 1
        losses.append(-(p * torch.log(q.clamp_min(1e-8))).sum(-1).mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def contrast_loss(u_now: torch.Tensor, u_next: torch.Tensor, tau: float) -> torch.Tensor:
    """SlotContrast-style slot InfoNCE (module docstring). u_now, u_next (B, S, D') unit slots of a chunk
    and of the next chunk (grouped from u_now). Symmetric cross-entropy over all B·S slots."""
    B, S, D = u_now.shape
    logits = u_now.reshape(B * S, D) @ u_next.reshape(B * S, D).T / tau  # (B·S, B·S)
    target = torch.arange(B * S)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def similarity_loss(a: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """VideoSAUR's feature-similarity target within a chunk: a (B, S, N) assignments, target (B, N, W) unit
    keys. For every token i the keys' affinity ``P_ij = softmax_{j≠i}(cos(k_i, k_j) / τ)`` is the target of
    the move the slots imply, ``Q_ij ∝ Σ_s A[s, i] · A[s, j] / Σ_j' A[s, j']`` (j ≠ i, renormalised);
    cross-entropy −Σ_j P_ij log Q_ij, averaged over tokens."""
    N = a.shape[2]
    eye = torch.eye(N, dtype=torch.bool)
    p = torch.softmax((target @ target.transpose(1, 2) / tau).masked_fill(eye, float("-inf")), dim=-1)  # (B, N, N)
    a_to = a / a.sum(-1, keepdim=True).clamp_min(1e-8)  # (B, S, N) each slot's mass over tokens
    q = (a.transpose(1, 2) @ a_to).masked_fill(eye, 0.0)  # (B, N, N)
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-8)
    return -(p * torch.log(q.clamp_min(1e-8))).sum(-1).mean()


def channel_stats(data: list[KeyChunk], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (W,) of every key channel of ``layer`` over all collected tokens."""
    k = torch.cat([c.keys[layer] for c in data]).float()  # (T, W)
    return k.mean(0), k.std(0).clamp_min(1e-6)


def group(f: torch.Tensor, settings: SlotConfig,
          init: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's grouping of features f (B, N, D') → U (B, S, D'), A (B, S, N), differentiable through
    the iterations: from ``init`` (B, S, D') (temporal init: the previous chunk's slots) or, as on a first
    chunk, from farthest-point seeds (picks of f rows)."""
    if init is None:
        init = batched_farthest_point_init(f.detach(), settings.num_slots)  # (B, S, D')
    return batched_slot_attention(f, init, settings.iters, settings.temperature)


@dataclass
class UnsupState:
    """What the checkpoint holds (module docstring)."""

    config: dict
    model_digest: str
    sources: list[str]  # the sources to learn from, in order
    done: int = 0  # sources collected
    chunks: list[KeyChunk] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    step: int = 0
    params: Optional[dict] = None  # enc / dec_w / dec_b: per-layer tensors
    opt: Optional[dict] = None
    rng: Optional[dict] = None  # the batch generator's state
    losses: list[float] = field(default_factory=list)
    collect_rng: Optional[dict] = None

    def to_payload(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "chunks"}
        d["format"] = CHECKPOINT_FORMAT
        d["chunks"] = [{"keys": c.keys, "frames": c.frames, "cells": c.cells, "source": c.source} for c in self.chunks]
        return d

    @classmethod
    def from_payload(cls, d: dict) -> "UnsupState":
        d = dict(d)
        d.pop("format", None)
        chunks = [KeyChunk(c["keys"], int(c["frames"]), int(c["cells"]), int(c.get("source", -1)))
                  for c in d.pop("chunks")]
        return cls(**d, chunks=chunks)


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name.split(".")[0] + ".checkpoint.pt")


def save_checkpoint(path: Path, state: UnsupState) -> None:
    from slotgen.atomic import atomic_output

    with atomic_output(path) as tmp:
        torch.save(state.to_payload(), tmp)


def load_checkpoint(path: Path) -> UnsupState:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise SlotgenError(f"checkpoint {path}: cannot read it ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise SlotgenError(f"checkpoint {path}: not a train-slots checkpoint")
    return UnsupState.from_payload(payload)


@dataclass
class UnsupResult:
    phi: LinearPhi
    losses: list[float]
    chunks: int
    seconds: float
    notes: list[str]


class Progress:
    """Progress lines with an ETA from the pace of the work itself: the first item of a stage (model
    warm-up, first-call costs) is not extrapolated."""

    def __init__(self, log: Callable[[str], None], every: float = 5.0):
        self.log, self.every = log, every
        self._t: dict[str, list[float]] = {}
        self._last = 0.0

    def tick(self, stage: str, done: int, total: int, extra: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        times = self._t.setdefault(stage, [])
        times.append(now)
        if not force and now - self._last < self.every and done < total:
            return
        self._last = now
        eta = "?"
        if len(times) >= 3:  # pace from the items after the first
            pace = (times[-1] - times[1]) / (len(times) - 2)
            eta = f"{pace * (total - done):.0f} s"
        bar = "#" * round(20 * done / max(total, 1))
        self.log(f"{stage} [{bar:<20}] {done}/{total} {extra}ETA {eta}".rstrip())


def train_unsupervised(bundle, sources: list[Path], out: Path, cfg: UnsupConfig, *, kind: str, resume: bool = False,
                       prompt: str = "", size: Optional[tuple[int, int]] = None, log: Callable[[str], None] = print,
                       should_stop: Callable[[], Optional[int]] = lambda: None,
                       chunks: Optional[list[KeyChunk]] = None, checkpoint_every: int = 100) -> UnsupResult:
    """Collect keys from ``sources`` (``kind`` "storyboards" or "videos") and fit φ; returns it (the caller
    writes the φ file). ``should_stop()`` returns a signal number to stop at the next safe point: the
    checkpoint is written and :class:`Stopped` raised. ``resume`` continues from the checkpoint. ``chunks``:
    keys collected already (an ablation trains several objectives on one collection). ``checkpoint_every``:
    steps between periodic checkpoints (also one after every source); 0: only on a stop and at the end."""
    from slotgen.train.miniature import debug_step_line

    cfg.validate()
    if checkpoint_every < 0:
        raise SlotgenError(f"--checkpoint-every must be 0 or more, got {checkpoint_every}")
    t0 = time.perf_counter()
    ckpt = checkpoint_path(out)
    if resume:
        if not ckpt.is_file():
            raise SlotgenError(f"--resume: no checkpoint {ckpt} to continue")
        state = load_checkpoint(ckpt)
        if state.model_digest != bundle.digest:
            raise SlotgenError(f"checkpoint {ckpt} belongs to another model (digest {state.model_digest[:12]})")
        stored = {**{k: v for k, v in UnsupConfig().to_dict().items() if k not in state.config}, **state.config}
        if stored != cfg.to_dict() or state.sources != [str(p) for p in sources]:
            raise SlotgenError(f"checkpoint {ckpt} was made with other settings or sources; rerun without --resume "
                               f"to start over")
        log(f"slots: resuming at source {state.done}/{len(sources)}, step {state.step}/{cfg.steps}")
    else:
        if ckpt.is_file() and chunks is None:  # an interrupted run's work is never overwritten silently
            raise SlotgenError(f"checkpoint {ckpt} exists from an interrupted run: add --resume to continue it, "
                               f"or delete it to start over")
        state = UnsupState(cfg.to_dict(), bundle.digest, [str(p) for p in sources])
        if chunks is not None:
            state.chunks, state.done = list(chunks), len(sources)

    def stop_here() -> None:
        signum = should_stop()
        if signum is not None:
            save_checkpoint(ckpt, state)
            raise Stopped(signum, ckpt)

    def note(msg: str) -> None:
        state.notes.append(msg)
        log(f"note: {msg}")

    # -- stage 1: keys ---------------------------------------------------------------------------------
    size = size or tuple(bundle.settings.resolution)
    rng = np.random.default_rng([cfg.seed, 17])
    if state.collect_rng is not None:
        rng.bit_generator.state = state.collect_rng
    progress = Progress(log)
    while state.done < len(sources) and len(state.chunks) < cfg.max_chunks:
        path = sources[state.done]
        if kind == "storyboards":
            got = storyboard_chunks(bundle, path, cfg, rng, limit=cfg.max_chunks - len(state.chunks), source=state.done)
        else:
            try:
                got = video_chunks(bundle, path, cfg, rng, _caption(path, prompt), size, note,
                                   limit=cfg.max_chunks - len(state.chunks), source=state.done)
            except SlotgenError as err:
                note(f"skipped: {err}")
                got = []
        state.chunks.extend(got[: cfg.max_chunks - len(state.chunks)])
        state.done += 1
        state.collect_rng = rng.bit_generator.state
        progress.tick("keys", state.done, len(sources), f"({len(state.chunks)} chunks) ", force=True)
        if os.environ.get("SLOTGEN_TRAIN_SLOTS_HOLD") == "1" and state.done == 1:
            sys.stdin.readline()  # tests: hold after the first source until a signal can be sent
        if checkpoint_every > 0 and should_stop() is None:
            save_checkpoint(ckpt, state)  # the sources rendered so far survive kill -9
        stop_here()
    if not state.chunks:
        raise SlotgenError("no chunk could be collected from the sources (see the notes above)")

    # -- stage 2: φ ------------------------------------------------------------------------------------
    data = state.chunks
    n_layers, width = len(data[0].keys), data[0].keys[0].shape[1]
    settings = SlotConfig(num_slots=cfg.slots) if cfg.slots else SlotConfig()  # the policy's iterations and τ
    if state.params is None:
        g = torch.Generator().manual_seed(cfg.seed * 1000 + 23)
        state.params = {"enc": [torch.randn(cfg.dim, width, generator=g) / width ** 0.5 for _ in range(n_layers)],
                        "dec_w": [torch.zeros(width, cfg.dim) for _ in range(n_layers)],
                        "dec_b": [torch.zeros(width) for _ in range(n_layers)]}
    params = {k: [torch.nn.Parameter(t.clone()) for t in v] for k, v in state.params.items()}
    # standardised: φ reads k / σ (W_l · diag(1/σ) is what the φ file holds), the target is (k − μ) / σ
    stats = [channel_stats(data, layer) for layer in range(n_layers)] if cfg.target == "standardised" else None
    flat = params["enc"] + params["dec_w"] + params["dec_b"]
    opt = torch.optim.Adam(flat, lr=cfg.lr)
    if state.opt is not None:
        opt.load_state_dict(state.opt)
    batch_rng = np.random.default_rng([cfg.seed, 29])
    if state.rng is not None:
        batch_rng.bit_generator.state = state.rng
    shapes = sorted({(c.frames, c.cells) for c in data})  # chunks of one shape are batched together
    pairs: dict = {}  # shape → [(i, i + 1)] consecutive chunks of one source (slot contrast)
    if cfg.contrast_weight > 0:
        for i in range(len(data) - 1):
            a, b = data[i], data[i + 1]
            if a.source >= 0 and a.source == b.source and (a.frames, a.cells) == (b.frames, b.cells):
                pairs.setdefault((a.frames, a.cells), []).append((i, i + 1))
        if not pairs:
            raise SlotgenError("--contrast-weight needs two consecutive chunks of one source; no source gave two")
        shapes = sorted(pairs)

    def sync_state() -> None:
        state.params = {k: [p.detach().clone() for p in v] for k, v in params.items()}
        state.opt = opt.state_dict()
        state.rng = batch_rng.bit_generator.state

    while state.step < cfg.steps:
        shape = shapes[int(batch_rng.integers(len(shapes)))] if len(shapes) > 1 else shapes[0]
        if cfg.contrast_weight > 0:  # batch/2 pairs of consecutive chunks: as many chunks per step
            pp = pairs[shape]
            pick = batch_rng.integers(0, len(pp), size=max(1, cfg.batch // 2))
            rows = [[pp[i][0] for i in pick], [pp[i][1] for i in pick]]
        else:
            pool = [i for i, c in enumerate(data) if (c.frames, c.cells) == shape]
            rows = [[pool[i] for i in batch_rng.integers(0, len(pool), size=cfg.batch)]]
        loss = torch.zeros(())
        for layer in range(n_layers):
            u_prev = None
            for part in rows:  # one part, or a chunk part and its next-chunk part
                k = torch.stack([data[i].keys[layer] for i in part]).float()  # (B, N, W)
                target = F.normalize(k, dim=-1)
                if stats is not None:
                    mu, sd = stats[layer]
                    f = F.normalize((k / sd) @ params["enc"][layer].T, dim=-1)  # (B, N, D')
                    recon_target = (k - mu) / sd / width ** 0.5  # z-scores, about unit length per token
                else:
                    f = F.normalize(k @ params["enc"][layer].T, dim=-1)  # (B, N, D')
                    recon_target = target
                u, a = group(f, settings, init=u_prev)  # the next chunk starts from the chunk's slots
                w = len(part) / sum(len(r) for r in rows)  # parts weighted by their chunks
                if cfg.target == "similarity":
                    loss = loss + w * similarity_loss(a, target, cfg.temporal_tau)
                else:
                    loss = loss + w * reconstruction_loss(a, u, recon_target, params["dec_w"][layer],
                                                          params["dec_b"][layer])
                if cfg.temporal_weight > 0 and shape[0] > 1:
                    loss = loss + w * cfg.temporal_weight * temporal_loss(a, target, shape[0], cfg.temporal_tau)
                if u_prev is not None:
                    loss = loss + cfg.contrast_weight * contrast_loss(u_prev, u, cfg.contrast_tau)
                u_prev = u
        loss = loss / n_layers
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state.losses.append(float(loss.detach()))
        state.step += 1
        progress.tick("steps", state.step, cfg.steps, f"loss {np.mean(state.losses[-20:]):.4f} ")
        if (checkpoint_every > 0 and state.step % checkpoint_every == 0 and state.step < cfg.steps
                and should_stop() is None):
            sync_state()
            save_checkpoint(ckpt, state)  # what kill -9 resumes from
        debug_step_line(state.step)
        if should_stop() is not None:
            sync_state()
            stop_here()
    sync_state()
    save_checkpoint(ckpt, state)  # a crash while the φ file is written loses nothing
    enc = [w.detach().clone() for w in params["enc"]]
    if stats is not None:  # fold the per-channel input scale into W: φ(k) = normalise(W · diag(1/σ) · k)
        enc = [w / stats[layer][1][None] for layer, w in enumerate(enc)]
    phi = LinearPhi(enc)
    return UnsupResult(phi, list(state.losses), len(data), time.perf_counter() - t0, list(state.notes))


def _caption(path: Path, prompt: str) -> str:
    """A clip's caption: ``CLIP.txt`` beside it when there is one, else ``prompt``."""
    side = path.with_suffix(".txt")
    return side.read_text().strip() if side.is_file() else prompt


def train_slots(model: str, out: Optional[Path], cfg: UnsupConfig, *, storyboards: Optional[Path] = None,
                videos: Optional[Path] = None, resume: bool = False, prompt: str = "", device: str = "cpu",
                size: Optional[tuple[int, int]] = None, log: Callable[[str], None] = print,
                should_stop: Callable[[], Optional[int]] = lambda: None, command: Optional[str] = None,
                bundle=None, checkpoint_every: int = 100) -> Path:
    """``slotgen train-slots`` without labels: load ``model``, learn φ, write ``out`` (default: the model
    folder's ``slot_phi.safetensors``, which the folder then uses). Returns the φ file's path."""
    from slotgen.memory.phi_file import PHI_FILE, save_phi
    from slotgen.models import BUILTIN_MODELS, load_model

    sources = list_sources(storyboards, videos)
    if out is None:
        if model in BUILTIN_MODELS or not Path(model).is_dir():
            raise SlotgenError(f"--out FILE is needed for the built-in model {model!r} (no folder to put φ in)")
        out = Path(model) / PHI_FILE
    from slotgen.atomic import check_output_path

    out = check_output_path(out)
    if bundle is None:
        bundle = load_model(model, device=device)
    res = train_unsupervised(bundle, sources, out, cfg, kind="storyboards" if storyboards is not None else "videos",
                             resume=resume, prompt=prompt, size=size, log=log, should_stop=should_stop,
                             checkpoint_every=checkpoint_every)
    config = {"mode": "unsupervised", **cfg.to_dict(), "source": "storyboards" if storyboards is not None else "videos",
              "sources": len(sources), "chunks": res.chunks, "seconds": round(res.seconds, 1),
              "loss_first_last": [res.losses[0], float(np.mean(res.losses[-20:]))], "command": command or ""}
    save_phi(out, res.phi, model_digest=bundle.digest, model_name=bundle.name, config=config)
    checkpoint_path(out).unlink(missing_ok=True)  # done: nothing to resume
    log(f"slots: φ ({len(res.phi.weights)} layers, D' = {cfg.dim}) from {res.chunks} chunks written to {out} "
        f"in {res.seconds:.0f} s")
    return out


__all__ = ["KeyChunk", "Stopped", "TARGETS", "UnsupConfig", "channel_stats", "checkpoint_path", "list_sources",
           "reconstruction_loss", "similarity_loss", "spy_commits", "storyboard_chunks", "temporal_loss",
           "contrast_loss", "train_slots", "train_unsupervised", "video_chunks"]
