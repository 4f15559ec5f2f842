"""Few-step flow-matching sampling per chunk (the Self-Forcing schedule).

Timesteps ``1000·(1 - i/steps)`` for i < steps ([1000, 750, 500, 250] for 4 steps), warped by
``σ' = shift·σ / (1 + (shift-1)·σ)`` (shift 5 → σ = [1, 0.9375, 0.8333, 0.625]). Per step the model
predicts the flow v; ``x0 = x_t - σ·v``; the next input is ``(1 - σ_next)·x0 + σ_next·ε`` with fresh
noise ε. No classifier-free guidance. The chunk's result is the last x0.

All noise comes from a generator seeded by (storyboard seed, chunk index), so a chunk's noise does
not depend on anything that happened before it: every memory policy sees the same noise, and a resumed
render draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class FlowSchedule:
    steps: int = 4
    shift: float = 5.0

    def sigmas(self) -> list[float]:
        base = [1.0 - i / self.steps for i in range(self.steps)]
        return [self.shift * s / (1.0 + (self.shift - 1.0) * s) for s in base]


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """A CPU generator unique to (seed, chunk); CPU so noise is identical on every device."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(chunk) * 7_919 + 12_345) % (2**63 - 1))
    return g


def chunk_noise(shape: tuple[int, ...], seed: int, chunk: int, steps: int) -> list[torch.Tensor]:
    """The initial noise and one fresh noise per re-noising step: ``steps`` tensors of ``shape``."""
    g = chunk_generator(seed, chunk)
    return [torch.randn(shape, generator=g, dtype=torch.float32) for _ in range(steps)]


def sample_chunk(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    noises: list[torch.Tensor],
    schedule: FlowSchedule,
) -> torch.Tensor:
    """Run the few-step sampler. ``denoise(x_t, timestep) -> v`` (flow prediction, same shape)."""
    sigmas = schedule.sigmas()
    x = noises[0]  # σ = 1: pure noise, (B, C, F, h, w)
    x0 = x
    for i, sigma in enumerate(sigmas):
        v = denoise(x, sigma * 1000.0)
        x0 = x - sigma * v  # predicted clean latents
        if i + 1 < len(sigmas):
            nxt = sigmas[i + 1]
            x = (1.0 - nxt) * x0 + nxt * noises[i + 1].to(x0)
    return x0
