"""``slotgen inspect``: what a render's memory holds, as a table, JSON or a PNG of slot assignments.

Sources: a ``--stats`` JSON written by ``slotgen render`` or a snapshot (``.pt``). Both carry the
memory policy's ``stats()`` — collected during the render at no extra forward passes — which this
module normalises into one report (:func:`build_report`, schema :func:`report_schema`). What a policy
adds to the report comes from its class (``inspect_layer``, ``inspect_schema``, ``inspect_columns``).
"""

from __future__ import annotations

import json
from pathlib import Path

from slotgen.errors import SlotgenError

def report_schema() -> dict:
    """JSON schema of :func:`build_report`'s output: the common keys plus every registered policy's
    per-layer keys (``inspect_schema``)."""
    from slotgen.memory.registry import policy_class, policy_names

    layer_keys: dict[str, dict] = {"layer": {"type": "integer", "minimum": 0},
                                   "tokens": {"type": "integer", "minimum": 0}}
    for name in policy_names():
        layer_keys.update(policy_class(name).inspect_schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "slotgen inspect report",
        "type": "object",
        "required": ["source", "policy", "frames_seen", "bytes", "layers"],
        "properties": {
            "source": {"type": "string"},
            "policy": {"enum": list(policy_names())},
            "frames_seen": {"type": "integer", "minimum": 0},
            "bytes": {"type": "integer", "minimum": 0},
            "sink_frames": {"type": "array", "items": {"type": "integer"}},
            "local_frames": {"type": "array", "items": {"type": "integer"}},
            "layers": {
                "type": "array",
                "items": {"type": "object", "required": ["layer", "tokens"], "properties": layer_keys},
            },
        },
    }


def load_stats(path: str | Path) -> tuple[dict, dict]:
    """(memory stats, extra info) from a ``--stats`` JSON or a snapshot file."""
    p = Path(path)
    if p.is_dir():
        raise SlotgenError(f"{p}: is a directory (give a --stats JSON or a snapshot .pt)")
    if not p.is_file():
        raise SlotgenError(f"{p}: no such file (give a --stats JSON or a snapshot .pt)")
    if p.suffix.lower() == ".json":
        try:
            doc = json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SlotgenError(f"{p}: not a slotgen stats JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != "slotgen-stats" or "memory" not in doc:
            raise SlotgenError(f"{p}: not a slotgen stats JSON (expected format 'slotgen-stats')")
        return doc["memory"], {k: v for k, v in doc.items() if k != "memory"}
    from slotgen.snapshot import load_snapshot, snapshot_policy

    snap = load_snapshot(p)
    return snapshot_policy(snap).stats(), {"storyboard": snap.source or str(p)}


def build_report(stats: dict, source: str) -> dict:
    """Normalise any policy's stats into the inspect report (see :func:`report_schema`)."""
    from slotgen.memory.registry import UnknownPolicyError, policy_class

    policy = stats["policy"]
    try:
        cls = policy_class(policy)
    except UnknownPolicyError as e:
        raise SlotgenError(f"{source}: {e} (a plug-in policy's module must be importable: see "
                            f"slotgen.memory.registry)") from None
    layers = [{"layer": i, "tokens": int(tok), **cls.inspect_layer(stats, i)}
              for i, tok in enumerate(stats.get("tokens_per_layer", []))]
    return {
        "source": source,
        "policy": policy,
        "frames_seen": int(stats.get("frames_seen", 0)),
        "bytes": int(stats.get("bytes", 0)),
        "sink_frames": [int(f) for f in stats.get("sink_frames", [])],
        "local_frames": [int(f) for f in stats.get("local_frames", [])],
        "layers": layers,
    }


def report_table(report: dict):
    """A rich table, one row per layer: layer, tokens, then the policy's own ``inspect_columns``."""
    from rich.table import Table

    from slotgen.memory.registry import policy_class

    columns = policy_class(report["policy"]).inspect_columns
    title = (f"{report['source']} — policy {report['policy']}, {report['frames_seen']} latent frames seen, "
             f"{report['bytes'] / 2**20:.2f} MiB held")
    table = Table(title=title)
    for c in ["layer", "tokens", *(title for title, _ in columns)]:
        table.add_column(c, justify="right")
    for row in report["layers"]:
        reported = len(row) > 2  # inspect_layer added this layer's fields
        table.add_row(str(row["layer"]), str(row["tokens"]), *(cell(row) if reported else "-" for _, cell in columns))
    return table


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195)]


def write_png(stats: dict, path: str | Path, layers: list[int] | None = None, cell: int = 16) -> Path:
    """Draw, per layer, the last chunk's token→slot assignment (a colour per slot) and the retrieved items.

    Needs a policy whose stats record per-layer slot assignments (the ``slot`` policy); others are
    refused with a clear message.
    """
    from PIL import Image, ImageDraw

    lays = stats.get("layers")
    if not isinstance(lays, list) or not all(isinstance(lay, dict) and "assignment" in lay for lay in lays):
        raise SlotgenError(f"--png needs a render with the slot memory policy (this one used {stats.get('policy')!r})")
    chosen = [i for i in (layers if layers is not None else range(len(lays))) if lays[i].get("assignment")]
    if not chosen:
        raise SlotgenError("no slot assignments recorded yet (the render has not committed a chunk)")
    panels = []
    for i in chosen:
        a = lays[i]["assignment"]
        frames = sorted(set(a["frames"]))
        th = max(h for h, _ in a["hw"]) + 1
        tw = max(w for _, w in a["hw"]) + 1
        img = Image.new("RGB", (len(frames) * (tw * cell + 8) + 8, th * cell + 60), (20, 20, 20))
        draw = ImageDraw.Draw(img)
        for slot, f, (h, w) in zip(a["slot"], a["frames"], a["hw"]):
            x0 = 8 + frames.index(f) * (tw * cell + 8) + w * cell
            y0 = 24 + h * cell
            draw.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=PALETTE[slot % len(PALETTE)])
        for j, f in enumerate(frames):
            draw.text((8 + j * (tw * cell + 8), 6), f"L{i} frame {f}", fill=(230, 230, 230))
        retrieved = lays[i]["retrieved"]
        frames_of = dict(zip(lays[i]["item_ids"], lays[i]["item_frames"]))
        desc = ", ".join(f"#{r}@{frames_of.get(r, ['?'])}" for r in retrieved[:6]) or "none"
        draw.text((8, 28 + th * cell), f"retrieved items: {desc}", fill=(230, 230, 230))
        panels.append(img)
    width = max(p.width for p in panels)
    out = Image.new("RGB", (width, sum(p.height for p in panels)), (20, 20, 20))
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height
    from slotgen.atomic import atomic_output

    with atomic_output(path) as tmp:
        out.save(tmp, format="PNG")
    return Path(path)
