"""Snapshots and resume: render(A then B) == render(A) + resume(B) bit for bit for every memory policy;
refused snapshots (truncated, corrupted, edited, future, other model, malicious) give one line and exit 2;
snapshot size does not grow with the video's length."""

from __future__ import annotations

import io
import os
import pickle
import shlex

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slotgen.cli import app
from slotgen.engine.generator import ChunkGeometry
from slotgen.errors import SnapshotError, StoryboardError
from slotgen.memory.registry import policy_names, resolve_memory
from slotgen.bench.snapshot_size import snapshot_sizes
from slotgen.render import render
from slotgen.resume import extend_storyboard, resume
from slotgen.snapshot import FORMAT, VERSION, encode_snapshot, load_snapshot, snapshot_policy
from slotgen.storyboard import parse_storyboard
from slotgen.video.writer import probe_video, read_video

RED = "a red circle moves right on a blue background"
GREEN = "a green square enters from the left on a white background"
YELLOW = "a yellow star moves up on a purple background"
# 32x32 and 2 sampler steps keep a chunk well under a second on a slow CPU
HEAD = "fps: 16\nresolution: 32x32\nsampler: {{steps: 2}}\nseed: 5\nmemory: {{policy: {policy}}}\n"

runner = CliRunner()


def story(policy: str, duration: float, *prompts: tuple[float, str]) -> object:
    lines = [HEAD.format(policy=policy), f"duration: {duration}\nprompts:\n"]
    for at, text in prompts:
        lines.append(f"  - at: {at}\n    prompt: {text}\n")
    return parse_storyboard("".join(lines), f"<{policy} {duration}s>")


def more(duration: float, *prompts: tuple[float, str]) -> object:
    """A continuation storyboard: times count from the end of the snapshot."""
    text = f"duration: {duration}\nprompts:\n" + "".join(f"  - at: {at}\n    prompt: {p}\n" for at, p in prompts)
    return parse_storyboard(text, "more.yaml")


def stderr_of(res) -> str:
    try:
        return res.stderr
    except (ValueError, AttributeError):
        return res.output


