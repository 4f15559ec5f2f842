"""Flow-matching sampling per chunk: the Self-Forcing few-step schedule or the Euler flow ODE.

Timesteps ``1000·(1 - i/steps)`` for i < steps ([1000, 750, 500, 250] for 4 steps), warped by
``σ' = shift·σ / (1 + (shift-1)·σ)`` (shift 5 → σ = [1, 0.9375, 0.8333, 0.625]). The noisy input at
level σ is ``x_σ = (1 - σ)·x0 + σ·ε``. Two samplers, chosen by the model (``ModelSettings.sampler``):

* ``self_forcing`` (Wan causal generators: Self-Forcing, LongLive, MemFlow): per step predict x0,
  then re-noise to the next level with *fresh* noise, ``x = (1 - σ_next)·x0 + σ_next·ε``; the chunk's
  result is the last x0. Right for a distilled few-step generator.
* ``euler`` (an undistilled flow model, such as the miniature): integrate the flow ODE
  ``dx/dσ = (x - x0)/σ`` from σ = 1 to 0 with Euler steps, ``x ← x + (σ_next - σ)·(x - x0)/σ`` with
  ``σ_next = 0`` after the last step (so the result is the last x0). Deterministic given the initial
  noise: the sample commits step by step instead of being re-drawn, which a model without
  distillation needs to produce one sharp sample rather than a blurred mean.

What the network predicts is a model property too (``ModelSettings.prediction``): ``flow`` (Wan:
v = ε − x0, so x0 = x_σ − σ·v) or ``sample`` (x0 directly; the miniature, whose 768-value patches a
narrow transformer can denoise only by predicting the clean patch).

All noise comes from a generator seeded by (storyboard seed, chunk index), so a chunk's noise does
not depend on anything that happened before it: every memory policy sees the same noise, and a resumed
render draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

SAMPLERS = ("self_forcing", "euler")
PREDICTIONS = ("flow", "sample")


@dataclass(frozen=True)
class FlowSchedule:
    steps: int = 4
    shift: float = 5.0
    sampler: str = "self_forcing"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")

    def sigmas(self) -> list[float]:
        base = [1.0 - i / self.steps for i in range(self.steps)]
        return [self.shift * s / (1.0 + (self.shift - 1.0) * s) for s in base]

    def noise_draws(self) -> int:
        """Noise tensors a chunk needs: the initial noise, plus one per re-noising step (Self-Forcing)."""
        return self.steps if self.sampler == "self_forcing" else 1


def chunk_generator(seed: int, chunk: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` unique to (seed, chunk): the noise of a chunk depends on nothing else,
    so a resumed stream draws exactly what an uninterrupted one would have (on the same device type)."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(chunk) * 7_919 + 12_345) % (2**63 - 1))
    return g


def chunk_noise(shape: tuple[int, ...], seed: int, chunk: int, steps: int,
                device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """``steps`` float32 noise tensors of ``shape`` drawn on ``device`` (no host → device copy): the
    initial noise first, then one per re-noising step. CPU and CUDA generators differ, so the same
    (seed, chunk) gives different noise on the two; each is reproducible (docs/SNAPSHOTS.md)."""
    g = chunk_generator(seed, chunk, device)
    return [torch.randn(shape, generator=g, dtype=torch.float32, device=device) for _ in range(steps)]


def x0_predictor(model: Callable[[torch.Tensor, float], torch.Tensor], prediction: str
                 ) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """Wrap ``model(x_σ, timestep) -> output`` into ``(x_σ, σ) -> x0`` for the model's prediction type."""
    if prediction == "flow":
        return lambda x, sigma: x - sigma * model(x, sigma * 1000.0)
    if prediction == "sample":
        return lambda x, sigma: model(x, sigma * 1000.0)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def sample_chunk(
    predict_x0: Callable[[torch.Tensor, float], torch.Tensor],
    noises: list[torch.Tensor],
    schedule: FlowSchedule,
) -> torch.Tensor:
    """Run the sampler from ``noises[0]`` (σ = 1). ``predict_x0(x_σ, σ) -> x0`` (see :func:`x0_predictor`)."""
    sigmas = schedule.sigmas()
    x = noises[0]  # σ = 1: pure noise, (B, C, F, h, w)
    x0 = x
    for i, sigma in enumerate(sigmas):
        x0 = predict_x0(x, sigma)  # predicted clean latents
        if i + 1 == len(sigmas):
            break
        nxt = sigmas[i + 1]
        if schedule.sampler == "self_forcing":
            x = (1.0 - nxt) * x0 + nxt * noises[i + 1].to(x0)
        else:  # Euler step of the flow ODE: velocity (x - x0)/σ
            x = x + (nxt - sigma) * (x - x0) / sigma
    return x0
