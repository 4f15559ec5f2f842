"""``slotgen inspect``: what a render's memory holds, as a table, JSON or a PNG of slot assignments.

Sources: a ``--stats`` JSON written by ``slotgen render`` or a snapshot (``.pt``). Both carry the
memory policy's ``stats()`` — collected during the render at no extra forward passes — which this
module normalises into one report (:func:`build_report`, schema :data:`REPORT_SCHEMA`).
"""

from __future__ import annotations

import json
from pathlib import Path

from slotgen.errors import SlotgenError

REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "slotgen inspect report",
    "type": "object",
    "required": ["source", "policy", "frames_seen", "bytes", "layers"],
    "properties": {
        "source": {"type": "string"},
        "policy": {"enum": ["window", "sink", "bank", "slot"]},
        "frames_seen": {"type": "integer", "minimum": 0},
        "bytes": {"type": "integer", "minimum": 0},
        "sink_frames": {"type": "array", "items": {"type": "integer"}},
        "local_frames": {"type": "array", "items": {"type": "integer"}},
        "layers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["layer", "tokens"],
                "properties": {
                    "layer": {"type": "integer", "minimum": 0},
                    "tokens": {"type": "integer", "minimum": 0},
                    "slots": {"type": "integer"},
                    "items": {"type": "integer"},
                    "bank_tokens": {"type": "integer"},
                    "budget": {"type": "integer"},
                    "budget_use": {"type": "number"},
                    "mean_age": {"type": "number"},
                    "max_age": {"type": "number"},
                    "hits": {"type": "integer"},
                    "retrieved": {"type": "array", "items": {"type": "integer"}},
                    "relevance": {"type": "object"},
                    "bank_frames": {"type": "array", "items": {"type": "integer"}},
                },
            },
        },
    },
}


def load_stats(path: str | Path) -> tuple[dict, dict]:
    """(memory stats, extra info) from a ``--stats`` JSON or a snapshot file."""
    p = Path(path)
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
    from slotgen.snapshot import load_snapshot, policy_from_snapshot

    snap = load_snapshot(p)
    return policy_from_snapshot(snap).stats(), {"storyboard": getattr(snap, "source", str(p))}


def build_report(stats: dict, source: str) -> dict:
    """Normalise any policy's stats into the inspect report (see REPORT_SCHEMA)."""
    policy = stats["policy"]
    tokens = stats.get("tokens_per_layer", [])
    layers = []
    for i, tok in enumerate(tokens):
        row: dict = {"layer": i, "tokens": int(tok)}
        if policy == "slot" and i < len(stats.get("layers", [])):
            lay = stats["layers"][i]
            row.update(
                slots=int(lay["num_slots"]), items=int(lay["items"]), bank_tokens=int(lay["tokens"]),
                budget=int(lay["budget"]), budget_use=float(lay["budget_use"]), mean_age=float(lay["mean_age"]),
                max_age=float(lay["max_age"]), hits=int(sum(lay["hits"])), retrieved=[int(x) for x in lay["retrieved"]],
                relevance={k: float(v["r"]) for k, v in lay.get("scores", {}).items()},
            )
        if policy == "bank" and i < len(stats.get("bank", [])):
            row["bank_frames"] = [int(f) for f in stats["bank"][i]]
            row["relevance"] = {k: float(v) for k, v in stats.get("bank_scores", [{}] * (i + 1))[i].items()}
        layers.append(row)
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
    """A rich table, one row per layer."""
    from rich.table import Table

    title = (f"{report['source']} — policy {report['policy']}, {report['frames_seen']} latent frames seen, "
             f"{report['bytes'] / 2**20:.2f} MiB held")
    table = Table(title=title)
    cols = ["layer", "tokens"]
    if report["policy"] == "slot":
        cols += ["slots", "items", "bank tokens", "budget use", "mean age", "max age", "hits", "retrieved", "best r"]
    if report["policy"] == "bank":
        cols += ["bank frames", "relevance"]
    for c in cols:
        table.add_column(c, justify="right")
    for row in report["layers"]:
        cells = [str(row["layer"]), str(row["tokens"])]
        if report["policy"] == "slot":
            rel = row.get("relevance", {})
            cells += [str(row["slots"]), str(row["items"]), str(row["bank_tokens"]), f"{row['budget_use']:.0%}",
                      f"{row['mean_age']:.1f}", f"{row['max_age']:.0f}", str(row["hits"]), str(len(row["retrieved"])),
                      f"{max(rel.values()):.2f}" if rel else "-"]
        if report["policy"] == "bank":
            rel = row.get("relevance", {})
            cells += [" ".join(map(str, row["bank_frames"])) or "-",
                      " ".join(f"{float(v):.2f}" for v in rel.values()) or "-"]
        table.add_row(*cells)
    return table


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195)]


def write_png(stats: dict, path: str | Path, layers: list[int] | None = None, cell: int = 16) -> Path:
    """Draw, per layer, the last chunk's token→slot assignment (a colour per slot) and the retrieved items.

    Only the ``slot`` policy has slots; other policies are refused with a clear message.
    """
    from PIL import Image, ImageDraw

    if stats.get("policy") != "slot":
        raise SlotgenError(f"--png needs a render with the slot memory policy (this one used {stats.get('policy')!r})")
    lays = stats["layers"]
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
