"""Figures for docs/BENCHMARKS.md: SIGKILL a render at seeded chunks (every policy), resume the newest
snapshot, and count the frames lost (rendered before the kill but not in the snapshot) and whether the
resumed lossless video equals an uninterrupted render bit for bit.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/fault_figures.py [--points 3] [--every 1c]
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
from pathlib import Path

import numpy as np

from tests.test_faults import POLICIES, kill_at_chunk, resume_everything, run_cli, story


def figures(points: int, every: str, seed: int = 18) -> list[dict]:
    from slotgen.snapshot import load_snapshot
    from slotgen.video.writer import read_video

    rng = random.Random(seed)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for policy in POLICIES:
            ref_dir = Path(root) / f"ref-{policy}"
            ref_dir.mkdir()
            (ref_dir / "story.yaml").write_text(story(policy))
            assert run_cli(ref_dir, "render", "story.yaml", "-o", "ref.mkv", "-q", "--snapshot-every", "0").returncode == 0
            ref = read_video(ref_dir / "ref.mkv")
            for k in range(points):
                chunk = rng.randrange(1, 15)
                d = Path(root) / f"{policy}-{k}"
                d.mkdir()
                (d / "story.yaml").write_text(story(policy))
                log = kill_at_chunk(d, chunk, ("--snapshot-every", every))
                rendered = max(int(m) for m in re.findall(r"slotgen-chunk \d+ frames (\d+)", log))
                held = load_snapshot(d / "out.mp4.snapshot.pt").frames_emitted
                res = resume_everything(d)
                exact = res.returncode == 0 and np.array_equal(read_video(d / "out.mkv"), ref)
                rows.append({"policy": policy, "kill_after_chunk": chunk, "frames_rendered": rendered,
                             "frames_in_snapshot": held, "frames_lost": rendered - held, "bit_exact": bool(exact),
                             "traceback": "Traceback" in log + res.stderr})
                print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=3)
    ap.add_argument("--every", default="1c")
    a = ap.parse_args()
    rows = figures(a.points, a.every)
    lost = [r["frames_lost"] for r in rows]
    print(f"cases {len(rows)}, bit-exact {sum(r['bit_exact'] for r in rows)}, tracebacks "
          f"{sum(r['traceback'] for r in rows)}, frames lost: max {max(lost)}, mean {sum(lost) / len(lost):.2f}")
