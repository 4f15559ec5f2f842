"""Streaming VAE decode (bit-exact vs one-shot), atomic outputs, and the streaming video writers."""

from __future__ import annotations

import importlib.util
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from slotgen.atomic import atomic_output, atomic_write_bytes
from slotgen.errors import SlotgenError, SnapshotError
from slotgen.video.decoder import REP_MARKER, StreamingDecoder, frames_to_uint8
from slotgen.video.writer import (
    LosslessWriter,
    MP4Writer,
    append_videos,
    open_writer,
    probe_video,
    read_video,
)
from tests.helpers_video import noise_frames, partial_files, psnr, smooth_frames, tiny_vae

# reading videos back uses PyAV (a test extra), an independent decoder
needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV (av) is not installed")

T_LATENT = 7
CHUNKINGS = [[3, 3, 1], [1, 2, 4], [7], [3, 4], [1] * 7, [2, 5]]


@lru_cache(maxsize=None)
def _vae(base_dim: int, num_res_blocks: int = 1):
    return tiny_vae(base_dim=base_dim, num_res_blocks=num_res_blocks)


@lru_cache(maxsize=None)
def _case(base_dim: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised latents (1, 16, 7, h, w) and the one-shot reference decode (1, 3, 25, 8h, 8w)."""
    vae = _vae(base_dim)
    gen = torch.Generator().manual_seed(1000 * base_dim + 10 * h + w)
    latents = torch.randn(1, 16, T_LATENT, h, w, generator=gen)
    # the WanPipeline de-normalisation, written out independently of StreamingDecoder
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        ref = vae.decode(latents / inv_std + mean).sample
    return latents, ref


def _stream(dec: StreamingDecoder, latents: torch.Tensor, chunks: list[int]) -> list[torch.Tensor]:
    outs, start = [], 0
    for c in chunks:
        outs.append(dec.decode_chunk_float(latents[:, :, start : start + c]))
        start += c
    return outs


# ---------------------------------------------------------------------- streaming decoder


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("base_dim,h,w", [(3, 4, 6), (3, 5, 3), (8, 4, 4)])
def test_streaming_decode_is_bit_identical_to_one_shot(base_dim: int, h: int, w: int, chunks: list[int]) -> None:
    latents, ref = _case(base_dim, h, w)
    assert ref.shape == (1, 3, 1 + 4 * (T_LATENT - 1), 8 * h, 8 * w)
    dec = StreamingDecoder(_vae(base_dim))
    outs = _stream(dec, latents, chunks)
    # first chunk: 1 + 4 (T - 1) frames, later chunks: 4 T
    assert [o.shape[2] for o in outs] == [1 + 4 * (chunks[0] - 1)] + [4 * c for c in chunks[1:]]
    assert torch.equal(torch.cat(outs, dim=2), ref)
    assert dec.frames_decoded == ref.shape[2]
    assert dec.latent_frames_decoded == T_LATENT


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=lambda c: "-".join(map(str, c)))
def test_decode_frames_yields_each_latent_frame_bit_identically(chunks: list[int]) -> None:
    """``decode_frames`` (a live page's first frame before the rest of the chunk) yields one latent
    frame's frames at a time, equal to ``decode_chunk``'s, and leaves the same state."""
    latents, ref = _case(3, 4, 6)
    whole, pieces = StreamingDecoder(_vae(3)), StreamingDecoder(_vae(3))
    start = 0
    for c in chunks:
        part = list(pieces.decode_frames(latents[:, :, start : start + c]))
        assert len(part) == c and all(p.dtype == np.uint8 for p in part)
        assert np.array_equal(np.concatenate(part), whole.decode_chunk(latents[:, :, start : start + c]))
        assert (pieces.frames_decoded, pieces.latent_frames_decoded) == (whole.frames_decoded,
                                                                          whole.latent_frames_decoded)
        start += c
    assert whole.frames_decoded == ref.shape[2]


def test_fresh_cache_per_chunk_would_not_match() -> None:
    """Guard that the test case is sensitive to the carried cache (so bit-exactness means something)."""
    latents, ref = _case(3, 4, 6)
    dec = StreamingDecoder(_vae(3))
    first = dec.decode_chunk_float(latents[:, :, :3])
    dec.reset()
    dec.latent_frames_decoded = 3  # pretend we continued, but with an empty cache
    second = dec.decode_chunk_float(latents[:, :, 3:])
    assert torch.equal(first, ref[:, :, :9])
    assert not torch.equal(second, ref[:, :, 9:])


def test_frames_for_predicts_chunk_lengths() -> None:
    latents, _ = _case(3, 4, 6)
    dec = StreamingDecoder(_vae(3))
    assert dec.temporal_scale == 4
    for c in (3, 1, 3):
        expected = dec.frames_for(c)
        assert dec.decode_chunk(latents[:, :, :c]).shape[0] == expected
    assert dec.frames_decoded == 9 + 4 + 12


def test_uint8_frames_match_reference_conversion() -> None:
    latents, ref = _case(3, 5, 3)
    dec = StreamingDecoder(_vae(3))
    frames = np.concatenate([dec.decode_chunk(latents[:, :, :2]), dec.decode_chunk(latents[:, :, 2:])])
    expected = ((ref[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert frames.dtype == np.uint8 and frames.shape == (25, 40, 24, 3)
    assert np.array_equal(frames, expected)


def test_pixel_mapping_endpoints() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 1, 5).expand(1, 3, 1, 1, 5)
    out = frames_to_uint8(x)
    assert out.shape == (1, 1, 5, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_denormalize_matches_wan_pipeline_and_overrides() -> None:
    vae = _vae(3)
    latents = torch.randn(1, 16, 2, 3, 3)
    dec = StreamingDecoder(vae)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    assert torch.equal(dec.denormalize(latents), latents / (1.0 / std) + mean)
    torch.testing.assert_close(dec.denormalize(latents), latents * std + mean)
    custom = StreamingDecoder(vae, latents_mean=[0.5] * 16, latents_std=[2.0] * 16)
    assert torch.equal(custom.denormalize(latents), latents * 2.0 + 0.5)
    with pytest.raises(ValueError):
        StreamingDecoder(vae, latents_mean=[0.0] * 3)


def test_vae_internal_cache_is_untouched_and_vae_stays_usable() -> None:
    vae = _vae(3)
    latents, ref = _case(3, 4, 6)
    other, other_ref = _case(3, 5, 3)
    vae.clear_cache()
    feat_map = vae._feat_map
    dec = StreamingDecoder(vae)
    outs = [dec.decode_chunk_float(latents[:, :, :3])]
    assert vae._feat_map is feat_map and all(e is None for e in feat_map)
    # someone else uses the same VAE between our chunks
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        assert torch.equal(vae.decode(other / inv_std + mean).sample, other_ref)
    outs.append(dec.decode_chunk_float(latents[:, :, 3:]))
    assert torch.equal(torch.cat(outs, dim=2), ref)


def test_reset_starts_a_new_video() -> None:
    latents, ref = _case(3, 4, 6)
    dec = StreamingDecoder(_vae(3))
    _stream(dec, latents, [2, 2])
    dec.reset()
    assert dec.frames_decoded == 0 and dec.latent_frames_decoded == 0
    assert torch.equal(torch.cat(_stream(dec, latents, [4, 3]), dim=2), ref)


def test_input_validation() -> None:
    latents, _ = _case(3, 4, 6)
    dec = StreamingDecoder(_vae(3))
    with pytest.raises(ValueError):
        dec.decode_chunk(latents[:, :8])  # wrong channel count
    with pytest.raises(ValueError):
        dec.decode_chunk(torch.cat([latents, latents]))  # batch 2
    with pytest.raises(ValueError):
        dec.decode_chunk(latents[:, :, :0])  # empty
    dec.decode_chunk(latents[:, :, :1])
    with pytest.raises(ValueError):
        dec.decode_chunk(torch.randn(1, 16, 1, 5, 6))  # spatial size changed mid-video
    assert dec.latent_frames_decoded == 1


@pytest.mark.slow
def test_failure_mid_chunk_leaves_state_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    vae = tiny_vae(3)  # private instance: the test wraps its decoder's forward
    latents, ref = _case(3, 4, 6)
    dec = StreamingDecoder(vae)
    first = dec.decode_chunk_float(latents[:, :, :3])
    before = dec.state_dict()
    real_forward = vae.decoder.forward
    calls = {"n": 0}

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated out-of-memory")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(vae.decoder, "forward", flaky_forward)
    with pytest.raises(RuntimeError, match="simulated"):
        dec.decode_chunk_float(latents[:, :, 3:])
    assert dec.latent_frames_decoded == 3 and dec.frames_decoded == 9
    assert all(a is b for a, b in zip(dec.state_dict()["feat_cache"], before["feat_cache"]))
    rest = dec.decode_chunk_float(latents[:, :, 3:])  # retry succeeds (call 3 was the only failure)
    assert torch.equal(torch.cat([first, rest], dim=2), ref)


@pytest.mark.parametrize("split", [1, 3, 5])
def test_state_dict_roundtrip_resumes_bit_identically(split: int) -> None:
    latents, ref = _case(3, 4, 6)
    vae = _vae(3)
    dec = StreamingDecoder(vae)
    head = dec.decode_chunk_float(latents[:, :, :split])
    state = dec.state_dict()
    assert state["latent_frames_decoded"] == split and state["frames_decoded"] == head.shape[2]
    dec.decode_chunk_float(latents[:, :, split:])  # the original goes on; the snapshot must not change

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    if split == 1:  # after one latent frame the temporal upsamplers hold the "Rep" marker
        assert REP_MARKER in loaded["feat_cache"]
    else:
        assert REP_MARKER not in loaded["feat_cache"]

    resumed = StreamingDecoder(vae)
    resumed.load_state_dict(loaded)
    assert resumed.frames_decoded == head.shape[2]
    tail = resumed.decode_chunk_float(latents[:, :, split:])
    assert torch.equal(torch.cat([head, tail], dim=2), ref)


def test_state_dict_to_cpu_copy_and_rejections() -> None:
    latents, _ = _case(3, 4, 6)
    dec = StreamingDecoder(_vae(3))
    dec.decode_chunk_float(latents[:, :, :2])
    state = dec.state_dict(device="cpu")
    own = dec.state_dict()
    assert any(isinstance(e, torch.Tensor) for e in state["feat_cache"])
    assert all(
        (a is None and b is None) or a is not b for a, b in zip(state["feat_cache"], own["feat_cache"])
    )  # copies, not the live tensors

    other = StreamingDecoder(_vae(3, num_res_blocks=2))  # different architecture: more cache slots
    with pytest.raises(SnapshotError, match="another VAE"):
        other.load_state_dict(state)
    fresh = StreamingDecoder(_vae(3))
    with pytest.raises(SnapshotError):
        fresh.load_state_dict({**state, "feat_cache": state["feat_cache"][:-1]})
    with pytest.raises(SnapshotError):
        fresh.load_state_dict({**state, "feat_cache": ["bogus"] * len(state["feat_cache"])})
    with pytest.raises(SnapshotError):
        fresh.load_state_dict({"format": "something else"})
    assert fresh.latent_frames_decoded == 0  # refused states change nothing


# ---------------------------------------------------------------------- atomic outputs


def test_atomic_output_success_and_failure(tmp_path: Path) -> None:
    final = tmp_path / "data.bin"
    final.write_bytes(b"old")
    with atomic_output(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".data.partial-") and tmp.suffix == ".bin"
        tmp.write_bytes(b"new")
        assert final.read_bytes() == b"old"
    assert final.read_bytes() == b"new"

    with pytest.raises(KeyError):
        with atomic_output(final) as tmp:
            tmp.write_bytes(b"broken")
            raise KeyError("boom")
    assert final.read_bytes() == b"new"  # untouched
    assert partial_files(tmp_path) == []

    kept = tmp_path / "kept.bin"
    with pytest.raises(KeyError):
        with atomic_output(kept, keep_partial=True) as tmp:
            tmp.write_bytes(b"half")
            raise KeyError("boom")
    assert kept.read_bytes() == b"half"
    assert partial_files(tmp_path) == []


def test_atomic_write_bytes_and_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"1")
    atomic_write_bytes(target, b"22")
    assert target.read_bytes() == b"22"
    assert partial_files(tmp_path) == []
    with pytest.raises(SlotgenError, match="does not exist"):
        atomic_write_bytes(tmp_path / "nope" / "x.json", b"1")
    with pytest.raises(SlotgenError, match="directory"):
        with atomic_output(tmp_path):
            pass


# ---------------------------------------------------------------------- writers and readers


@needs_av
def test_mp4_writer_streams_a_browser_playable_h264(tmp_path: Path) -> None:
    w, h, n = 64, 48, 20
    frames = smooth_frames(n, w, h)
    path = tmp_path / "clip.mp4"
    with MP4Writer(path, fps=16, size=(w, h)) as writer:
        for chunk in np.split(frames, [1, 9]):  # 1 + 8 + 11 frames, like decoder chunks
            writer.write(chunk)
            assert not path.exists()  # nothing under the final name until close
            assert writer.tmp_path.parent == tmp_path and writer.tmp_path.name.startswith(".clip.partial-")
        assert writer.frames_written == n
    assert path.exists() and partial_files(tmp_path) == []
    info = probe_video(path)
    assert info == {"frames": n, "width": w, "height": h, "fps": 16.0, "codec": "h264", "pix_fmt": "yuv420p"}
    decoded = read_video(path)
    assert decoded.shape == (n, h, w, 3) and decoded.dtype == np.uint8
    assert psnr(decoded, frames) > 30
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")  # +faststart: index first, streamable


@needs_av
def test_lossless_writer_round_trips_exactly(tmp_path: Path) -> None:
    w, h = 33, 17  # odd sizes are fine for FFV1/RGB
    frames = noise_frames(6, w, h)
    path = tmp_path / "master.mkv"
    with LosslessWriter(path, fps=24, size=(w, h)) as writer:
        writer.write(frames[:2])
        writer.write(frames[2])  # a single (H, W, 3) frame
        writer.write(frames[3:])
    info = probe_video(path)
    assert (info["frames"], info["width"], info["height"], info["codec"]) == (6, w, h, "ffv1")
    assert info["fps"] == pytest.approx(24.0)
    assert np.array_equal(read_video(path), frames)


def test_writer_exception_removes_everything(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    with pytest.raises(RuntimeError, match="engine crashed"):
        with MP4Writer(path, fps=16, size=(32, 32)) as writer:
            writer.write(smooth_frames(5, 32, 32))
            raise RuntimeError("engine crashed")
    assert not path.exists()
    assert partial_files(tmp_path) == []


@needs_av
def test_writer_keep_partial_on_error_finalises_playable_file(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    with pytest.raises(RuntimeError):
        with MP4Writer(path, fps=16, size=(32, 32), keep_partial_on_error=True) as writer:
            writer.write(smooth_frames(5, 32, 32))
            raise RuntimeError("engine crashed")
    assert probe_video(path)["frames"] == 5
    assert read_video(path).shape == (5, 32, 32, 3)
    assert partial_files(tmp_path) == []


@needs_av
def test_writer_abort_close_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "a.mp4"
    writer = MP4Writer(path, fps=16, size=(32, 32))
    writer.write(smooth_frames(3, 32, 32))
    writer.abort()
    writer.abort()  # idempotent
    assert not path.exists() and partial_files(tmp_path) == []

    empty = MP4Writer(tmp_path / "empty.mp4", fps=16, size=(32, 32))
    with pytest.raises(ValueError, match="no frames"):
        empty.close()
    assert list(tmp_path.iterdir()) == []

    writer = MP4Writer(path, fps=16, size=(32, 32))
    with pytest.raises(ValueError):
        writer.write(np.zeros((2, 32, 30, 3), np.uint8))  # wrong size
    with pytest.raises(ValueError):
        writer.write(np.zeros((2, 32, 32, 3), np.float32))  # wrong dtype
    writer.write(np.zeros((2, 32, 32, 3), np.uint8))
    assert writer.close() == path and writer.close() == path
    assert probe_video(path)["frames"] == 2

    with pytest.raises(SlotgenError, match="even"):
        MP4Writer(tmp_path / "odd.mp4", fps=16, size=(33, 32))
    with pytest.raises(SlotgenError, match="does not exist"):
        MP4Writer(tmp_path / "missing" / "x.mp4", fps=16, size=(32, 32))
    with pytest.raises(SlotgenError, match="fps"):
        LosslessWriter(tmp_path / "x.mkv", fps=0, size=(32, 32))


@needs_av
def test_open_writer_picks_by_extension(tmp_path: Path) -> None:
    with open_writer(tmp_path / "a.MP4", 8, (16, 16)) as writer:
        assert isinstance(writer, MP4Writer)
        writer.write(smooth_frames(2, 16, 16))
    with open_writer(tmp_path / "b.mkv", 8, (15, 15)) as writer:
        assert isinstance(writer, LosslessWriter)
        writer.write(smooth_frames(2, 15, 15))
    assert probe_video(tmp_path / "b.mkv")["codec"] == "ffv1"
    with pytest.raises(SlotgenError, match="extension"):
        open_writer(tmp_path / "c.avi", 8, (16, 16))
    with pytest.raises(SlotgenError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")


def _write_mp4(path: Path, frames: np.ndarray, **kwargs) -> None:
    with MP4Writer(path, fps=16, size=(frames.shape[2], frames.shape[1]), **kwargs) as writer:
        writer.write(frames)


@pytest.mark.slow
@needs_av
def test_append_videos(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    _write_mp4(a, smooth_frames(9, 48, 32))
    _write_mp4(b, smooth_frames(12, 48, 32, offset=9))
    _write_mp4(c, smooth_frames(4, 48, 32, offset=21), crf=30)  # other encoder settings
    decoded_a, decoded_b = read_video(a), read_video(b)

    # same settings: lossless stream copy, so decoded frames are exactly the inputs' decoded frames
    out = append_videos(a, b, tmp_path / "ab.mp4")
    info = probe_video(out)
    assert (info["frames"], info["width"], info["height"], info["codec"]) == (21, 48, 32, "h264")
    assert info["pix_fmt"] == "yuv420p" and info["fps"] == 16.0
    assert np.array_equal(read_video(out), np.concatenate([decoded_a, decoded_b]))

    # different settings: re-encoded, still the sum of frames
    out2 = append_videos(out, c, tmp_path / "abc.mp4")
    assert probe_video(out2)["frames"] == 25
    assert psnr(read_video(out2)[:21], read_video(out)) > 30

    forced = append_videos(a, b, tmp_path / "forced.mp4", mode="reencode")
    assert probe_video(forced)["frames"] == 21

    append_videos(a, b, a)  # in place: atomic, so reading `a` while writing is safe
    assert probe_video(a)["frames"] == 21
    assert partial_files(tmp_path) == []

    _write_mp4(tmp_path / "small.mp4", smooth_frames(3, 32, 32))
    with pytest.raises(SlotgenError, match="sizes differ"):
        append_videos(b, tmp_path / "small.mp4", tmp_path / "bad.mp4")
    with pytest.raises(SlotgenError, match="does not exist"):
        append_videos(b, tmp_path / "missing.mp4", tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists() and partial_files(tmp_path) == []


def test_starting_ffmpeg_while_another_thread_holds_pyav_objects_does_not_hang(tmp_path) -> None:
    """ffmpeg starts with no Python code in the forked child: one run there (imageio-ffmpeg's
    ``preexec_fn``) frees the other threads' objects, and a PyAV frame reformatter among them waits
    forever for codec threads the fork did not copy; the writer then hangs in ``Popen`` (the live
    tests stalled so in long test runs, after ``read_video``). ffmpeg leads a session of its own, so a
    Ctrl-C at the terminal reaches slotgen only."""
    import os
    import threading

    import av

    from slotgen.video.writer import MP4Writer, open_writer

    src = tmp_path / "src.mkv"
    with open_writer(src, 16, (64, 64)) as w:
        w.write(np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8))
    ready, done, result = threading.Event(), threading.Event(), {}

    def hold():  # a reformatter (with its slice threads) referenced only from this thread's frame
        with av.open(str(src)) as container:
            frame = next(container.decode(video=0))
            scaled = frame.reformat(width=48, height=48, format="rgb24")  # noqa: F841
        ready.set()
        done.wait()

    def write():
        with MP4Writer(tmp_path / "out.mp4", 16, (64, 64)) as w:
            result["own session"] = os.getsid(w._proc.pid) == w._proc.pid
            w.write(np.zeros((2, 64, 64, 3), np.uint8))
        result["written"] = True

    holder = threading.Thread(target=hold)
    holder.start()
    ready.wait(30)
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(60)
    done.set()
    holder.join(30)
    assert result == {"own session": True, "written": True}
