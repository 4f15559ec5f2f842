"""Train SlotMemory's slot projection φ on the shape world with its ground-truth masks, *supervised*
(``slotgen train-slots --supervised``; also the last stage of ``slotgen train-miniature``). The mode for
any model, without labels, is :mod:`slotgen.train.slots_unsup`.

The paper trains its slot module with a contrastive and a reconstruction loss and publishes neither
weights nor loss definitions. This is our reading, at the miniature's size:

* **Data.** Ground-truth world episodes (training seeds, never the benchmark's) are encoded with the
  model's VAE and committed chunk by chunk through the engine under the ``slot`` policy with the
  training-free φ, exactly as ``bench identity`` measures slot purity. Every commit pass hands each
  layer's un-roped keys ``k`` (N, H, D) of the chunk to the memory; we keep them with each token's
  ground-truth label (the entity covering ≥ 20 % of the token's cell, else background: the bench's
  ``token_labels``).
* **φ_l(k) = normalise(W_l · flatten(k))**, one ``W_l`` (D', H·D) per layer (:class:`LinearPhi`).
* **Contrastive loss** (supervised contrastive, Khosla et al. 2020) over the tokens of one chunk:
  tokens with the same ground-truth label are positives, all other tokens of the chunk negatives,
  at temperature ``tau``. It pulls an entity's tokens (and the background's) together in φ-space and
  pushes different entities apart — what the slot attention then clusters. It uses the world's
  ground-truth masks: φ is a *supervised* probe of the keys, scored on held-out episodes.
* **Reconstruction loss**: a linear decoder per layer must reconstruct each token's unit-normalised key
  from φ(k) (weight ``recon_weight``), so φ keeps what the keys say beyond the labels.
* **Co-assignment loss** (weight ``assign_weight``): the policy's own slot attention
  (:func:`~slotgen.memory.slot_attention.batched_slot_attention`, the batched form of the engine's
  :func:`~slotgen.memory.slot_attention.slot_attention`, with the policy's slot count,
  iterations and temperature, farthest-point init as on a first chunk) runs on φ(k), differentiably.
  ``P = Aᵀ A`` (N, N) is the probability that two tokens land in one slot; a binary cross-entropy pulls
  it to 1 for same-label pairs and 0 otherwise, the two kinds weighted equally. The contrastive loss only
  shapes φ-space; this one scores the grouping the memory actually uses. On 12 held-out validation
  episodes it lifted slot purity from 0.58 to 0.78 (docs/MINIATURE.md, "The slot module").

Everything is seeded; on the same machine and thread count a run repeats exactly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from slotgen.errors import SlotgenError
from slotgen.memory.slot import SlotConfig
from slotgen.memory.slot_attention import LinearPhi, batched_slot_attention, farthest_point_init


@dataclass
class SlotTrainConfig:
    """Everything that determines a φ training run (stored in the model's config and card)."""

    seed: int = 0
    episodes: int = 48  # ground-truth world episodes (seeds 500_000 + i: disjoint from training and bench seeds)
    dim: int = 32  # D', the slot feature size
    steps: int = 400
    batch: int = 64  # chunks per step (each gives one contrastive set per layer)
    lr: float = 3e-3
    tau: float = 0.1  # contrastive temperature
    recon_weight: float = 0.1
    assign_weight: float = 10.0  # co-assignment loss through the slot attention (0: contrastive + reconstruction only)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        for name, v, low in (("--episodes", self.episodes, 2), ("--dim", self.dim, 2), ("--steps", self.steps, 1),
                             ("--batch", self.batch, 1)):
            if v < low:
                raise SlotgenError(f"{name} must be at least {low}, got {v}")
        if not self.tau > 0 or not self.lr > 0 or self.recon_weight < 0 or self.assign_weight < 0:
            raise SlotgenError(f"tau and lr must be positive, recon_weight and assign_weight non-negative, got "
                               f"{self.tau}, {self.lr}, {self.recon_weight}, {self.assign_weight}")


EPISODE_SEED0 = 500_000


@dataclass
class SlotTrainResult:
    phi: LinearPhi
    losses: list[float] = field(default_factory=list)
    chunks: int = 0  # training chunks collected
    seconds: float = 0.0


def world_episodes(n: int, seed: int, world: str = "standard") -> list:
    """``n`` seeded exit-and-return episodes of ``world`` with 1 entity per lane at most (a third of the
    multi-entity ones with a same-kind companion)."""
    from slotgen.world.scene import exit_return_episode, world_named

    spec = world_named(world)
    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(n):
        k = int(rng.choice([1, 2, 3][: spec.config.lanes]))
        out.append(exit_return_episode(seed=EPISODE_SEED0 + seed * 10_000 + i, gap_frames=int(rng.choice([0, 12, 24])),
                                       n_entities=k, similar=k >= 2 and bool(rng.random() < 0.35), world=spec))
    return out


