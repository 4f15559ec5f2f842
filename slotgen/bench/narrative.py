"""``slotgen bench narrative``: render one narrative under several memory settings and score every video.

The protocol of the SlotMemory paper's interactive long-video evaluation (arXiv 2605.31033), run on
whatever model the settings name:

* every setting (a memory spec ``POLICY[@PRESET][:KEY=VALUE...]`` on a model) renders the same
  storyboard with the same seeds, so the noise is identical across settings;
* **CLIP text–video score**: for a frame and a text, CLIP's own logit ``exp(logit_scale) · cos(image
  embedding, text embedding)`` (what ``CLIPModel`` returns as ``logits_per_image``; 100 · cosine for the
  released CLIP models). A prompt segment's score is the mean over its frames of the logit against its
  prompt; a window's score (``window_seconds``, 10 s by default) is the mean over its frames of the logit
  against the prompt in force at each frame;
* **subject consistency** and **background consistency** with VBench's definitions (Huang et al., VBench,
  CVPR 2024; ``vbench/subject_consistency.py`` and ``vbench/background_consistency.py``): per-frame
  features, L2-normalised — DINO ViT-B/16's class token for the subject, CLIP ViT-B/32's image embedding
  for the background — and the video's score is the mean over frames ``i ≥ 1`` of
  ``(max(0, cos(f_i, f_{i−1})) + max(0, cos(f_i, f_0))) / 2``. Frames are prepared as VBench does: DINO
  resizes the short side to 224 (bilinear, no antialiasing, no crop) and normalises with ImageNet
  statistics; CLIP resizes the short side to 224 (bicubic), centre-crops 224 and normalises with CLIP's
  statistics; resizes of 8-bit frames are rounded back to 8 bits as torchvision does. The same scores are
  also reported per window (the window's first frame as ``f_0``);
* every number gets a 95 % percentile bootstrap interval over the seeds.

Scorer weights: ``openai/clip-vit-base-patch32`` and ``facebook/dino-vitb16`` through transformers'
``CLIPModel`` / ``ViTModel`` from the Hugging Face cache (downloaded once on first use unless
``HF_HUB_OFFLINE=1``; the commit used is recorded in the JSON), or ``scorer_dir`` with ``clip/`` and
``dino/`` sub-folders saved by ``save_pretrained``. The scores mean something only for a model that draws
natural images: on the embedded miniature (toy shapes) they are meaningless and the output says so.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from slotgen.errors import SlotgenError, one_line

CLIP_MODEL = "openai/clip-vit-base-patch32"  # VBench's background-consistency backbone (CLIP ViT-B/32)
DINO_MODEL = "facebook/dino-vitb16"  # VBench's subject-consistency backbone (DINO ViT-B/16)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEANINGLESS = ("the model is the embedded miniature, which draws toy shapes: CLIP and DINO were trained on natural "
               "images, so these scores are meaningless here (they test the pipeline, not the memory)")


# --- frame preparation (VBench's transforms) ---------------------------------------------------------------
def _resize_short_side(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(N, 3, H, W) float in 0..255 → short side ``size`` as torchvision's ``Resize(size)`` on uint8 frames:
    long side ``int(size · long / short)``, no antialiasing, rounded and clamped back to 0..255."""
    h, w = x.shape[-2:]
    if h <= w:
        new = (size, int(size * w / h))
    else:
        new = (int(size * h / w), size)
    y = F.interpolate(x, size=new, mode=mode, align_corners=False, antialias=False)
    return y.round().clamp(0, 255)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - m) / s


def clip_pixels(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) → CLIP input (N, 3, size, size): short side ``size`` bicubic, centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    x = _resize_short_side(x, size, "bicubic")
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return _normalise(x[..., top:top + size, left:left + size], CLIP_MEAN, CLIP_STD)


def dino_pixels(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) → DINO input (N, 3, size, size·W/H): short side ``size`` bilinear, no crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    return _normalise(_resize_short_side(x, size, "bilinear"), IMAGENET_MEAN, IMAGENET_STD)


