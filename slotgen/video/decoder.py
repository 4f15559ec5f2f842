"""Streaming causal decode of Wan2.1 latents with diffusers' :class:`AutoencoderKLWan`.

The Wan VAE decoder is causal in time: ``AutoencoderKLWan._decode`` walks the latent frames one at a
time through ``vae.decoder`` and threads a *feature cache* (one slot per ``WanCausalConv3d``) from
frame to frame. The cache holds the last <= 2 time steps of every causal conv input, so the output of
frame ``i`` depends on frames ``< i`` only through it.

:class:`StreamingDecoder` keeps that cache itself, across calls, so latents can be decoded chunk by
chunk as the engine produces them, with frames bit-identical to one-shot ``vae.decode(all_latents)``.
It never touches the VAE's own ``_feat_map`` (the same VAE instance can keep serving other callers)
and patches nothing: it calls ``vae.post_quant_conv`` and ``vae.decoder`` exactly like ``_decode``.

Frame counts (temporal compression ``s``, 4 for Wan2.1): the first latent frame decodes to 1 pixel
frame, every later latent frame to ``s``; so a first chunk of ``T`` latent frames gives
``1 + s * (T - 1)`` frames and every later chunk ``s * T``.

The cache (plus counters) can be exported with :meth:`StreamingDecoder.state_dict` and restored with
:meth:`StreamingDecoder.load_state_dict`; continuing after a restore is bit-identical to never having
stopped (on the same device/dtype). The state contains only tensors, ints, strings, lists, dicts and
None, so ``torch.load(..., weights_only=True)`` accepts it. The upsampler's first-frame marker is kept
as the plain string ``"Rep"``, exactly as diffusers stores it.

Residual and attention blocks whose output branch is exactly zero (``conv2`` of a residual block, or
``proj`` of an attention block, all-zero weights and bias, and no shortcut convolution) add exactly 0
to their input: :func:`skip_identity_blocks` builds a view of the decoder without them (same parameters,
same cache layout; their cache slots stay empty), which the streaming decode runs. Its frames are
bit-identical to the full decoder's for finite inputs. The miniature's exact VAE (``make_exact_vae``)
is such a decoder: 2 of its 52-channel 3×3×3 convolutions do work, 8 would be multiplied by zero.

Caveats: spatial tiling (``vae.enable_tiling()``) is not used, so the reference for bit-exactness is
the non-tiled ``vae.decode``; batch size must be 1.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from slotgen.errors import SnapshotError

REP_MARKER = "Rep"  # diffusers' WanResample marker: "first frame seen, nothing to cache yet"
STATE_FORMAT = "slotgen.streaming_decoder"
STATE_VERSION = 1

CacheEntry = torch.Tensor | str | None


class _SkippedResidual(nn.Module):
    """Stands in for a residual block whose output branch is exactly zero: returns its input, and moves
    the feature-cache index past the block's causal convolutions so every later slot keeps its place."""

    def __init__(self, cache_slots: int):
        super().__init__()
        self.cache_slots = cache_slots

    def forward(self, x, feat_cache=None, feat_idx=[0]):  # noqa: B006 - diffusers' own signature
        if feat_cache is not None:
            feat_idx[0] += self.cache_slots
        return x


def _all_zero(*tensors: torch.Tensor | None) -> bool:
    """True when every tensor is absent or holds only zeros; a tensor without data (``meta``, as
    ``bench flops`` builds models) proves nothing, so it counts as not zero."""
    if any(t is not None and t.is_meta for t in tensors):
        return False
    return all(t is None or not bool(t.detach().any()) for t in tensors)


