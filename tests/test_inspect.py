"""`slotgen inspect` on a real render's memory: table, JSON (schema-checked) and PNG."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from typer.testing import CliRunner

from slotgen.cli import app
from slotgen.inspect import report_schema, build_report, load_stats, report_table, write_png

STORY = """\
duration: 2.5
resolution: 64x64
memory:
  policy: {policy}
  window: 3
  sink: 0
prompts:
  - prompt: a red circle moves right on a blue background
  - at: 1.5
    prompt: a green square enters from the left on a blue background
"""


@pytest.fixture(scope="module")
def stats_files(tmp_path_factory):
    from slotgen.models import load_model
    from slotgen.render import render

    bundle = load_model("miniature")
    tmp = tmp_path_factory.mktemp("inspect")
    out = {}
    for policy in ("slot", "sink"):
        story = tmp / f"{policy}.yaml"
        story.write_text(STORY.format(policy=policy))
        from slotgen.storyboard import load_storyboard

        stats = tmp / f"{policy}.json"
        render(load_storyboard(story), tmp / f"{policy}.mp4", bundle=bundle, stats=stats)
        out[policy] = stats
    return out


def test_report_from_slot_render(stats_files):
    stats, _ = load_stats(stats_files["slot"])
    report = build_report(stats, str(stats_files["slot"]))
    jsonschema.validate(report, report_schema())
    assert report["policy"] == "slot" and len(report["layers"]) == 4
    lay = report["layers"][0]
    assert lay["items"] > 0 and 0 < lay["budget_use"] <= 1.0
    assert lay["tokens"] == lay["bank_tokens"] + 3 * 16  # bank + a 3-frame window of 16 tokens
    table = report_table(report)
    assert table.row_count == 4


def test_png_shows_slots(stats_files, tmp_path):
    from PIL import Image

    stats, _ = load_stats(stats_files["slot"])
    png = write_png(stats, tmp_path / "slots.png")
    img = Image.open(png)
    assert img.width > 100 and img.height > 100
    colours = {c for _, c in img.getcolors(1 << 16)}
    assert len(colours) >= 3  # several slots drawn in distinct colours


def test_png_refused_for_frame_policies(stats_files, tmp_path):
    from slotgen.errors import SlotgenError

    stats, _ = load_stats(stats_files["sink"])
    with pytest.raises(SlotgenError, match="slot memory policy"):
        write_png(stats, tmp_path / "x.png")


def test_cli_inspect_table_json_png(stats_files, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(stats_files["slot"])])
    assert res.exit_code == 0, res.output
    assert "policy slot" in res.output and "budget use" in res.output
    res = runner.invoke(app, ["inspect", str(stats_files["slot"]), "--json"])
    assert res.exit_code == 0
    jsonschema.validate(json.loads(res.stdout), report_schema())
    res = runner.invoke(app, ["inspect", str(stats_files["slot"]), "--png", str(tmp_path / "s.png")])
    assert res.exit_code == 0 and (tmp_path / "s.png").exists()
    res = runner.invoke(app, ["inspect", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "no such file" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = runner.invoke(app, ["inspect", str(bad)])
    assert res.exit_code == 2 and "slotgen stats" in res.output


@pytest.mark.slow
def test_cli_inspect_reads_a_snapshot(tmp_path):
    """`slotgen inspect snap.pt` shows the same memory as the render's --stats JSON."""
    story = tmp_path / "s.yaml"
    story.write_text(STORY.format(policy="slot"))
    runner = CliRunner()
    res = runner.invoke(app, ["render", str(story), "-o", str(tmp_path / "v.mp4"), "--snapshot", str(tmp_path / "s.pt"),
                              "--stats", str(tmp_path / "s.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    from_snap = runner.invoke(app, ["inspect", str(tmp_path / "s.pt"), "--json"])
    from_stats = runner.invoke(app, ["inspect", str(tmp_path / "s.json"), "--json"])
    assert from_snap.exit_code == 0, from_snap.output
    a, b = json.loads(from_snap.stdout), json.loads(from_stats.stdout)
    jsonschema.validate(a, report_schema())
    assert a["layers"] == b["layers"] and a["bytes"] == b["bytes"]
    res = runner.invoke(app, ["inspect", str(tmp_path / "s.pt"), "--png", str(tmp_path / "snap.png")])
    assert res.exit_code == 0 and (tmp_path / "snap.png").stat().st_size > 0
    (tmp_path / "broken.pt").write_bytes(b"not a snapshot")
    res = runner.invoke(app, ["inspect", str(tmp_path / "broken.pt")])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_png_draws_the_segmented_frame_under_the_slots_with_a_legend(tmp_path):
    """inspect --png: the frame each slot map segments is underneath (its pixels show through the tint)
    and a legend names every slot; without the video the same map is drawn on black."""
    from PIL import Image

    from slotgen.inspect import underlay_frames

    story = tmp_path / "s.yaml"
    story.write_text("fps: 16\nresolution: 64x64\nseed: 3\nsampler: {steps: 2}\nmemory: {policy: slot}\nduration: 1\n"
                     "prompts:\n  - prompt: a red circle moves right on a blue background\n")
    res = CliRunner().invoke(app, ["render", str(story), "-o", str(tmp_path / "v.mp4"), "--lossless",
                                   str(tmp_path / "v.mkv"), "--stats", str(tmp_path / "s.json"), "-q"])
    assert res.exit_code == 0, res.output
    stats, extra = load_stats(tmp_path / "s.json")
    assert extra["video"] == str((tmp_path / "v.mkv").resolve())
    frames = underlay_frames(stats, extra)
    shown = sorted(frames)
    assert shown and all(f.shape == (64, 64, 3) for f in frames.values())
    with_video = np.asarray(Image.open(write_png(stats, tmp_path / "a.png", frames=frames)).convert("RGB"))
    without = np.asarray(Image.open(write_png(stats, tmp_path / "b.png")).convert("RGB"))
    assert with_video.shape == without.shape
    # the first panel (64x64 px: 4x4 tokens of 16 px) is the frame, tinted: it differs from the bare map
    # nearly everywhere and follows the frame's brightness
    a, b = with_video[24:88, 8:72].astype(float), without[24:88, 8:72].astype(float)
    assert (a != b).any(axis=-1).mean() > 0.5
    frame = frames[shown[0]].astype(float)
    # inside the tokens (not their outlines), panel = (1 - α)·frame + α·slot colour with α = 90/255
    alpha = 90 / 255
    inner = np.zeros((64, 64), bool)
    inner[np.ix_([y for y in range(64) if y % 16 not in (0, 15)], [x for x in range(64) if x % 16 not in (0, 15)])] = True
    blend = np.abs(a - alpha * b - (1 - alpha) * frame).max(-1)
    assert (blend[inner] <= 3).mean() > 0.6  # the rest: the black boxes holding slot numbers
    # the same frames, read again from the video, are what the panel was built from
    from slotgen.video.writer import read_video

    video = read_video(tmp_path / "v.mkv")
    assert all(np.array_equal(frames[f], video[f]) for f in shown)  # stride_t 1: latent f is video frame f
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "s.json"), "--png", str(tmp_path / "c.txt")])
    assert res.exit_code == 2 and "name it .png" in res.output
