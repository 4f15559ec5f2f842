"""A memory policy from one module outside slotgen (tests/toy_policy.py) renders, snapshots, resumes
bit-exactly and is inspected, through the library and through the CLI (registered by
SLOTGEN_POLICY_MODULES); nothing in slotgen names it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from slotgen.memory.registry import policy_names, unregister_policy

ROOT = Path(__file__).resolve().parents[1]
RED = "a red circle moves right on a blue background"
GREEN = "a green square enters from the left on a white background"
STORY = """\
fps: 16
resolution: 32x32
sampler: {{steps: 2}}
seed: 3
duration: {duration}
memory: {{policy: stride, window: 3, stride: 2, keep: 2}}
prompts:
  - prompt: {red}
  - at: 1.25
    prompt: {green}
"""


@pytest.fixture
def stride():
    import importlib

    from slotgen.memory.registry import register_policy

    module = importlib.import_module("tests.toy_policy")  # registers it on first import
    register_policy(module.StrideMemory)  # again after an earlier test's unregister (same class: allowed)
    assert "stride" in policy_names()
    yield module
    unregister_policy("stride")
    assert "stride" not in policy_names()


def test_registration_checks_the_contract(stride):
    from typing import Literal

    from slotgen.memory.base import PolicyConfig
    from slotgen.memory.registry import register_policy

    class OtherConfig(PolicyConfig):
        policy: Literal["other"] = "other"

    class NoConfig(stride.StrideMemory):
        name = "noconfig"

    class WrongTag(stride.StrideMemory):
        name = "wrongtag"
        config_class = OtherConfig

    class Taken(stride.StrideMemory):
        name = "stride"
        config_class = stride.StrideConfig

    for cls, needle in ((NoConfig, "config_class"), (WrongTag, "Literal"), (Taken, "already registered")):
        with pytest.raises(TypeError, match=needle):
            register_policy(cls)
    assert policy_names()[-1] == "stride" and "noconfig" not in policy_names()


@pytest.mark.slow
def test_plugin_policy_renders_snapshots_resumes_and_inspects(stride, miniature, tmp_path):
    from slotgen.inspect import build_report, load_stats, report_schema, report_table
    from slotgen.render import render
    from slotgen.resume import resume
    from slotgen.snapshot import load_snapshot, snapshot_policy
    from slotgen.storyboard import parse_storyboard
    from slotgen.video.writer import read_video

    full = parse_storyboard(STORY.format(duration=3.0, red=RED, green=GREEN), "full.yaml")
    assert isinstance(full.memory, stride.StrideConfig) and full.memory.stride == 2
    ref_rep = render(full, tmp_path / "full.mkv", bundle=miniature)
    kept = ref_rep.memory_stats["frames"][0]
    assert any(f % 2 == 0 and f < kept[-1] - 2 for f in kept), kept  # strided frames older than the window

    head = parse_storyboard(f"fps: 16\nresolution: 32x32\nsampler: {{steps: 2}}\nseed: 3\nduration: 1.0\n"
                            f"memory: {{policy: stride, window: 3, stride: 2, keep: 2}}\nprompts:\n  - prompt: {RED}\n",
                            "head.yaml")
    rep_a = render(head, tmp_path / "a.mkv", bundle=miniature, snapshot=tmp_path / "a.pt")
    snap = load_snapshot(tmp_path / "a.pt")
    assert snap.policy == "stride" and snapshot_policy(snap).stats() == rep_a.memory_stats
    more = parse_storyboard(f"duration: 2.0\nprompts:\n  - prompt: {RED}\n  - at: 0.25\n    prompt: {GREEN}\n",
                            "more.yaml")
    rep_b = resume(snap, tmp_path / "b.mkv", storyboard=more, bundle=miniature)
    assert rep_b.memory_stats == ref_rep.memory_stats
    pieces = np.concatenate([read_video(tmp_path / "a.mkv"), read_video(tmp_path / "b.mkv")])
    assert np.array_equal(pieces, read_video(tmp_path / "full.mkv"))

    stats, _ = load_stats(tmp_path / "a.pt")
    report = build_report(stats, "a.pt")
    jsonschema.validate(report, report_schema())
    assert report["policy"] == "stride" and report["layers"][0]["kept_frames"] == rep_a.memory_stats["frames"][0]
    assert [c.header for c in report_table(report).columns] == ["layer", "tokens", "kept frames"]


@pytest.mark.slow
def test_plugin_policy_through_the_cli(tmp_path):
    story = tmp_path / "s.yaml"
    story.write_text(STORY.format(duration=1.5, red=RED, green=GREEN).replace("stride: 2", "stride: 1"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLOTGEN_POLICY_MODULES": "tests.toy_policy",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def slotgen(*args: str, env=env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "slotgen", *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=300)

    proc = slotgen("render", str(story), "-o", str(tmp_path / "a.mp4"), "--stride", "2", "--keep", "1",
                   "--snapshot", str(tmp_path / "a.pt"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = slotgen("resume", str(tmp_path / "a.pt"), "-o", str(tmp_path / "b.mp4"), "--prompt", GREEN,
                   "--duration", "0.5s", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = slotgen("resume", str(tmp_path / "a.pt"), "-o", str(tmp_path / "c.mp4"), "--prompt", GREEN,
                   "--duration", "0.5s", "--keep", "3")
    assert proc.returncode == 2 and "--keep cannot change on resume" in proc.stderr, proc.stderr
    proc = slotgen("inspect", str(tmp_path / "a.pt"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["policy"] == "stride" and report["layers"][0]["kept_frames"]
    proc = slotgen("inspect", str(tmp_path / "a.pt"))
    assert proc.returncode == 0 and "kept frames" in proc.stdout, proc.stderr

    broken = {**env, "SLOTGEN_POLICY_MODULES": "tests.no_such_policy"}
    proc = slotgen("render", str(story), "-o", str(tmp_path / "x.mp4"), env=broken)
    assert proc.returncode == 2 and "cannot import 'tests.no_such_policy'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.mp4").exists()

    bare = {k: v for k, v in env.items() if k != "SLOTGEN_POLICY_MODULES"}
    proc = slotgen("inspect", str(tmp_path / "a.pt"), env=bare)  # the snapshot names the policy, never code
    assert proc.returncode == 2 and "unknown memory policy 'stride'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
