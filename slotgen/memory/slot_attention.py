"""Training-free slot attention over a chunk's keys, and the small tools around it.

SlotMemory (see ``slot.py``) groups a chunk's tokens into ``S`` slots per layer:

    x    = φ(k)                                   # (N, D')  one unit-norm feature per token
    U₀   = previous chunk's slots  (temporal init) # (S, D')
           or farthest-point picks from x (first chunk)
    repeat ``iters`` times:
        A = softmax_over_slots(U xᵀ / τ)           # (S, N)   every column sums to 1
        U = normalise(A x / A·1)                   # (S, D')  weighted mean of the slot's tokens
    A = softmax_over_slots(U xᵀ / τ)              # assignment that matches the returned U

This is soft spherical k-means with the softmax taken over *slots* (tokens compete to be explained,
slots compete for tokens), i.e. slot attention without the learned GRU/MLP update. The paper trains
its slot module (contrastive + reconstruction losses); no weights are public, so φ defaults to the
normalised head-mean of the un-roped keys and a learned φ can be plugged in (:class:`LinearPhi`; the
miniature ships one, trained by ``slotgen.train.slots``).

Everything here is deterministic: no random init, ties broken by the lowest index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Phi = Callable[[int, torch.Tensor], torch.Tensor]
"""A slot projection: ``phi(layer, k)`` with k (N, H, D) un-roped keys → (N, D') features."""


def default_phi(layer: int, k: torch.Tensor) -> torch.Tensor:
    """Training-free φ: unit-normalised mean over heads. k: (N, H, D) → (N, D) float32."""
    return F.normalize(k.float().mean(dim=1), dim=-1)  # (N, D)


@dataclass
class LinearPhi:
    """A learned φ: one projection matrix per layer, ``φ_l(k) = normalise(W_l · flatten(k))``.

    weights[l]: (D', H·D). Load them from a weights file with :meth:`from_state_dict`.
    """

    weights: list[torch.Tensor]

    def __call__(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        w = self.weights[layer].to(k.device, torch.float32)  # (D', H·D)
        return F.normalize(k.float().flatten(1) @ w.T, dim=-1)  # (N, H·D) @ (H·D, D') → (N, D')

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], num_layers: int, prefix: str = "slot_phi.") -> "LinearPhi | None":
        """``{prefix}{layer}.weight`` for every layer, or None when the file carries no slot module."""
        names = [f"{prefix}{layer}.weight" for layer in range(num_layers)]
        if not all(n in state for n in names):
            return None
        return cls([state[n] for n in names])


def farthest_point_init(x: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Deterministic k-means++-style seeds: S rows of x (N, D'), unit-norm, → (S, D').

    The first seed is the token farthest (lowest cosine) from the mean feature; each next seed is the
    token whose cosine distance to its nearest seed is largest. Ties go to the lowest token index
    (``argmax``/``argmin`` return the first extremum), so the result does not depend on anything but x.
    With fewer tokens than slots (or duplicate tokens) seeds repeat; repeated slots share mass equally.
    """
    return batched_farthest_point_init(x[None], num_slots)[0]


def batched_farthest_point_init(x: torch.Tensor, num_slots: int) -> torch.Tensor:
    """:func:`farthest_point_init` for a batch x (L, N, D') → (L, S, D'), all on the device (no sync)."""
    centre = x.mean(dim=1, keepdim=True)  # (L, 1, D')
    pick = torch.argmin((x * centre).sum(-1), dim=1)  # (L,) farthest token from the centre
    seeds = [x.gather(1, pick[:, None, None].expand(-1, 1, x.shape[2]))]  # [(L, 1, D')]
    nearest = 1.0 - (x * seeds[0]).sum(-1)  # (L, N) cosine distance to the nearest seed so far
    for _ in range(num_slots - 1):
        pick = torch.argmax(nearest, dim=1)  # (L,)
        seeds.append(x.gather(1, pick[:, None, None].expand(-1, 1, x.shape[2])))
        nearest = torch.minimum(nearest, 1.0 - (x * seeds[-1]).sum(-1))  # (L, N)
    return torch.cat(seeds, dim=1).clone()  # (L, S, D')


def slot_attention(x: torch.Tensor, init: torch.Tensor, iters: int, temperature: float, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft spherical k-means with softmax over slots (see module docstring).

    x: (N, D') unit-norm token features; init: (S, D') starting slots.
    Returns U (S, D') unit-norm slots and A (S, N) assignments whose columns sum to 1.
    A slot that receives (almost) no mass keeps its previous vector instead of dividing by ~0.
    """
    u, a = batched_slot_attention(x[None], init[None], iters, temperature, eps)  # a batch of one
    return u[0], a[0]


def batched_slot_attention(x: torch.Tensor, init: torch.Tensor, iters: int, temperature: float,
                           eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`slot_attention` on a batch, differentiable (training φ through the grouping uses it).

    x: (B, N, D') unit-norm features; init: (B, S, D') starting slots. Returns U (B, S, D') and A (B, S, N).
    """
    u = F.normalize(init.float(), dim=-1)  # (B, S, D')
    x = x.float()
    for _ in range(iters):
        a = torch.softmax(u @ x.transpose(1, 2) / temperature, dim=1)  # (B, S, N), softmax over slots
        mass = a.sum(dim=2, keepdim=True)  # (B, S, 1)
        mean = (a @ x) / mass.clamp_min(eps)  # (B, S, N) @ (B, N, D') → (B, S, D') weighted means
        u = torch.where(mass > eps, F.normalize(mean, dim=-1), u)  # dead slots stay put
    a = torch.softmax(u @ x.transpose(1, 2) / temperature, dim=1)  # (B, S, N), matches the returned U
    return u, a


def adjusted_rand_index(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two labelings of the same N items; 1 = identical partitions.

    ARI = (Σ_ij C(n_ij,2) − E) / (½(Σ_i C(a_i,2) + Σ_j C(b_j,2)) − E),  E = Σ_i C(a_i,2)·Σ_j C(b_j,2) / C(N,2)
    with n_ij the contingency table and a_i, b_j its row / column sums. Returns 1.0 when the
    denominator vanishes (both labelings trivial).
    """
    a = torch.unique(labels_a.long(), return_inverse=True)[1]  # (N,) relabelled 0..I-1
    b = torch.unique(labels_b.long(), return_inverse=True)[1]  # (N,) relabelled 0..J-1
    n = a.numel()
    if n < 2:
        return 1.0
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)  # (I, J)
    table.index_put_((a, b), torch.ones(n, dtype=torch.float64), accumulate=True)

    def pairs(t: torch.Tensor) -> torch.Tensor:
        return t * (t - 1) / 2

    index = pairs(table).sum()
    rows, cols = pairs(table.sum(1)).sum(), pairs(table.sum(0)).sum()
    expected = rows * cols / pairs(torch.tensor(float(n), dtype=torch.float64))
    maximum = (rows + cols) / 2
    if math.isclose(float(maximum), float(expected)):
        return 1.0
    return float((index - expected) / (maximum - expected))
