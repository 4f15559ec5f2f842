"""Slot purity and identity recall of slot projections φ on the miniature (docs/MEMORY.md, "Learning φ
without labels"): unsupervised φ (reconstruction only; + temporal term; + slot contrast; both), the
shipped supervised φ and the training-free φ, on held-out `bench identity` episodes scored against the world's masks.

    python scripts/slot_phi_eval.py --videos CLIPS --steps 300 --json out.json

Keys are collected once from --videos (or --storyboards) and every unsupervised variant trains on them
with the same seed. Purity: `slotgen.bench.identity.slot_purity` (ARI, mean over layers) on
`bench_episodes(gaps, episodes, seed=1000, similar=True)`. Recall: `run_identity_bench(past="truth")`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=Path)
    ap.add_argument("--storyboards", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--purity-episodes", type=int, default=4, help="per gap, single and similar")
    ap.add_argument("--recall-episodes", type=int, default=2, help="per gap, single and similar (0: skip)")
    ap.add_argument("--gaps", default="12,36")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--variant", action="append", default=None,
                    metavar="NAME:TEMPORAL_WEIGHT:STEPS:DIM[:CONTRAST_WEIGHT[:SLOTS]][:FIELD=VALUE...]",
                    help="an unsupervised variant to train (default: reconstruction only, + temporal, + slot "
                         "contrast, + both; weights 1); FIELD=VALUE sets any other UnsupConfig field, e.g. "
                         "batch=32 or target=standardised")
    ap.add_argument("--purity-seed", default="1000",
                    help="first held-out episode seed (selection: 2000); several, comma-separated, score every φ on "
                         "each set (the rows' 'purity' by seed)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the training-free and supervised rows")
    ap.add_argument("--keys", type=Path, help="cache of the collected keys (written once, then read)")
    ap.add_argument("--save-phi", type=Path, help="folder for the unsupervised φ files")
    ap.add_argument("--collect-only", action="store_true",
                    help="collect the keys into --keys and stop (no φ, no scores)")
    args = ap.parse_args()

    import numpy as np

    from slotgen.bench.identity import bench_episodes, run_identity_bench, slot_purity
    from slotgen.memory.phi_file import save_phi
    from slotgen.models import load_model
    from slotgen.train.slots_unsup import (UnsupConfig, checkpoint_path, list_sources, storyboard_chunks,
                                           train_unsupervised, video_chunks)

    bundle = load_model("miniature")
    if args.save_phi is not None:
        args.save_phi.mkdir(parents=True, exist_ok=True)
    sources = list_sources(args.storyboards, args.videos)
    rng = np.random.default_rng([args.seed, 17])
    t0 = time.perf_counter()
    chunks = []
    base = UnsupConfig(seed=args.seed, steps=args.steps, batch=args.batch)
    for i, p in enumerate(sources if args.keys is None or not args.keys.is_file() else []):
        if args.videos is not None:
            from slotgen.train.slots_unsup import _caption
            chunks += video_chunks(bundle, p, base, rng, _caption(p, ""), tuple(bundle.settings.resolution), print,
                                   source=i)
        else:
            chunks += storyboard_chunks(bundle, p, base, rng, source=i)
    if args.keys is not None:  # the collected keys, reused by a later run with other objectives
        import torch

        from slotgen.train.slots_unsup import KeyChunk
        if args.keys.is_file():
            chunks = [KeyChunk(c["keys"], c["frames"], c["cells"], c.get("source", -1))
                      for c in torch.load(args.keys)]
        else:
            torch.save([{"keys": c.keys, "frames": c.frames, "cells": c.cells, "source": c.source} for c in chunks],
                       args.keys)
    print(f"{len(chunks)} chunks from {len(sources)} sources in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.collect_only:
        if args.keys is None:
            ap.error("--collect-only needs --keys FILE")
        return

    gaps = [int(g) for g in args.gaps.split(",")]
    purity_seeds = [int(x) for x in str(args.purity_seed).split(",")]
    held_out = {seed: [d["episode"] for d in bench_episodes(gaps, args.purity_episodes, seed, True)]
                for seed in purity_seeds}
    variants = {} if args.no_baselines else {"training-free": dataclasses.replace(bundle, slot_phi=None),
                                             "supervised (shipped)": bundle}
    specs = [v.split(":") for v in args.variant] if args.variant else \
        [["unsupervised: reconstruction only", "0", str(args.steps), "32", "0"],
         ["unsupervised: reconstruction + temporal", "1", str(args.steps), "32", "0"],
         ["unsupervised: reconstruction + slot contrast", "0", str(args.steps), "32", "1"],
         ["unsupervised: reconstruction + temporal + slot contrast", "1", str(args.steps), "32", "1"]]
    fields = {f.name: f.type for f in dataclasses.fields(UnsupConfig)}
    for spec in specs:
        extra = dict(x.split("=", 1) for x in spec if "=" in x)
        name, tw, steps, dim, *cw = [x for x in spec if "=" not in x]
        unknown = sorted(set(extra) - set(fields))
        if unknown:
            ap.error(f"--variant {name}: no UnsupConfig field {', '.join(unknown)}")
        typed = {k: (v if fields[k] in (str, "str") else (float(v) if fields[k] in (float, "float") else int(v)))
                 for k, v in extra.items()}
        cfg = dataclasses.replace(base, temporal_weight=float(tw), steps=int(steps), dim=int(dim),
                                  contrast_weight=float(cw[0]) if cw else 0.0,
                                  slots=int(cw[1]) if len(cw) > 1 else 0, **typed)
        out = (args.save_phi or Path("/tmp")) / f"phi_{len(variants)}.safetensors"
        res = train_unsupervised(bundle, sources, out, cfg, kind="videos" if args.videos else "storyboards",
                                 chunks=chunks, log=lambda m: None)
        checkpoint_path(out).unlink(missing_ok=True)  # the keys are cached elsewhere (--keys)
        if args.save_phi is not None:
            save_phi(out, res.phi, model_digest=bundle.digest, model_name=bundle.name, config={"mode": "unsupervised", **cfg.to_dict()})
        print(f"{name}: trained in {res.seconds:.0f} s, loss {res.losses[0]:.3f} -> {np.mean(res.losses[-20:]):.3f}", flush=True)
        variants[name] = dataclasses.replace(bundle, slot_phi=res.phi)
    result = {"chunks": len(chunks), "sources": len(sources), "steps": args.steps, "seed": args.seed, "rows": {}}
    for name, b in variants.items():
        by_seed = {}
        for seed, eps in held_out.items():
            pur = slot_purity(b, eps)
            by_seed[seed] = {"mean": pur["mean_ari"], "layers": [x["ari"] for x in pur["layers"]]}
        first = by_seed[purity_seeds[0]]
        row = {"purity_mean": first["mean"], "purity_layers": first["layers"], "purity": by_seed}
        if args.recall_episodes > 0 and "reconstruction only" not in name:
            r = run_identity_bench(["slot"], gaps, args.recall_episodes, seed=1000, similar=True, purity=False, bundle=b,
                                   past="truth")
            row["identity_recall"] = r["summary"]["slot"]["all"]["identity_recall"]
        result["rows"][name] = row
        print(name, json.dumps(row, default=str)[:400], flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
