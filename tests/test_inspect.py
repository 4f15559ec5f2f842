"""`slotgen inspect` on a real render's memory: table, JSON (schema-checked) and PNG."""

from __future__ import annotations

import json

import jsonschema
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
