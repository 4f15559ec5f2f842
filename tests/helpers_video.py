"""Test helpers for video tests: a tiny offline Wan VAE and synthetic frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan


def tiny_vae(base_dim: int = 3, num_res_blocks: int = 1, seed: int = 0) -> AutoencoderKLWan:
    """A randomly initialised Wan2.1-architecture VAE (z_dim 16, 8x spatial, 4x temporal), fp32, eval."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=num_res_blocks)
    return vae.eval()


def smooth_frames(n: int, width: int, height: int, offset: int = 0) -> np.ndarray:
    """Smoothly varying moving colour gradients, uint8 ``(n, height, width, 3)`` (codec friendly)."""
    t = np.arange(offset, offset + n, dtype=np.float64)[:, None, None]  # (n, 1, 1)
    y = np.arange(height, dtype=np.float64)[None, :, None]  # (1, H, 1)
    x = np.arange(width, dtype=np.float64)[None, None, :]  # (1, 1, W)
    r = 128 + 90 * np.sin(x / 11.0 + t / 5.0) + 0 * y
    g = 128 + 90 * np.cos(y / 9.0 - t / 7.0) + 0 * x
    b = 128 + 60 * np.sin((x + y) / 17.0 + t / 3.0)
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).round().clip(0, 255).astype(np.uint8)


def noise_frames(n: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Uniform random uint8 frames ``(n, height, width, 3)`` -- the worst case for a codec."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 arrays."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def partial_files(directory: Path) -> list[str]:
    """Leftover temporary (``*.partial-*``) files in a directory."""
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)
