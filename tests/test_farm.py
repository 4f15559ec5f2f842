"""slotgen render-many on a local Ray cluster (2 CPUs: 2 workers of 1 thread; the miniature at 32x32,
2 sampler steps). Ray starts once for the module. Each case proves a promise of docs/SCALE_OUT.md:
N jobs give the files of N single renders (weights loaded once per worker), a worker killed by its
pid mid-job resumes from its snapshot to a bit-identical video, a bad storyboard fails alone, and a
rerun after Ctrl-C skips the finished jobs and resumes the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray  # in the test extra: CI runs these tests

from slotgen.errors import SlotgenError
from slotgen.farm import FarmJob, Manifest, collect_storyboards, job_storyboard, parse_seeds, plan_jobs, render_many
from slotgen.video.writer import read_video


def story(duration: float = 3, seed: int = 5, policy: str = "{policy: window, window: 4}") -> str:
    return textwrap.dedent(f"""\
        fps: 16
        resolution: 32x32
        sampler: {{steps: 2}}
        seed: {seed}
        memory: {policy}
        duration: {duration}
        prompts:
          - prompt: a red circle moves right on a blue background
          - at: {duration / 2}
            prompt: a green square enters from the left on a white background
        """)


# one Ray instance per module: under pytest-xdist these tests share a worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("ray")

from tests.ray_cluster import local_cluster  # noqa: E402

BAD = "fps: 16\nduration: 2\nprompts:\n  - prompt: a red circle\n    at: soon\n"


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (tests/ray_cluster.py)."""
    yield from local_cluster()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted single-machine renders (in this process, lossless), by (storyboard text, seed, policy)."""
    from slotgen.models import load_model
    from slotgen.render import render

    cache: dict = {}
    root = tmp_path_factory.mktemp("single")
    bundle = load_model("miniature")

    def get(job: FarmJob) -> np.ndarray:
        key = (Path(job.storyboard).read_text(), job.seed, job.policy)
        if key not in cache:
            out = root / f"{len(cache)}.mkv"
            render(job_storyboard(job), out, bundle=bundle, snapshot_every=0)
            cache[key] = read_video(out)
        return cache[key]

    return get


def manifest_rows(out: Path) -> dict[str, dict]:
    return {r["job"]: r for r in json.loads((out / "manifest.json").read_text())["jobs"]}


# -- planning (no Ray) -------------------------------------------------------------------------------

def test_plan_folder_glob_list_and_sweep(tmp_path):
    (tmp_path / "sb").mkdir()
    for name in ("a", "b"):
        (tmp_path / "sb" / f"{name}.yaml").write_text(story())
    (tmp_path / "sb" / "notes.md").write_text("not a storyboard")
    (tmp_path / "list.txt").write_text("# season one\nsb/b.yaml\n\nsb/a.yaml  # again\n")
    assert [p.name for p in collect_storyboards([tmp_path / "sb"])] == ["a.yaml", "b.yaml"]
    assert [p.name for p in collect_storyboards([str(tmp_path / "sb" / "*.yaml")])] == ["a.yaml", "b.yaml"]
    assert [p.name for p in collect_storyboards([tmp_path / "list.txt"])] == ["b.yaml", "a.yaml"]
    jobs = plan_jobs([tmp_path / "sb"], tmp_path / "out", seeds=parse_seeds("1-2"), policies=["window", "slot"])
    assert [j.name for j in jobs] == ["a-seed1-window", "a-seed1-slot", "a-seed2-window", "a-seed2-slot",
                                      "b-seed1-window", "b-seed1-slot", "b-seed2-window", "b-seed2-slot"]
    assert jobs[1].output == str((tmp_path / "out" / "a-seed1-slot.mkv").resolve())
    assert jobs[1].snapshot == jobs[1].output + ".snapshot.pt"
    sb = job_storyboard(jobs[3])
    assert (sb.seed, sb.memory.policy) == (2, "slot")
    assert job_storyboard(jobs[0]).memory.window == 4  # the storyboard's own policy keeps its settings
    assert parse_seeds("1,4,2-3,4") == [1, 4, 2, 3]
    for bad in ("x", "3-1", "1-", ""):
        with pytest.raises(SlotgenError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(SlotgenError, match="unknown policy 'nope'"):
        plan_jobs([tmp_path / "sb"], tmp_path / "out", policies=["nope"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.yaml").write_text(story())
    with pytest.raises(SlotgenError, match="two storyboards are named 'a'"):
        plan_jobs([tmp_path / "sb", tmp_path / "other"], tmp_path / "out")
    with pytest.raises(SlotgenError, match="matches no files"):
        collect_storyboards([str(tmp_path / "none" / "*.yaml")])


# -- on the cluster ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_jobs_equal_single_renders_and_weights_load_once_per_worker(cluster, reference, tmp_path):
    (tmp_path / "sb").mkdir()
    (tmp_path / "sb" / "a.yaml").write_text(story(seed=5))
    (tmp_path / "sb" / "b.yaml").write_text(story(duration=2.5, seed=9))
    jobs = plan_jobs([tmp_path / "sb"], tmp_path / "out", policies=["window", "slot"])
    statuses = []
    report = render_many(jobs, tmp_path / "out", snapshot_every="2c", on_update=statuses.append)
    rows = manifest_rows(tmp_path / "out")
    assert [r["status"] for r in report.rows] == ["done"] * 4
    for job in jobs:
        row = rows[job.name]
        assert (row["seed"], row["policy"], row["output"]) == (job_storyboard(job).seed, job.policy, job.output)
        frames = read_video(job.output)
        assert row["frames"] == len(frames) and row["seconds"] > 0 and row["error"] is None
        assert np.array_equal(frames, reference(job)), job.name
    # two workers (one per CPU), each loaded the model once for its two jobs
    assert len(report.workers) == 2
    assert [w["loads"] for w in report.workers] == [1, 1]
    assert sum(w["jobs"] for w in report.workers) == 4
    assert statuses and statuses[-1].frames_done == statuses[-1].frames_total == 2 * (48 + 40)
    assert statuses[-1].fps > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_storyboard_fails_alone(cluster, reference, tmp_path):
    (tmp_path / "good.yaml").write_text(story(duration=2))
    (tmp_path / "bad.yaml").write_text(BAD)
    (tmp_path / "nomodel.yaml").write_text(story(duration=2) + f"model: {tmp_path / 'no-such-model'}\n")
    jobs = plan_jobs([tmp_path / "bad.yaml", tmp_path / "good.yaml", tmp_path / "nomodel.yaml"], tmp_path / "out")
    report = render_many(jobs, tmp_path / "out")
    rows = manifest_rows(tmp_path / "out")
    assert {k: r["status"] for k, r in rows.items()} == {"bad": "failed", "good": "done", "nomodel": "failed"}
    assert rows["bad"]["error"].startswith(f"{tmp_path / 'bad.yaml'}:5: prompts[0].at: expected a time")
    assert "no-such-model" in rows["nomodel"]["error"] and "\n" not in rows["nomodel"]["error"]
    assert np.array_equal(read_video(jobs[1].output), reference(jobs[1]))
    assert report.counts() == {"failed": 2, "done": 1}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_worker_killed_mid_job_resumes_from_its_snapshot(cluster, reference, tmp_path):
    (tmp_path / "long.yaml").write_text(story(duration=8, policy="{policy: slot}"))
    jobs = plan_jobs([tmp_path / "long.yaml"], tmp_path / "out")
    killed: dict = {}

    def on_update(st) -> None:
        p = st.running_jobs.get("long")
        if not killed and p and p["frames"] >= 36:  # a few chunks in, snapshots after every chunk
            killed.update(pid=p["pid"], frames=p["frames"])
            os.kill(p["pid"], signal.SIGKILL)

    result: dict = {}
    t = threading.Thread(target=lambda: result.update(
        report=render_many(jobs, tmp_path / "out", snapshot_every="1c", on_update=on_update, poll=0.1)))
    t.start()
    t.join(360)
    assert not t.is_alive(), "render_many did not finish"
    assert killed, "the job finished before the worker could be killed"
    row = manifest_rows(tmp_path / "out")["long"]
    assert row["status"] == "done", row
    assert row["resumed_from"] > 0  # resumed from a snapshot, not rendered again from the start
    assert int(row["worker"].rsplit(":", 1)[1]) != killed["pid"]  # a restarted worker finished it
    frames = read_video(jobs[0].output)
    assert len(frames) == 128 and np.array_equal(frames, reference(jobs[0]))
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_stops_cleanly_and_rerun_skips_finished_jobs(cluster, reference, tmp_path):
    """The CLI as a subprocess joining the module's cluster (--ray): SIGINT while the second job renders."""
    (tmp_path / "a.yaml").write_text(story(duration=2))
    (tmp_path / "z.yaml").write_text(story(duration=40, seed=3))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "slotgen", "render-many", str(tmp_path / "a.yaml"), str(tmp_path / "z.yaml"),
           "-o", str(out), "--ray", cluster, "--workers", "1", "--snapshot-every", "4c"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = manifest_rows(out) if (out / "manifest.json").is_file() else {}
            if rows.get("a", {}).get("status") == "done" and rows.get("z", {}).get("status") == "running":
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rerun the same command" in err
    rows = manifest_rows(out)
    assert rows["a"]["status"] == "done" and rows["z"]["status"] == "interrupted", rows
    a_mtime = Path(rows["a"]["output"]).stat().st_mtime_ns
    z_frames = len(read_video(rows["z"]["output"]))
    assert 0 < z_frames < 640

    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "1 already done, skipped" in res.stderr
    rows = manifest_rows(out)
    assert rows["z"]["status"] == "done" and rows["z"]["resumed_from"] == z_frames
    assert Path(rows["a"]["output"]).stat().st_mtime_ns == a_mtime  # not rendered again
    jobs = plan_jobs([tmp_path / "a.yaml", tmp_path / "z.yaml"], out)
    for job in jobs:
        assert np.array_equal(read_video(job.output), reference(job)), job.name