def assert_one_line_error(res, needle: str = "") -> str:
    err = stderr_of(res)
    assert res.exit_code == 2, (res.exit_code, res.output, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    return lines[0]


# -- exactness --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy", policy_names())
def test_resume_is_bit_exact(policy, miniature, tmp_path):
    """One story (red for 1.25 s, then green until 3.5 s) rendered in one go and in pieces.

    * split at 1.25 s (20 frames: the miniature's 3-frame chunks decode 21, so 1 frame is pending) with
      more.yaml that starts with the prompt switch: the resume's first chunk re-caches under the new prompt;
    * split at 0.5625 s (9 frames: exactly 3 chunks) where more.yaml's first prompt continues red;
    * the --prompt/--duration form, chained twice (green 1 s, then green 1.25 s more, which merges).
    """
    full = story(policy, 3.5, (0, RED), (1.25, GREEN))
    ref_rep = render(full, tmp_path / "full.mkv", bundle=miniature)
    ref = read_video(tmp_path / "full.mkv")
    assert len(ref) == 56

    # split 1: ends between chunk boundaries, the resume starts with a prompt switch
    rep_a = render(story(policy, 1.25, (0, RED)), tmp_path / "a.mkv", bundle=miniature, snapshot=tmp_path / "a.pt")
    snap = load_snapshot(tmp_path / "a.pt")
    geo = ChunkGeometry(miniature.settings.chunk_frames, miniature.settings.vae_stride_t)
    assert geo.first_frame(geo.num_chunks(20)) == 21  # the split falls inside a chunk
    assert (snap.frames_emitted, len(snap.pending), snap.chunk, snap.prompt) == (20, 1, geo.num_chunks(20), RED)
    assert snap.policy == policy and snap.seed == 5 and not snap.interrupted and snap.complete
    # the policy can be rebuilt without the model (what `slotgen inspect` does)
    assert snapshot_policy(snap).stats() == rep_a.memory_stats
    rep_b = resume(snap, tmp_path / "b.mkv", storyboard=more(2.25, (0, GREEN)), bundle=miniature,
                   snapshot_out=tmp_path / "b.pt")
    assert rep_b.first_frame == 20 and rep_b.frames == 36 and rep_b.prompt_chunks[0] == 1
    assert np.array_equal(np.concatenate([read_video(tmp_path / "a.mkv"), read_video(tmp_path / "b.mkv")]), ref)
    # the continuation's snapshot equals the one-go render's end state
    assert rep_b.memory_stats == ref_rep.memory_stats
    end = load_snapshot(tmp_path / "b.pt")
    assert (end.frames_emitted, end.chunk, end.complete) == (56, geo.num_chunks(56), True)
    # the storyboard as rendered: its memory resolved under the model's attention preset
    assert end.storyboard == full.with_overrides(memory=resolve_memory(full.memory, miniature.settings.preset))
    assert end.memory.preset == "slotgen"
    assert end.source == snap.source == f"<{policy} 1.25s>"  # the story's first storyboard, kept across resumes

    # split 2: on a chunk boundary, the first new prompt continues the old one (the spans merge)
    render(story(policy, 0.5625, (0, RED)), tmp_path / "a2.mkv", bundle=miniature, snapshot=tmp_path / "a2.pt")
    rep = resume(tmp_path / "a2.pt", tmp_path / "b2.mkv", storyboard=more(2.9375, (0, RED), (0.6875, GREEN)),
                 bundle=miniature)
    assert rep.first_frame == 9 and geo.first_frame(geo.num_chunks(9)) == 9  # on a chunk boundary
    assert np.array_equal(np.concatenate([read_video(tmp_path / "a2.mkv"), read_video(tmp_path / "b2.mkv")]), ref)

    # --prompt/--duration, extended twice from the first snapshot
    resume(snap, tmp_path / "c1.mkv", prompt=GREEN, duration=1.0, bundle=miniature, snapshot_out=tmp_path / "c1.pt")
    resume(tmp_path / "c1.pt", tmp_path / "c2.mkv", prompt=GREEN, duration=1.25, bundle=miniature)
    pieces = [read_video(tmp_path / f) for f in ("a.mkv", "c1.mkv", "c2.mkv")]
    assert [len(p) for p in pieces] == [20, 16, 20]
    assert np.array_equal(np.concatenate(pieces), ref)


@pytest.mark.slow
def test_cli_render_snapshot_resume_append_chain(miniature, tmp_path, monkeypatch):
    """The CLI: render --snapshot, resume --storyboard --append --snapshot, resume --prompt --append again."""
    import slotgen.render

    monkeypatch.setattr(slotgen.render, "load_model", lambda *a, **k: miniature)  # no reload per command
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text(HEAD.format(policy="sink") + f"duration: 1.25\nprompts:\n  - prompt: {RED}\n")
    (tmp_path / "more.yaml").write_text(f"duration: 1s\nseed: 5\nprompts:\n  - prompt: {GREEN}\n")
    res = runner.invoke(app, ["render", "a.yaml", "-o", "a.mp4", "--lossless", "a.mkv", "--snapshot", "a.pt"])
    assert res.exit_code == 0, stderr_of(res)
    res = runner.invoke(app, ["resume", "a.pt", "--storyboard", "more.yaml", "-o", "ab.mp4", "--append",
                              "--lossless", "b.mkv", "--snapshot", "ab.pt", "--quiet"])
    assert res.exit_code == 0, stderr_of(res)
    assert probe_video("ab.mp4")["frames"] == 36 and probe_video("a.mp4")["frames"] == 20  # the original is kept
    res = runner.invoke(app, ["resume", "ab.pt", "-p", YELLOW, "-d", "1.5s", "-o", "abc.mp4", "--append",
                              "--lossless", "c.mkv", "--snapshot", "abc.pt"])
    assert res.exit_code == 0, stderr_of(res)
    assert "after frame 36" in stderr_of(res)
    assert probe_video("abc.mp4")["frames"] == 60
    snap = load_snapshot("abc.pt")
    assert [p.text for p in snap.storyboard.prompts] == [RED, GREEN, YELLOW]
    assert [p.start for p in snap.storyboard.prompts] == [0, 1.25, 2.25] and snap.storyboard.duration == 3.75
    assert snap.video["path"] == str((tmp_path / "abc.mp4").resolve()) and snap.video["first_frame"] == 0

    full = story("sink", 3.75, (0, RED), (1.25, GREEN), (2.25, YELLOW))
    render(full, tmp_path / "full.mkv", bundle=miniature)
    pieces = np.concatenate([read_video(f) for f in ("a.mkv", "b.mkv", "c.mkv")])
    assert np.array_equal(pieces, read_video("full.mkv"))
    # --append copies the original video (same encoder settings: a stream copy) and adds the continuation
    joined = read_video("abc.mp4")
    assert np.array_equal(joined[:36], read_video("ab.mp4"))
    # H.264 at 32x32 is lossy: the joined MP4 must be far closer to the exact pieces than to them out of step
    err = np.abs(joined.astype(int) - pieces.astype(int)).mean()
    shifted = np.abs(joined[1:].astype(int) - pieces[:-1].astype(int)).mean()
    assert err < 32 and err < 0.5 * shifted, (err, shifted)


# -- the combined timeline -------------------------------------------------------------------------------


def test_timeline_counts_from_the_end_of_the_snapshot():
    base = story("sink", 2.0, (0, RED), (1.5, GREEN))
    combined = extend_storyboard(base, more(3.0, (0, YELLOW), (1.0, RED)))
    assert [(p.start, p.end, p.text) for p in combined.prompts] == [
        (0, 1.5, RED), (1.5, 2.0, GREEN), (2.0, 3.0, YELLOW), (3.0, 5.0, RED)]
    assert combined.duration == 5.0 and combined.seed == base.seed and combined.memory == base.memory
    merged = extend_storyboard(base, prompt=GREEN, duration=1.0)
    assert [(p.start, p.end, p.text) for p in merged.prompts] == [(0, 1.5, RED), (1.5, 3.0, GREEN)]
    # a more.yaml may repeat the snapshot's settings but not change them (error on its line)
    same = parse_storyboard(f"seed: 5\nfps: 16\nduration: 1\nprompts:\n  - prompt: {RED}\n", "more.yaml")
    assert extend_storyboard(base, same).duration == 3.0
    for key, value, line in (("seed", "6", 1), ("fps", "24", 1), ("resolution", "64x64", 1),
                             ("memory", "{policy: window}", 1)):
        bad = parse_storyboard(f"{key}: {value}\nduration: 1\nprompts:\n  - prompt: {RED}\n", "more.yaml")
        with pytest.raises(StoryboardError, match=rf"^more.yaml:{line}: {key}: .* differs from the snapshot's"):
            extend_storyboard(base, bad)


# -- refusing bad snapshots ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_snapshot(miniature, tmp_path_factory):
    d = tmp_path_factory.mktemp("snap")
    render(story("sink", 0.5, (0, RED)), d / "a.mp4", bundle=miniature, snapshot=d / "a.pt")
    return d / "a.pt"


def _payload(path) -> dict:
    outer = torch.load(path, weights_only=True)
    return torch.load(io.BytesIO(outer["payload"].numpy().tobytes()), weights_only=True)


@pytest.mark.slow
def test_snapshots_with_retired_model_settings_still_resume(good_snapshot, miniature, tmp_path):
    """Snapshots written while ModelSettings still carried `window`/`sink` (never read) keep resuming."""
    payload = _payload(good_snapshot)
    payload["model"]["settings"] = {**payload["model"]["settings"], "window": 12, "sink": 3}
    old = tmp_path / "old.pt"
    old.write_bytes(encode_snapshot(payload))
    rep = resume(old, tmp_path / "b.mkv", prompt=GREEN, duration=0.5, bundle=miniature)
    ref = resume(good_snapshot, tmp_path / "c.mkv", prompt=GREEN, duration=0.5, bundle=miniature)
    assert rep.frames == ref.frames > 0
    assert np.array_equal(read_video(tmp_path / "b.mkv"), read_video(tmp_path / "c.mkv"))
    payload["model"]["settings"]["chunk_frames"] += 1  # a setting that matters is still checked
    (tmp_path / "other.pt").write_bytes(encode_snapshot(payload))
    with pytest.raises(SnapshotError):
        resume(tmp_path / "other.pt", tmp_path / "d.mkv", prompt=GREEN, duration=0.5, bundle=miniature)


def _resume_cli(snap, tmp_path, *extra):
    return runner.invoke(app, ["resume", str(snap), "-p", GREEN, "-d", "0.5", "-o", str(tmp_path / "o.mp4"),
                               "--quiet", *extra])


class Evil:
    """Unpickling this would create the marker file."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _refusals(good: bytes, tmp_path):
    """name -> (bytes, expected message part)."""
    payload = _payload(io.BytesIO(good))
    start = good.find(torch.load(io.BytesIO(good), weights_only=True)["payload"].numpy().tobytes()[:256])
    assert start > 0
    flipped = bytearray(good)
    for i in range(start + 1000, start + 1010):
        flipped[i] ^= 0xFF
    edited_outer = torch.load(io.BytesIO(good), weights_only=True)
    inner = io.BytesIO()
    edited = dict(payload, position=dict(payload["position"], chunk=payload["position"]["chunk"] + 1))
    torch.save(edited, inner)
    edited_outer["payload"] = torch.frombuffer(bytearray(inner.getvalue()), dtype=torch.uint8)
    unchecked = io.BytesIO()
    torch.save(edited_outer, unchecked)
    future = torch.load(io.BytesIO(good), weights_only=True)
    future["version"] = VERSION + 1
    future_bytes = io.BytesIO()
    torch.save(future, future_bytes)
    return {
        "truncated": (good[: len(good) // 2], "truncated or corrupted"),
        "flipped bytes": (bytes(flipped), "checksum mismatch"),
        "edited chunk, old checksum": (unchecked.getvalue(), "checksum mismatch"),
        "edited chunk, new checksum": (encode_snapshot(edited), "is inconsistent: chunk"),
        "future version": (future_bytes.getvalue(), f"format version {VERSION + 1}"),
        "not a snapshot": (b"duration: 3\nprompts: []\n", "not a slotgen snapshot"),
        "empty": (b"", "not a slotgen snapshot"),
    }


def test_bad_snapshots_are_refused_with_one_line(good_snapshot, tmp_path):
    good = good_snapshot.read_bytes()
    for name, (data, needle) in _refusals(good, tmp_path).items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        path.write_bytes(data)
        with pytest.raises(SnapshotError, match=needle):
            load_snapshot(path)
        line = assert_one_line_error(_resume_cli(path, tmp_path), needle)
        assert str(path) in line, name
        assert not (tmp_path / "o.mp4").exists()
    assert_one_line_error(_resume_cli(tmp_path / "missing.pt", tmp_path), "file not found")


def test_inspect_summary(good_snapshot, tmp_path):
    import json

    res = runner.invoke(app, ["inspect", str(good_snapshot), "--summary"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["format"] == FORMAT and summary["frames_emitted"] == 8 and summary["pending_frames"] == 1
    assert summary["policy"] == "sink" and summary["model"]["name"] == "miniature" and len(summary["model"]["digest"]) == 64
    (tmp_path / "bad.pt").write_bytes(b"nope")
    assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "bad.pt"), "--summary"]), "error: snapshot ")


def test_malicious_pickles_never_run(good_snapshot, tmp_path):
    Evil.marker = str(tmp_path / "PWNED")
    evil = Evil()
    raw = tmp_path / "raw.pt"  # a plain pickle, not even a zip: never unpickled
    raw.write_bytes(pickle.dumps({"format": FORMAT, "payload": evil}))
    outer = tmp_path / "outer.pt"  # the object in the outer container
    torch.save({"format": FORMAT, "version": VERSION, "sha256": "0", "payload": evil}, outer)
    inner = tmp_path / "inner.pt"  # in the payload, with a valid checksum
    buf = io.BytesIO()
    torch.save({"position": evil}, buf)
    import hashlib

    torch.save({"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                "payload": torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)}, inner)
    for path, needle in ((raw, "not a slotgen snapshot"), (outer, "refused"), (inner, "refused")):
        with pytest.raises(SnapshotError, match=needle):
            load_snapshot(path)
        assert_one_line_error(_resume_cli(path, tmp_path), needle)
        assert_one_line_error(runner.invoke(app, ["resume", str(path), "-o", str(tmp_path / "o.mp4")]), needle)
    assert not os.path.exists(Evil.marker)
    # and the check would have noticed: unpickling normally does run it
    pickle.loads(pickle.dumps(evil))
    assert os.path.exists(Evil.marker)


def test_other_model_is_refused(good_snapshot, tmp_path):
    from slotgen.models.miniature import write_miniature

    other = write_miniature(tmp_path / "other", seed=1)
    line = assert_one_line_error(_resume_cli(good_snapshot, tmp_path, "--model", str(other)), "was made with model")
    assert "digest" in line
    assert not (tmp_path / "o.mp4").exists()


def test_resume_usage_errors_are_one_line(good_snapshot, tmp_path):
    snap = str(good_snapshot)
    o = str(tmp_path / "o.mp4")
    (tmp_path / "more.yaml").write_text(f"seed: 9\nduration: 1\nprompts:\n  - prompt: {RED}\n")
    cases = [
        (["resume", snap, "-o", o, "--seed", "3"], "--seed cannot change on resume"),
        (["resume", snap, "-o", o, "--memory", "window"], "--memory cannot change on resume"),
        (["resume", snap, "-o", o, "--window", "4"], "--window cannot change on resume"),
        (["resume", snap, "-o", o, "--fps", "24"], "--fps cannot change on resume"),
        (["resume", snap, "-o", o, "--resolution", "64x64"], "--resolution cannot change on resume"),
        (["resume", snap, "-p", GREEN], "needs -o"),
        (["resume", snap, "-o", o, "-p", GREEN], "--prompt and --duration go together"),
        (["resume", snap, "-o", o, "-d", "2s"], "--prompt and --duration go together"),
        (["resume", snap, "-o", o, "-p", GREEN, "-d", "soon"], "--duration: expected a time"),
        (["resume", snap, "-o", o, "-p", GREEN, "-d", "0"], "--duration must be longer than 0s"),
        (["resume", snap, "-o", o, "-p", GREEN, "-d", "1", "-s", str(tmp_path / "more.yaml")], "either --storyboard"),
        (["resume", snap, "-o", o], "storyboard is complete"),
        (["resume", snap, "-o", o, "-s", str(tmp_path / "more.yaml")], "more.yaml:1: seed: 9 differs"),
        (["resume", snap, "-o", o, "-s", str(tmp_path / "nope.yaml")], "not found"),
        (["resume", snap, "-o", str(tmp_path / "nodir" / "o.mp4"), "-p", GREEN, "-d", "1"], "does not exist"),
        (["resume", snap, "-o", str(tmp_path / "o.mkv"), "-p", GREEN, "-d", "1", "--append"], "is not a .mkv like -o"),
        (["resume", snap, "-o", o, "-p", GREEN, "-d", "1", "--append-to", str(tmp_path / "x.mp4")], "does not exist"),
    ]
    for args, needle in cases:
        assert_one_line_error(runner.invoke(app, args), needle)
    assert not (tmp_path / "o.mp4").exists()


def test_append_checks_the_original_frame_count(good_snapshot, tmp_path):
    from slotgen.video.writer import open_writer

    with open_writer(tmp_path / "wrong.mp4", 16, (32, 32)) as w:
        w.write(np.zeros((5, 32, 32, 3), np.uint8))
    res = _resume_cli(good_snapshot, tmp_path, "--append-to", str(tmp_path / "wrong.mp4"))
    assert_one_line_error(res, "has 5 frames but the snapshot continues after frame 8")


# -- size ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy", policy_names())
def test_snapshot_size_does_not_grow_with_length(policy, miniature):
    """5 s and 20 s of video (both leave 1 pending frame) give the same snapshot size, up to noise.

    window/sink/bank are byte-for-byte the same size; slot's item count (hence per-tensor overhead)
    fluctuates within its token budget (measured: +1.2 % from 5 s to 20 s with the miniature's 3-frame
    chunks). A memory that grew with length would be ~4× larger at 20 s.
    """
    out = io.StringIO()
    rows = snapshot_sizes([5.0, 20.0], [policy], bundle=miniature, steps=1, out=out)
    short, long = rows
    geo = ChunkGeometry(miniature.settings.chunk_frames, miniature.settings.vae_stride_t)
    assert (short["chunks"], long["chunks"]) == (geo.num_chunks(80), geo.num_chunks(320))
    assert short["pending_frames"] == long["pending_frames"] == 1
    tolerance = 1.0 if policy != "slot" else 1.03
    assert long["bytes"] <= short["bytes"] * tolerance + 1024, out.getvalue()
    assert long["memory_bytes"] <= short["memory_bytes"] * tolerance
    assert long["history_frames"] <= short["history_frames"]
    assert f"{policy:>8}" in out.getvalue()
