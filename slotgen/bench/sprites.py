"""Identity persistence and free-running scores on the sprite world (``slotgen bench identity --world sprites``).

Protocol (definitions fixed here before any result was looked at):

* Episodes: for every gap g (video frames of absence, a multiple of 3, ≥ 3) and i < ``episodes``, the sprite
  episode of seed ``seed + j`` with ``g/3 − 1`` empty chunks between the exit chunk and the return, where j
  counts up from i and skips any seed whose script a ``training``-episode run (``--seed 0``) trains on: every
  episode is a new combination of sprite, rows, sides and gap.
* Every policy renders every episode from the same storyboard (storyboard seed = episode seed), so every
  policy sees the same per-(seed, chunk) noise; memories as in :func:`slotgen.bench.identity.memory_for`
  (a 9-frame local window for every policy).
* Frames are scored by :func:`slotgen.world.sprites.analyse_sprites` (cell by cell against the episode's
  exact cell map). Per (policy, gap): means with 95 % percentile bootstrap intervals; per policy ≠ window:
  paired differences vs ``window`` over the episodes where both define the metric. Identity recall is
  defined when the returning sprite is drawn (right cell, colour and shape) at least once after the return
  (``return_seen``); chance is 1/4. Ground truth is scored too (every metric 1.0).
* ``past = "truth"``: the ground-truth-past protocol of :mod:`slotgen.bench.identity`: every chunk before
  the return is the episode's ground truth committed through the engine, every chunk from the return on is
  generated; only the generated frames are scored.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from slotgen.bench.identity import _paired
from slotgen.errors import SlotgenError

SPRITE_GAPS = (3, 9, 18, 27)  # absence gaps (video frames) of the sprite bench; the window is 9 frames
METRICS = ("presence", "compliance", "duplicate_rate", "identity_recall", "return_seen", "trait_accuracy")
PAIRED = ("identity_recall", "presence", "compliance")


def bench_sprite_episodes(gaps: list[int], episodes: int, seed: int, training: int = 512) -> list[dict]:
    from slotgen.world.sprites import sprite_episode, training_episodes

    for g in gaps:
        if g < 3 or g % 3:
            raise SlotgenError(f"--gaps: sprite-world gaps are video frames, multiples of 3 and at least 3, got {g}")
    seen = {ep.script for ep in training_episodes(training, 0)}
    out = []
    for g in gaps:
        s = seed
        for _ in range(episodes):
            while (ep := sprite_episode(s, g // 3 - 1)).script in seen:
                s += 1
            out.append({"gap": g, "seed": s, "episode": ep})
            s += 1
    return out


def _renderer(ep, policy: str, bundle, storyboard_seed: int):
    from slotgen.bench.identity import _episode_renderer
    from slotgen.world.sprites import storyboard_yaml

    return _episode_renderer(ep, policy, bundle, storyboard_seed, to_yaml=storyboard_yaml, world="sprite")


def render_sprite_frames(ep, policy: str, bundle, storyboard_seed: int) -> np.ndarray:
    """Free-running render of a sprite episode through the engine → uint8 (T, 64, 64, 3)."""
    from slotgen.bench.identity import render_frames
    from slotgen.world.sprites import storyboard_yaml

    return render_frames(ep, policy, bundle, storyboard_seed, to_yaml=storyboard_yaml, world="sprite")


@torch.no_grad()
def render_sprite_true_past(ep, policy: str, bundle, storyboard_seed: int) -> tuple[np.ndarray, int]:
    """Ground truth committed up to the return chunk, generated from there → ``(frames, judged_from)``."""
    from slotgen.bench.identity import ground_truth_latents
    from slotgen.world.sprites import CHUNK, render_sprites

    renderer = _renderer(ep, policy, bundle, storyboard_seed)
    engine, sb = renderer.engine, renderer.storyboard
    geo, F = engine.geometry, engine.geometry.chunk_frames
    if geo.stride_t != 1 or F != CHUNK:
        raise SlotgenError("--past truth on the sprite world needs a model with 3-frame chunks and no temporal compression")
    lat = ground_truth_latents(bundle, render_sprites(ep)[0])
    chunks = []
    while geo.first_frame(engine.next_chunk) < sb.total_frames:
        c = engine.next_chunk
        k = sb.prompt_index_at(geo.first_frame(c) / sb.fps)
        forced = c < ep.return_chunk
        chunks.append(engine.generate_chunk(k, sb.prompts[k].text,
                                            latents=lat[:, :, c * F : (c + 1) * F] if forced else None).frames)
    return np.concatenate(chunks)[: sb.total_frames], CHUNK * ep.return_chunk


def summarise(reports: list, n_boot: int = 2000) -> dict:
    from slotgen.world.analyse import bootstrap_ci

    out: dict[str, Any] = {}
    for m in METRICS:
        vals = [getattr(r, m) for r in reports if getattr(r, m) is not None]
        if vals:
            est, lo, hi = bootstrap_ci(vals, n=n_boot, seed=0)
            out[m] = {"mean": est, "low": lo, "high": hi, "n": len(vals)}
        else:
            out[m] = {"mean": None, "low": None, "high": None, "n": 0}
    return out


def run_sprite_identity_bench(policies: list[str], gaps: list[int], episodes: int, model: str = "miniature",
                              seed: int = 1000, bundle=None, past: str = "generated",
                              progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Render and score every (episode, policy) on the sprite world; a JSON-able dict (module docstring)."""
    from slotgen.models import load_model
    from slotgen.world.sprites import CHANCE, analyse_sprites, render_sprites

    if past not in ("generated", "truth"):
        raise SlotgenError(f"--past: expected generated or truth, got {past!r}")
    t0 = time.perf_counter()
    bundle = load_model(model) if bundle is None else bundle
    eps = bench_sprite_episodes(gaps, episodes, seed)
    reports: dict[str, list] = {p: [] for p in policies}
    truth, rows = [], []
    for k, item in enumerate(eps):
        ep = item["episode"]
        truth.append(analyse_sprites(render_sprites(ep)[0], ep))
        for p in policies:
            if past == "truth":
                frames, judged = render_sprite_true_past(ep, p, bundle, item["seed"])
            else:
                frames, judged = render_sprite_frames(ep, p, bundle, item["seed"]), 0
            rep = analyse_sprites(frames, ep, judged_from=judged)
            reports[p].append(rep)
            rows.append({"policy": p, "gap": item["gap"], "seed": item["seed"], **{m: getattr(rep, m) for m in METRICS}})
        progress(f"episode {k + 1}/{len(eps)} (gap {item['gap']}) done, {time.perf_counter() - t0:.0f} s")

    def pick(p: str, g: Optional[int]) -> list:
        return [r for r, it in zip(reports[p], eps) if g is None or it["gap"] == g]

    summary = {p: {"all": summarise(pick(p, None)), **{str(g): summarise(pick(p, g)) for g in gaps}} for p in policies}
    paired = {p: {("all" if g is None else str(g)): {m: _paired(pick(p, g), pick("window", g), m) for m in PAIRED}
                  for g in [None, *gaps]} for p in policies if p != "window" and "window" in policies}
    return {"format": "slotgen-bench-identity", "version": 1, "world": "sprites", "model": bundle.name,
            "digest": bundle.digest, "policies": policies, "gaps": gaps, "episodes_per_gap": episodes, "seed": seed,
            "past": past, "window_video_frames": 9, "chance_recall": CHANCE, "summary": summary,
            "paired_vs_window": paired, "ground_truth": {"all": summarise(truth)}, "rows": rows,
            "seconds": time.perf_counter() - t0}


