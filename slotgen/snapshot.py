"""Snapshots: everything needed to continue a render later, bit for bit (see docs/SNAPSHOTS.md).

A snapshot is one file written by ``slotgen render --snapshot snap.pt`` (or automatically beside the
output when a render is interrupted) and read by ``slotgen resume`` and ``slotgen inspect``.

File layout (a standard ``torch.save`` zip, read only with ``torch.load(weights_only=True)``)::

    {"format": "slotgen-snapshot", "version": 1,
     "sha256": "<hex digest of payload bytes>",
     "payload": uint8 tensor}          # itself a torch.save of the state below

Checking ``format``/``version`` and the sha256 *before* unpickling the payload means a truncated,
corrupted or hand-edited snapshot (or one from a newer slotgen) is refused with a one-line reason,
and nothing in a snapshot is ever executed: both loads use the weights-only unpickler, which only
builds tensors and plain Python data, and a file that is not a zip archive is never unpickled at all.

The payload (format version 1) holds:

* ``model``: spec (``miniature`` or a folder), name, ``bundle.digest``, settings, layer count;
* ``storyboard``: the storyboard so far as YAML (``Storyboard.to_yaml()``);
* ``seed`` and ``options`` (seed, fps, width, height, steps, shift);
* ``position``: next chunk, frames emitted, storyboard frames, whether it was interrupted;
* ``prompt``/``prompt_index``: the prompt in force for the last chunk;
* ``engine``: ``StreamingEngine.state_dict()`` -- the memory policy's full state, the latent history
  a prompt-switch re-cache needs, and the VAE decoder's causal feature cache;
* ``pending``: frames decoded past the storyboard's end (a continuation emits them first);
* ``video``: where the frames so far were written (for ``resume --append``).

The noise of chunk ``c`` is seeded by ``(seed, c)``, so no RNG state is needed.

This module is the file format only: what writes a payload is :meth:`slotgen.render.Renderer.snapshot_payload`,
what continues one is :mod:`slotgen.resume`.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slotgen.atomic import atomic_write_bytes
from slotgen.errors import SlotgenError, SnapshotError
from slotgen.models.bundle import RETIRED_SETTINGS

FORMAT = "slotgen-snapshot"
VERSION = 1
SNAPSHOT_SUFFIX = ".snapshot.pt"  # an interrupted render writes <output>.snapshot.pt
_ZIP_MAGIC = b"PK\x03\x04"
ENGINE_OPTIONS = ("seed", "fps", "width", "height", "steps", "shift")
"""The engine options a snapshot records (a continuation must keep them)."""


def default_snapshot_path(output: str | Path) -> Path:
    """Where an interrupted render puts its snapshot unless told otherwise: ``<output>.snapshot.pt``."""
    output = Path(output)
    return output.with_name(output.name + SNAPSHOT_SUFFIX)


# ----------------------------------------------------------------------------------------------------
# The loaded form


@dataclass
class Snapshot:
    """A verified snapshot. ``engine_state`` is what ``StreamingEngine.load_state_dict`` takes."""

    path: str | None
    version: int
    created: str
    slotgen_version: str
    model: dict  # {"spec", "name", "digest", "settings", "num_layers", "transformer", "dtype", "device"}
    storyboard_yaml: str
    storyboard: Any  # slotgen.storyboard.Storyboard
    seed: int
    options: dict  # seed, fps, width, height, steps, shift
    chunk: int  # the next chunk to generate
    frames_emitted: int  # video frames written so far (the continuation's first frame index)
    total_frames: int  # frames of the snapshot's storyboard
    interrupted: bool
    prompt: str | None  # prompt in force for the last generated chunk
    prompt_index: int | None
    engine_state: dict
    pending: np.ndarray  # (N, H, W, 3) uint8, frames decoded past the storyboard's end
    video: dict = field(default_factory=dict)  # {"path", "first_frame", "lossless", "lossless_first_frame"}
    nbytes: int = 0  # size of the file
    source: str = ""  # the storyboard file the story was first rendered from

    @property
    def memory_state(self) -> dict:
        """The memory policy's full ``state_dict()``."""
        return self.engine_state["memory"]

    @property
    def memory(self):
        """The memory configuration (its policy's validated config, a ``PolicyConfig``)."""
        return self.storyboard.memory

    @property
    def policy(self) -> str:
        """The memory policy's name (``window``, ``sink``, ...)."""
        return self.storyboard.memory.policy

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def history_frames(self) -> list[int]:
        """Latent frames kept for a prompt-switch re-cache."""
        return [int(f) for f in self.engine_state["history_frames"]]

    @property
    def complete(self) -> bool:
        """True when every frame of the snapshot's storyboard was written."""
        return self.frames_emitted >= self.total_frames

    @property
    def seconds_emitted(self) -> float:
        return self.frames_emitted / self.options["fps"]

    def summary(self) -> dict:
        """JSON-serialisable facts about the snapshot (what ``slotgen inspect`` prints)."""
        return {
            "format": FORMAT,
            "version": self.version,
            "created": self.created,
            "slotgen_version": self.slotgen_version,
            "bytes": self.nbytes,
            "model": {k: self.model[k] for k in ("spec", "name", "digest", "num_layers")},
            "seed": self.seed,
            "options": dict(self.options),
            "policy": self.policy,
            "memory": self.memory.model_dump(),
            "chunk": self.chunk,
            "frames_emitted": self.frames_emitted,
            "seconds_emitted": self.seconds_emitted,
            "total_frames": self.total_frames,
            "complete": self.complete,
            "interrupted": self.interrupted,
            "pending_frames": int(len(self.pending)),
            "prompt": self.prompt,
            "history_frames": self.history_frames,
            "prompts": [{"start": p.start, "end": p.end, "text": p.text} for p in self.storyboard.prompts],
            "video": dict(self.video),
            "source": self.source,
        }


