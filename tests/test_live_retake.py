"""A prompt typed while a chunk is sampled takes effect at that chunk: the engine gives the chunk up
before its commit pass (restoring the memory policy) and samples it again under the new prompt. The
engine ends exactly as if it had generated the chunk once, and a live record re-renders to the live
frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slotgen.engine.generator import ChunkRetaken
from slotgen.render import Renderer, render
from slotgen.storyboard import parse_storyboard
from slotgen.video.writer import read_video
from tests.live_helpers import GREEN, RED, YELLOW

# a small window so the slot bank fills (items, retrieval hits) within a few chunks
HEAD = "fps: 16\nresolution: 32x32\nsampler: {steps: 2}\nseed: 7\nmemory: {policy: slot, window: 2, top_k: 4}\n"


# in-process live sessions run each in a fresh process (tests/conftest.py, marker "isolated")
pytestmark = pytest.mark.isolated

@pytest.fixture(scope="module")
def miniature():
    from slotgen.models import load_model

    return load_model("miniature")


def storyboard(prompts: str, duration: float = 600):
    return parse_storyboard(f"{HEAD}duration: {duration}\nprompts:\n{prompts}", "r.yaml")


def assert_same(a, b, where="state"):
    """Equal nested state: tensors bit for bit, everything else by value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_a_retaken_chunk_leaves_the_engine_as_generating_it_once(miniature):
    """Chunk 4 starts under a new prompt (a re-cache) and is given up after its first denoising step,
    then generated under another prompt: every chunk, the decoded frames and the whole engine state
    (memory with its hit counts, history, decoder) equal a run that generated chunk 4 once."""
    sb = storyboard(f"  - prompt: {RED}\n")
    k, after = 4, 2

    def engine():
        return Renderer(sb, bundle=miniature).engine

    a = engine()
    out_a = [a.generate_chunk(0, RED) for _ in range(k)]
    before = a.policy.stats()
    calls, seen = [], {}

    def retake(chunk):  # asked before each denoising step and before the commit pass
        calls.append(chunk)
        if len(calls) == 2:  # after the re-cache and the first step under YELLOW
            seen.update(a.policy.stats())
            return True
        return False

    with pytest.raises(ChunkRetaken):
        a.generate_chunk(1, YELLOW, retake=retake)
    assert calls == [k, k] and a.next_chunk == k and a.prompt == RED
    # the abandoned attempt did change the memory (re-cache, hits): the restore is what makes it exact
    assert seen["layers"] != before["layers"] or seen["tokens_per_layer"] != before["tokens_per_layer"]
    assert sum(sum(lay["hits"]) for lay in seen["layers"]) > sum(sum(lay["hits"]) for lay in before["layers"])
    assert_same(a.policy.stats(), before, "stats after the retake")
    out_a += [a.generate_chunk(2, GREEN, retake=lambda c: False) for _ in range(1 + after)]

    b = engine()
    out_b = [b.generate_chunk(0, RED) for _ in range(k)] + [b.generate_chunk(2, GREEN) for _ in range(1 + after)]
    for ra, rb in zip(out_a, out_b, strict=True):
        assert ra.chunk == rb.chunk and ra.recached_frames == rb.recached_frames
        assert torch.equal(ra.latents, rb.latents) and np.array_equal(ra.frames, rb.frames), ra.chunk
    assert out_a[k].recached_frames > 0
    assert_same(a.state_dict(), b.state_dict())


@pytest.mark.slow
def test_a_prompt_typed_mid_chunk_takes_effect_at_that_chunk_and_re_renders(miniature, tmp_path):
    """A live session whose storyboard switches to YELLOW at chunk 5; GREEN is typed while chunk 5 is
    being sampled (between its denoising steps, after the re-cache to YELLOW). The record holds GREEN
    from chunk 5 (YELLOW never took effect), and the offline render of the record equals live.mkv."""
    from slotgen.live import LiveSession

    switch = 15 / 16  # chunk 5's first frame (3 frames a chunk)
    sb = storyboard(f"  - prompt: {RED}\n  - at: {switch}\n    prompt: {YELLOW}\n")
    session = LiveSession(sb, out=tmp_path / "out", bundle=miniature, realtime=False, snapshot_every=None)
    hooked, calls, retaken = session.renderer.retake, [], []

    def retake(chunk):
        calls.append(chunk)
        if chunk == 5 and calls.count(5) == 3:  # loop start, before step 0, then before step 1: mid-chunk
            session.submit(GREEN, 0.25, "slerp")
        answer = hooked(chunk)
        if answer:
            retaken.append((chunk, calls.count(chunk)))
        return answer

    session.renderer.retake = retake

    def on_event(kind, data):
        if kind == "chunk" and data["chunk"] >= 7:
            session.stop()

    session.on_event = on_event
    session.start()
    assert session.wait(120) and session.status == "stopped", session.error
    assert retaken == [(5, 3)]
    rec = session.record()
    assert [(p.text, round(p.start * 16)) for p in rec.prompts] == [(RED, 0), (GREEN, 15)]
    assert (rec.prompts[1].transition, rec.prompts[1].blend) == (0.25, "slerp")
    out = tmp_path / "out"
    from slotgen.storyboard import load_storyboard

    assert load_storyboard(out / "story.yaml").prompts == rec.prompts
    render(load_storyboard(out / "story.yaml"), tmp_path / "again.mkv", bundle=miniature)
    live = read_video(out / "live.mkv")
    assert len(live) == rec.total_frames == 3 * session.chunks_done
    assert np.array_equal(read_video(tmp_path / "again.mkv"), live)