def print_sprite_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(s):
        return "–" if s is None or s.get("mean") is None else f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"

    console = Console(width=220)
    table = Table(title=f"slotgen bench identity --world sprites — {result['model']} ({result['digest'][:12]}), "
                        f"window 9 frames, chance recall {result['chance_recall']:.2f}, past: {result['past']}")
    for col in ("policy", "gap", "n", *METRICS):
        table.add_column(col, justify="right")
    for p in result["policies"]:
        for key in [*map(str, result["gaps"]), "all"]:
            s = result["summary"][p][key]
            table.add_row(p, key, str(s["presence"]["n"]), *(fmt(s[m]) for m in METRICS))
    gt = result["ground_truth"]["all"]
    table.add_row("ground truth", "all", str(gt["presence"]["n"]), *(fmt(gt[m]) for m in METRICS))
    console.print(table)
    for p, by_gap in result["paired_vs_window"].items():
        for key, d in by_gap.items():
            parts = [f"{m} {d[m]['diff']:+.2f} [{d[m]['low']:+.2f}, {d[m]['high']:+.2f}] (n={d[m]['n']})"
                     for m in PAIRED if d[m] is not None]
            console.print(f"{p} − window, gap {key}: " + ("; ".join(parts) or "–"))


def score_free_running(bundle, episodes: list, storyboard_seed: int = 7, policy: str = "window") -> dict:
    """The pilot's curve point: each episode free-run with ``policy`` and storyboard seed ``storyboard_seed``;
    means of presence, compliance, duplicate rate (and the identity numbers where defined) over the episodes."""
    from slotgen.world.sprites import analyse_sprites

    reps = [analyse_sprites(render_sprite_frames(ep, policy, bundle, storyboard_seed), ep) for ep in episodes]
    out = {m: (float(np.mean(v)) if (v := [getattr(r, m) for r in reps if getattr(r, m) is not None]) else None)
           for m in METRICS}
    out["episodes"] = len(reps)
    out["per_episode"] = [{m: getattr(r, m) for m in METRICS} for r in reps]
    return out


__all__ = ["SPRITE_GAPS", "bench_sprite_episodes", "print_sprite_report", "render_sprite_frames",
           "render_sprite_true_past", "run_sprite_identity_bench", "score_free_running"]


