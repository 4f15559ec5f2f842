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
LONG_RENDER_SECONDS = 600.0  # projected render time (at the steady pace) above which a warning is printed


# torch's own default intra-op thread count (its physical cores), read before anything changes it
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def cpu_threads(requested: int | None, *, usable_cores: int | None = None,
                torch_default: int = TORCH_DEFAULT_THREADS, env: dict | None = None) -> int | None:
    """Intra-op threads for a render on the CPU, or ``None`` to leave torch's setting alone.

    ``requested`` (``--threads``) wins. With ``OMP_NUM_THREADS`` set, the user chose: ``None``. Otherwise
    one fewer than the cores, at least 1 and at most torch's default: the overlapped decode and the MP4
    writer run on a thread of their own and torch's thread count is process-wide, so generation at
    torch's default (every core) and the decode worker oversubscribe the machine. On this project's
    2-core machine, 60 s of video take 41.5 s at 1 thread and 66.8 s at torch's default of 2
    (docs/BENCHMARKS.md); more cores are not measured."""
    if requested is not None:
        if requested < 1:
            raise SlotgenError(f"--threads: expected at least 1, got {requested}")
        return requested
    if "OMP_NUM_THREADS" in (os.environ if env is None else env):
        return None
    if usable_cores is None:
        usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch_default, usable_cores - 1))


def apply_cpu_threads(device: torch.device, requested: int | None) -> int:
    """Set torch's intra-op threads for a render on ``device`` (CPU only, see :func:`cpu_threads`);
    returns the count in effect."""
    n = cpu_threads(requested) if device.type == "cpu" else None
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


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


def time_warning(chunk_seconds: float, chunks: int, width: int, height: int) -> str | None:
    """Once the pace is steady (:class:`slotgen.pace.SteadyPace`: never the first chunk's compile or warm-up):
    a warning when the ``chunks`` still to render will take long at ``chunk_seconds`` each, else None."""
    projected = chunk_seconds * chunks
    if projected <= LONG_RENDER_SECONDS:
        return None
    return (f"{width}x{height}: a chunk takes {chunk_seconds:.1f}s; the {chunks} chunks left will take about "
            f"{projected / 60:.0f} min (Ctrl-C stops with a snapshot; --snapshot-every keeps it crash-safe)")
