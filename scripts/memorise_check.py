"""Positive control for the miniature's recipe: can it free-run the episodes it was trained on?

    python scripts/memorise_check.py --out DIR [--episodes 2] [--steps 2700] [--threads 2]
                                     [--sampler-steps 1,4,12] [--seeds 7,8] [--score K] [--json FILE]
    python scripts/memorise_check.py --model DIR ...        (score an existing folder, no training;
                                                             --episodes and --seed as it was trained)
    python scripts/memorise_check.py --model DIR --held-out 12 [--world reduced] ...
                                                            (score N held-out episodes of the folder's
                                                             world instead: a learning-curve point)

Trains `slotgen train-miniature`'s recipe (same code, `TrainConfig` defaults) on only `--episodes`
world episodes for an exact `--steps` count, then renders each *training* episode's storyboard
free-running through the engine (`window` memory, every `--sampler-steps` Euler step count, every
storyboard `--seeds` noise seed) and scores it with the world's analyser. Nothing here is unseen
data: the question is whether the recipe, the engine and the sampler agree well enough for a model
that has had enough samples of an episode to draw it. A failure here would be a recipe bug that no
amount of compute fixes; a pass says the shipped model's failure on unseen episodes is samples per
episode (docs/MINIATURE.md, "The positive control"). SlotMemory's φ is trained for a single step (the check uses
`window` memory, which does not read it). With the same `--threads`, `--steps` repeats a run exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers of at least 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="train into this folder, then score it")
    where.add_argument("--model", type=Path, help="score this trained folder (trained with --seed and --episodes)")
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2700)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sampler-steps", type=_ints, default=[1, 4, 12], help="Euler step counts, e.g. 1,4,12")
    ap.add_argument("--seeds", type=_ints, default=[7, 8], help="storyboard seeds (the sampler's noise), e.g. 7,8")
    ap.add_argument("--score", type=int, default=None, help="score only the first K training episodes (default: all)")
    ap.add_argument("--held-out", type=int, default=None,
                    help="score this many held-out episodes (train.miniature.held_out_episodes) instead of training ones")
    ap.add_argument("--world", default=None, help="standard or reduced (default: the folder's training world, else standard)")
    ap.add_argument("--policy", default="window", help="memory policy of the renders (default window)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.held_out is not None and args.held_out < 1:
        ap.error(f"--held-out must be at least 1, got {args.held_out}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from slotgen.bench.identity import render_frames
    from slotgen.errors import SlotgenError
    from slotgen.models.miniature import load_miniature
    from slotgen.train.miniature import TrainConfig, held_out_episodes, train_miniature, training_episodes
    from slotgen.train.slots import SlotTrainConfig
    from slotgen.world import analyse_episode

    cfg = TrainConfig(episodes=args.episodes, steps=args.steps, seed=args.seed, threads=args.threads,
                      world=args.world or "standard", slots=SlotTrainConfig(episodes=2, steps=1, batch=4))
    folder, train_s = args.model, None
    try:
        if folder is None:
            folder, t0 = args.out, time.perf_counter()
            train_miniature(cfg, folder, command="python " + " ".join(sys.argv))
            train_s = time.perf_counter() - t0
        torch.set_num_threads(args.threads)
        bundle = load_miniature(folder)
        if args.world is None and args.model is not None:  # the world the folder was trained on
            trained = json.loads((folder / "config.json").read_text()).get("training", {}).get("config", {})
            cfg.world = trained.get("world", "standard")
        cfg.validate()
    except SlotgenError as e:
        print(f"memorise_check: {e}", file=sys.stderr)
        return 2
    base = bundle.settings
    rows = []
    if args.held_out is not None:
        episodes = held_out_episodes(args.held_out, cfg.world, cfg.max_gap)
    else:
        episodes = training_episodes(cfg.episodes, cfg.seed, cfg.max_gap, cfg.world)[: args.score]
    for i, ep in enumerate(episodes):
        for steps in args.sampler_steps:
            bundle.settings = dataclasses.replace(base, steps=steps)
            for seed in args.seeds:
                report = analyse_episode(render_frames(ep, args.policy, bundle, storyboard_seed=seed), ep).to_dict()
                row = {"episode": i, "episode_seed": ep.seed, "sampler_steps": steps, "storyboard_seed": seed,
                       **{k: report[k] for k in ("presence", "compliance", "duplicate_rate", "vanish_rate")}}
                rows.append(row)
                print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      flush=True)
    means = {k: sum(r[k] for r in rows if r[k] is not None) / max(1, sum(r[k] is not None for r in rows))
             for k in ("presence", "compliance", "duplicate_rate", "vanish_rate")}
    print("mean " + " ".join(f"{k} {v:.3f}" for k, v in means.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"folder": str(folder), "train": cfg.to_dict(), "train_seconds": train_s,
                                         "held_out": args.held_out, "policy": args.policy, "means": means,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
