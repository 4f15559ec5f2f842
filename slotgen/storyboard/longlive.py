"""LongLive's interactive prompt files as storyboards.

LongLive (and MemFlow) read a JSONL file with one video per line, ``{"prompts": ["...", "...", ...]}``,
plus ``switch_frame_indices`` (latent frames where prompt ``i + 1`` takes over; one fewer than the
prompts) and ``num_output_frames`` (latent frames of the video) from their config. A switch at latent
frame ``s`` takes effect at the first chunk that starts at or after ``s``.

slotgen's storyboards are timed in seconds. With Wan's VAE (temporal stride 4, the first latent frame
alone) latent frame ``s ≥ 1`` begins at video frame ``1 + 4(s − 1)``, and slotgen switches at the
first chunk whose first video frame is at or after the prompt's start, so prompt ``i + 1`` starts at
``(1 + 4(s − 1)) / fps`` seconds and the video lasts ``(1 + 4(T − 1)) / fps`` seconds for ``T`` latent
frames: the same chunks get the same prompts as in LongLive.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from slotgen.errors import SlotgenError


def read_longlive_prompts(path: str | Path) -> list[list[str]]:
    """The prompt lists of a LongLive JSONL file, one per non-empty line (errors name file and line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SlotgenError(f"{path}: unreadable ({type(e).__name__})") from None
    videos = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlotgenError(f"{path}:{number}: invalid JSON ({e.msg}); expected {{\"prompts\": [...]}}") from None
        prompts = item.get("prompts") if isinstance(item, dict) else None
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p.strip() for p in prompts)):
            raise SlotgenError(f"{path}:{number}: expected {{\"prompts\": [\"...\", ...]}} with non-empty strings")
        videos.append([p.strip() for p in prompts])
    if not videos:
        raise SlotgenError(f"{path}: no prompts; expected one {{\"prompts\": [...]}} object per line")
    return videos


def parse_switch_frames(text: str) -> list[int]:
    """``"40, 80, 120"`` (LongLive's config syntax) → ``[40, 80, 120]``; empty text → no switch."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise SlotgenError(f"--switch-frame-indices {text!r}: expected latent frame indices such as 40,80,120") from None


def longlive_storyboard_yaml(prompts: list[str], switch_frame_indices: list[int], num_frames: int, *,
                             model: str = "miniature", fps: int = 16, stride_t: int = 4, seed: int = 0,
                             title: str | None = None) -> str:
    """Storyboard YAML for one LongLive prompt list (module docstring), validated by the storyboard parser."""
    from slotgen.storyboard import parse_storyboard

    if len(switch_frame_indices) != len(prompts) - 1:
        raise SlotgenError(f"{len(prompts)} prompts need {len(prompts) - 1} switch frame indices, got "
                           f"{len(switch_frame_indices)} ({switch_frame_indices})")
    if num_frames < 1:
        raise SlotgenError(f"--frames {num_frames}: expected at least 1 latent frame")
    previous = 0
    for s in switch_frame_indices:
        if not previous < s < num_frames:
            raise SlotgenError(f"switch frame index {s}: expected increasing latent frames between 1 and "
                               f"{num_frames - 1} (the video has {num_frames})")
        previous = s

    def seconds(latent: int) -> float:
        return (1 + stride_t * (latent - 1)) / fps

    data: dict = {}
    if title:
        data["title"] = title
    data.update({"duration": seconds(num_frames), "fps": fps, "seed": seed, "model": model})
    data["prompts"] = [{"at": 0 if i == 0 else seconds(switch_frame_indices[i - 1]), "prompt": p}
                       for i, p in enumerate(prompts)]
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=4096)
    parse_storyboard(text, "<longlive import>")  # the result must be a valid storyboard
    return text


__all__ = ["longlive_storyboard_yaml", "parse_switch_frames", "read_longlive_prompts"]
