"""``slotgen bench identity``: does an entity that leaves the frame come back as itself?

Protocol (all definitions fixed in this file before any results were looked at):

* Episodes: for every gap g in ``gaps`` and i < ``episodes``, ``exit_return_episode(seed + i, g)``
  (one entity; seed defaults to 1000, outside the default training run's episode seeds 0..255) and, with ``similar``, ``exit_return_episode(seed + i, g, n_entities=2, similar=True)``
  (a same-kind companion with different hidden traits: the attribute-leakage test).
* Every policy renders every episode from the same storyboard (the world grammar's captions, storyboard
  seed = episode seed), so every policy sees the same per-(seed, chunk) noise. Policies: ``window``
  with a 9-latent-frame window (9 video frames with the miniature, whose VAE does not compress time) and ``sink``/``bank``/``slot`` with their defaults
  (sink 3 + window 9); the local window is the same for all.
* Frames are collected in memory (``Renderer.stream([collector])``) and scored with
  :func:`slotgen.world.analyse_episode`: identity recall, leakage, compliance, duplicate and vanish
  rates, flicker proxy. Per (policy, gap): means with 95 % percentile bootstrap intervals
  (:func:`slotgen.world.aggregate`); per policy ≠ window: paired differences vs ``window`` over the
  same episodes (:func:`slotgen.world.paired_bootstrap`, episodes where both are defined).
* Ground truth (the world's own render) is scored too (sanity: recall 1) and chance recall is 1/9.
* ``past``: ``"generated"`` (default) renders every chunk. ``"truth"`` is the *ground-truth past*
  protocol, a teacher-forced diagnostic that isolates the memory from long-horizon drift: every chunk
  that ends before the protagonist's first return frame is the episode's ground truth (encoded with the
  model's VAE and committed through the engine with the policy, :meth:`StreamingEngine.generate_chunk`
  with ``latents``), and every later chunk, from the one holding the return on, is sampled as usual
  under the same per-(seed, chunk) noise. Recall and leakage then ask only: can the model redraw the
  traits it saw before the absence, from what the policy kept? Compliance, presence, duplicates,
  vanishings and flicker count only the generated frames (``analyse_episode(judged_from=...)``).
* Slot purity: every ground-truth episode of the run (single and similar) is encoded with the model's
  VAE and committed chunk by chunk through the engine with the ``slot`` policy and the model's φ (the
  engine's commit pass at timestep 0 with each chunk's caption, exactly ``StreamingEngine._commit``). After each chunk, every layer's token→slot assignment
  (``policy.stats()["layers"][l]["assignment"]``) is compared with the ground-truth label map on the
  token grid by the adjusted Rand index. A token's ground-truth label (16×16-pixel cell, last video
  frame of its latent frame) is the entity covering most of the cell if it covers ≥ 20 % of it, else
  background. ARI is computed per (chunk, layer) over the chunk's tokens, only for chunks whose ground
  truth has at least two labels, and averaged per layer.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from slotgen.errors import SlotgenError

WINDOW_FRAMES = 9  # local window of every policy (latent frames); × the VAE's temporal stride in video frames
TABLE_METRICS = ("identity_recall", "leakage", "return_seen", "compliance", "presence", "duplicate_rate", "vanish_rate",
                 "flicker_proxy")
PAIRED_METRICS = ("identity_recall", "leakage", "compliance")
CHANCE_RECALL = 1.0 / 9.0
CELL_COVER = 0.20  # an entity labels a token cell when it covers at least this fraction of it


class FrameCollector:
    """A writer that keeps every frame in memory."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def write(self, frames: np.ndarray) -> None:
        self.chunks.append(np.asarray(frames).copy())

    def frames(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros((0, 64, 64, 3), np.uint8)


def bench_episodes(gaps: list[int], episodes: int, seed: int, similar: bool) -> list[dict]:
    from slotgen.world import exit_return_episode

    out = []
    for gap in gaps:
        for i in range(episodes):
            out.append({"gap": gap, "seed": seed + i, "kind": "single",
                        "episode": exit_return_episode(seed + i, gap, n_entities=1)})
            if similar:
                out.append({"gap": gap, "seed": seed + i, "kind": "similar",
                            "episode": exit_return_episode(seed + i, gap, n_entities=2, similar=True)})
    return out


def memory_for(policy: str) -> dict:
    """The benchmark's memory section for ``policy``: its defaults, with a local window of
    :data:`WINDOW_FRAMES` where the policy has one (only ``window``'s default differs)."""
    from slotgen.memory.registry import policy_class

    field = policy_class(policy).config_class.model_fields.get("window")
    if field is not None and field.default != WINDOW_FRAMES:
        return {"policy": policy, "window": WINDOW_FRAMES}
    return {"policy": policy}


PASTS = ("generated", "truth")


def _episode_renderer(episode, policy: str, bundle, storyboard_seed: int, to_yaml=None, world: str = "identity"):
    """A renderer of ``episode``'s storyboard under ``policy``; ``to_yaml(episode, seed=, memory=)`` writes
    the storyboard (default: the shape world's :func:`~slotgen.world.episode_to_storyboard_yaml`)."""
    from slotgen.render import Renderer
    from slotgen.storyboard import parse_storyboard

    if to_yaml is None:
        from slotgen.world import episode_to_storyboard_yaml as to_yaml
    text = to_yaml(episode, seed=storyboard_seed, memory=memory_for(policy))
    return Renderer(parse_storyboard(text, f"<{world} episode {episode.seed}>"), bundle=bundle)


def render_frames(episode, policy: str, bundle, storyboard_seed: int, to_yaml=None, world: str = "identity") -> np.ndarray:
    """Free-running render of an episode through the engine → uint8 ``(T, H, W, 3)``."""
    collector = FrameCollector()
    _episode_renderer(episode, policy, bundle, storyboard_seed, to_yaml, world).stream([collector])
    return collector.frames()


@torch.no_grad()
def ground_truth_latents(bundle, frames: np.ndarray) -> torch.Tensor:
    """``uint8 (T, H, W, 3)`` video → the model's normalised latents ``(1, C, L, h, w)`` (VAE mean)."""
    vae = bundle.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # (1, 3, T, H, W)
    z = vae.encode(x.to(bundle.device, bundle.dtype)).latent_dist.mean.float().cpu()
    return ((z - mean) / std).to(bundle.device, bundle.dtype)


@torch.no_grad()
def render_with_true_past(episode, policy: str, bundle, storyboard_seed: int,
                          truth_latents: Optional[torch.Tensor] = None) -> tuple[np.ndarray, int]:
    """The ground-truth-past protocol (module docstring) → ``(frames, judged_from)``: the video and its
    first generated frame. ``truth_latents``: the episode's :func:`ground_truth_latents`, if already
    computed (one encode serves every policy)."""
    from slotgen.world import render_episode
    from slotgen.world.scene import first_return_frame

    back = first_return_frame(episode)
    if back is None:
        raise ValueError(f"episode {episode.seed}: its protagonist never returns, so there is no past to hand over")
    renderer = _episode_renderer(episode, policy, bundle, storyboard_seed)
    engine, sb = renderer.engine, renderer.storyboard
    geo, F = engine.geometry, engine.geometry.chunk_frames
    lat = truth_latents if truth_latents is not None else ground_truth_latents(bundle, render_episode(episode).frames)
    judged_from = None
    chunks = []
    while geo.first_frame(engine.next_chunk) < sb.total_frames:
        c = engine.next_chunk
        start = geo.first_frame(c)
        forced = start + geo.video_frames(c) <= back  # the chunk ends before the return: ground truth
        if not forced and judged_from is None:
            judged_from = start
        k = sb.prompt_index_at(start / sb.fps)
        res = engine.generate_chunk(k, sb.prompts[k].text, latents=lat[:, :, c * F : (c + 1) * F] if forced else None)
        chunks.append(res.frames)
    assert judged_from is not None  # the return lies inside the timeline
    return np.concatenate(chunks)[: sb.total_frames], judged_from


def _summary(reports: list, n_boot: int = 2000) -> dict:
    from slotgen.world import aggregate

    return aggregate(reports, n=n_boot, seed=0)


def _paired(a: list, b: list, metric: str) -> Optional[dict]:
    from slotgen.world import paired_bootstrap

    pairs = [(getattr(x, metric), getattr(y, metric)) for x, y in zip(a, b)
             if getattr(x, metric) is not None and getattr(y, metric) is not None]
    if not pairs:
        return None
    est, low, high = paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs], n=2000, seed=0)
    return {"diff": est, "low": low, "high": high, "n": len(pairs)}


