"""``slot_phi.safetensors``: a learned slot projection φ for one model, in a file of its own.

SlotMemory groups a chunk's tokens by φ(k) (``slot_attention.py``). A φ learned for a model
(``slotgen train-slots``) is stored as::

    slot_phi.{layer}.weight      (D', H·D) float32, one per transformer layer (LinearPhi)
    metadata (safetensors header, strings):
        format        "slotgen-slot-phi"
        version       "1"
        model_digest  digest of the model it was trained on (ModelBundle.digest)
        model_name    its name
        layers, dim, width      L, D', H·D
        config        the training run's settings (JSON)

Which φ a render uses (:func:`attach_phi`): ``--slot-phi FILE``, else the model folder's own
``slot_phi.safetensors``, else a φ shipped inside the model's weights (the embedded miniature), else the
training-free one. The model's digest does not cover the file; snapshots record the φ's own
:func:`phi_digest` and a resume refuses another one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from slotgen.errors import ModelError
from slotgen.memory.slot_attention import LinearPhi

PHI_FILE = "slot_phi.safetensors"
FORMAT = "slotgen-slot-phi"
VERSION = 1
TRAINING_FREE = "training-free"


def phi_digest(phi: LinearPhi | None) -> str:
    """sha256 over φ's per-layer weights (shape, dtype, float32 bytes); ``"training-free"`` without one."""
    if phi is None:
        return TRAINING_FREE
    h = hashlib.sha256(b"slotgen.slot_phi/1")
    for w in phi.weights:
        t = w.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class PhiFile:
    """A φ read from a file, with what its header says."""

    phi: LinearPhi
    path: str
    model_digest: str
    model_name: str
    config: dict

    @property
    def digest(self) -> str:
        return phi_digest(self.phi)


def save_phi(path: str | Path, phi: LinearPhi, *, model_digest: str, model_name: str, config: dict) -> Path:
    """Write φ and its header to ``path`` atomically (mode as a plain file's)."""
    from safetensors.torch import save_file

    from slotgen.atomic import atomic_output

    tensors = {f"slot_phi.{layer}.weight": w.detach().to("cpu", torch.float32).contiguous()
               for layer, w in enumerate(phi.weights)}
    dim, width = phi.weights[0].shape
    meta = {"format": FORMAT, "version": str(VERSION), "model_digest": model_digest, "model_name": model_name,
            "layers": str(len(phi.weights)), "dim": str(dim), "width": str(width), "config": json.dumps(config, sort_keys=True)}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_phi(path: str | Path) -> PhiFile:
    """Read a φ file; anything that is not one is a one-line :class:`ModelError`."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"slot φ {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a file that is not one
        raise ModelError(f"slot φ {path}: not a safetensors file ({type(err).__name__})") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"slot φ {path}: not a slot φ file (its header lacks format {FORMAT!r}; write one with "
                         f"`slotgen train-slots`)")
    if int(meta.get("version", "0")) > VERSION:
        raise ModelError(f"slot φ {path}: format version {meta.get('version')} is newer than this slotgen reads ({VERSION})")
    try:
        layers = int(meta["layers"])
        config = json.loads(meta.get("config", "{}"))
    except (KeyError, ValueError):
        raise ModelError(f"slot φ {path}: malformed header") from None
    phi = LinearPhi.from_state_dict(tensors, layers)
    if phi is None or len(tensors) != layers:
        raise ModelError(f"slot φ {path}: its header says {layers} layers but it holds {len(tensors)} weights")
    return PhiFile(phi, str(path), meta.get("model_digest", ""), meta.get("model_name", "?"), config)


def check_phi(pf: PhiFile, bundle) -> None:
    """Refuse a φ that was not trained on ``bundle`` (digest) or does not fit its layers or key width."""
    layers = len(bundle.transformer.blocks)
    if len(pf.phi.weights) != layers:
        raise ModelError(f"slot φ {pf.path} has {len(pf.phi.weights)} layers but model {bundle.name!r} has {layers}")
    if pf.model_digest != bundle.digest:
        raise ModelError(f"slot φ {pf.path} was trained on model {pf.model_name!r} (digest {pf.model_digest[:12]}), "
                         f"not on {bundle.name!r} (digest {bundle.digest[:12]}); train one for this model with "
                         f"`slotgen train-slots`")
    cfg = bundle.transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    if pf.phi.weights[0].shape[1] != width:
        raise ModelError(f"slot φ {pf.path} reads keys of width {pf.phi.weights[0].shape[1]}, the model's are {width}")


def attach_phi(bundle, path: str | Path | None = None, folder: str | Path | None = None):
    """``bundle`` with the φ a render should use (module docstring): ``path`` if given, else ``folder``'s
    :data:`PHI_FILE` if it has one; otherwise ``bundle`` unchanged. Checks the file against the model."""
    if path is None and folder is not None and (Path(folder).expanduser() / PHI_FILE).is_file():
        path = Path(folder).expanduser() / PHI_FILE
    if path is None:
        return bundle
    if str(path) == TRAINING_FREE:
        return dataclasses.replace(bundle, slot_phi=None, slot_phi_source=TRAINING_FREE)
    pf = read_phi(path)
    check_phi(pf, bundle)
    device = bundle.device
    phi = LinearPhi([w.to(device) for w in pf.phi.weights])
    return dataclasses.replace(bundle, slot_phi=phi, slot_phi_source=str(Path(pf.path).resolve()))


def phi_for_snapshot(bundle, record: dict | None, path: str | Path | None = None):
    """``bundle`` with the φ a resume must use: ``path`` if given, else the one ``record`` (a snapshot's)
    names when the model's own differs from it: its file, or none (training-free). The digest check
    itself is :func:`slotgen.snapshot.check_model`'s."""
    if path is not None:
        return attach_phi(bundle, path)
    if not record or record.get("digest") == phi_digest(bundle.slot_phi):
        return bundle
    if record.get("digest") == TRAINING_FREE:
        return attach_phi(bundle, TRAINING_FREE)
    source = record.get("source")
    if source not in (None, "weights", TRAINING_FREE) and Path(source).is_file():
        return attach_phi(bundle, source)
    return bundle


def phi_record(bundle) -> dict:
    """What a snapshot records of the φ a render used: ``{"digest", "source"}``."""
    source = getattr(bundle, "slot_phi_source", None)
    if bundle.slot_phi is None:
        source = TRAINING_FREE
    return {"digest": phi_digest(bundle.slot_phi), "source": source or "weights"}


def describe(record: dict | None) -> str:
    """One phrase for ``inspect`` and the render's first lines: which φ, and its digest."""
    if not record:
        return "not recorded"
    if record["digest"] == TRAINING_FREE:
        return "training-free (normalised head-mean key)"
    where = "shipped in the model's weights" if record["source"] == "weights" else record["source"]
    return f"{where} (digest {record['digest'][:12]})"


__all__ = ["PHI_FILE", "PhiFile", "TRAINING_FREE", "attach_phi", "check_phi", "describe", "phi_digest", "phi_record",
           "read_phi", "save_phi"]