# --- the definitions ---------------------------------------------------------------------------------------
def vbench_consistency(features: torch.Tensor) -> float:
    """VBench's subject/background consistency of one video from per-frame features (T, D), T ≥ 2:
    mean over i ≥ 1 of (max(0, cos(f_i, f_{i-1})) + max(0, cos(f_i, f_0))) / 2."""
    if features.shape[0] < 2:
        raise ValueError("consistency needs at least two frames")
    f = F.normalize(features.float(), dim=-1)  # (T, D)
    prev = (f[1:] * f[:-1]).sum(-1).clamp(min=0)  # (T-1,)
    first = (f[1:] * f[:1]).sum(-1).clamp(min=0)  # (T-1,)
    return float(((prev + first) / 2).mean())


@dataclass
class Scorers:
    """CLIP (text–image logits, background features) and DINO (subject features) with their preprocessing."""

    clip: torch.nn.Module  # transformers CLIPModel
    tokenizer: object  # its tokenizer
    dino: torch.nn.Module  # transformers ViTModel (DINO)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    names: dict = field(default_factory=dict)  # {"clip": {...id, commit}, "dino": {...}}
    batch: int = 32

    @property
    def clip_size(self) -> int:
        return int(self.clip.config.vision_config.image_size)

    @property
    def dino_size(self) -> int:
        return int(self.dino.config.image_size)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(P, D) unnormalised CLIP text embeddings (the text projection of the pooled output)."""
        max_len = int(self.clip.config.text_config.max_position_embeddings)
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out = self.clip.text_model(input_ids=tok["input_ids"].to(self.device),
                                   attention_mask=tok["attention_mask"].to(self.device))
        return self.clip.text_projection(out.pooler_output).float()

    @torch.no_grad()
    def clip_image_embeddings(self, frames: np.ndarray) -> torch.Tensor:
        """(N, D) unnormalised CLIP image embeddings of uint8 frames (N, H, W, 3)."""
        outs = []
        for i in range(0, len(frames), self.batch):
            px = clip_pixels(frames[i:i + self.batch], self.clip_size).to(self.device, self.clip.dtype)
            outs.append(self.clip.visual_projection(self.clip.vision_model(pixel_values=px).pooler_output).float())
        return torch.cat(outs)

    @torch.no_grad()
    def dino_features(self, frames: np.ndarray) -> torch.Tensor:
        """(N, D) DINO class-token features (after the final norm) of uint8 frames (N, H, W, 3)."""
        outs = []
        for i in range(0, len(frames), self.batch):
            px = dino_pixels(frames[i:i + self.batch], self.dino_size).to(self.device, self.dino.dtype)
            out = self.dino(pixel_values=px, interpolate_pos_encoding=True)
            outs.append(out.last_hidden_state[:, 0].float())
        return torch.cat(outs)

    @torch.no_grad()
    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(N, P) CLIP logits: exp(logit_scale) · cos(image, text), as ``CLIPModel.logits_per_image``."""
        scale = self.clip.logit_scale.exp().float()
        return scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T


def _commit(model) -> str | None:
    path = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
    m = re.search(r"snapshots/([0-9a-f]{40})", path)
    return m.group(1) if m else None


def load_scorers(scorer_dir: str | Path | None = None, device: str | torch.device = "cpu",
                 clip_id: str = CLIP_MODEL, dino_id: str = DINO_MODEL, revision: str | None = None) -> Scorers:
    """CLIP and DINO from ``scorer_dir`` (``clip/``, ``dino/``) or the Hugging Face cache/hub (module docstring)."""
    from transformers import AutoTokenizer, CLIPModel, ViTModel

    device = torch.device(device)
    if scorer_dir is not None:
        root = Path(scorer_dir).expanduser()
        sources = {"clip": str(root / "clip"), "dino": str(root / "dino")}
        for k, p in sources.items():
            if not Path(p).is_dir():
                raise SlotgenError(f"--scorer-dir {root}: no {k}/ folder; expected clip/ (CLIPModel + tokenizer) and "
                                   "dino/ (ViTModel) saved with save_pretrained")
        kw: dict = {"local_files_only": True}
    else:
        sources = {"clip": clip_id, "dino": dino_id}
        kw = {"revision": revision} if revision else {}
    try:
        clip = CLIPModel.from_pretrained(sources["clip"], **kw).eval().requires_grad_(False).to(device)
        tokenizer = AutoTokenizer.from_pretrained(sources["clip"], **kw)
        dino = ViTModel.from_pretrained(sources["dino"], add_pooling_layer=False, **kw).eval().requires_grad_(False).to(device)
    except OSError as err:
        where = f"--scorer-dir {scorer_dir}" if scorer_dir is not None else f"{clip_id} / {dino_id}"
        raise SlotgenError(f"scorer weights ({where}) cannot be loaded: {one_line(err, 120)}; they come from the "
                           "Hugging Face hub once (network, HF_HUB_OFFLINE unset) or from --scorer-dir") from None
    names = {k: {"source": sources[k], "commit": _commit(m)} for k, m in (("clip", clip), ("dino", dino))}
    return Scorers(clip, tokenizer, dino, device, names)