def skip_identity_blocks(decoder: nn.Module) -> tuple[nn.Module, int]:
    """A view of a ``WanDecoder3d`` without its provable identity blocks → ``(decoder, blocks skipped)``.

    A ``WanResidualBlock`` returns ``conv2(...) + shortcut(x)``; with ``conv2``'s weight and bias all zero
    and an identity shortcut that is ``0 + x = x`` exactly (for finite activations). A
    ``WanAttentionBlock`` returns ``proj(...) + x``, the same with ``proj`` zero. The view shares every
    parameter with ``decoder`` (nothing is copied or changed), replaces those blocks by stand-ins that
    keep the feature-cache indices of the others, and is decided once: later edits of the weights are
    not re-checked. Returns ``decoder`` itself when nothing can be skipped."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import (WanAttentionBlock, WanCausalConv3d,
                                                                  WanResidualBlock)

    def identity_residual(m: nn.Module) -> bool:
        return (type(m) is WanResidualBlock and isinstance(m.conv_shortcut, nn.Identity)
                and _all_zero(m.conv2.weight, m.conv2.bias))

    def identity_attention(m: nn.Module) -> bool:
        return type(m) is WanAttentionBlock and _all_zero(m.proj.weight, m.proj.bias)

    if not any(identity_residual(m) or identity_attention(m) for m in decoder.modules()):
        return decoder, 0
    shared = {id(t): t for t in list(decoder.parameters()) + list(decoder.buffers())}
    view = copy.deepcopy(decoder, memo=shared)  # new module objects, the same parameter tensors
    skipped = 0
    for parent in list(view.modules()):
        for name, child in list(parent.named_children()):
            if identity_residual(child):
                slots = sum(isinstance(c, WanCausalConv3d) for c in child.modules())
                parent._modules[name] = _SkippedResidual(slots)
                skipped += 1
            elif identity_attention(child):
                parent._modules[name] = nn.Identity()
                skipped += 1
    return view, skipped


def _count_causal_convs(decoder: nn.Module) -> int:
    """Number of feature-cache slots the decoder uses: one per ``WanCausalConv3d`` (as diffusers counts)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in decoder.modules())


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """Convert decoded video ``(1, 3, N, H, W)`` in [-1, 1] to uint8 frames ``(N, H, W, 3)``.

    Pixel mapping: ``round((clamp(x, -1, 1) + 1) * 127.5)`` computed in float32, rounding half to
    even (-1 -> 0, 0 -> 128, 1 -> 255). This is the [-1, 1] -> [0, 255] mapping of diffusers'
    ``VideoProcessor`` (``(x / 2 + 0.5) * 255``), up to float rounding of exact .5 ties.
    """
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"expected video of shape (1, 3, N, H, W), got {tuple(video.shape)}")
    x = video[0].float().clamp(-1.0, 1.0)  # (3, N, H, W)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)  # (3, N, H, W) in [0, 255]
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()  # (N, H, W, 3)