def fit_log_curve(steps: list[float], values: list[float], at: list[float]) -> dict:
    """Least-squares fit ``value = a + b·ln(steps)`` and its values at ``at`` (the pilot's kill rule)."""
    x = np.log(np.asarray(steps, float))
    y = np.asarray(values, float)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("a log fit needs at least two distinct step counts")
    b, a = np.polyfit(x, y, 1)
    return {"a": float(a), "b": float(b), "at": {str(int(s)): float(a + b * np.log(s)) for s in at},
            "steps_to_0.9": float(np.exp((0.9 - a) / b)) if b > 0 else None}


RULE_MIN_POINTS = 4


def compliance_rule(points: list[dict], budget_steps: float) -> dict:
    """The sprite world's kill rule on scored points (each with ``steps``, ``compliance``, ``duplicate_rate``):
    continue only if there are at least :data:`RULE_MIN_POINTS` points, the fit compliance = a + b·ln(steps)
    has b > 0 and reaches ≥ 0.9 at ``budget_steps``, and the duplicate rate falls (the fit of duplicate rate
    against ln(steps) has a negative slope and the last point is below the first). Presence alone does not
    decide: it counts any sprite in the expected cell, which drawing every row of a column also earns."""
    steps = [p["steps"] for p in points]
    if len(points) < RULE_MIN_POINTS:
        return {"continue": False, "reason": f"{len(points)} points, the rule needs {RULE_MIN_POINTS}"}
    comp = fit_log_curve(steps, [p["compliance"] for p in points], [budget_steps])
    dup = fit_log_curve(steps, [p["duplicate_rate"] for p in points], [budget_steps])
    at_b = comp["at"][str(int(budget_steps))]
    falls = dup["b"] < 0 and points[-1]["duplicate_rate"] < points[0]["duplicate_rate"]
    reasons = [r for r, bad in ((f"compliance slope {comp['b']:+.3f} ≤ 0", comp["b"] <= 0),
                                (f"compliance fit at {int(budget_steps)} steps {at_b:.2f} < 0.9", at_b < 0.9),
                                ("the duplicate rate does not fall", not falls)) if bad]
    return {"continue": not reasons, "reason": "; ".join(reasons) or "every condition met",
            "compliance_fit": comp, "duplicate_fit": dup}


def trait_rule(points: list[dict], budget_steps: float, from_step: int = 0) -> dict:
    """The kill rule of a run that must learn the sprite's trait (its dot) as well as the layout. Without
    the trait there is nothing for a memory to bring back, so a run that learns the layout alone does not
    continue.

    ``from_step = 0`` (the trait weighted from the start): every condition of :func:`compliance_rule`, and
    trait accuracy fitted as a + b·ln(steps) over every point with b > 0 and the fit ≥ 0.9 at
    ``budget_steps``. ``from_step > 0`` (a run that learnt the layout first and weights the trait from
    that step on; ``points`` are the ones at or after it): the layout must hold (mean compliance of the
    last 3 points ≥ 0.9 and mean duplicate rate ≤ 0.1), and trait accuracy fitted against ln(steps −
    from_step) over the points after ``from_step`` must have b > 0 and reach ≥ 0.9 at ``budget_steps``."""
    stage = [p for p in points if p["steps"] > from_step]
    if len(stage) < RULE_MIN_POINTS:
        return {"continue": False, "reason": f"{len(stage)} points, the rule needs {RULE_MIN_POINTS}"}
    trait = fit_log_curve([p["steps"] - from_step for p in stage], [p["trait_accuracy"] for p in stage],
                          [budget_steps - from_step])
    at_b = trait["at"][str(int(budget_steps - from_step))]
    reasons = [r for r, bad in ((f"trait accuracy slope {trait['b']:+.3f} ≤ 0", trait["b"] <= 0),
                                (f"trait accuracy fit at {int(budget_steps)} steps {at_b:.2f} < 0.9", at_b < 0.9)) if bad]
    if from_step == 0:
        layout = compliance_rule(points, budget_steps)
        if not layout["continue"]:
            reasons = [layout["reason"], *reasons]
        return {**layout, "continue": not reasons, "reason": "; ".join(reasons) or "every condition met", "trait_fit": trait}
    last = stage[-3:]
    comp = float(np.mean([p["compliance"] for p in last]))
    dup = float(np.mean([p["duplicate_rate"] for p in last]))
    reasons = [r for r, bad in ((f"compliance of the last 3 points {comp:.2f} < 0.9", comp < 0.9),
                                (f"duplicate rate of the last 3 points {dup:.2f} > 0.1", dup > 0.1))
               if bad] + reasons
    return {"continue": not reasons, "reason": "; ".join(reasons) or "every condition met", "trait_fit": trait,
            "layout": {"compliance_last3": comp, "duplicate_rate_last3": dup}, "from_step": from_step}
