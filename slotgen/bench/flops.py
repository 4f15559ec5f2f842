"""``slotgen bench flops``: FLOPs per chunk of the transformer and the VAE, and the FPS they allow.

Counted, not estimated: the real diffusers modules run on the ``meta`` device (shapes only, no
weights, no memory) under :class:`torch.utils.flop_counter.FlopCounterMode`, through the engine's own
attention processors, so self-attention over ``[memory ; chunk]`` is counted at the memory size the
policy holds in its steady state. One chunk is ``steps`` denoising forwards plus the commit forward
(the cross-attention text K/V are cached per prompt, so they are not counted per forward), and the
streaming VAE decode of a later chunk (``stride_t · F`` video frames). The text encoder runs once
per prompt and is left out.

Steady-state memory per policy (latent frames of ``T`` tokens, from the policy's config):
window ``window·T``; sink ``(sink + window)·T``; bank ``(sink + window + bank_frames)·T``;
slot ``(sink + window)·T + top_k·top_r`` tokens.

The FPS ceiling at ``R`` TFLOP/s is ``frames per chunk / (FLOPs per chunk / R)``: what a device
sustaining ``R`` on this mix of kernels could reach with nothing else in the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

META = torch.device("meta")


@dataclass
class FlopRow:
    policy: str
    memory_tokens: int
    transformer_tflop_per_forward: float
    transformer_tflop_per_chunk: float
    vae_tflop_per_chunk: float
    frames_per_chunk: int

    @property
    def total_tflop_per_chunk(self) -> float:
        return self.transformer_tflop_per_chunk + self.vae_tflop_per_chunk

    def fps_at(self, tflops: float) -> float:
        """Frames per second at a sustained ``tflops`` TFLOP/s."""
        return self.frames_per_chunk * tflops / self.total_tflop_per_chunk


def memory_tokens(config, tokens_per_frame: int) -> int:
    """Rows of K/V a policy attends to besides the chunk, in its steady state (module docstring)."""
    name = config.policy
    frames = config.window + getattr(config, "sink", 0)
    if name in ("window", "sink"):
        return frames * tokens_per_frame
    if name == "bank":
        return (frames + config.bank_frames) * tokens_per_frame
    if name == "slot":
        return frames * tokens_per_frame + config.top_k * config.top_r
    raise ValueError(f"bench flops knows the memory size of window, sink, bank and slot, not {name!r}")


class _FixedMemory:
    """Stands in for a policy: every layer reads ``rows`` memory rows (meta tensors), writes nothing."""

    def __init__(self, rows: int, frames: int, heads: int, head_dim: int, tokens_per_frame: int, grid: tuple[int, int]):
        self.block = None
        if rows:
            from slotgen.memory.base import KVBlock

            k = torch.empty(1, rows, heads, head_dim, device=META)
            per = -(-rows // max(frames, 1))  # rows per distinct frame (for the RoPE bound only)
            runs = tuple((f, min(per, rows - f * per)) for f in range(frames) if rows - f * per > 0)
            self.block = KVBlock(k, k.clone(), torch.empty(rows, dtype=torch.long, device=META),
                                 torch.empty(rows, 2, dtype=torch.long, device=META), runs)

    def read(self, layer: int):
        return self.block

    def write(self, layer: int, block) -> None:
        pass


def parse_memory_spec(text: str) -> dict:
    """'sink:sink=3,window=6' → {"policy": "sink", "sink": "3", "window": "6"} (validated by the policy's config)."""
    from pydantic import ValidationError

    from slotgen.errors import SlotgenError
    from slotgen.memory import parse_memory_config

    name, _, rest = text.partition(":")
    spec: dict = {"policy": name.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SlotgenError(f"--memory {text!r}: expected key=value after the policy, got {item!r}")
        spec[key.strip()] = value.strip()
    try:
        parse_memory_config(spec)
    except ValidationError as e:  # the first problem, with the key it is about
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise SlotgenError(f"--memory {text!r}: {where + ': ' if where else ''}{first['msg']}") from None
    except ValueError as e:  # an unknown policy or preset
        raise SlotgenError(f"--memory {text!r}: {str(e).splitlines()[0]}") from None
    return spec


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_on_meta(model: str):
    """(transformer, vae, settings) of ``model`` ('wan-1.3b' / 'wan-1.3b-random' or 'miniature') on meta."""
    from diffusers import AutoencoderKLWan

    if model in ("wan-1.3b", "wan-1.3b-random"):
        from slotgen.models.wan import WAN_1_3B_TRANSFORMER, WAN_SETTINGS, WAN_VAE, _meta_transformer, cast_vae

        transformer = _meta_transformer(WAN_1_3B_TRANSFORMER, torch.bfloat16)
        with META:
            vae = cast_vae(AutoencoderKLWan(**WAN_VAE).eval(), None, torch.bfloat16)
        return transformer, vae, WAN_SETTINGS
    if model == "miniature":
        import json

        from slotgen.models.bundle import ModelSettings
        from slotgen.models.miniature import _asset_path, build_modules

        config = json.loads((_asset_path(None) / "config.json").read_text())
        with META:
            transformer, vae, _ = build_modules(config)
        return transformer, vae, ModelSettings.from_dict(config.get("settings", {}))
    raise ValueError(f"bench flops models: wan-1.3b-random, miniature; got {model!r}")


def count_flops(model: str, width: int, height: int, memories: list[dict], steps: int | None = None,
                on_item=None) -> list[FlopRow]:
    """One :class:`FlopRow` per memory config (mappings as in a storyboard's ``memory:``); ``on_item(label)``
    is called as each config starts (a progress display)."""
    from slotgen.engine.attention import StreamState, install_streaming_processors
    from slotgen.memory import parse_memory_config
    from slotgen.video.decoder import StreamingDecoder

    transformer, vae, s = model_on_meta(model)
    steps = steps or s.steps
    cfg = transformer.config
    p = cfg.patch_size
    lh, lw = height // s.vae_stride_s, width // s.vae_stride_s
    grid = (lh // p[1], lw // p[2])
    T = grid[0] * grid[1]
    F = s.chunk_frames
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    dtype = transformer.patch_embedding.weight.dtype
    x = torch.empty(1, cfg.in_channels, F, lh, lw, device=META, dtype=dtype)
    text = torch.empty(1, s.text_len, cfg.text_dim, device=META, dtype=dtype)
    t = torch.zeros(1, device=META)

    state = StreamState()
    install_streaming_processors(transformer, state)
    state.frames = torch.empty(F * T, dtype=torch.long, device=META)
    state.hw = torch.empty(F * T, 2, dtype=torch.long, device=META)
    state.runs = tuple((f, T) for f in range(F))
    state.text = text

    def forward():
        with torch.no_grad():
            transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)

    # the VAE: decode a first chunk (9 frames), count a later one (stride_t · F frames)
    decoder = StreamingDecoder(vae)
    z = torch.empty(1, vae.config.z_dim, F, lh, lw, device=META, dtype=dtype)
    with torch.no_grad():
        decoder.decode_chunk_float(z)
        vae_flops = _count(lambda: decoder.decode_chunk_float(z))

    rows = []
    for memory in memories:
        if on_item is not None:
            on_item(str(memory.get("policy", memory)))
        config = parse_memory_config(memory)
        m = memory_tokens(config, T)
        frames = config.window + getattr(config, "sink", 0) + getattr(config, "bank_frames", 0) + getattr(config, "top_k", 0)
        state.memory = _FixedMemory(m, frames, heads, head_dim, T, grid)
        state.epoch += 1
        forward()  # fills the per-prompt cross-attention cache; the next forwards reuse it
        per_forward = _count(forward)
        rows.append(FlopRow(config.policy, m, per_forward / 1e12, (steps + 1) * per_forward / 1e12, vae_flops / 1e12,
                            s.vae_stride_t * F))
    return rows
