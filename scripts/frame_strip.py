"""A frame strip of one world episode: ground truth (top row) over the model's free-running render.

    python scripts/frame_strip.py --model DIR [--out frame_strip.png] [--world reduced] [--episode-seed 900003]
                                  [--gap 24] [--entities 1] [--policy slot] [--seed 7] [--every 6] [--scale 2]

The episode is ``exit_return_episode(--episode-seed, --gap, --entities, world=--world)`` (default world:
the folder's training world); its storyboard is rendered through the engine with the memory
``--policy`` and storyboard seed ``--seed``; every ``--every``-th frame from frame 1 is shown, with the
world's analyser's presence/compliance/duplicate rate printed for the whole episode.

With ``--world sprites`` (or a folder trained on it) the episode is ``sprite_episode(--episode-seed, --gap/3 − 1)``
(``--gap`` in frames of absence, a multiple of 3) and the scores are the cell analyser's
(``slotgen.world.sprites.analyse_sprites``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a miniature folder (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=Path("frame_strip.png"), help="the PNG to write (default: %(default)s)")
    ap.add_argument("--world", default=None)
    ap.add_argument("--episode-seed", type=int, default=900_003)
    ap.add_argument("--gap", type=int, default=24)
    ap.add_argument("--entities", type=int, default=1)
    ap.add_argument("--policy", default="slot")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--scale", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    from PIL import Image

    from slotgen.bench.identity import render_frames
    from slotgen.errors import SlotgenError
    from slotgen.models.miniature import _asset_path, load_miniature
    from slotgen.world import analyse_episode, render_episode
    from slotgen.world.scene import exit_return_episode, world_named

    try:
        bundle = load_miniature(args.model)
        world = args.world
        if world is None:
            config = json.loads((_asset_path(args.model) / "config.json").read_text())
            world = config.get("training", {}).get("config", {}).get("world", "standard")
        if world == "sprites":
            from slotgen.world.sprites import sprite_episode

            if args.gap < 3 or args.gap % 3:
                raise ValueError(f"--gap: sprite-world gaps are frames of absence, multiples of 3 and at least 3, got {args.gap}")
            episode = sprite_episode(args.episode_seed, args.gap // 3 - 1)
        else:
            episode = exit_return_episode(args.episode_seed, args.gap, args.entities, world=world_named(world))
    except (SlotgenError, ValueError) as e:
        print(f"frame_strip: {e}", file=sys.stderr)
        return 2
    if world == "sprites":
        from slotgen.bench.sprites import render_sprite_frames
        from slotgen.world.sprites import analyse_sprites, render_sprites

        frames = render_sprite_frames(episode, args.policy, bundle, storyboard_seed=args.seed)
        truth = render_sprites(episode)[0]
    else:
        frames = render_frames(episode, args.policy, bundle, storyboard_seed=args.seed)
        truth = render_episode(episode).frames
    idx = list(range(1, min(len(frames), len(truth)), args.every))
    gap = np.full((truth.shape[1], 1, 3), 255, np.uint8)  # a white column between frames
    row = lambda video: np.concatenate([np.concatenate([video[i], gap], 1) for i in idx], 1)  # noqa: E731
    strip = np.concatenate([row(truth), np.full((2, len(idx) * (truth.shape[2] + 1), 3), 255, np.uint8), row(frames)], 0)
    img = Image.fromarray(strip)
    img.resize((img.width * args.scale, img.height * args.scale), Image.NEAREST).save(args.out)
    if world == "sprites":
        from dataclasses import asdict

        report = asdict(analyse_sprites(frames, episode))
    else:
        report = analyse_episode(frames, episode).to_dict()
    print(json.dumps({"episode_seed": args.episode_seed, "world": world, "policy": args.policy, "frames": idx,
                      **{k: report[k] for k in ("presence", "compliance", "duplicate_rate", "identity_recall")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