# --- scoring one video -------------------------------------------------------------------------------------
def score_video(frames: np.ndarray, fps: float, prompts: list[tuple[float, float, str]], scorers: Scorers,
                window_seconds: float = 10.0) -> dict:
    """Scores of one video (uint8 (N, H, W, 3)); ``prompts``: (start s, end s, text) tiling the video."""
    n = len(frames)
    times = np.arange(n) / fps  # frame i is shown at i / fps
    which = np.array([next(k for k, (s, e, _) in enumerate(prompts) if t < e or k == len(prompts) - 1)
                      for t in times])  # (N,) prompt in force per frame
    img = scorers.clip_image_embeddings(frames)  # (N, D)
    txt = scorers.text_embeddings([p[2] for p in prompts])  # (P, D)
    logit = scorers.logits(img, txt)  # (N, P)
    own = logit[torch.arange(n), torch.from_numpy(which)].numpy()  # (N,) each frame against its prompt
    dino = scorers.dino_features(frames)  # (N, E)
    segments = []
    for k, (s, e, text) in enumerate(prompts):
        idx = np.nonzero(which == k)[0]
        segments.append({"prompt": text, "start": s, "end": e, "frames": len(idx),
                         "clip": float(own[idx].mean()) if len(idx) else None})
    windows = []
    for w in range(math.ceil(n / fps / window_seconds)):
        idx = np.nonzero((times >= w * window_seconds) & (times < (w + 1) * window_seconds))[0]
        if len(idx) == 0:
            continue
        sel = torch.from_numpy(idx)
        windows.append({"start": w * window_seconds, "end": min((w + 1) * window_seconds, n / fps), "frames": len(idx),
                        "clip": float(own[idx].mean()),
                        "subject": vbench_consistency(dino[sel]) if len(idx) > 1 else None,
                        "background": vbench_consistency(img[sel]) if len(idx) > 1 else None})
    return {"frames": n, "fps": fps, "clip": float(own.mean()), "subject": vbench_consistency(dino),
            "background": vbench_consistency(img), "segments": segments, "windows": windows}


# --- the benchmark -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    memory: str  # a memory spec POLICY[@PRESET][:KEY=VALUE...]
    model: str | None  # None: the storyboard's

    @property
    def label(self) -> str:
        return self.memory if self.model is None else f"{self.memory} on {self.model}"

    @property
    def stem(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.@=-]+", "_", self.label)


def narratives(path: str | Path, *, switch_frames: list[int] | None = None, frames: int | None = None,
               model: str = "miniature") -> list:
    """The storyboards to benchmark: a storyboard file, or a LongLive JSONL (one per line; LongLive's
    interactive example's switches 40,80,120,160,200 and 240 latent frames by default)."""
    from slotgen.storyboard import load_storyboard, parse_storyboard
    from slotgen.storyboard.longlive import longlive_storyboard_yaml, read_longlive_prompts

    path = Path(path)
    if path.suffix == ".jsonl":
        out = []
        for i, prompts in enumerate(read_longlive_prompts(path), 1):
            sw = switch_frames if switch_frames is not None else [40, 80, 120, 160, 200][: len(prompts) - 1]
            text = longlive_storyboard_yaml(prompts, sw, frames or 240, model=model, title=f"{path.stem}-{i}")
            out.append(parse_storyboard(text, f"{path}:{i}"))
        return out
    return [load_storyboard(path)]