def test_manifest_is_json_with_every_column(tmp_path):
    m = Manifest(tmp_path)
    job = FarmJob("x", str(tmp_path / "x.yaml"), 3, "slot", str(tmp_path / "x.mkv"))
    m.update(job, seed=3, policy="slot", status="pending")
    m.write()
    row = json.loads((tmp_path / "manifest.json").read_text())["jobs"][0]
    assert set(row) >= {"job", "storyboard", "seed", "policy", "output", "frames", "seconds", "status", "error"}
    assert Manifest(tmp_path).rows["x"]["status"] == "pending"
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SlotgenError, match="not a slotgen render-many manifest"):
        Manifest(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_resumes_its_snapshot_and_restarts_an_edited_storyboard(tmp_path, reference):
    """RenderWorker without Ray: a stopped job resumes from its snapshot; a finished one is not rendered
    again; an edited storyboard (another seed) starts over."""
    from slotgen.farm import RenderWorker

    (tmp_path / "s.yaml").write_text(story(duration=2))
    job = plan_jobs([tmp_path / "s.yaml"], tmp_path)[0]
    first = RenderWorker()
    first.stop()  # stops after its first chunk, with a snapshot
    r1 = first.run(job, snapshot_every=0)
    assert r1["status"] == "interrupted" and 0 < r1["frames"] < 32
    second = RenderWorker()
    r2 = second.run(job, snapshot_every="1c")
    assert (r2["status"], r2["resumed_from"], r2["frames"]) == ("done", r1["frames"], 32)
    assert np.array_equal(read_video(job.output), reference(job))
    mtime = Path(job.output).stat().st_mtime_ns
    r3 = second.run(job)
    assert (r3["status"], r3["frames"]) == ("done", 32) and Path(job.output).stat().st_mtime_ns == mtime
    assert second.loads == 1  # one model load for both jobs
    (tmp_path / "s.yaml").write_text(story(duration=2, seed=11))
    r4 = second.run(job)
    assert (r4["status"], r4["resumed_from"]) == ("done", 0)
    assert np.array_equal(read_video(job.output), reference(job))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gpus_the_cluster_lacks_are_one_line(cluster, tmp_path):
    (tmp_path / "s.yaml").write_text(story(duration=2))
    jobs = plan_jobs([tmp_path / "s.yaml"], tmp_path / "out")
    with pytest.raises(SlotgenError, match="--gpus-per-job 1: the Ray cluster has 0 GPUs"):
        render_many(jobs, tmp_path / "out", gpus_per_job=1)


@pytest.mark.parametrize("args, message", [
    (["nowhere/"], "'nowhere/' is neither a storyboard, a folder, a list file nor a glob"),
    (["s.yaml", "--memory", "window,nope"], "--memory: unknown policy 'nope'"),
    (["s.yaml", "--seeds", "5-1"], "--seeds: expected seeds like 1-8"),
    (["s.yaml", "--snapshot-every", "soon"], "--snapshot-every"),
])
@pytest.mark.slow
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, message):
    (tmp_path / "s.yaml").write_text(story(duration=2))
    res = subprocess.run([sys.executable, "-m", "slotgen", "render-many", *args, "-o", "out"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_worker_dead_past_its_retries_fails_the_job_alone_and_a_rerun_resumes_it(cluster, reference, tmp_path):
    (tmp_path / "a.yaml").write_text(story(duration=6))
    (tmp_path / "b.yaml").write_text(story(duration=2, seed=8))
    jobs = plan_jobs([tmp_path / "a.yaml", tmp_path / "b.yaml"], tmp_path / "out")
    killed: dict = {}

    def on_update(st) -> None:
        p = st.running_jobs.get("a")
        if not killed and p and p["frames"] >= 24:
            killed.update(pid=p["pid"])
            os.kill(p["pid"], signal.SIGKILL)

    box: dict = {}
    t = threading.Thread(target=lambda: box.update(report=render_many(
        jobs, tmp_path / "out", workers=1, max_retries=0, snapshot_every="1c", on_update=on_update, poll=0.1)))
    t.start()
    t.join(300)
    assert not t.is_alive() and killed
    rows = manifest_rows(tmp_path / "out")
    assert rows["a"]["status"] == "failed" and rows["a"]["error"].startswith("worker lost after 0 retries: ")
    assert rows["b"]["status"] == "done"  # a fresh worker took the rest of the queue
    report = render_many(jobs, tmp_path / "out", workers=1)
    assert report.skipped == ["b"]
    row = manifest_rows(tmp_path / "out")["a"]
    assert row["status"] == "done" and row["resumed_from"] > 0  # from the snapshot the killed worker left
    assert np.array_equal(read_video(jobs[0].output), reference(jobs[0]))


# -- joining a cluster: unreachable, silent or refusing addresses (only 127.0.0.1 is contacted) ---------

def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening: a connection is refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _render_many(tmp_path, *args, **popen):
    (tmp_path / "s.yaml").write_text(story(duration=2))
    return subprocess.Popen([sys.executable, "-m", "slotgen", "render-many", "s.yaml", "-o", "out/jobs", *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), **popen)


@pytest.mark.slow
def test_unreachable_ray_address_is_one_line_naming_it_exit_2_writing_nothing(tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    proc = _render_many(tmp_path, "--ray", address)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 <= 15
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"error: --ray {address}: "), err
    assert "connection refused" in err
    assert not (tmp_path / "out").exists()  # no folder, no manifest of pending rows


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_while_a_silent_address_is_joined_stops_within_5_s(tmp_path, sig):
    """A port that accepts and never answers: Ray's own connect retries for minutes, deaf to signals."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    address = f"127.0.0.1:{server.getsockname()[1]}"
    proc = _render_many(tmp_path, "--ray", address)
    try:
        deadline = time.monotonic() + 60
        server.settimeout(max(0.1, deadline - time.monotonic()))
        conn, _ = server.accept()  # the reachability probe: the driver now goes on into ray.init
        conn.close()
        time.sleep(3.0)  # well inside Ray's connection attempt
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 <= 5, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
    assert proc.returncode == 130, err
    assert f"while joining the Ray cluster at {address}: nothing was written" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_refused_token_is_one_line(cluster, tmp_path):
    """The module's local instance uses token authentication (Ray 2.60's default); a wrong token is refused."""
    (tmp_path / "wrong-token").write_text("0" * 32 + "\n")
    proc = _render_many(tmp_path, "--ray", cluster, "--ray-token-file", "wrong-token")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --ray {cluster}: the cluster refused"), err
    assert "--ray-token-file" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_right_token_file_joins(cluster, tmp_path):
    from pathlib import Path as _P

    token = _P.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        (tmp_path / "token").write_text(os.environ["RAY_AUTH_TOKEN"])
    else:
        (tmp_path / "token").write_text(token.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # only the flag gives the token
    (tmp_path / "s.yaml").write_text(story(duration=1))
    res = subprocess.run([sys.executable, "-m", "slotgen", "render-many", "s.yaml", "-o", "out", "--ray", cluster,
                          "--ray-token-file", "token", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(env, OMP_NUM_THREADS="1"), timeout=240)
    assert res.returncode == 0, res.stderr
    assert manifest_rows(tmp_path / "out")["s"]["status"] == "done"
