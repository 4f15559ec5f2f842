"""Host syncs and operator launches per chunk, per policy: the probe behind the sync tests and
``scripts/gpu_check.sh``.

Drives a :class:`~slotgen.engine.generator.StreamingEngine` chunk by chunk (a prompt switch at a
given chunk, so the re-cache path is counted too) and counts, inside each ``generate_chunk``, the
host-device syncs and aten ops with :class:`~slotgen.engine.sync_probe.SyncProbe`.
"""

from __future__ import annotations

from slotgen.engine.sync_probe import SyncProbe

PROMPTS = ("a red circle moves right on a blue background", "a green square enters from the right on a blue background")


def count_per_chunk(bundle, memory: dict, chunks: int, switch_at: int | None = None, width: int | None = None,
                    height: int | None = None, steps: int = 4, seed: int = 0) -> list[dict]:
    """``[{"chunk", "preset", "recached", "syncs", "ops", "sources", "stats"}]`` for chunks 0..chunks-1 of one stream (``stats``:
    the policy's ``stats()`` after the chunk, outside the probe).

    memory: a memory section as a storyboard has it (``{"policy": "slot", ...}``, optionally with an
    attention ``preset``; resolved against the model's preset as a render does); the prompt switches to
    the second prompt at chunk ``switch_at`` (None: never)."""
    from slotgen.engine.generator import EngineOptions, StreamingEngine
    from slotgen.memory import build_policy
    from slotgen.memory.registry import parse_memory_config, resolve_memory

    w, h = bundle.settings.resolution if width is None else (width, height)
    config = resolve_memory(parse_memory_config(memory), bundle.settings.preset)
    policy = build_policy(config, len(bundle.transformer.blocks), phi=bundle.slot_phi)
    engine = StreamingEngine(bundle, policy, EngineOptions(seed=seed, fps=16, width=w, height=h, steps=steps, shift=5.0,
                                                           preset=config.preset))
    out = []
    for c in range(chunks):
        idx = 1 if switch_at is not None and c >= switch_at else 0
        with SyncProbe() as probe:
            res = engine.generate_chunk(idx, PROMPTS[idx])
        out.append({"chunk": c, "preset": engine.preset.name, "recached": res.recached_frames, "syncs": probe.syncs,
                    "ops": probe.ops, "sources": dict(probe.sources), "stats": policy.stats()})
    return out