def collect_keys(bundle, episodes: list) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Per committed chunk: each layer's un-roped keys (N, H·D) and the tokens' ground-truth labels (N,)."""
    from slotgen.bench.identity import committed_ground_truth, memory_for
    from slotgen.memory import build_policy

    n_layers = len(bundle.transformer.blocks)
    F_ = bundle.settings.chunk_frames
    out = []
    for ep in episodes:
        policy = build_policy(memory_for("slot"), n_layers)  # the training-free φ
        keys: list[torch.Tensor] = []
        write = policy.write

        def spy(layer, block, write=write, keys=keys):
            keys.append(block.k.float().mean(dim=0).flatten(1).cpu())  # (N, H·D)
            write(layer, block)

        policy.write = spy
        for c, cells in committed_ground_truth(bundle, ep, policy):
            labels = np.concatenate([cells(c * F_ + i) for i in range(F_)])  # engine token order: frame, row, col
            out.append((list(keys), torch.from_numpy(labels)))
            keys.clear()
    return out


def supcon(f: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss of unit features f (B, N, D') with labels y (B, N); anchors without a
    positive are skipped. Returns the mean over anchors."""
    B, N, _ = f.shape
    sim = f @ f.transpose(1, 2) / tau  # (B, N, N)
    eye = torch.eye(N, dtype=torch.bool, device=f.device)[None]
    sim = sim.masked_fill(eye, float("-inf"))  # an anchor is not its own candidate
    logp = sim - torch.logsumexp(sim, dim=2, keepdim=True)  # (B, N, N) log-softmax over candidates
    pos = (y[:, :, None] == y[:, None, :]) & ~eye  # (B, N, N)
    n_pos = pos.sum(2)  # (B, N)
    per_anchor = -(logp.masked_fill(~pos, 0.0)).sum(2) / n_pos.clamp_min(1)  # (B, N)
    valid = n_pos > 0
    return per_anchor[valid].mean()