def snapshot_policy(snapshot: Snapshot):
    """The snapshot's memory policy with its state loaded (on the CPU).

    Needs no model: ``slotgen inspect`` uses it to call ``policy.stats()``.
    """
    from slotgen.memory import build_policy

    policy = build_policy(snapshot.memory, snapshot.num_layers)
    try:
        policy.load_state_dict(snapshot.memory_state, device="cpu")
    except SlotgenError:
        raise
    except Exception as e:  # noqa: BLE001 - a policy's own validation: ValueError, KeyError, ...
        raise SnapshotError(f"{_where(snapshot.path)}the memory state does not fit policy {snapshot.policy!r}: "
                            f"{_one_line(e)}") from None
    return policy


# ----------------------------------------------------------------------------------------------------
# Writing


def encode_snapshot(payload: dict) -> bytes:
    """Serialise a payload into the snapshot container (see the module docstring)."""
    inner = io.BytesIO()
    torch.save(payload, inner)
    data = inner.getvalue()
    outer = io.BytesIO()
    torch.save({
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(data).hexdigest(),
        "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }, outer)
    return outer.getvalue()


def write_snapshot(path: str | Path, payload: dict) -> Path:
    """Write a payload (see the module docstring) to ``path`` as a snapshot, atomically (temporary file + rename)."""
    return atomic_write_bytes(path, encode_snapshot(payload))


# ----------------------------------------------------------------------------------------------------
# Reading


def _where(path: str | None) -> str:
    return f"snapshot {path}: " if path else "snapshot: "


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _torch_load(data: bytes, path: str | None, what: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line SnapshotError."""
    import pickle

    where = _where(path)
    if not data.startswith(_ZIP_MAGIC):
        raise SnapshotError(f"{where}not a slotgen snapshot ({what} is not a PyTorch zip archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"unsupported (?:GLOBAL|global)[: ]+(?:GLOBAL )?([\w.]+)", str(e))
        if m:
            raise SnapshotError(f"{where}refused: {what} contains Python objects ({m.group(1)}) besides tensors and "
                                f"plain data; it was not executed (the file is corrupted or was crafted)") from None
        raise SnapshotError(f"{where}refused: {what} is corrupted or holds more than tensors and plain data "
                            f"(it was not executed)") from None
    except Exception as e:  # noqa: BLE001 - zip/format errors from torch: truncated or corrupted
        first = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise SnapshotError(f"{where}cannot be read ({what} is truncated or corrupted: {_one_line(first)})") from None


class _Check:
    """Structural checks on an untrusted payload: every failure is a one-line SnapshotError."""

    def __init__(self, path: str | None):
        self.where = _where(path)

    def fail(self, message: str) -> SnapshotError:
        return SnapshotError(f"{self.where}{message}")

    def get(self, d: Any, key: str, types: type | tuple, ctx: str = "") -> Any:
        if not isinstance(d, dict) or key not in d:
            raise self.fail(f"is missing {ctx}{key!r}")
        value = d[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self.fail(f"has a malformed {ctx}{key!r}")
        if not isinstance(value, types):
            raise self.fail(f"has a malformed {ctx}{key!r} (expected {_type_names(types)})")
        return value

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise self.fail(f"is inconsistent: {message}")


def _type_names(types: type | tuple) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


def decode_snapshot(data: bytes, path: str | None = None) -> Snapshot:
    """Verify and read snapshot bytes (see :func:`load_snapshot`)."""
    chk = _Check(path)
    outer = _torch_load(data, path, "the file")
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise chk.fail("not a slotgen snapshot (no 'slotgen-snapshot' format marker)")
    version = outer.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise chk.fail("has a malformed format version")
    if version > VERSION:
        raise chk.fail(f"was written by a newer slotgen (snapshot format version {version}; this slotgen reads "
                       f"version {VERSION}); upgrade slotgen to resume it")
    if version < 1:
        raise chk.fail(f"has an unknown snapshot format version {version}")
    digest = chk.get(outer, "sha256", str)
    payload_t = chk.get(outer, "payload", torch.Tensor)
    if payload_t.dtype != torch.uint8 or payload_t.ndim != 1:
        raise chk.fail("has a malformed payload")
    payload_bytes = payload_t.numpy().tobytes()
    if hashlib.sha256(payload_bytes).hexdigest() != digest:
        raise chk.fail("checksum mismatch: the snapshot was corrupted or edited after it was written")
    p = _torch_load(payload_bytes, path, "the payload")
    if not isinstance(p, dict):
        raise chk.fail("has a malformed payload")
    return _from_payload(p, version, path, len(data), chk)


def _from_payload(p: dict, version: int, path: str | None, nbytes: int, chk: _Check) -> Snapshot:
    from slotgen.engine.generator import ChunkGeometry
    from slotgen.errors import StoryboardError
    from slotgen.storyboard import parse_storyboard

    model = chk.get(p, "model", dict)
    for key, types in (("spec", str), ("name", str), ("digest", str), ("settings", dict), ("num_layers", int)):
        chk.get(model, key, types, "model ")
    sb_yaml = chk.get(p, "storyboard", str)
    try:
        storyboard = parse_storyboard(sb_yaml, f"{path or 'snapshot'} (storyboard)")
    except StoryboardError as e:
        raise chk.fail(f"has an invalid storyboard ({_one_line(e)})") from None
    seed = chk.get(p, "seed", int)
    options = chk.get(p, "options", dict)
    for key in ENGINE_OPTIONS:
        chk.get(options, key, (float, int) if key == "shift" else int, "options ")
    pos = chk.get(p, "position", dict)
    chunk = chk.get(pos, "chunk", int, "position ")
    frames_emitted = chk.get(pos, "frames_emitted", int, "position ")
    total = chk.get(pos, "total_frames", int, "position ")
    interrupted = chk.get(pos, "interrupted", bool, "position ")
    prompt = chk.get(p, "prompt", (str, type(None)))
    prompt_index = chk.get(p, "prompt_index", (int, type(None)))
    engine = chk.get(p, "engine", dict)
    for key, types in (("next_chunk", int), ("history_frames", list), ("history", list), ("memory", dict),
                       ("decoder", dict)):
        chk.get(engine, key, types, "engine ")
    chk.get(engine, "prompt", (str, type(None)), "engine ")
    pending_t = chk.get(p, "pending", torch.Tensor)
    video = chk.get(p, "video", dict)

    # -- consistency: the counters, the decoder, the storyboard and the options must tell one story ----
    s = model["settings"]
    try:
        geo = ChunkGeometry(int(s["chunk_frames"]), int(s["vae_stride_t"]))
    except (KeyError, TypeError, ValueError):
        raise chk.fail("has malformed model settings") from None
    dec = engine["decoder"]
    dec_frames, dec_latent = dec.get("frames_decoded"), dec.get("latent_frames_decoded")
    chk.require(chunk >= 0 and engine["next_chunk"] == chunk,
                f"chunk {chunk} but the engine is at chunk {engine['next_chunk']}")
    chk.require(dec_latent == chunk * geo.chunk_frames,
                f"chunk {chunk} but the decoder has decoded {dec_latent} latent frames "
                f"({geo.chunk_frames} per chunk)")
    chk.require(dec_frames == geo.first_frame(chunk),
                f"chunk {chunk} but the decoder has decoded {dec_frames} video frames")
    chk.require(0 <= frames_emitted <= total, f"{frames_emitted} frames emitted of a {total}-frame storyboard")
    chk.require(total == storyboard.total_frames,
                f"the storyboard has {storyboard.total_frames} frames, the position says {total}")
    chk.require(chunk == geo.num_chunks(frames_emitted), f"chunk {chunk} does not match {frames_emitted} frames emitted")
    chk.require(pending_t.dtype == torch.uint8 and pending_t.ndim == 4 and pending_t.shape[1:] ==
                (options["height"], options["width"], 3), "the pending frames do not match the resolution")
    chk.require(frames_emitted + pending_t.shape[0] == dec_frames,
                f"{frames_emitted} frames emitted + {pending_t.shape[0]} pending != {dec_frames} decoded")
    chk.require(seed == options["seed"] == storyboard.seed, "the seed differs between the storyboard and options")
    chk.require(options["fps"] == storyboard.fps, "the fps differs between the storyboard and options")
    chk.require(len(engine["history_frames"]) == len(engine["history"]), "the latent history is malformed")
    chk.require(all(isinstance(f, int) and 0 <= f < chunk * geo.chunk_frames for f in engine["history_frames"]),
                "the latent history holds frames that were never generated")
    chk.require(all(isinstance(t, torch.Tensor) for t in engine["history"]), "the latent history is malformed")
    mem_policy = engine["memory"].get("policy")
    chk.require(mem_policy == storyboard.memory.policy,
                f"the memory state is for policy {mem_policy!r}, the storyboard uses {storyboard.memory.policy!r}")
    chk.require((prompt is None) == (chunk == 0) and prompt == engine["prompt"], "the prompt in force is malformed")
    for key in ("path", "lossless"):
        chk.get(video, key, (str, type(None)), "video ")
    for key in ("first_frame", "lossless_first_frame"):
        chk.get(video, key, int, "video ")
    joins = video.get("joins", [])
    chk.require(isinstance(joins, list) and len(joins) <= 2, "the video's join records are malformed")
    for j in joins:
        chk.require(isinstance(j, dict) and isinstance(j.get("target"), str) and isinstance(j.get("segment"), str)
                    and isinstance(j.get("base"), (str, type(None))) and isinstance(j.get("frames"), int)
                    and not isinstance(j.get("frames"), bool) and 0 < j["frames"] <= frames_emitted,
                    "the video's join records are malformed")
        chk.require(Path(j["segment"]).name.startswith(".") and ".segment-" in Path(j["segment"]).name
                    and Path(j["segment"]).parent == Path(j["target"]).parent,
                    "a join record names a file that is not a segment beside its video")

    return Snapshot(
        path=path, version=version, created=str(p.get("created", "")),
        slotgen_version=str(p.get("slotgen_version", "")), model=model, storyboard_yaml=sb_yaml,
        storyboard=storyboard, seed=seed, options=dict(options), chunk=chunk, frames_emitted=frames_emitted,
        total_frames=total, interrupted=interrupted, prompt=prompt, prompt_index=prompt_index, engine_state=engine,
        pending=pending_t.numpy(), video=dict(video), nbytes=nbytes, source=str(p.get("storyboard_source", "")),
    )


def load_snapshot(path: str | Path) -> Snapshot:
    """Read and verify a snapshot file.

    Raises :class:`SnapshotError` (one line, exit code 2 in the CLI) for a missing, truncated,
    corrupted, hand-edited, future-version or unsafe file. Nothing in the file is executed.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {path}: file not found") from None
    except IsADirectoryError:
        raise SnapshotError(f"snapshot {path}: is a directory") from None
    except OSError as e:
        raise SnapshotError(f"snapshot {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    return decode_snapshot(data, str(path))


def check_model(snapshot: Snapshot, bundle) -> None:
    """Refuse to continue a snapshot with another model (weights digest or settings differ)."""
    want = snapshot.model["digest"]
    if bundle.digest != want:
        raise SnapshotError(
            f"{_where(snapshot.path)}was made with model {snapshot.model['name']!r} (digest {want[:12]}), "
            f"but the loaded model {bundle.name!r} has digest {bundle.digest[:12]}; pass --model with the original model"
        )
    recorded = {k: v for k, v in snapshot.model["settings"].items() if k not in RETIRED_SETTINGS}
    if bundle.settings.to_dict() != recorded:
        raise SnapshotError(f"{_where(snapshot.path)}was made with other settings for model {bundle.name!r} "
                            f"(chunking, VAE strides or text length changed)")
    recorded_phi = snapshot.model.get("slot_phi")
    if isinstance(recorded_phi, dict) and "digest" in recorded_phi:
        from slotgen.memory.phi_file import describe, phi_digest, phi_record

        if phi_digest(bundle.slot_phi) != recorded_phi["digest"]:
            raise SnapshotError(f"{_where(snapshot.path)}was rendered with slot φ {describe(recorded_phi)}, but the "
                                f"model now has φ {describe(phi_record(bundle))}; pass --slot-phi with the original φ")
    if len(bundle.transformer.blocks) != snapshot.num_layers:
        raise SnapshotError(f"{_where(snapshot.path)}has {snapshot.num_layers} layers of memory, the model has "
                            f"{len(bundle.transformer.blocks)}")


__all__ = ["FORMAT", "VERSION", "Snapshot", "check_model", "decode_snapshot", "default_snapshot_path",
           "encode_snapshot", "load_snapshot", "snapshot_policy", "write_snapshot"]
