"""The chunk samplers: Self-Forcing re-noising and the Euler flow ODE, on flow or x0 predictions."""

from __future__ import annotations

import pytest
import torch

from slotgen.engine.sampler import FlowSchedule, chunk_noise, sample_chunk, x0_predictor
from slotgen.models.bundle import ModelSettings


def test_schedule_is_the_self_forcing_one():
    assert FlowSchedule(4, 5.0).sigmas() == pytest.approx([1.0, 0.9375, 0.8333333, 0.625])
    assert FlowSchedule(4, 5.0).noise_draws() == 4
    assert FlowSchedule(12, 3.0, "euler").noise_draws() == 1


def test_euler_follows_the_flow_ode_to_the_oracle_sample():
    """With an oracle that always predicts the same x0, the flow ODE dx/dσ = (x − x0)/σ from x(1) = ε has the
    closed form x(σ) = σ·ε + (1 − σ)·x0; Euler is exact on it and ends at x0 (σ = 0)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 3, 2, 2, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    seen = []

    def oracle(x, sigma):
        seen.append((sigma, x.clone()))
        return x0

    out = sample_chunk(oracle, [noise], FlowSchedule(6, 3.0, "euler"))
    assert torch.equal(out, x0)
    for sigma, x in seen:  # every input lies on the straight path between noise and x0
        torch.testing.assert_close(x, sigma * noise + (1 - sigma) * x0, rtol=1e-5, atol=1e-5)
    assert [s for s, _ in seen] == pytest.approx(FlowSchedule(6, 3.0).sigmas())


def test_self_forcing_renoises_with_fresh_noise():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 2, 3, 2, 2, generator=g)
    noises = [torch.randn(x0.shape, generator=g) for _ in range(4)]
    seen = []

    def oracle(x, sigma):
        seen.append(x.clone())
        return x0

    sched = FlowSchedule(4, 5.0)
    assert torch.equal(sample_chunk(oracle, noises, sched), x0)
    for i, sigma in enumerate(sched.sigmas()):
        torch.testing.assert_close(seen[i], noises[0] if i == 0 else (1 - sigma) * x0 + sigma * noises[i])


def test_prediction_types_give_the_same_x0():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 2, 3, 2, 2, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    sigma = 0.7
    x = (1 - sigma) * x0 + sigma * eps
    flow = x0_predictor(lambda x_, t: eps - x0, "flow")  # a model predicting v = ε − x0
    sample = x0_predictor(lambda x_, t: x0, "sample")  # a model predicting x0
    torch.testing.assert_close(flow(x, sigma), x0)
    torch.testing.assert_close(sample(x, sigma), x0)
    timesteps = []
    x0_predictor(lambda x_, t: timesteps.append(t) or x_, "sample")(x, sigma)
    assert timesteps == [pytest.approx(700.0)]  # the model gets Wan's timestep scale


def test_bad_sampler_or_prediction_is_refused():
    with pytest.raises(ValueError, match="sampler"):
        FlowSchedule(4, 5.0, "ddim")
    with pytest.raises(ValueError, match="prediction"):
        x0_predictor(lambda x, t: x, "eps")
    with pytest.raises(ValueError, match="sampler"):
        ModelSettings(sampler="ddim")
    with pytest.raises(ValueError, match="prediction"):
        ModelSettings(prediction="eps")


def test_chunk_noise_draws_are_a_prefix():
    """Euler draws only the first of the Self-Forcing noises: the same (seed, chunk) starts from the same ε."""
    a = chunk_noise((1, 2, 3, 2, 2), seed=3, chunk=7, steps=1)
    b = chunk_noise((1, 2, 3, 2, 2), seed=3, chunk=7, steps=4)
    assert torch.equal(a[0], b[0]) and len(b) == 4
