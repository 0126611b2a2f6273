"""Collate structures into one graph-batch dict (the model's input).

A batch is a plain dict of torch tensors. B graphs, N atoms, E directed edges:

=================  ===========  =======  ======================================================
key                shape        dtype    meaning (unit)
=================  ===========  =======  ======================================================
atomic_numbers     [N]          int64    element of each atom
positions          [N, 3]       float    Cartesian coordinates (Å)
cell               [B, 3, 3]    float    lattice vectors as rows (Å), ASE convention; as given
                                         by the structure (zeros for molecules)
pbc                [B, 3]       bool     periodic axes
batch              [N]          int64    graph index of each atom (sorted)
ptr                [B+1]        int64    atom offsets: atoms of graph b are ptr[b]:ptr[b+1]
num_atoms          [B]          int64    atoms per graph
edge_index         [2, E]       int64    row 0 = dst (centre i, receiver), row 1 = src
                                         (neighbour j); global atom indices; sorted by dst,
                                         then src, then shift (CSR order)
edge_shift         [E, 3]       float    integer image multiples S: the edge vector is
                                         r_ij = positions[src] - positions[dst]
                                         + edge_shift @ cell[batch[dst]] (Å), 0 < |r_ij| < cutoff
energy             [B]          float    total energy (eV); 0 where has_energy is False  [targets]
has_energy         [B]          bool     the structure has an energy label          [targets]
forces             [N, 3]       float    forces (eV/Å); 0 for atoms of structures whose
                                         has_forces is False                       [targets]
has_forces         [B]          bool     the structure has force labels (all its atoms) [targets]
stress             [B, 3, 3]    float    stress (eV/Å^3), ASE sign: (1/V) dE/dstrain;
                                         zeros where has_stress is False           [targets]
has_stress         [B]          bool     the structure has a stress label          [targets]
source             [B]          int64    source (dataset) id
index              [B]          int64    graph index in the store
=================  ===========  =======  ======================================================

"float" is the ``dtype`` given to `collate` (float32 by default). Targets are per-structure
label masks: when any structure carries any label (energy, forces or stress), all six target
keys are present, each label filled with zeros where a structure lacks it and flagged by its
``has_*`` mask, so a batch may mix structures with and without energy, forces or stress (the
losses of ``gnnmegatron.training.losses`` average each term over the labelled structures only)
and every training batch has the same keys. A batch of bare structures (no label at all, e.g. for
inference) has none of them. The neighbour list is computed in float64 from the structures'
positions (`neighbors.radius_graph_pbc`) on the target device, before positions are cast to
``dtype``.

Shapes:
    B graphs, N atoms, E directed edges.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gnnmegatron.data.neighbors import radius_graph_pbc

__all__ = ["collate", "batch_to", "voigt_to_matrix"]


def voigt_to_matrix(stress):
    """ASE Voigt order (xx, yy, zz, yz, xz, xy) -> symmetric 3x3 matrix.

    Shapes:
        stress: [6] -> [3, 3].
    """
    xx, yy, zz, yz, xz, xy = np.asarray(stress, dtype=np.float64)
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def _field(s, name, where, shape=None, dtype=np.float64, required=True):
    value = s.get(name)
    if value is None:
        if required:
            raise ValueError(f"{where}: missing field {name!r}")
        return None
    arr = np.asarray(value, dtype=dtype)
    if shape is not None and (arr.ndim != len(shape)
                              or any(d != -1 and a != d for a, d in zip(arr.shape, shape))):
        want = "[" + ", ".join("n" if d == -1 else str(d) for d in shape) + "]"
        raise ValueError(f"{where}: field {name!r} has shape {list(arr.shape)}, expected {want}")
    return arr


def _parse(s, pos, where):
    """Validate one structure and return numpy arrays."""
    if not isinstance(s, Mapping):
        raise TypeError(f"{where}: expected a dict (see gnnmegatron.data.batch), got {type(s).__name__}; "
                        f"convert ase.Atoms with the store writer or build the dict yourself")
    z = _field(s, "atomic_numbers", where, (-1,), np.int64)
    n = len(z)
    out = dict(
        atomic_numbers=z,
        positions=_field(s, "positions", where, (n, 3)),
        cell=_field(s, "cell", where, (3, 3), required=False),
        pbc=_field(s, "pbc", where, None, bool, required=False),
        forces=_field(s, "forces", where, (n, 3), required=False),
        source=int(s.get("source", 0) or 0),
        index=int(s["index"]) if s.get("index") is not None else pos,
    )
    if out["cell"] is None:
        out["cell"] = np.zeros((3, 3))
    if out["pbc"] is None:
        out["pbc"] = np.zeros(3, bool)
    elif out["pbc"].ndim == 0:  # ASE allows a single bool for all axes
        out["pbc"] = np.full(3, bool(out["pbc"]))
    elif out["pbc"].shape != (3,):
        raise ValueError(f"{where}: field 'pbc' has shape {list(out['pbc'].shape)}, expected [3]")
    energy = s.get("energy")
    out["energy"] = None if energy is None else float(np.asarray(energy, dtype=np.float64).reshape(()))
    stress = s.get("stress")
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64)
        if stress.shape == (6,):
            stress = voigt_to_matrix(stress)
        elif stress.shape != (3, 3):
            raise ValueError(f"{where}: field 'stress' has shape {list(stress.shape)}, "
                             f"expected [3, 3] or Voigt [6]")
    out["stress"] = stress
    for name in ("positions", "forces", "stress", "cell"):
        if out[name] is not None and not np.isfinite(out[name]).all():
            raise ValueError(f"{where}: field {name!r} has non-finite values; fix or drop the structure")
    if out["energy"] is not None and not np.isfinite(out["energy"]):
        raise ValueError(f"{where}: field 'energy' is {out['energy']}; fix or drop the structure")
    return out


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to ``device``: on CUDA through pinned memory with a non-blocking copy (ordered on
    the current stream, so the neighbour search that follows sees the data; PyTorch's pinned-memory
    cache keeps the host buffer until the copy has run), elsewhere a plain ``to``."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def collate(structures: Sequence[Mapping], cutoff: float, dtype=torch.float32, device="cpu") -> dict:
    """Concatenate structures into one batch dict and build its neighbour list.

    Args:
        structures: structure dicts (numpy or array-like values): ``atomic_numbers`` [n],
            ``positions`` [n, 3] (Å), optional ``cell`` [3, 3] (Å, default zeros), ``pbc`` [3]
            (default False), ``energy`` (eV), ``forces`` [n, 3] (eV/Å), ``stress`` [3, 3] or
            Voigt [6] (eV/Å^3), ``source`` (default 0), ``index`` (default: list position).
        cutoff: neighbour-list radius (Å).
        dtype: float dtype of positions, cell, shifts and targets.
        device: where the tensors (and the neighbour search) live. On CUDA the host arrays are
            copied through pinned memory without blocking the host; the training loader calls this
            on a side stream of its prefetch thread, a step ahead.

    Returns:
        The batch dict documented in this module's docstring.

    Raises:
        ValueError: an empty list or a malformed field (names the structure and field).

    Shapes:
        See the module docstring (B = len(structures)).
    """
    if len(structures) == 0:
        raise ValueError("collate needs at least one structure")
    parsed = []
    for k, s in enumerate(structures):
        idx = s.get("index") if isinstance(s, Mapping) else None
        where = f"structure {k}" + (f" (store index {idx})" if idx is not None else "")
        parsed.append(_parse(s, k, where))
    device = torch.device(device)
    num_atoms = torch.tensor([len(p["atomic_numbers"]) for p in parsed], dtype=torch.long)
    pos64 = _to_device(torch.from_numpy(np.concatenate([p["positions"] for p in parsed]).reshape(-1, 3)), device)
    cell64 = _to_device(torch.from_numpy(np.stack([p["cell"] for p in parsed])), device)
    pbc = _to_device(torch.from_numpy(np.stack([p["pbc"] for p in parsed])), device)
    num_atoms = _to_device(num_atoms, device)
    batch_vec = torch.repeat_interleave(torch.arange(len(parsed), device=device), num_atoms)
    ptr = torch.cat([num_atoms.new_zeros(1), torch.cumsum(num_atoms, 0)])
    try:
        edge_index, edge_shift = radius_graph_pbc(pos64, cell64, pbc, batch_vec, cutoff, ptr=ptr)
    except ValueError as err:  # name the structure rather than the batch-local graph only
        raise ValueError(f"{err} [batch-local graph -> store index: "
                         f"{[p['index'] for p in parsed]}]") from err
    out = {
        "atomic_numbers": _to_device(torch.from_numpy(np.concatenate([p["atomic_numbers"] for p in parsed])), device),
        "positions": pos64.to(dtype),
        "cell": cell64.to(dtype),
        "pbc": pbc,
        "batch": batch_vec,
        "ptr": ptr,
        "num_atoms": num_atoms,
        "edge_index": edge_index,
        "edge_shift": edge_shift.to(dtype),
    }
    has = {name: [p[name] is not None for p in parsed] for name in ("energy", "forces", "stress")}
    if any(any(flags) for flags in has.values()):  # labelled: every target with its per-structure mask
        out["energy"] = torch.tensor([p["energy"] if p["energy"] is not None else 0.0 for p in parsed],
                                     dtype=dtype, device=device)
        forces = np.concatenate([p["forces"] if p["forces"] is not None else np.zeros((len(p["atomic_numbers"]), 3))
                                 for p in parsed]).reshape(-1, 3)
        out["forces"] = _to_device(torch.from_numpy(forces).to(dtype), device)  # cast on the host: fewer bytes to copy
        stress = np.stack([p["stress"] if p["stress"] is not None else np.zeros((3, 3)) for p in parsed])
        out["stress"] = _to_device(torch.from_numpy(stress).to(dtype), device)
        for name, flags in has.items():
            out[f"has_{name}"] = torch.tensor(flags, dtype=torch.bool, device=device)
    out["source"] = torch.tensor([p["source"] for p in parsed], dtype=torch.long, device=device)
    out["index"] = torch.tensor([p["index"] for p in parsed], dtype=torch.long, device=device)
    return out


def batch_to(batch: Mapping, device, non_blocking: bool = False) -> dict:
    """Move every tensor of a batch dict to ``device`` (other values are kept as they are).

    Shapes:
        Unchanged.
    """
    device = torch.device(device)
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
