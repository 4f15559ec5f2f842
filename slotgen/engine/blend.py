"""Prompt transitions: the text conditioning of two prompts mixed with one weight.

A storyboard prompt with ``transition: 1.5s`` blends in from the previous prompt over that span
(:meth:`slotgen.storyboard.Storyboard.conditioning_at` gives each chunk its weight ``w`` from the
time of its first frame). Two mixes, the ones Daydream Scope offers for its prompt transitions
(github.com/daydreamlive/scope):

* ``linear``: ``(1 - w)·a + w·b``, row by row;
* ``slerp``: spherical interpolation of every token row ``a_i``, ``b_i`` (each a ``d``-vector)::

      θ_i = arccos(â_i · b̂_i)
      out_i = sin((1 - w)·θ_i)/sin θ_i · a_i + sin(w·θ_i)/sin θ_i · b_i

  which keeps a row's direction on the great circle between the two; rows that are (nearly)
  parallel or where either side is zero (Wan's padding rows past a prompt's tokens) fall back to
  the linear mix, which is the limit of the formula there.

Both are computed in float32 and cast back, so the result depends on nothing but ``a``, ``b`` and ``w``.
"""

from __future__ import annotations

import torch

BLENDS = ("linear", "slerp")
PARALLEL = 1e-4
"""Rows whose angle (radians) is below this, or with a zero side, are mixed linearly."""


def blend_embeddings(a: torch.Tensor, b: torch.Tensor, w: float, mode: str = "linear") -> torch.Tensor:
    """``a`` → ``b`` at weight ``w`` in [0, 1] (0: ``a``, 1: ``b``); ``a``, ``b``: (B, L, d), same shape."""
    if mode not in BLENDS:
        raise ValueError(f"unknown blend {mode!r}; expected one of {', '.join(BLENDS)}")
    if a.shape != b.shape:
        raise ValueError(f"cannot blend conditioning of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = a.float(), b.float()  # (B, L, d)
    linear = (1.0 - w) * x + w * y
    if mode == "linear":
        return linear.to(a.dtype)
    nx, ny = x.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)  # (B, L, 1)
    cos = ((x * y).sum(-1, keepdim=True) / (nx * ny).clamp_min(1e-12)).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)  # (B, L, 1)
    sin = torch.sin(theta)
    ok = (theta > PARALLEL) & (nx > 0) & (ny > 0) & (sin > 1e-6)
    safe = torch.where(ok, sin, torch.ones_like(sin))
    spherical = (torch.sin((1.0 - w) * theta) / safe) * x + (torch.sin(w * theta) / safe) * y
    return torch.where(ok, spherical, linear).to(a.dtype)
