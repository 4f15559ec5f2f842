"""Counting host-device synchronisations and operator launches on any device, CPU included.

On CUDA a host sync stalls the Python thread until the GPU has caught up; a chunk loop that asks the
device for a value per layer runs at the speed of its launches, not of its kernels. On CPU nothing
stalls, so the syncs are invisible to a timer; this probe makes them countable anywhere::

    with SyncProbe() as probe:
        engine.generate_chunk(...)
    probe.syncs      # host syncs: .item/.tolist/.cpu/.numpy/bool()/int()/float() on tensors,
                     # nonzero, unique, boolean-mask indexing, torch.tensor from host data, ...
    probe.ops        # aten operator calls (≈ kernel launches on a GPU)
    probe.sources    # Counter of "what" → count, for finding them

Two mechanisms, deduplicated:

* a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten call: ops whose output
  size or value needs the data (``nonzero``, ``unique``, ``masked_select``, indexing with a boolean
  mask, ``repeat_interleave`` without an output size, ``_local_scalar_dense``, ``lift_fresh`` of a
  host tensor from ``torch.tensor``) count as syncs, every call counts as an op;
* ``torch.Tensor.item/tolist/cpu/numpy/__bool__/__int__/__float__/__index__`` are wrapped for the
  duration of the ``with`` block (and restored after), because on a CPU tensor ``.cpu()``,
  ``.tolist()`` or ``.numpy()`` never reach the dispatcher. A sync counted by a wrapper does not count
  again for the aten calls made inside it.

The probe is for tests and benchmarks; it watches the thread that entered it.
"""

from __future__ import annotations

import threading
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

# aten ops whose result size or value depends on device data: a device → host sync on CUDA
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "item",
    _aten.nonzero.default: "nonzero",
    _aten.nonzero_numpy.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique.default: "unique",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.is_nonzero.default: "bool",
    _aten.equal.default: "equal",
    _aten.allclose.default: "allclose",
    _aten.lift_fresh.default: "torch.tensor(host data)",
}

_WRAPPED = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)


class _Mode(TorchDispatchMode):
    def __init__(self, probe: "SyncProbe"):
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        p = self.probe
        p.ops += 1
        p.op_names[str(func.overloadpacket.__name__)] += 1
        what = _SYNC_OPS.get(func)
        if what is None and func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
                                     _aten._index_put_impl_.default) and _has_bool_index(args[1]):
            what = "boolean-mask index"
        if what is None and func in (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor) \
                and kwargs.get("output_size") is None:
            what = "repeat_interleave"
        if what is not None and p._inside == 0:
            p._count(what)
        return func(*args, **kwargs)


class SyncProbe:
    """Counts host syncs and aten ops in a ``with`` block (see the module docstring)."""

    def __init__(self) -> None:
        self.syncs = 0
        self.ops = 0
        self.sources: Counter[str] = Counter()
        self.op_names: Counter[str] = Counter()
        self._inside = 0
        self._saved: dict[str, object] = {}
        self._mode = _Mode(self)
        self._thread = None

    def _count(self, what: str) -> None:
        self.syncs += 1
        self.sources[what] += 1

    def reset(self) -> None:
        self.syncs = self.ops = 0
        self.sources.clear()
        self.op_names.clear()

    def _wrap(self, name: str):
        original = getattr(torch.Tensor, name)
        probe = self

        def wrapper(t, *args, **kwargs):
            counted = threading.get_ident() == probe._thread and probe._inside == 0
            if counted and not (name == "cpu" and t.device.type == "meta"):
                probe._count(f".{name.strip('_')}()")
            probe._inside += counted
            try:
                return original(t, *args, **kwargs)
            finally:
                probe._inside -= counted

        wrapper.__name__ = name
        return wrapper

    def __enter__(self) -> "SyncProbe":
        self._thread = threading.get_ident()
        for name in _WRAPPED:
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from the C base class
            setattr(torch.Tensor, name, self._wrap(name))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        self._saved.clear()
