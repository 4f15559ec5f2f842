"""Score a sprite-world training run's snapshots and checkpoints free-running, and apply the kill rule.

    python scripts/sprite_curve.py --run RUN [--checkpoints FILE ...] [--episodes 12] [--seed 7]
                                   [--budget-minutes 180] [--rule presence|compliance|trait] [--json curve.json] [--png curve.png]

Every ``RUN/snapshots/step-N`` folder (and every given copy of ``RUN/checkpoint/state.pt``, loaded into the
first snapshot's folder) is scored on ``held_out_episodes(--episodes)`` of the sprite world, free-running
with ``window`` memory and storyboard seed ``--seed`` (``slotgen.bench.sprites.score_free_running``). Then
presence = a + b·ln(steps) is fitted over every point and evaluated at B, the steps ``--budget-minutes`` of
training buy at the run's measured rate; the rule passes when b > 0 and the fit at B is ≥ 0.9. With
``--rule compliance`` the rule is ``slotgen.bench.sprites.compliance_rule``: at least 4 points, compliance
fitted the same way reaching ≥ 0.9 at B, and the duplicate rate falling; ``--rule trait``
(``slotgen.bench.sprites.trait_rule``) adds trait accuracy fitted the same way reaching ≥ 0.9 at B.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, nargs="*", default=[])
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--budget-minutes", type=float, default=180.0)
    ap.add_argument("--max-minutes", type=float, default=30.0, help="only points within this much training")
    ap.add_argument("--from-steps", type=int, default=0, help="only points at or after this step")
    ap.add_argument("--rule", choices=("presence", "compliance", "trait"), default="presence",
                    help="presence: the fit of presence decides; compliance: compliance and the duplicate rate decide; trait: those and trait accuracy")
    ap.add_argument("--trait-from", type=int, default=0,
                    help="with --rule trait: the step the run starts weighting the trait (slotgen.bench.sprites.trait_rule)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from slotgen.bench.sprites import compliance_rule, fit_log_curve, trait_rule, score_free_running
    from slotgen.models.miniature import load_miniature
    from slotgen.world.sprites import held_out_episodes

    torch.set_num_threads(1)
    snaps = sorted((args.run / "snapshots").glob("step-*"))
    if not snaps:
        print(f"sprite_curve: no snapshots in {args.run / 'snapshots'}", file=sys.stderr)
        return 2
    episodes = held_out_episodes(args.episodes)
    points: dict[int, dict] = {}
    for folder in snaps:
        training = json.loads((folder / "config.json").read_text())["training"]
        points[training["transformer_steps"]] = {"source": str(folder), "seconds": training["seconds"],
                                                 "bundle": lambda folder=folder: load_miniature(folder)}
    for path in args.checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)

        def bundle(state=state):
            b = load_miniature(snaps[0])
            b.transformer.load_state_dict(state["transformer"])
            b.text_encoder.load_state_dict(state["text_encoder"])
            return b

        points.setdefault(int(state["step"]), {"source": str(path), "seconds": float(state["elapsed"]), "bundle": bundle})
    rows = []
    for step in sorted(points):
        p = points[step]
        if p["seconds"] > args.max_minutes * 60 + 1 or step < args.from_steps:
            continue
        score = score_free_running(p["bundle"](), episodes, storyboard_seed=args.seed)
        rows.append({"steps": step, "training_seconds": round(p["seconds"], 1), "source": p["source"], **score})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("per_episode", "source")}), flush=True)
    if len(rows) < 2:
        print(json.dumps({"points": rows}))
        return 0
    rate = rows[-1]["steps"] / rows[-1]["training_seconds"]
    B = rate * args.budget_minutes * 60
    fit = fit_log_curve([r["steps"] for r in rows], [r["presence"] for r in rows], [B, 2 * B])
    passed = fit["b"] > 0 and fit["at"][str(int(B))] >= 0.9
    extra: dict = {}
    if args.rule in ("compliance", "trait"):
        extra = {"rule": compliance_rule(rows, B) if args.rule == "compliance" else trait_rule(rows, B, args.trait_from)}
        passed = extra["rule"]["continue"]
        fit = extra["rule"].get("compliance_fit", fit)
    result = {"episodes": args.episodes, "storyboard_seed": args.seed, "policy": "window", "steps_per_second": rate,
              "budget_steps": int(B), "rule_metric": args.rule, "fit": fit, "continue": passed, **extra, "points": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "points"}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        write_png(result, args.png)
    return 0


def write_png(result: dict, path: Path, size=(560, 300)) -> None:
    """Presence, compliance and duplicate rate against steps (log x), with the fit extended to B."""
    import math

    from PIL import Image, ImageDraw

    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 50, 25, W - 110, H - 35
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text((x0, 6), "sprite world, 12 held-out episodes, free-running (window)", fill="black")
    pts = result["points"]
    lo, hi = math.log(min(p["steps"] for p in pts) / 1.5), math.log(result["budget_steps"] * 1.2)

    def px(s, v):
        return x0 + (x1 - x0) * (math.log(s) - lo) / (hi - lo), y1 - (y1 - y0) * v

    for v in (0, 0.5, 0.9, 1.0):
        d.line([px(math.exp(lo), v), px(math.exp(hi), v)], fill=(225, 225, 225))
        d.text((x0 - 30, px(1, v)[1] - 6), f"{v:.1f}", fill="black")
    last = -1e9
    for s in (p["steps"] for p in pts):  # step labels, skipping any that would overlap the previous one
        if px(s, 0)[0] - last >= 30:
            d.text((px(s, 0)[0] - 10, y1 + 4), str(s), fill="black")
            last = px(s, 0)[0]
    bx = px(result["budget_steps"], 0)[0]
    d.line([(bx, y0), (bx, y1)], fill=(150, 150, 150))
    d.text((bx - 20, y1 + 18), f"B={result['budget_steps']}", fill="black")
    f = result["fit"]
    d.line([px(s, f["a"] + f["b"] * math.log(s)) for s in (math.exp(lo), math.exp(hi))], fill=(120, 120, 240))
    for i, (m, col) in enumerate((("presence", (30, 60, 200)), ("compliance", (30, 150, 50)),
                                  ("duplicate_rate", (200, 40, 40)))):
        xy = [px(p["steps"], p[m]) for p in pts]
        if len(xy) > 1:
            d.line(xy, fill=col, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.line([(x1 + 8, y0 + 16 * i + 6), (x1 + 24, y0 + 16 * i + 6)], fill=col, width=3)
        d.text((x1 + 28, y0 + 16 * i), m, fill="black")
    img.save(path)


if __name__ == "__main__":
    sys.exit(main())
