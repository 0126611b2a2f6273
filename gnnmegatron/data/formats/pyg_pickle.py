"""Read the pickled torch_geometric ``Data`` records of OC20/OC22 LMDBs without torch_geometric.

fairchem's LMDBs (``preprocess_ef.py``: ``txn.put(str(i).encode("ascii"), pickle.dumps(data))``)
hold one pickled ``torch_geometric.data.Data`` per key, plus a pickled int under ``"length"``.
Two object layouts exist: PyG 1.x pickles keep the attributes (``pos``, ``cell``,
``atomic_numbers``, ``natoms``, ``tags``, ``fixed``, ``y`` or ``energy``, ``force`` or
``forces``, ``sid``, ``fid``, ...) in the object's ``__dict__``; PyG 2.x pickles keep them in
``__dict__["_store"]._mapping`` (a ``GlobalStorage``). :func:`loads` unpickles with a restricted
unpickler that maps every ``torch_geometric.*`` class to a plain stand-in, rebuilds tensors
through torch (``torch.load(..., weights_only=True)`` for the storages) and refuses any other
global, so a record can neither run code nor need torch_geometric. It returns the attributes as
a dict of numpy arrays / Python scalars.

Tensors are pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
with the storage as ``torch.storage._load_from_bytes(b)``, ``b`` being a legacy ``torch.save``
stream (three small pickles: magic number, protocol 1001, system info; the pickle of a storage
persistent id ``("storage", torch.FloatStorage, key, location, numel, ...)``; the list of storage
keys; then per storage an int64 element count and the raw little-endian data). That stream is
decoded here with numpy (about 10x faster than ``torch.load`` per tensor, which dominated the
reading of OC20 LMDBs); anything else falls back to ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle

import numpy as np


class _StandIn:
    """Placeholder for a torch_geometric class: keeps the pickled state and nothing else."""

    _pyg_name = "?"
    _state: dict | None = None  # set by __setstate__ (pickle skips it for an empty state)

    def __init__(self, *args, **kwargs):
        self._args = args
        self._state = dict(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self._state = dict(state) if isinstance(state, dict) else {"_value": state}

    def __setitem__(self, key, value):  # PyG storages are mappings
        self._state[key] = value


_STANDINS: dict[str, type] = {}


def _standin(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _STANDINS:
        _STANDINS[key] = type(name, (_StandIn,), {"_pyg_name": key})
    return _STANDINS[key]


_STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
                   "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
                   "BoolStorage": "?"}
_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _StorageUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a tensor storage")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        return pid[1].dtype, str(pid[2])


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


_HEADER = b""  # the header pickles (magic number, protocol, system info) of the last stream that had valid ones


def _load_storage(data: bytes):
    """A legacy torch.save of one storage -> 1-D numpy array (torch.load as the fallback).

    The stream's pickles are read by one restricted unpickler (one per pickle cost ~2 µs each, a
    third of the time of an OC20 record), and the three header pickles, the same in every stream a
    writer made, are compared as bytes with the last valid ones instead of being unpickled again.
    """
    global _HEADER
    try:
        f = io.BytesIO(data)
        u = _StorageUnpickler(f)
        if _HEADER and data.startswith(_HEADER):  # the same three header pickles as a stream checked before
            f.seek(len(_HEADER))
        else:
            magic, proto, sysinfo = u.load(), u.load(), u.load()
            if magic != _MAGIC or proto != 1001 or not isinstance(sysinfo, dict) \
                    or not sysinfo.get("little_endian", False):
                raise ValueError("not a little-endian legacy torch stream")
            _HEADER = data[:f.tell()]
        dtype, key = u.load()
        keys = u.load()
        if not isinstance(keys, list) or keys != [key]:
            raise ValueError("unexpected storage keys")
        numel = int.from_bytes(f.read(8), "little")
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise ValueError("truncated storage")
        return np.frombuffer(raw, dtype=dtype)
    except (pickle.UnpicklingError, ValueError, KeyError, EOFError, TypeError, AttributeError):
        import torch
        return torch.load(io.BytesIO(data), weights_only=True)


def _rebuild_tensor(storage, offset, size, stride, *rest):
    """``torch._utils._rebuild_tensor[_v2]`` for numpy storages (a torch storage goes through torch)."""
    if not isinstance(storage, np.ndarray):
        import torch._utils
        return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, *rest) if len(rest) >= 2 else \
            torch._utils._rebuild_tensor(storage, offset, size, stride)
    size, stride = tuple(int(x) for x in size), tuple(int(x) for x in stride)
    need = offset + (sum((n - 1) * st for n, st in zip(size, stride)) + 1 if all(size) else 0)
    if need > storage.size:
        raise ValueError(f"tensor of size {size} runs past its storage of {storage.size} elements")
    contiguous, step = True, 1
    for n, st in zip(reversed(size), reversed(stride)):
        contiguous &= n == 1 or st == step
        step *= n
    if contiguous:  # the common case: a slice, without as_strided (~10 µs per tensor)
        return storage[offset:offset + step].reshape(size).copy()
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[st * item for st in stride])
    return np.array(view)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("collections", "OrderedDict"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "slice"),
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch_geometric" or module.startswith("torch_geometric."):
            return _standin(module, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not a tensor, numpy "
                                     "array or torch_geometric object)")


def _plain(v):
    if hasattr(v, "detach") and hasattr(v, "numpy"):  # torch.Tensor (the fallback path)
        v = v.detach().cpu()
        v = (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def loads(data: bytes) -> dict:
    """Attributes of one pickled PyG ``Data`` record as {name: numpy array or scalar}.

    Raises:
        pickle.UnpicklingError / ValueError: not a pickled Data object (or it refers to other code).
    """
    obj = _Unpickler(io.BytesIO(data)).load()
    if isinstance(obj, dict):
        attrs = obj
    elif isinstance(obj, _StandIn):
        st = obj._state or {}
        store = st.get("_store")
        if isinstance(store, _StandIn):  # PyG >= 2.0: attributes in the GlobalStorage mapping
            attrs = (store._state or {}).get("_mapping", {})
        else:                            # PyG 1.x: attributes in __dict__
            attrs = {k: v for k, v in st.items() if not k.startswith("_")}
    else:
        raise ValueError(f"record is a pickled {type(obj).__name__}, not a torch_geometric Data object")
    return {k: _plain(v) for k, v in attrs.items() if v is not None}


__all__ = ["loads"]
