"""Prompt transitions: `transition:` blends the text conditioning from the previous prompt chunk by chunk
(linear or slerp), renders differ from a cut, are deterministic, resume bit for bit, and are validated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slotgen.engine.blend import blend_embeddings
from slotgen.engine.generator import ChunkGeometry
from slotgen.errors import StoryboardError
from slotgen.render import Renderer, render
from slotgen.resume import resume
from slotgen.snapshot import load_snapshot
from slotgen.storyboard import parse_storyboard
from slotgen.video.writer import read_video

RED = "a red circle moves right on a blue background"
GREEN = "a green square enters from the left on a white background"
HEAD = "fps: 16\nresolution: 32x32\nsampler: {steps: 2}\nseed: 5\nmemory: {policy: sink}\n"


def story(duration: float, switch: float = 0.5625, transition: str | None = "1s", blend: str | None = None):
    extra = "" if transition is None else f"    transition: {transition}\n"
    extra += "" if blend is None else f"    blend: {blend}\n"
    return parse_storyboard(f"{HEAD}duration: {duration}\nprompts:\n  - prompt: {RED}\n"
                            f"  - at: {switch}\n    prompt: {GREEN}\n{extra}", "t.yaml")


# -- the two mixes, by their definitions ------------------------------------------------------------


def test_linear_and_slerp_definitions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    a[0, 4] = 0  # a padding row on one side
    for w in (0.0, 0.3, 1.0):
        assert torch.allclose(blend_embeddings(a, b, w, "linear"), (1 - w) * a + w * b)
    s = blend_embeddings(a, b, 0.3, "slerp")
    ang = lambda u, v: math.acos(max(-1.0, min(1.0, float(torch.dot(u, v) / (u.norm() * v.norm())))))
    for i in range(4):
        x, y, z = a[0, i], b[0, i], s[0, i]
        theta = ang(x, y)
        want = (math.sin(0.7 * theta) * x + math.sin(0.3 * theta) * y) / math.sin(theta)
        assert torch.allclose(z, want, atol=1e-5)
    ua, ub = a[:, :4] / a[:, :4].norm(dim=-1, keepdim=True), b[:, :4] / b[:, :4].norm(dim=-1, keepdim=True)
    us = blend_embeddings(ua, ub, 0.3, "slerp")
    for i in range(4):  # unit rows stay on the great circle: unit norm, 0.3·θ from a, 0.7·θ from b
        theta = ang(ua[0, i], ub[0, i])
        assert float(us[0, i].norm()) == pytest.approx(1.0, abs=1e-5)
        assert ang(ua[0, i], us[0, i]) == pytest.approx(0.3 * theta, abs=1e-3)
        assert ang(us[0, i], ub[0, i]) == pytest.approx(0.7 * theta, abs=1e-3)
    assert torch.allclose(s[0, 4], 0.3 * b[0, 4])  # zero side: the linear mix
    assert not torch.allclose(s[0, :4], blend_embeddings(a, b, 0.3, "linear")[0, :4])
    assert torch.allclose(blend_embeddings(a, b, 0.0, "slerp"), a, atol=1e-6)
    assert torch.allclose(blend_embeddings(a, a, 0.5, "slerp"), a)  # parallel rows
    with pytest.raises(ValueError):
        blend_embeddings(a, b, 0.5, "cubic")


def test_weight_fixed_per_chunk_from_its_first_frame():
    sb = story(3.0, switch=0.5625, transition="1s")
    geo = ChunkGeometry(3, 4)
    got = []
    for c in range(geo.num_chunks(sb.total_frames)):
        idx, blend = sb.conditioning_at(geo.first_frame(c) / sb.fps)
        got.append((idx, None if blend is None else round(blend[1], 6)))
    # chunk 1 starts at frame 9 = 0.5625 s (the switch): weight 0; chunk 2 at 21 → 0.75; chunk 3 at 33 → past 1 s
    assert got == [(0, None), (1, 0.0), (1, 0.75), (1, None), (1, None)]
    idx, blend = sb.conditioning_at(geo.first_frame(2) / sb.fps)
    assert blend[0] == RED and blend[2] == "linear"


# -- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, needle", [
    (f"  - prompt: {RED}\n    transition: 1s\n", "first prompt cannot have a transition"),
    (f"  - prompt: {RED}\n  - at: 1\n    prompt: {GREEN}\n    transition: -1s\n", "transition"),
    (f"  - prompt: {RED}\n  - at: 1\n    prompt: {GREEN}\n    transition: 1s\n    blend: cubic\n", "blend"),
    (f"  - prompt: {RED}\n  - at: 1\n    prompt: {GREEN}\n    blend: slerp\n", "needs a 'transition'"),
    (f"  - prompt: {RED}\n  - at: 1\n    prompt: {GREEN}\n    transition: soon\n", "transition"),
])
def test_bad_transitions_are_one_line(body, needle):
    with pytest.raises(StoryboardError) as e:
        parse_storyboard(f"{HEAD}duration: 3\nprompts:\n{body}", "t.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("t.yaml:") and needle in msg, msg


def test_transitions_round_trip_through_yaml():
    sb = story(3.0, transition="1.5s", blend="slerp")
    assert sb.prompts[1].transition == 1.5 and sb.prompts[1].blend == "slerp"
    again = parse_storyboard(sb.to_yaml())
    assert again == sb
    assert "transition" not in story(3.0, transition=None).to_yaml()


# -- renders ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_transition_differs_from_cut_and_is_deterministic(miniature, tmp_path):
    cut, lin, slerp = (tmp_path / n for n in ("cut.mkv", "lin.mkv", "slerp.mkv"))
    render(story(2.0, transition=None), cut, bundle=miniature)
    render(story(2.0, transition="1s"), lin, bundle=miniature)
    render(story(2.0, transition="1s", blend="slerp"), slerp, bundle=miniature)
    a, b, c = read_video(cut), read_video(lin), read_video(slerp)
    assert np.array_equal(a[:9], b[:9])  # the miniature's chunks 0-2 (3 frames each): before the switch
    assert not np.array_equal(a[9:], b[9:])  # the blended chunks (and what follows them) differ
    assert np.array_equal(b[:12], c[:12])  # chunk 3 has weight 0: linear and slerp agree
    assert not np.array_equal(b[12:], c[12:])  # slerp ≠ linear once the weight is inside (0, 1)
    render(story(2.0, transition="1s"), tmp_path / "again.mkv", bundle=miniature)
    assert np.array_equal(read_video(tmp_path / "again.mkv"), b)


@pytest.mark.slow
def test_resume_inside_a_transition_is_bit_exact(miniature, tmp_path):
    """Stop inside the 1 s transition (the miniature's chunks are 3 frames: the switch at frame 9 is chunk 3,
    stop after chunk 4, weight 3/16) and resume: the frames are those of one go."""
    full = story(2.0, transition="1s", blend="slerp")
    render(full, tmp_path / "full.mkv", bundle=miniature)
    r = Renderer(full, bundle=miniature)
    from slotgen.render import stream_to_files

    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 5

    rep = stream_to_files(r, tmp_path / "a.mkv", should_stop=stop, snapshot=tmp_path / "a.pt", snapshot_every=None)
    assert rep.interrupted and rep.frames == 15
    snap = load_snapshot(tmp_path / "a.pt")
    assert snap.storyboard.prompts[1].transition == 1.0 and snap.storyboard.prompts[1].blend == "slerp"
    resume(snap, tmp_path / "b.mkv", bundle=miniature)
    joined = np.concatenate([read_video(tmp_path / "a.mkv"), read_video(tmp_path / "b.mkv")])
    assert np.array_equal(joined, read_video(tmp_path / "full.mkv"))
