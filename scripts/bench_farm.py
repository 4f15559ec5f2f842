"""render-many on Ray vs one process, and frames lost when a worker is killed (docs/BENCHMARKS.md).

1. ``--jobs`` storyboards of ``--duration`` seconds (seeds 1..N, the miniature at ``--resolution``,
   ``--steps`` sampler steps) rendered one after another in this process (model loaded once), then the
   same jobs through :func:`slotgen.farm.render_many` on a fresh local Ray instance of ``--cpus`` CPUs
   (one worker per CPU; Ray's start-up counted). Same snapshot interval in both. Ratio in the same run.
2. One job whose worker is SIGKILLed ``--kills`` times, snapshots every ``--every`` chunks: for each kill,
   frames the worker had reported before the kill (polled every 0.1 s, so up to ~0.1 s of frames may be
   missing from the count) minus the frame the restarted worker resumed from.

Run: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/bench_farm.py [--jobs 8 --duration 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import textwrap
import threading
import time
from pathlib import Path


def write_storyboards(root: Path, n: int, duration: float, resolution: str, steps: int) -> list[Path]:
    paths = []
    for seed in range(1, n + 1):
        p = root / f"story{seed}.yaml"
        p.write_text(textwrap.dedent(f"""\
            fps: 16
            resolution: {resolution}
            sampler: {{steps: {steps}}}
            seed: {seed}
            memory: {{policy: slot}}
            duration: {duration}
            prompts:
              - prompt: a red circle moves right on a blue background
              - at: {duration / 2}
                prompt: a green square enters from the left on a white background
            """))
        paths.append(p)
    return paths


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--resolution", default="32x32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--snapshot-every", default="60", help="both variants of part 1")
    ap.add_argument("--every", default="8c", help="part 2's snapshot interval (Nc)")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from slotgen.farm import job_storyboard, plan_jobs, ray_init, render_many
    from slotgen.models import load_model
    from slotgen.render import Renderer, render

    tmp = Path(tempfile.mkdtemp(prefix="bench-farm-"))
    (tmp / "sb").mkdir()
    paths = write_storyboards(tmp / "sb", args.jobs, args.duration, args.resolution, args.steps)
    out = {"jobs": args.jobs, "duration": args.duration, "resolution": args.resolution, "steps": args.steps,
           "cpus": args.cpus, "load_before": loadavg()}
    print(f"{args.jobs} jobs of {args.duration:g}s at {args.resolution}, {args.steps} steps; load {out['load_before']}",
          flush=True)

    # -- 1a. one after another, one process --------------------------------------------------------
    jobs = plan_jobs(paths, tmp / "seq")
    (tmp / "seq").mkdir()
    t0 = time.perf_counter()
    bundle = load_model("miniature")
    frames = 0
    for job in jobs:
        rep = render(job_storyboard(job), job.output, bundle=bundle, snapshot=job.snapshot,
                     snapshot_every=args.snapshot_every)
        frames += rep.frames
    out["sequential_s"] = round(time.perf_counter() - t0, 2)
    out["frames"] = frames
    print(f"sequential, one process: {out['sequential_s']:.1f}s ({frames / out['sequential_s']:.1f} frames/s)", flush=True)

    # -- 1b. the same jobs on a local Ray instance ---------------------------------------------------
    t0 = time.perf_counter()
    ray_init(None, num_cpus=args.cpus)
    out["ray_start_s"] = round(time.perf_counter() - t0, 2)
    rep = render_many(plan_jobs(paths, tmp / "ray"), tmp / "ray", snapshot_every=args.snapshot_every)
    out["ray_s"] = round(time.perf_counter() - t0, 2)
    assert all(r["status"] == "done" for r in rep.rows), rep.rows
    out["ray_job_seconds"] = round(sum(r["seconds"] for r in rep.rows), 2)
    out["ray_workers"] = rep.workers
    from slotgen.video.writer import read_video
    import numpy as np

    out["identical"] = all(np.array_equal(read_video(a.output), read_video(b.output))
                           for a, b in zip(jobs, plan_jobs(paths, tmp / "ray")))
    out["speedup"] = round(out["sequential_s"] / out["ray_s"], 3)
    ideal = out["sequential_s"] / min(args.cpus, args.jobs)
    out["ray_overhead_s"] = round(out["ray_s"] - ideal, 2)
    print(f"ray, {len(rep.workers)} workers: {out['ray_s']:.1f}s incl. {out['ray_start_s']:.1f}s Ray start; "
          f"speed-up {out['speedup']:.2f}x; vs sequential/{min(args.cpus, args.jobs)} = {ideal:.1f}s: "
          f"+{out['ray_overhead_s']:.1f}s; outputs identical: {out['identical']}; load {loadavg()}", flush=True)

    # -- 2. frames lost when a worker is killed --------------------------------------------------------
    job = plan_jobs([paths[0]], tmp / "kill")[0]
    sb = job_storyboard(job)
    r = Renderer(sb, bundle=bundle)
    n_chunks = int(args.every.rstrip("c"))
    per_chunk = sb.total_frames / r.total_chunks()
    # kill points spread over the job and off the snapshot grid (k * 7 + 5 frames past an even split)
    thresholds = [sb.total_frames * (k + 1) // (args.kills + 1) + 7 * k + 5 for k in range(args.kills)]
    kills: list[dict] = []
    state = {"pid": None}

    def on_update(st) -> None:
        p = st.running_jobs.get(job.name)
        if not p:
            return
        if kills and "resumed_from" not in kills[-1] and p["pid"] != kills[-1]["pid"] and "resumed_from" in p:
            kills[-1]["resumed_from"] = p.get("resumed_from", 0)
            kills[-1]["lost"] = kills[-1]["frames_seen"] - kills[-1]["resumed_from"]
        if len(kills) < len(thresholds) and p["frames"] >= thresholds[len(kills)] and p["pid"] != state["pid"] \
                and (not kills or "resumed_from" in kills[-1]):
            kills.append({"pid": p["pid"], "frames_seen": p["frames"]})
            state["pid"] = p["pid"]
            os.kill(p["pid"], signal.SIGKILL)

    box: dict = {}
    th = threading.Thread(target=lambda: box.update(rep=render_many([job], tmp / "kill", snapshot_every=args.every,
                                                                     on_update=on_update, poll=0.1)))
    th.start()
    th.join()
    row = box["rep"].rows[0]
    same = bool(np.array_equal(read_video(job.output), read_video(jobs[0].output)))
    out["kill"] = {"interval_chunks": n_chunks, "frames_per_chunk": round(per_chunk, 2),
                   "interval_frames": round(n_chunks * per_chunk, 1), "kills": kills, "status": row["status"],
                   "identical_to_uninterrupted": same}
    for k in kills:
        print(f"killed worker {k['pid']} at frame {k['frames_seen']}, resumed from {k.get('resumed_from')}: "
              f"lost {k.get('lost')} frames (interval {n_chunks} chunks = {n_chunks * per_chunk:.0f} frames)")
    print(f"killed job: {row['status']}, output identical to the uninterrupted render: {same}")
    import ray

    ray.shutdown()
    out["load_after"] = loadavg()
    print(f"load average after: {out['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