def is_miniature(model: str) -> bool:
    from slotgen.models.pull import resolve_model_path

    if model == "miniature":
        return True
    p = resolve_model_path(model)
    return p is not None and (p / "weights.safetensors").is_file() and (p / "config.json").is_file()


def run_narrative_bench(storyboard_path: str | Path, settings: list[Setting], seeds: list[int], out_dir: str | Path, *,
                        scorers: Scorers | None = None, scorer_dir: str | Path | None = None, device: str = "cpu",
                        ray_address: str | None = None, window_seconds: float = 10.0,
                        switch_frames: list[int] | None = None, frames: int | None = None,
                        log: Callable[[str], None] = lambda m: None) -> dict:
    """Render every narrative × setting × seed into ``out_dir/videos`` (in-process, or through render-many's
    library on Ray when ``ray_address`` is given; finished videos are reused), score them, and return the
    JSON-able result (also written to ``out_dir/narrative.json``)."""
    from slotgen.bench.speed import memory_spec
    from slotgen.memory.registry import parse_memory_config

    out = Path(out_dir)
    (out / "storyboards").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    stories = narratives(storyboard_path, switch_frames=switch_frames, frames=frames)
    jobs = []  # (narrative index, setting, seed, storyboard path, video path, storyboard)
    for n, sb in enumerate(stories):
        for setting in settings:
            for seed in seeds:
                over = {"seed": seed, "memory": parse_memory_config(memory_spec(setting.memory))}
                if setting.model is not None:
                    over["model"] = setting.model
                story = sb.with_overrides(**over)
                name = (f"n{n}-" if len(stories) > 1 else "") + f"{setting.stem}-seed{seed}"
                sb_path = out / "storyboards" / f"{name}.yaml"
                sb_path.write_text(story.to_yaml())
                jobs.append((n, setting, seed, sb_path, out / "videos" / f"{name}.mkv", story))
    if scorers is None:  # before any rendering: a missing scorer fails now, not after hours of video
        log("loading the scorers (CLIP, DINO)")
        scorers = load_scorers(scorer_dir, device=device)
    todo = [j for j in jobs if not j[4].is_file()]
    if todo and ray_address is not None:
        from slotgen.farm import FarmJob, render_many

        log(f"rendering {len(todo)} videos on Ray ({ray_address})")
        report = render_many([FarmJob(j[4].stem, str(j[3].resolve()), None, None, str(j[4].resolve())) for j in todo],
                             out / "videos", address=ray_address, device=device)
        if report.counts().get("failed") or report.interrupted or any(not j[4].is_file() for j in todo):
            raise SlotgenError(f"render-many did not finish every video; see {out / 'videos' / 'manifest.json'}")
    else:
        from slotgen.render import render

        for i, j in enumerate(todo, 1):
            log(f"rendering {j[4].name} ({i}/{len(todo)})")
            render(j[5], j[4], device=device, snapshot_every=None)
    from slotgen.video.writer import read_video

    videos = []
    for i, (n, setting, seed, sb_path, video, story) in enumerate(jobs, 1):
        log(f"scoring {video.name} ({i}/{len(jobs)})")
        prompts = [(p.start, p.end, p.text) for p in story.prompts]
        s = score_video(read_video(video), story.fps, prompts, scorers, window_seconds)
        videos.append({"narrative": n, "setting": setting.label, "seed": seed, "video": str(video), **s})
    models = {s.model or st.model for s in settings for st in stories}
    meaningful = not any(is_miniature(m) for m in models)
    result = {"storyboard": str(storyboard_path), "settings": [s.label for s in settings], "seeds": seeds,
              "window_seconds": window_seconds, "scorers": scorers.names, "meaningful": meaningful,
              "note": None if meaningful else MEANINGLESS, "videos": videos,
              "summary": summarise(videos, [s.label for s in settings])}
    (out / "narrative.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _ci(values: list[float]) -> dict:
    from slotgen.world import bootstrap_ci

    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "low": None, "high": None, "n": 0}
    r = bootstrap_ci(vals, n=2000, seed=0)
    return {"mean": r.estimate, "low": r.low, "high": r.high, "n": len(vals)}


