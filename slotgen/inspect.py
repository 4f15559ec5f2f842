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
            "settings": {"type": "object"},
            "slot_phi": {"type": "object", "properties": {"digest": {"type": "string"}, "source": {"type": "string"}}},
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
    v = snap.video
    video, first = (v.get("lossless"), v.get("lossless_first_frame", 0)) if v.get("lossless") else \
        (v.get("path"), v.get("first_frame", 0))
    return snapshot_policy(snap).stats(), {"storyboard": snap.source or str(p), "video": video,
                                           "video_first_frame": first,
                                           "stride_t": int(snap.model["settings"].get("vae_stride_t", 1))}


def underlay_frames(stats: dict, extra: dict, video: str | Path | None = None) -> dict[int, "object"]:
    """The video frames the last chunk's slot assignment segments: {latent frame: RGB uint8 (H, W, 3)}.

    ``video`` (else the one the stats/snapshot records) holds story frames from ``video_first_frame``;
    latent frame ``f`` is shown by its last video frame, ``stride_t · f``. Empty when the video is gone."""
    path = video if video is not None else extra.get("video")
    if not path or not Path(path).is_file():
        return {}
    lays = [lay for lay in stats.get("layers") or [] if isinstance(lay, dict) and lay.get("assignment")]
    wanted = sorted({int(f) for lay in lays for f in lay["assignment"]["frames"]})
    stride = int(extra.get("stride_t", 1) or 1)
    first = 0 if video is not None else int(extra.get("video_first_frame", 0) or 0)
    index = {stride * f - first: f for f in wanted if stride * f - first >= 0}
    from slotgen.video.writer import iter_video_frames

    out = {}
    try:
        for i, frame in enumerate(iter_video_frames(path)):
            if i in index:
                out[index[i]] = frame
            if i >= max(index, default=-1):
                break
    except Exception:  # noqa: BLE001 - an unreadable video: no underlay rather than no picture
        return {}
    return out


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
        **({"settings": stats["settings"]} if isinstance(stats.get("settings"), dict) else {}),
        **({"slot_phi": stats["slot_phi"]} if isinstance(stats.get("slot_phi"), dict) else {}),
        "layers": layers,
    }


def report_table(report: dict):
    """A rich table, one row per layer: layer, tokens, then the policy's own ``inspect_columns``."""
    from rich.table import Table

    from slotgen.memory.registry import policy_class

    columns = policy_class(report["policy"]).inspect_columns
    title = (f"{report['source']} — policy {report['policy']}, {report['frames_seen']} latent frames seen, "
             f"{report['bytes'] / 2**20:.2f} MiB held")
    if report["policy"] == "slot" and "settings" in report:
        from slotgen.memory.phi_file import describe

        st = report["settings"]
        title += (f"\n{st.get('num_slots')} slots, top_r {st.get('top_r')}, top_k {st.get('top_k')}, budget "
                  f"{st.get('budget')} tokens per layer; φ {describe(report.get('slot_phi'))}")
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


def write_png(stats: dict, path: str | Path, layers: list[int] | None = None, cell: int = 16,
              frames: dict | None = None) -> Path:
    """Draw, per layer, the last chunk's token→slot assignment over the frame it segments, with a legend.

    Each latent frame is a panel: the video frame (``frames``: {latent frame: RGB array}, see
    :func:`underlay_frames`) scaled to the token grid, each token tinted with its slot's colour and
    outlined, the slot number written in the token where the slot's area is largest. Below: a legend
    (colour, slot, tokens owned per frame) and the items retrieved. Needs a policy whose stats record
    per-layer slot assignments (the ``slot`` policy); others are refused with a clear message.
    """
    from PIL import Image, ImageDraw

    lays = stats.get("layers")
    if not isinstance(lays, list) or not all(isinstance(lay, dict) and "assignment" in lay for lay in lays):
        raise SlotgenError(f"--png needs a render with the slot memory policy (this one used {stats.get('policy')!r})")
    chosen = [i for i in (layers if layers is not None else range(len(lays))) if lays[i].get("assignment")]
    if not chosen:
        raise SlotgenError("no slot assignments recorded yet (the render has not committed a chunk)")
    frames = frames or {}
    panels = []
    for i in chosen:
        a = lays[i]["assignment"]
        fids = sorted(set(a["frames"]))
        th = max(h for h, _ in a["hw"]) + 1
        tw = max(w for _, w in a["hw"]) + 1
        slots = sorted(set(a["slot"]))
        legend_rows = (len(slots) + 3) // 4
        pw = tw * cell
        img = Image.new("RGB", (max(len(fids) * (pw + 8) + 8, 4 * 150 + 8), th * cell + 64 + 16 * legend_rows),
                        (20, 20, 20))
        draw = ImageDraw.Draw(img)
        for j, f in enumerate(fids):  # the frame underneath, scaled to the token grid
            x = 8 + j * (pw + 8)
            if f in frames:
                img.paste(Image.fromarray(frames[f]).resize((pw, th * cell), Image.NEAREST), (x, 24))
            draw.text((x, 6), f"L{i} frame {f}" + ("" if f in frames else " (not in the video)"), fill=(230, 230, 230))
        tint = Image.new("RGBA", img.size, (0, 0, 0, 0))
        tdraw = ImageDraw.Draw(tint)
        count: dict[tuple[int, int], int] = {}
        where: dict[tuple[int, int], list] = {}
        for slot, f, (h, w) in zip(a["slot"], a["frames"], a["hw"]):
            x0 = 8 + fids.index(f) * (pw + 8) + w * cell
            y0 = 24 + h * cell
            colour = PALETTE[slot % len(PALETTE)]
            alpha = 90 if f in frames else 255  # translucent over a picture, solid without one
            tdraw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(*colour, alpha), outline=(*colour, 255))
            count[(slot, f)] = count.get((slot, f), 0) + 1
            where.setdefault((slot, f), []).append((x0, y0))
        img = Image.alpha_composite(img.convert("RGBA"), tint).convert("RGB")
        draw = ImageDraw.Draw(img)
        for (slot, f), cells in where.items():  # the slot's number at its middle token
            xs = sorted(c[0] for c in cells)
            ys = sorted(c[1] for c in cells)
            cx, cy = xs[len(xs) // 2], ys[len(ys) // 2]
            draw.rectangle([cx, cy, cx + cell - 1, cy + cell - 1], fill=(0, 0, 0))
            draw.text((cx + 2, cy + 2), str(slot), fill=PALETTE[slot % len(PALETTE)])
        y = 28 + th * cell
        for k, slot in enumerate(slots):  # legend: swatch, slot, tokens per frame
            lx, ly = 8 + (k % 4) * 150, y + (k // 4) * 16
            draw.rectangle([lx, ly + 2, lx + 10, ly + 12], fill=PALETTE[slot % len(PALETTE)])
            per = "/".join(str(count.get((slot, f), 0)) for f in fids)
            draw.text((lx + 14, ly), f"slot {slot}: {per} tokens", fill=(230, 230, 230))
        retrieved = lays[i]["retrieved"]
        frames_of = dict(zip(lays[i]["item_ids"], lays[i]["item_frames"]))
        desc = ", ".join(f"#{r}@{frames_of.get(r, ['?'])}" for r in retrieved[:6]) or "none"
        draw.text((8, y + 16 * legend_rows + 2), f"retrieved items: {desc}", fill=(230, 230, 230))
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