def coassignment_loss(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Balanced binary cross-entropy between P(same slot) = Aᵀ A and same-label, per chunk.

    a: (B, S, N) slot assignments (columns sum to 1); y: (B, N) labels. Same-label pairs and
    different-label pairs each carry half the weight of a chunk; the diagonal counts as a same pair.
    """
    p = (a.transpose(1, 2) @ a).clamp(1e-5, 1 - 1e-5)  # (B, N, N) probability two tokens share a slot
    same = (y[:, :, None] == y[:, None, :]).float()  # (B, N, N)
    n_same = same.sum((1, 2), keepdim=True)  # (B, 1, 1)
    n_diff = (1 - same).sum((1, 2), keepdim=True)
    w = torch.where(same > 0, 0.5 / n_same.clamp_min(1), 0.5 / n_diff.clamp_min(1))  # (B, N, N)
    return F.binary_cross_entropy(p, same, weight=w, reduction="sum") / a.shape[0]


def _grouping(f: torch.Tensor, settings) -> torch.Tensor:
    """The slot policy's first-chunk grouping of features f (B, N, D') → A (B, S, N), differentiable."""
    init = torch.stack([farthest_point_init(x, settings.num_slots) for x in f])  # (B, S, D') picks of f rows
    return batched_slot_attention(f, init, settings.iters, settings.temperature)[1]


def train_slot_phi(bundle, cfg: SlotTrainConfig, log: Callable[[str], None] = print,
                   data: Optional[list] = None, world: str = "standard") -> SlotTrainResult:
    """Collect ground-truth keys of ``world``'s episodes (unless ``data`` is given) and fit φ (see the
    module docstring)."""
    cfg.validate()
    t0 = time.perf_counter()
    if data is None:
        log(f"slots: committing {cfg.episodes} ground-truth {world} world episodes")
        data = collect_keys(bundle, world_episodes(cfg.episodes, cfg.seed, world))
    n_layers = len(data[0][0])
    width = data[0][0][0].shape[1]  # H·D
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 11)
    enc = [torch.nn.Parameter(torch.randn(cfg.dim, width, generator=g) / width ** 0.5) for _ in range(n_layers)]
    dec = [torch.nn.Parameter(torch.zeros(width, cfg.dim)) for _ in range(n_layers)]
    opt = torch.optim.Adam(enc + dec, lr=cfg.lr)
    keys = [torch.stack([d[0][l] for d in data]) for l in range(n_layers)]  # L × (M, N, H·D)
    labels = torch.stack([d[1] for d in data])  # (M, N)
    rng = np.random.default_rng([cfg.seed, 11])
    settings = SlotConfig()  # the policy's slot count, iterations and temperature
    res = SlotTrainResult(phi=LinearPhi([]), chunks=len(data))
    for step in range(cfg.steps):
        idx = torch.from_numpy(rng.integers(0, len(data), size=cfg.batch))
        y = labels[idx]  # (B, N)
        loss = torch.zeros(())
        for l in range(n_layers):
            k = keys[l][idx]  # (B, N, H·D)
            f = F.normalize(k @ enc[l].T, dim=-1)  # (B, N, D')
            target = F.normalize(k, dim=-1)
            recon = F.mse_loss(f @ dec[l].T, target) * width  # per-token squared error of the unit key
            loss = loss + supcon(f, y, cfg.tau) + cfg.recon_weight * recon
            if cfg.assign_weight > 0:
                loss = loss + cfg.assign_weight * coassignment_loss(_grouping(f, settings), y)
        loss = loss / n_layers
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        res.losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            log(f"slots: step {step + 1}: loss {np.mean(res.losses[-100:]):.4f}")
    res.phi = LinearPhi([w.detach().clone() for w in enc])
    res.seconds = time.perf_counter() - t0
    return res


def phi_tensors(phi: LinearPhi, prefix: str = "slot_phi.") -> dict[str, torch.Tensor]:
    """The weights-file entries of a learned φ (read back by :meth:`LinearPhi.from_state_dict`)."""
    return {f"{prefix}{l}.weight": w.detach().to("cpu", torch.float32).contiguous() for l, w in enumerate(phi.weights)}


CARD_HEADING = "## Slot projection φ (`slotgen train-slots`)"


def add_slot_phi(folder, cfg: SlotTrainConfig, log: Callable[[str], None] = print,
                 command: Optional[str] = None, out=None) -> SlotTrainResult:
    """Train φ (supervised) on the miniature in ``folder`` and write it as ``out`` (default: the folder's
    ``slot_phi.safetensors``, which the folder then uses; :mod:`slotgen.memory.phi_file`), plus a section in
    ``MODEL_CARD.md``. The model's own files (config, tokenizer, weights) are not touched."""
    import json
    from pathlib import Path

    from slotgen.atomic import atomic_write_bytes
    from slotgen.memory.phi_file import PHI_FILE, save_phi
    from slotgen.models.miniature import load_miniature

    cfg.validate()
    folder = Path(folder)
    bundle = load_miniature(folder)
    config = json.loads((folder / "config.json").read_text())
    world = config.get("training", {}).get("config", {}).get("world", "standard")  # the world the model learned
    res = train_slot_phi(bundle, cfg, log=log, world=world)
    out = Path(out) if out is not None else folder / PHI_FILE
    save_phi(out, res.phi, model_digest=bundle.digest, model_name=bundle.name,
             config={"mode": "supervised", **cfg.to_dict(), "world": world, "chunks": res.chunks,
                     "seconds": round(res.seconds, 1), "loss_first_last": [res.losses[0], float(np.mean(res.losses[-20:]))],
                     "command": command or ""})
    card_path = folder / "MODEL_CARD.md"
    if card_path.is_file():  # a trained folder's card says how its φ was made
        card = card_path.read_text() if card_path.is_file() else "# Model card\n"
        card = card.split("\n" + CARD_HEADING)[0].rstrip("\n") + "\n\n" + slot_card(cfg, res, command) + "\n"
        atomic_write_bytes(card_path, card.encode())
    log(f"slots: φ ({len(res.phi.weights)} layers, D' = {cfg.dim}) written to {out} in {res.seconds:.0f} s")
    return res


def slot_card(cfg: SlotTrainConfig, res: SlotTrainResult, command: Optional[str]) -> str:
    first, last = res.losses[0], float(np.mean(res.losses[-20:]))
    cmd = command or f"slotgen train-slots --supervised --model DIR --seed {cfg.seed}"
    return f"""{CARD_HEADING}

Produced by `{cmd}` (also the last stage of `slotgen train-miniature`), supervised by the world's masks,
written as `slot_phi.safetensors` beside the weights. φ_l(k) = normalise(W_l · flatten(k)), D' = {cfg.dim}, one
W_l per layer, used by the `slot` memory policy in place of the training-free head-mean
(`slotgen.train.slots` documents the losses).

- Data: {cfg.episodes} ground-truth world episodes (seeds {EPISODE_SEED0 + cfg.seed * 10_000}…, disjoint from the
  transformer's training episodes and from `bench identity`), committed chunk by chunk through this model:
  {res.chunks} chunks, each layer's un-roped keys with the tokens' ground-truth labels.
- Loss: supervised contrastive (temperature {cfg.tau:g}; same ground-truth label = positive; it uses the
  world's masks) + {cfg.recon_weight:g} × linear reconstruction of the unit key from φ(k) + {cfg.assign_weight:g} ×
  co-assignment cross-entropy through the policy's slot attention; Adam lr {cfg.lr:g},
  {cfg.steps} steps of {cfg.batch} chunks; loss {first:.3f} → {last:.3f} (mean of the last 20 steps); {res.seconds:.0f} s.
"""
