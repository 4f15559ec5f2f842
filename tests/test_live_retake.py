"""A prompt typed while a chunk is made takes effect at that chunk: the engine gives the chunk up at the
next transformer block before its commit pass (restoring the memory policy) and makes it again under the
new prompt. The
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
@pytest.mark.parametrize("where", ["step", "recache"])
def test_a_retaken_chunk_leaves_the_engine_as_generating_it_once(miniature, where):
    """Chunk 4 starts under a new prompt (a re-cache) and is given up in the middle of a forward (after
    the first block of the second denoising step, or of the re-cache pass), then generated under
    another prompt: every chunk, the decoded frames and the whole engine state (memory with its hit
    counts, history, decoder) equal a run that generated chunk 4 once."""
    sb = storyboard(f"  - prompt: {RED}\n")
    k, after = 4, 2

    def engine():
        return Renderer(sb, bundle=miniature).engine

    a = engine()
    out_a = [a.generate_chunk(0, RED) for _ in range(k)]
    before = a.policy.stats()
    blocks = len(miniature.transformer.blocks)
    calls, seen = [], {}

    def retake(chunk):  # asked before every block until the commit pass
        calls.append((chunk, a.state.recache))
        if calls.count((k, where == "recache")) == (2 if where == "recache" else blocks + 2):  # block 1
            # of the re-cache's pass, or of the second denoising step
            seen.update(a.policy.stats())
            return True
        return False

    with pytest.raises(ChunkRetaken):
        a.generate_chunk(1, YELLOW, retake=retake)
    assert {c for c, _ in calls} == {k} and a.next_chunk == k and a.prompt == RED
    assert a.state.check is None and not a.state.recache and not a.state.commit
    if where == "step":  # asked during the re-cache too, and before each block of each step
        assert calls.count((k, True)) > 0 and calls.count((k, False)) == blocks + 2
    # the abandoned attempt did change the memory (re-cache, hits): the restore is what makes it exact
    assert seen["layers"] != before["layers"] or seen["tokens_per_layer"] != before["tokens_per_layer"]
    if where == "step":
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
    being sampled (in the first block of its first denoising step, after the re-cache to YELLOW). The record holds GREEN
    from chunk 5 (YELLOW never took effect), and the offline render of the record equals live.mkv."""
    from slotgen.live import LiveSession

    switch = 15 / 16  # chunk 5's first frame (3 frames a chunk)
    sb = storyboard(f"  - prompt: {RED}\n  - at: {switch}\n    prompt: {YELLOW}\n")
    session = LiveSession(sb, out=tmp_path / "out", bundle=miniature, realtime=False, snapshot_every=None)
    hooked, calls, retaken = session.renderer.retake, [], []

    engine = session.renderer.engine
    blocks = len(miniature.transformer.blocks)

    def retake(chunk):
        calls.append((chunk, engine.state.recache))
        if calls.count((5, False)) == 3:  # loop start, then blocks 0 and 1 of the first step: mid-forward
            session.submit(GREEN, 0.25, "slerp")
        answer = hooked(chunk)
        if answer:
            retaken.append((chunk, calls.count((5, False))))
        return answer

    session.renderer.retake = retake

    def on_event(kind, data):
        if kind == "chunk" and data["chunk"] >= 7:
            session.stop()

    session.on_event = on_event
    session.start()
    assert session.wait(120) and session.status == "stopped", session.error
    assert retaken == [(5, 3)] and blocks > 2  # at once: block 1 of the step's forward
    assert calls.count((5, True)) > 0  # the re-cache to YELLOW ran (and asked) before
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


@pytest.mark.slow
def test_a_typed_prompt_ends_the_pacing_wait_and_its_first_frame_goes_out_before_the_commit_pass(miniature,
                                                                                                  tmp_path):
    """In real time the render waits for the clock between chunks; a typed prompt ends the wait at once
    (here the wait would last 1000 s), and the first frame of the chunk under it reaches the page's
    broadcaster before that chunk's commit pass (decoded a latent frame at a time)."""
    import time

    from slotgen.live import LiveSession

    session = LiveSession(storyboard(f"  - prompt: {RED}\n"), out=tmp_path / "out", bundle=miniature, realtime=True,
                          snapshot_every=None)
    engine, log = session.renderer.engine, []
    forward, write = engine._forward, session.broadcast.write

    def logged_forward(latents, t, frame_start, embeds, commit):
        if commit and not engine.state.recache:
            log.append(("commit", frame_start // engine.geometry.chunk_frames))
        return forward(latents, t, frame_start, embeds, commit)

    def logged_write(frames):
        log.append(("write", session.renderer.frames_emitted, len(frames)))
        return write(frames)

    engine._forward, session.broadcast.write = logged_forward, logged_write
    session.start()
    try:
        deadline = time.monotonic() + 120
        while session.chunks_done < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        session._t0 += 1000  # the render is now far ahead of the clock: it waits before its next chunk
        done = session.chunks_done
        time.sleep(1.0)
        assert session.chunks_done <= done + 2  # waiting (a chunk may have been under way)
        t = time.monotonic()
        session.submit(GREEN)
        while not any(e.source == "typed" and e.chunk is not None and session.chunks_done > e.chunk
                      for e in session.entries) and time.monotonic() - t < 60:
            time.sleep(0.01)
        typed = [e for e in session.entries if e.source == "typed"]
        assert typed and session.chunks_done > typed[0].chunk, "the typed prompt waited for the clock"
    finally:
        session.stop()
        assert session.wait(120) and session.status == "stopped", session.error
    c = typed[0].chunk
    first = engine.geometry.first_frame(c)
    at_write = log.index(("write", first, 1))  # one latent frame's frames (stride 1 here)
    assert at_write < log.index(("commit", c))