class StreamingDecoder:
    """Decode normalised Wan latents chunk by chunk, bit-identical to one-shot ``vae.decode``.

    Args:
        vae: a diffusers ``AutoencoderKLWan`` (any device/dtype; it is only read, never modified).
        latents_mean: per-channel mean of the latent space (``z_dim`` floats); defaults to
            ``vae.config.latents_mean``.
        latents_std: per-channel std of the latent space; defaults to ``vae.config.latents_std``.

    The engine works in normalised latent space; :meth:`decode_chunk` de-normalises exactly as
    diffusers' ``WanPipeline`` does (``z = latents / (1 / std) + mean`` in the VAE's dtype, i.e.
    ``latents * std + mean``) before decoding.
    """

    def __init__(
        self,
        vae: nn.Module,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
    ) -> None:
        self.vae = vae
        config = vae.config
        self.z_dim: int = int(config.z_dim)
        mean = list(config.latents_mean if latents_mean is None else latents_mean)
        std = list(config.latents_std if latents_std is None else latents_std)
        if len(mean) != self.z_dim or len(std) != self.z_dim:
            raise ValueError(
                f"latents_mean/latents_std need {self.z_dim} entries (z_dim), got {len(mean)}/{len(std)}"
            )
        if any(s == 0 for s in std):
            raise ValueError("latents_std must not contain zeros")
        self._mean = torch.tensor(mean).view(1, self.z_dim, 1, 1, 1)  # (1, z, 1, 1, 1) fp32
        self._std = torch.tensor(std).view(1, self.z_dim, 1, 1, 1)  # (1, z, 1, 1, 1) fp32
        self._stats_cache: tuple[torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

        self.num_cache_slots: int = _count_causal_convs(vae.decoder)
        self._decoder, self.skipped_blocks = skip_identity_blocks(vae.decoder)  # bit-identical, cheaper
        upsample = list(getattr(vae, "temperal_upsample", config.temperal_downsample[::-1]))
        self.temporal_scale: int = 2 ** sum(bool(u) for u in upsample)  # pixel frames per latent frame
        self.patch_size: int | None = getattr(config, "patch_size", None)

        self._feat_cache: list[CacheEntry] = []
        self.latent_frames_decoded: int = 0
        self.frames_decoded: int = 0
        self._latent_hw: tuple[int, int] | None = None  # spatial latent size, fixed after the first chunk
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget all history: the next chunk is decoded as the start of a new video."""
        self._feat_cache = [None] * self.num_cache_slots
        self.latent_frames_decoded = 0
        self.frames_decoded = 0
        self._latent_hw = None

    def frames_for(self, latent_frames: int) -> int:
        """Pixel frames the next chunk of ``latent_frames`` latent frames will decode to."""
        if latent_frames <= 0:
            return 0
        first = 1 if self.latent_frames_decoded == 0 else self.temporal_scale
        return first + self.temporal_scale * (latent_frames - 1)

    def state_dict(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """Export the feature cache and counters.

        The returned dict holds only tensors, ints, strings (``"Rep"`` markers), lists, dicts and None,
        so it round-trips through ``torch.save`` / ``torch.load(weights_only=True)``. Tensors are the
        cache's own (they are replaced, never modified in place, by later decoding, so the dict stays
        a valid snapshot); pass ``device`` (e.g. ``"cpu"``) to get copies on that device instead.
        """
        cache: list[CacheEntry] = []
        for entry in self._feat_cache:
            if isinstance(entry, torch.Tensor) and device is not None:
                entry = entry.to(device, copy=True)
            cache.append(entry)
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "num_cache_slots": self.num_cache_slots,
            "z_dim": self.z_dim,
            "temporal_scale": self.temporal_scale,
            "feat_cache": cache,
            "latent_frames_decoded": self.latent_frames_decoded,
            "frames_decoded": self.frames_decoded,
            "latent_hw": None if self._latent_hw is None else list(self._latent_hw),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; tensors are moved to the VAE's device and dtype.

        Raises :class:`~slotgen.errors.SnapshotError` if the state is malformed or was made with a
        VAE of another architecture. Nothing is changed unless the whole state is valid.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise SnapshotError("decoder state is not a slotgen streaming-decoder state")
        if state.get("version") != STATE_VERSION:
            raise SnapshotError(
                f"decoder state version {state.get('version')!r} is not supported (expected {STATE_VERSION})"
            )
        for key, mine in (
            ("num_cache_slots", self.num_cache_slots),
            ("z_dim", self.z_dim),
            ("temporal_scale", self.temporal_scale),
        ):
            if state.get(key) != mine:
                raise SnapshotError(
                    f"decoder state was made with another VAE ({key} {state.get(key)!r}, this VAE has {mine})"
                )
        cache = state.get("feat_cache")
        if not isinstance(cache, list) or len(cache) != self.num_cache_slots:
            raise SnapshotError("decoder state has a malformed feature cache")
        latent_frames = state.get("latent_frames_decoded")
        frames = state.get("frames_decoded")
        if not (isinstance(latent_frames, int) and isinstance(frames, int) and latent_frames >= 0 and frames >= 0):
            raise SnapshotError("decoder state has malformed frame counters")
        hw = state.get("latent_hw")
        if hw is not None and not (isinstance(hw, list) and len(hw) == 2 and all(isinstance(v, int) for v in hw)):
            raise SnapshotError("decoder state has a malformed latent size")

        device, dtype = self._device_dtype()
        restored: list[CacheEntry] = []
        for entry in cache:
            if entry is None or (isinstance(entry, str) and entry == REP_MARKER):
                restored.append(entry)
            elif isinstance(entry, torch.Tensor):
                if entry.ndim != 5 or entry.shape[0] != 1:
                    raise SnapshotError("decoder state has a malformed feature-cache tensor")
                restored.append(entry.to(device=device, dtype=dtype))
            else:
                raise SnapshotError(f"decoder state has an unexpected feature-cache entry {entry!r:.40}")
        self._feat_cache = restored
        self.latent_frames_decoded = latent_frames
        self.frames_decoded = frames
        self._latent_hw = None if hw is None else (hw[0], hw[1])

    # ------------------------------------------------------------------ decoding

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Execution device/dtype of the VAE (after any accelerate offload hook has run)."""
        weight = self.vae.post_quant_conv.weight
        return weight.device, weight.dtype

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, z, T, h, w)`` -> VAE latents, exactly as ``WanPipeline`` does it.

        Casts to the VAE's device/dtype, then ``latents / (1 / std) + mean`` with the statistics in
        that dtype (bit-identical to the pipeline; mathematically ``latents * std + mean``).
        """
        device, dtype = self._device_dtype()
        latents = latents.to(device=device, dtype=dtype)
        if self._stats_cache is None or self._stats_cache[:2] != (device, dtype):
            mean = self._mean.to(device, dtype)  # (1, z, 1, 1, 1)
            inv_std = 1.0 / self._std.to(device, dtype)  # (1, z, 1, 1, 1)
            self._stats_cache = (device, dtype, mean, inv_std)
        _, _, mean, inv_std = self._stats_cache
        return latents / inv_std + mean

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5:
            raise ValueError(f"expected latents of shape (1, z, T, h, w), got {tuple(latents.shape)}")
        b, c, t, h, w = latents.shape
        if b != 1:
            raise ValueError(f"StreamingDecoder decodes one video at a time (batch 1), got batch {b}")
        if c != self.z_dim:
            raise ValueError(f"expected {self.z_dim} latent channels, got {c}")
        if t < 1:
            raise ValueError("cannot decode an empty chunk (T = 0)")
        if self._latent_hw is not None and (h, w) != self._latent_hw:
            raise ValueError(
                f"latent size changed mid-video: {self._latent_hw} before, {(h, w)} now (call reset() first)"
            )

    def _frames(self, latents: torch.Tensor, cache: list[CacheEntry]):
        """Decode ``latents`` (checked) frame by frame into ``cache`` (the decoder's working copy): yields
        each latent frame's video ``(1, 3, 1 or s, H, W)``, clamped to [-1, 1]. The state's counters are
        the caller's to advance."""
        vae = self.vae
        hook = getattr(vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)  # what diffusers' @apply_forward_hook does around vae.decode
        start = self.latent_frames_decoded
        with torch.no_grad():
            z = self.denormalize(latents)  # (1, z, T, h, w)
            x = vae.post_quant_conv(z)  # (1, z, T, h, w)
            for i in range(latents.shape[2]):
                first = start + i == 0
                # (1, z, 1, h, w) -> (1, 3 * p * p, 1 or s, H / p, W / p)
                out = self._decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=first)
                if self.patch_size is not None:
                    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                    out = unpatchify(out, patch_size=self.patch_size)  # (1, 3, 1 or s, H, W)
                yield torch.clamp(out, min=-1.0, max=1.0)

    def decode_chunk_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next chunk of normalised latents ``(1, z, T, h, w)`` to video ``(1, 3, N, H, W)``.

        The result is clamped to [-1, 1] (as ``vae.decode`` does), in the VAE's dtype and on its
        device. ``N = 1 + s * (T - 1)`` for the first chunk and ``s * T`` afterwards. The decoder's
        state is only updated if the whole chunk decodes (an exception leaves it unchanged).
        """
        self._check_latents(latents)
        # Work on a shallow copy: the decoder replaces list entries (never mutates cached tensors in
        # place), so committing the copy at the end makes the update all-or-nothing.
        cache = list(self._feat_cache)
        out = torch.cat(list(self._frames(latents, cache)), dim=2)  # (1, 3, N, H, W)
        self._feat_cache = cache
        self._latent_hw = tuple(latents.shape[3:])
        self.latent_frames_decoded += latents.shape[2]
        self.frames_decoded += out.shape[2]
        return out

    def decode_frames(self, latents: torch.Tensor):
        """Decode the next chunk like :meth:`decode_chunk`, yielding the uint8 frames of each latent frame
        ``(1 or s, H, W, 3)`` as soon as it is decoded (a live page shows the chunk's first frame before
        the rest are decoded). The frames are bit-identical to :meth:`decode_chunk`'s; the state moves
        one latent frame at a time (an exception leaves it after the last frame yielded)."""
        self._check_latents(latents)
        cache = list(self._feat_cache)
        for video in self._frames(latents, cache):
            self._feat_cache = list(cache)
            self._latent_hw = tuple(latents.shape[3:])
            self.latent_frames_decoded += 1
            self.frames_decoded += video.shape[2]
            yield frames_to_uint8(video)

    def decode_chunk(self, latents: torch.Tensor) -> np.ndarray:
        """Decode the next chunk of normalised latents ``(1, z, T, h, w)`` to uint8 frames ``(N, H, W, 3)``.

        Pixels are ``round((clamp(x, -1, 1) + 1) * 127.5)`` (see :func:`frames_to_uint8`).
        """
        return frames_to_uint8(self.decode_chunk_float(latents))
