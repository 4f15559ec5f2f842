"""LongLive's interactive prompt files (JSONL + switch_frame_indices + num_output_frames) as storyboards:
every chunk gets the prompt LongLive's own loop gives it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from slotgen.cli import app
from slotgen.engine.generator import ChunkGeometry
from slotgen.errors import SlotgenError
from slotgen.storyboard import load_storyboard, parse_storyboard
from slotgen.storyboard.longlive import longlive_storyboard_yaml, parse_switch_frames, read_longlive_prompts

PROMPTS = [f"prompt number {i}" for i in range(6)]


def longlive_segment(chunk_start: int, switches: list[int]) -> int:
    """LongLive's rule (pipeline/interactive_causal_inference.py): at each block start, advance the
    segment while the block's first latent frame has reached the next switch index."""
    return sum(chunk_start >= s for s in switches)


@pytest.mark.parametrize("switches, frames", [([40, 80, 120, 160, 200], 240), ([6, 18, 19, 22, 23], 24)])
def test_every_chunk_gets_longlives_prompt(switches, frames):
    sb = parse_storyboard(longlive_storyboard_yaml(PROMPTS, switches, frames), "ll.yaml")
    geo = ChunkGeometry(chunk_frames=3, stride_t=4)
    assert sb.total_frames == 1 + 4 * (frames - 1)  # T latent frames <-> 1 + 4(T - 1) video frames
    assert geo.num_chunks(sb.total_frames) == frames // 3
    for c in range(frames // 3):
        assert sb.prompt_index_at(geo.first_frame(c) / sb.fps) == longlive_segment(3 * c, switches), c


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompts": ["a", "b"]}) + "\n\n" + '{"prompts": "a"}\n')
    with pytest.raises(SlotgenError, match=r"p.jsonl:3: expected"):
        read_longlive_prompts(f)
    f.write_text("{oops\n")
    with pytest.raises(SlotgenError, match=r"p.jsonl:1: invalid JSON"):
        read_longlive_prompts(f)
    with pytest.raises(SlotgenError, match="3 prompts need 2 switch frame indices"):
        longlive_storyboard_yaml(["a", "b", "c"], [6], 24)
    with pytest.raises(SlotgenError, match="switch frame index 30"):
        longlive_storyboard_yaml(["a", "b"], [30], 24)
    with pytest.raises(SlotgenError, match="expected latent frame indices"):
        parse_switch_frames("40;80")
    assert parse_switch_frames("40, 80, 120") == [40, 80, 120]


def test_cli_imports_each_line_as_a_storyboard(tmp_path):
    f = tmp_path / "interactive.jsonl"
    f.write_text("\n".join(json.dumps({"prompts": PROMPTS[:3]}) for _ in range(2)) + "\n")
    runner = CliRunner()
    res = runner.invoke(app, ["import-longlive", str(f), "--switch-frame-indices", "6, 12", "--frames", "24",
                              "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    sb = load_storyboard(tmp_path / "out" / "interactive-2.yaml")
    assert [p.text for p in sb.prompts] == PROMPTS[:3] and sb.prompts[1].start == 21 / 16
    res = runner.invoke(app, ["import-longlive", str(f), "--switch-frame-indices", "6", "--frames", "24",
                              "-o", str(tmp_path / "one.yaml"), "--line", "1"])
    assert res.exit_code == 2 and "3 prompts need 2 switch frame indices" in res.output
