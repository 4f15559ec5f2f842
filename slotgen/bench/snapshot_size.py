"""``slotgen bench snapshot-sizes``: how big a snapshot is after long renders, per memory policy.

Each policy renders a storyboard (a prompt switch halfway) for each duration without writing video;
the row gives the encoded snapshot's bytes, the policy's own bytes, the latent frames kept for a
re-cache and the frames decoded past the end. A bounded memory gives the same size at every length.
"""

from __future__ import annotations

import sys

from slotgen.memory.registry import policy_names
from slotgen.models import load_model
from slotgen.render import Renderer
from slotgen.snapshot import encode_snapshot
from slotgen.storyboard import parse_storyboard


def snapshot_sizes(durations=(60.0, 600.0), policies=None, *, model: str = "miniature", device: str = "cpu",
                   resolution: str | None = None, steps: int | None = None, bundle=None, out=None,
                   on_item=None) -> list[dict]:
    """Render each policy for each duration (no video written) and report the snapshot's size.

    The storyboard switches prompt halfway; each policy runs with its default configuration.
    ``resolution`` (``"WxH"``) and ``steps`` default to the model's. ``on_item(label)`` is called as each
    render starts (a progress display).
    """
    out = out if out is not None else sys.stdout
    policies = list(policies or policy_names())
    bundle = bundle if bundle is not None else load_model(model, device=device)
    extra = (f"resolution: {resolution}\n" if resolution else "") + (f"sampler: {{steps: {steps}}}\n" if steps else "")
    rows = []
    print(f"{'policy':>8} {'video s':>8} {'chunks':>7} {'snapshot bytes':>15} {'memory bytes':>13} "
          f"{'history':>8} {'pending':>8}", file=out, flush=True)
    for policy in policies:
        for seconds in durations:
            if on_item is not None:
                on_item(f"{policy}, {seconds:g} s")
            text = (f"duration: {seconds}\nseed: 0\nmodel: {model}\n{extra}memory: {{policy: {policy}}}\nprompts:\n"
                    f"  - prompt: a red circle moves right on a blue background\n"
                    f"  - at: {seconds / 2}\n    prompt: a green square enters from the left on a white background\n")
            renderer = Renderer(parse_storyboard(text, f"<{policy} {seconds}s>"), bundle=bundle)
            renderer.stream([])
            size = len(encode_snapshot(renderer.snapshot_payload()))
            row = {"policy": policy, "video_s": seconds, "chunks": renderer.engine.next_chunk, "bytes": size,
                   "memory_bytes": renderer.policy.nbytes(), "history_frames": len(renderer.engine.history),
                   "pending_frames": int(len(renderer.pending))}
            rows.append(row)
            print(f"{policy:>8} {seconds:>8g} {row['chunks']:>7} {size:>15,} {row['memory_bytes']:>13,} "
                  f"{row['history_frames']:>8} {row['pending_frames']:>8}", file=out, flush=True)
    return rows
