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


def _load_storage(data: bytes):
    import torch
    return torch.load(io.BytesIO(data), weights_only=True)


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
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not a tensor, numpy "
                                     "array or torch_geometric object)")


def _plain(v):
    if hasattr(v, "detach") and hasattr(v, "numpy"):  # torch.Tensor
        v = v.detach().cpu().numpy()
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