def summarise(videos: list[dict], labels: list[str]) -> dict:
    """Per setting: each score's mean over seeds (and narratives) with a 95 % bootstrap interval; per window too."""
    summary = {}
    for label in labels:
        vs = [v for v in videos if v["setting"] == label]
        n_windows = max(len(v["windows"]) for v in vs)
        summary[label] = {
            **{k: _ci([v[k] for v in vs]) for k in ("clip", "subject", "background")},
            "windows": [{"start": vs[0]["windows"][w]["start"] if w < len(vs[0]["windows"]) else None,
                         **{k: _ci([v["windows"][w][k] for v in vs if w < len(v["windows"])])
                            for k in ("clip", "subject", "background")}} for w in range(n_windows)],
        }
    return summary


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(c: dict) -> str:
        return "-" if c["mean"] is None else f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"

    summary = result["summary"]
    n_windows = max(len(s["windows"]) for s in summary.values())
    w = result["window_seconds"]
    table = Table(title=f"slotgen bench narrative — {len(result['seeds'])} seeds, 95 % bootstrap CI over seeds")
    for col in ["setting", "CLIP (all)", "subject cons.", "background cons."] + [
            f"CLIP {i * w:g}-{(i + 1) * w:g}s" for i in range(n_windows)]:
        table.add_column(col)
    for label, s in summary.items():
        table.add_row(label, fmt(s["clip"]), fmt(s["subject"]), fmt(s["background"]),
                      *[fmt(x["clip"]) for x in s["windows"]])
    console = Console(width=240)
    console.print(table)
    if not result["meaningful"]:
        console.print(f"note: {result['note']}", markup=False, highlight=False)


def write_plot(result: dict, path: str | Path, size: tuple[int, int] = (720, 420)) -> None:
    """CLIP score per window over time, one line per setting, bootstrap intervals as bars."""
    from PIL import Image, ImageDraw

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 60, 30, W - 200, H - 50
    d.rectangle([x0, y0, x1, y1], outline="black")
    title = "CLIP text-video score per window" + ("" if result["meaningful"] else " (miniature: meaningless)")
    d.text((x0, 8), title, fill="black")
    points = [(x["start"], x["clip"]) for s in result["summary"].values() for x in s["windows"] if x["clip"]["mean"] is not None]
    if not points:
        img.save(path)
        return
    lows = [c["low"] for _, c in points]
    highs = [c["high"] for _, c in points]
    lo, hi = min(lows), max(highs)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    tmax = max(t for t, _ in points) + result["window_seconds"]

    def px(t, v):
        return x0 + (x1 - x0) * (t + result["window_seconds"] / 2) / tmax, y1 - (y1 - y0) * (v - lo) / (hi - lo)

    for i in range(5):
        v = lo + (hi - lo) * i / 4
        d.line([(x0, px(0, v)[1]), (x1, px(0, v)[1])], fill=(225, 225, 225))
        d.text((5, px(0, v)[1] - 6), f"{v:.2f}", fill="black")
    for t in sorted({t for t, _ in points}):
        cx = px(t, lo)[0]
        d.line([(cx, y1), (cx, y1 + 4)], fill="black")
        d.text((cx - 12, y1 + 6), f"{t + result['window_seconds'] / 2:g}", fill="black")
    d.text(((x0 + x1) // 2 - 40, y1 + 24), "time (s, window centre)", fill="black")
    colours = [(200, 30, 30), (30, 140, 50), (30, 70, 210), (150, 40, 190), (230, 140, 20), (20, 20, 20)]
    for i, (label, s) in enumerate(result["summary"].items()):
        col = colours[i % len(colours)]
        pts = []
        for x in s["windows"]:
            c = x["clip"]
            if c["mean"] is None:
                continue
            p = px(x["start"], c["mean"])
            pts.append(p)
            d.line([(p[0] + 2 * i, px(0, c["low"])[1]), (p[0] + 2 * i, px(0, c["high"])[1])], fill=col)
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        d.text((x1 + 10, y0 + 16 * i), label, fill=col)
    img.save(path)
