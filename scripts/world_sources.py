"""Write the shape world's exit-and-return episodes as slot-training sources, without their masks.

``--storyboards DIR``: one storyboard per episode (the world grammar's captions), for
``slotgen train-slots --storyboards DIR`` (the model renders them itself). ``--videos DIR``: the world's
own render of each episode as an MP4 with its first caption beside it (``NAME.txt``), for
``slotgen train-slots --videos DIR``. Episodes are those the supervised φ trains on
(``slotgen.train.slots.world_episodes``: seeds 500000 + ..., disjoint from ``bench identity``'s).

    python scripts/world_sources.py --storyboards sb --episodes 8
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storyboards", type=Path, help="write storyboards here")
    ap.add_argument("--videos", type=Path, help="write MP4 clips (and captions) here")
    ap.add_argument("--episodes", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", default="standard")
    args = ap.parse_args()
    if args.storyboards is None and args.videos is None:
        ap.error("give --storyboards DIR or --videos DIR")
    from slotgen.train.slots import world_episodes
    from slotgen.world import episode_to_storyboard_yaml, render_episode
    from slotgen.world.grammar import episode_prompts

    for i, ep in enumerate(world_episodes(args.episodes, args.seed, args.world)):
        name = f"episode_{i:03d}"
        if args.storyboards is not None:
            args.storyboards.mkdir(parents=True, exist_ok=True)
            (args.storyboards / f"{name}.yaml").write_text(episode_to_storyboard_yaml(ep, seed=ep.seed))
        if args.videos is not None:
            from slotgen.video.writer import MP4Writer

            args.videos.mkdir(parents=True, exist_ok=True)
            truth = render_episode(ep)
            with MP4Writer(args.videos / f"{name}.mp4", fps=ep.config.fps,
                             size=(ep.config.width, ep.config.height)) as w:
                w.write(truth.frames)
            (args.videos / f"{name}.txt").write_text(episode_prompts(ep)[0].text + "\n")
    print(f"wrote {args.episodes} episodes")


if __name__ == "__main__":
    main()
