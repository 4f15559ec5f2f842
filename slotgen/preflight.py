"""Checks before any work: the device exists, the resolution fits in memory, the render's cost is said.

:func:`check_device` turns ``--device`` into a :class:`torch.device` or a one-line error naming the
devices this torch can use. :func:`memory_estimate` is the peak working memory of one chunk, dominated
by the VAE decoder's activations at full resolution::

    bytes ≈ W · H · frames_per_decode · C · 4 bytes · ACTIVATION_FACTOR   + model weights

``C`` is the decoder's first-stage width (``vae.config.base_dim``), ``frames_per_decode`` the video frames
one latent frame decodes to (``vae_stride_t``: diffusers' Wan VAE decodes latent frame by latent frame).
``ACTIVATION_FACTOR`` = 32 was calibrated on the miniature (peak RSS growth of one chunk at 64², 128²,
256² with every policy: at most 28 × the first-stage activation) and is an estimate for other models.
:func:`check_memory` refuses a render whose estimate exceeds twice the available memory (it cannot fit)
and warns above half of it. The time estimate is measured, not guessed: after the first chunk,
:func:`time_warning` projects the whole render and warns when it is long.
"""

from __future__ import annotations

import os

import torch

from slotgen.errors import SlotgenError

ACTIVATION_FACTOR = 32
REFUSE_RATIO = 2.0  # estimate > 2 × available: refused
WARN_RATIO = 0.5  # estimate > available / 2: a warning
LONG_RENDER_SECONDS = 600.0  # projected render time above which the first chunk prints a warning


def available_devices() -> list[str]:
    """The devices this torch build can use here, e.g. ``["cpu", "cuda:0"]``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` this machine has, else a one-line :class:`SlotgenError`."""
    avail = available_devices()
    names = ", ".join(avail)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise SlotgenError(f"--device {device}: not a torch device; available here: {names}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA device (this torch build has no CUDA)" if torch.version.cuda is None else \
                "no CUDA device is visible"
            raise SlotgenError(f"--device {device}: {why} (torch {torch.__version__}); available here: {names}")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise SlotgenError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices; "
                               f"available here: {names}")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if "mps" not in avail:
            raise SlotgenError(f"--device {device}: Apple MPS is not available in this torch build or on this "
                               f"machine; available here: {names}")
        return dev
    raise SlotgenError(f"--device {device}: slotgen runs on cpu, cuda or mps; available here: {names}")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a render on ``device`` (None when unknown)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - driver queries can fail; then nothing is refused
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_estimate(bundle, width: int, height: int) -> int:
    """Peak working memory of one chunk at ``width`` × ``height`` (bytes; see the module docstring)."""
    cfg = getattr(bundle.vae, "config", {}) or {}
    channels = int(cfg.get("base_dim", 96) if hasattr(cfg, "get") else 96)
    frames = max(1, int(bundle.settings.vae_stride_t))
    itemsize = torch.finfo(bundle.dtype).bits // 8 if bundle.dtype.is_floating_point else 4
    return width * height * frames * channels * itemsize * ACTIVATION_FACTOR


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(bundle, width: int, height: int) -> str | None:
    """Refuse (one line) a resolution whose estimate is more than twice the free memory; return a
    warning above half of it, else None."""
    need = memory_estimate(bundle, width, height)
    free = available_memory(bundle.device)
    if free is None:
        return None
    where = "GPU memory" if bundle.device.type == "cuda" else "memory"
    if need > REFUSE_RATIO * free:
        raise SlotgenError(f"resolution {width}x{height} needs about {_gib(need)} of {where} per chunk; "
                           f"{_gib(free)} is free on {bundle.device}; choose a smaller resolution")
    if need > WARN_RATIO * free:
        return (f"resolution {width}x{height} needs about {_gib(need)} of {where} per chunk, "
                f"{_gib(free)} is free on {bundle.device}; the render may run out of memory")
    return None


def time_warning(first_chunk_seconds: float, chunks: int, width: int, height: int) -> str | None:
    """After the first chunk: a warning when the projected render time is long, else None."""
    projected = first_chunk_seconds * chunks
    if projected <= LONG_RENDER_SECONDS:
        return None
    return (f"{width}x{height}: the first chunk took {first_chunk_seconds:.1f}s; the {chunks} chunks will take about "
            f"{projected / 60:.0f} min (Ctrl-C stops with a snapshot; --snapshot-every keeps it crash-safe)")
