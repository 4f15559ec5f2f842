"""The Python API checks what the CLI checks: a device this machine lacks is one SlotgenError line from
``load_model`` itself, and ``resume`` takes more prompts as a path as well as a parsed storyboard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slotgen.errors import SlotgenError
from slotgen.models import load_model
from slotgen.render import render
from slotgen.resume import resume
from slotgen.storyboard import load_storyboard, parse_storyboard
from slotgen.video.writer import read_video

STORY = """\
fps: 16
resolution: 32x32
sampler: {steps: 2}
seed: 4
memory: {policy: window, window: 4}
duration: 1
prompts:
  - prompt: a red circle moves right on a blue background
"""
MORE = """\
prompts:
  - prompt: a green square enters from the left on a white background
    duration: 1
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_load_model_on_a_device_this_build_lacks_is_one_slotgen_error(device):
    with pytest.raises(SlotgenError) as err:
        load_model("miniature", device=device)
    message = str(err.value)
    assert "\n" not in message and "no CUDA device" in message and "available here: cpu" in message


def test_load_model_refuses_a_device_that_is_not_one():
    with pytest.raises(SlotgenError, match="not a torch device"):
        load_model("miniature", device="gpu0")


@pytest.mark.slow
@pytest.mark.parametrize("kind", [str, Path])
def test_resume_takes_the_more_storyboard_as_a_path(kind, tmp_path):
    bundle = load_model("miniature")
    (tmp_path / "more.yaml").write_text(MORE)
    render(parse_storyboard(STORY, "a.yaml"), tmp_path / "a.mkv", bundle=bundle, snapshot=tmp_path / "a.pt",
           snapshot_every=0)
    by_path = resume(str(tmp_path / "a.pt"), tmp_path / "p.mkv", storyboard=kind(tmp_path / "more.yaml"),
                     bundle=bundle, snapshot_every=0)
    parsed = resume(tmp_path / "a.pt", tmp_path / "s.mkv", storyboard=load_storyboard(tmp_path / "more.yaml"),
                    bundle=bundle, snapshot_every=0)
    assert by_path.frames == parsed.frames > 0
    assert np.array_equal(read_video(tmp_path / "p.mkv"), read_video(tmp_path / "s.mkv"))


def test_resume_with_a_missing_more_storyboard_is_one_line(tmp_path):
    bundle = load_model("miniature")
    render(parse_storyboard(STORY, "a.yaml"), tmp_path / "a.mkv", bundle=bundle, snapshot=tmp_path / "a.pt",
           snapshot_every=0)
    with pytest.raises(SlotgenError, match="nope.yaml"):
        resume(tmp_path / "a.pt", tmp_path / "b.mkv", storyboard=str(tmp_path / "nope.yaml"), bundle=bundle)