# ------------------------------------------------------------------------------------------------
# slot purity


def token_labels(labels: np.ndarray, th: int, tw: int, cover: float = CELL_COVER) -> np.ndarray:
    """(H, W) ground-truth label map → (th·tw,) token labels (see module docstring)."""
    H, W = labels.shape
    ch, cw = H // th, W // tw
    out = np.zeros(th * tw, np.int64)
    for r in range(th):
        for c in range(tw):
            cell = labels[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw]
            ids, counts = np.unique(cell[cell > 0], return_counts=True)
            if len(ids) and counts.max() >= cover * cell.size:
                out[r * tw + c] = int(ids[np.argmax(counts)])
    return out


def latent_to_video_frame(f: int, stride: int) -> int:
    """Last video frame of latent frame f for a VAE of temporal stride s (0 ↔ 0, f ≥ 1 ↔ s·f)."""
    return 0 if f == 0 else stride * f


@torch.no_grad()
def committed_ground_truth(bundle, episode, policy) -> Iterator[tuple[int, Callable[[int], np.ndarray]]]:
    """Encode a ground-truth world episode with the model's VAE and commit it chunk by chunk through the
    engine with ``policy`` (the commit pass at timestep 0 with each chunk's caption, exactly
    ``StreamingEngine._commit``). After each chunk yields ``(chunk, cells)``: ``cells(latent_frame)`` is
    that frame's (th·tw,) ground-truth token labels (:func:`token_labels` of its last video frame,
    computed once per frame)."""
    from slotgen.engine.generator import EngineOptions, StreamingEngine
    from slotgen.world import render_episode
    from slotgen.world.grammar import episode_prompts

    s = bundle.settings
    truth = render_episode(episode)
    T = truth.frames.shape[0]
    lat = ground_truth_latents(bundle, truth.frames)  # (1, C, L, h, w) normalised
    engine = StreamingEngine(bundle, policy, EngineOptions(seed=episode.seed, fps=s.fps, width=episode.config.width,
                                                           height=episode.config.height, steps=s.steps, shift=s.shift))
    th, tw = engine.token_hw
    F = engine.geometry.chunk_frames
    cues = episode_prompts(episode)
    cache: dict[int, np.ndarray] = {}

    def cells(latent_frame: int) -> np.ndarray:
        vf = min(latent_to_video_frame(latent_frame, s.vae_stride_t), T - 1)
        if vf not in cache:
            cache[vf] = token_labels(truth.truth.labels[vf], th, tw)
        return cache[vf]

    for c in range(lat.shape[2] // F):
        f0 = engine.geometry.first_frame(c)
        prompt_index, prompt = next((k, cue.text) for k, cue in enumerate(cues) if cue.start <= f0 < cue.end)
        ctx = engine._context(c, c * F, F, prompt_index, prompt, False)
        engine._commit(ctx, lat[:, :, c * F : (c + 1) * F], engine.text.embeds(prompt))
        yield c, cells


def slot_purity(bundle, episodes: list, slot_memory: Optional[dict] = None) -> dict:
    """ARI between the slot policy's token→slot assignment and ground truth (see module docstring)."""
    from slotgen.memory import build_policy
    from slotgen.memory.slot_attention import adjusted_rand_index

    n_layers = len(bundle.transformer.blocks)
    per_layer: list[list[float]] = [[] for _ in range(n_layers)]
    for ep in episodes:
        policy = build_policy(slot_memory or memory_for("slot"), n_layers, phi=bundle.slot_phi)
        tw = ep.config.width // bundle.stride  # token grid width
        for _, cells in committed_ground_truth(bundle, ep, policy):
            stats = policy.stats()
            for layer in range(n_layers):
                a = stats["layers"][layer]["assignment"]
                if a is None:
                    continue
                slots = np.asarray(a["slot"]).reshape(-1)
                frames = np.asarray(a["frames"]).reshape(-1)
                hw = np.asarray(a["hw"]).reshape(-1, 2)
                gt = np.array([cells(int(f))[int(r) * tw + int(cc)] for f, (r, cc) in zip(frames, hw)])
                if len(np.unique(gt)) < 2:
                    continue
                per_layer[layer].append(adjusted_rand_index(torch.as_tensor(slots), torch.as_tensor(gt)))
    layers = [{"layer": l, "ari": float(np.mean(v)) if v else None, "n": len(v)} for l, v in enumerate(per_layer)]
    defined = [x["ari"] for x in layers if x["ari"] is not None]
    return {"layers": layers, "mean_ari": float(np.mean(defined)) if defined else None,
            "best_ari": float(np.max(defined)) if defined else None}


# ------------------------------------------------------------------------------------------------
# driver


def run_identity_bench(policies: list[str], gaps: list[int], episodes: int, model: str = "miniature", seed: int = 1000,
                       similar: bool = True, purity: bool = True, bundle=None, past: str = "generated",
                       progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Render and score every (episode, policy); returns a JSON-able dict (see module docstring)."""
    from slotgen.models import load_model
    from slotgen.world import analyse_episode, render_episode
    from slotgen.world.analyse import METRICS

    if past not in PASTS:
        raise SlotgenError(f"--past: expected one of {', '.join(PASTS)}, got {past!r}")
    t0 = time.perf_counter()
    if bundle is None:
        bundle = load_model(model)
    eps = bench_episodes(gaps, episodes, seed, similar)
    reports: dict[str, list] = {p: [] for p in policies}
    truth_reports = []
    rows = []
    for k, item in enumerate(eps):
        ep = item["episode"]
        truth = render_episode(ep).frames
        truth_reports.append(analyse_episode(truth, ep))
        truth_latents = ground_truth_latents(bundle, truth) if past == "truth" else None
        for p in policies:
            t = time.perf_counter()
            if past == "truth":
                frames, judged_from = render_with_true_past(ep, p, bundle, storyboard_seed=item["seed"],
                                                            truth_latents=truth_latents)
            else:
                frames, judged_from = render_frames(ep, p, bundle, storyboard_seed=item["seed"]), 0
            rep = analyse_episode(frames, ep, judged_from=judged_from)
            reports[p].append(rep)
            rows.append({"policy": p, "gap": item["gap"], "seed": item["seed"], "kind": item["kind"],
                         **{m: getattr(rep, m) for m in METRICS},
                         "seconds": time.perf_counter() - t})
        progress(f"episode {k + 1}/{len(eps)} (gap {item['gap']}, {item['kind']}) done, "
                 f"{time.perf_counter() - t0:.0f} s")

    def idx(gap=None, kind=None):
        return [i for i, it in enumerate(eps) if (gap is None or it["gap"] == gap) and (kind is None or it["kind"] == kind)]

    summary: dict[str, Any] = {}
    paired: dict[str, Any] = {}
    for p in policies:
        summary[p] = {"all": _summary(reports[p])}
        for g in gaps:
            summary[p][str(g)] = _summary([reports[p][i] for i in idx(g)])
        if p != "window" and "window" in policies:
            paired[p] = {}
            for g in [None, *gaps]:
                ii = idx(g)
                paired[p]["all" if g is None else str(g)] = {
                    m: _paired([reports[p][i] for i in ii], [reports["window"][i] for i in ii], m) for m in PAIRED_METRICS}
    truth = {"all": _summary(truth_reports)}
    result: dict[str, Any] = {
        "format": "slotgen-bench-identity", "version": 1, "model": bundle.name, "digest": bundle.digest,
        "policies": policies, "gaps": gaps, "episodes_per_gap": episodes, "seed": seed, "similar": similar, "past": past,
        "window_latent_frames": WINDOW_FRAMES, "window_video_frames": bundle.settings.vae_stride_t * WINDOW_FRAMES,
        "memory": {p: memory_for(p) for p in policies}, "chance_recall": CHANCE_RECALL,
        "summary": summary, "paired_vs_window": paired, "ground_truth": truth, "rows": rows,
    }
    if purity:
        t = time.perf_counter()
        gt_eps = [it["episode"] for it in eps]  # every episode of the run (cheap: one commit pass per chunk)
        result["slot_purity"] = slot_purity(bundle, gt_eps)
        progress(f"slot purity on {len(gt_eps)} ground-truth episodes: {time.perf_counter() - t:.0f} s")
    result["seconds"] = time.perf_counter() - t0
    return result


def _fmt(s: dict) -> str:
    if s is None or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"


def _fmt_diff(d: Optional[dict]) -> str:
    if d is None:
        return "–"
    return f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=240)
    table = Table(title=f"slotgen bench identity — {result['model']} ({result['digest'][:12]}), window "
                        f"{result['window_latent_frames']} latent frames = {result['window_video_frames']} video frames; "
                        f"chance recall {result['chance_recall']:.2f}"
                        + ("; ground-truth past up to the return (--past truth)" if result.get("past") == "truth" else ""))
    for col in ("policy", "gap", "n", "identity recall", "leakage", "returns seen", "compliance", "presence", "duplicates",
                "vanishings", "flicker"):
        table.add_column(col, justify="right")
    for p in result["policies"]:
        for key in [*map(str, result["gaps"]), "all"]:
            s = result["summary"][p][key]
            table.add_row(p, key, str(s["identity_recall"]["n"]), *(_fmt(s[m]) for m in TABLE_METRICS))
    gt = result["ground_truth"]["all"]
    table.add_row("ground truth", "all", str(gt["identity_recall"]["n"]), *(_fmt(gt[m]) for m in TABLE_METRICS))
    console.print(table)
    if result["paired_vs_window"]:
        t2 = Table(title="paired differences vs window (same episodes, seeds and noise; 95 % bootstrap CI)")
        for col in ("policy", "gap", "Δ recall", "Δ leakage", "Δ compliance"):
            t2.add_column(col, justify="right")
        for p, by_gap in result["paired_vs_window"].items():
            for key, d in by_gap.items():
                t2.add_row(p, key, *(_fmt_diff(d[m]) for m in PAIRED_METRICS))
        console.print(t2)
    if "slot_purity" in result:
        sp = result["slot_purity"]
        def ari(v) -> str:
            return "–" if v is None else f"{v:.2f}"

        cells = ", ".join(f"L{x['layer']}: {ari(x['ari'])} (n={x['n']})" for x in sp["layers"])
        console.print(f"slot purity (ARI vs ground truth): mean {ari(sp['mean_ari'])}, best {ari(sp['best_ari'])}; {cells}")


def write_plot(result: dict, path, size: tuple[int, int] = (640, 400)) -> None:
    """Identity recall vs gap per policy (with bootstrap intervals), chance and window length marked."""
    from PIL import Image, ImageDraw

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 60, 30, W - 140, H - 50
    d.rectangle([x0, y0, x1, y1], outline="black")
    past = "; ground-truth past" if result.get("past") == "truth" else ""
    d.text((x0, 8), f"identity recall vs absence gap ({result['model']}{past})", fill="black")
    gaps = result["gaps"]
    gmax = max(max(gaps), result["window_video_frames"]) * 1.1 or 1

    def px(g, v):
        return x0 + (x1 - x0) * g / gmax, y1 - (y1 - y0) * v

    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line([px(0, v), px(gmax, v)], fill=(225, 225, 225))
        d.text((x0 - 35, px(0, v)[1] - 6), f"{v:.2f}", fill="black")
    for g in gaps:
        d.text((px(g, 0)[0] - 8, y1 + 6), str(g), fill="black")
    d.text(((x0 + x1) // 2 - 60, y1 + 24), "gap (video frames)", fill="black")
    wx = px(result["window_video_frames"], 0)[0]
    d.line([(wx, y0), (wx, y1)], fill=(160, 160, 160), width=1)
    d.text((wx + 3, y0 + 3), "window", fill=(120, 120, 120))
    cy = px(0, result["chance_recall"])[1]
    d.line([(x0, cy), (x1, cy)], fill=(200, 120, 120))
    d.text((x1 + 5, cy - 6), "chance", fill=(200, 120, 120))
    colours = [(200, 30, 30), (30, 140, 50), (30, 70, 210), (150, 40, 190), (230, 140, 20), (20, 20, 20)]
    for i, p in enumerate(result["policies"]):
        col = colours[i % len(colours)]
        pts = []
        for g in gaps:
            s = result["summary"][p][str(g)]["identity_recall"]
            if s["mean"] is None:
                continue
            pts.append(px(g, s["mean"]))
            lo, hi = px(g, s["low"]), px(g, s["high"])
            d.line([(lo[0] + 2 * i, lo[1]), (hi[0] + 2 * i, hi[1])], fill=col, width=1)
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.line([(x1 + 10, y0 + 20 * i + 8), (x1 + 30, y0 + 20 * i + 8)], fill=col, width=3)
        d.text((x1 + 35, y0 + 20 * i + 2), p, fill="black")
    img.save(path)
