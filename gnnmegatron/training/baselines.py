"""Per-element reference energies (the composition-only linear baseline) and target statistics.

The fit solves ``E_g ≈ sum_Z n_gZ * e_Z`` by least squares over training graphs; the model
adds ``e_Z`` per atom and learns only the remainder. The same fit evaluated on the
validation split is the composition baseline that the demo reports beside the model.
"""

from __future__ import annotations

import numpy as np
import torch


def _subset(indices: np.ndarray, max_graphs: int) -> np.ndarray:
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    if max_graphs and len(indices) > max_graphs:
        pick = np.linspace(0, len(indices) - 1, max_graphs).round().astype(np.int64)
        indices = indices[np.unique(pick)]
    return indices


def fit_reference_energies(store, indices, max_z: int, max_graphs: int = 20000, read_batch: int = 1024):
    """Least-squares per-element energies from (a deterministic, evenly spaced subset of) graphs.

    Args:
        store: a ``GraphStore`` (anything with ``get_many``).
        indices: graph indices of the training split.
        max_z: largest atomic number the model embeds.
        max_graphs: read at most this many graphs (0 = all).

    Returns:
        (reference [max_z + 1] float64 tensor in eV, stats dict with ``force_rms`` (eV/Å),
        ``residual_rms_per_atom`` (eV/atom), ``elements`` (list of Z) and ``graphs``).
    """
    chosen = _subset(indices, max_graphs)
    rows, energies, f_sq, f_count = [], [], 0.0, 0
    for start in range(0, len(chosen), read_batch):
        for s in store.get_many(chosen[start:start + read_batch]):
            z = np.asarray(s["atomic_numbers"], dtype=np.int64)
            if z.max(initial=0) > max_z:
                raise ValueError(f"structure with atomic number {int(z.max())} exceeds the model's max_z={max_z}")
            rows.append(np.bincount(z, minlength=max_z + 1))
            energies.append(float(s["energy"]))
            if s.get("forces") is not None:
                f = np.asarray(s["forces"], dtype=np.float64)
                f_sq += float((f * f).sum())
                f_count += f.size
    if not rows:
        raise ValueError("no training graphs to fit reference energies on")
    counts = np.stack(rows).astype(np.float64)
    energy = np.asarray(energies)
    present = np.flatnonzero(counts.sum(0) > 0)
    coef, *_ = np.linalg.lstsq(counts[:, present], energy, rcond=None)
    reference = np.zeros(max_z + 1)
    reference[present] = coef
    residual = (energy - counts @ reference) / counts.sum(1)
    stats = {
        "force_rms": float(np.sqrt(f_sq / f_count)) if f_count else 1.0,
        "residual_rms_per_atom": float(np.sqrt(np.mean(residual ** 2))),
        "elements": [int(z) for z in present],
        "graphs": int(len(rows)),
    }
    return torch.from_numpy(reference), stats


def composition_energy(reference: torch.Tensor, atomic_numbers: torch.Tensor, batch: torch.Tensor,
                       num_graphs: int) -> torch.Tensor:
    """Composition-baseline energy per graph, [B] (eV): sum of reference energies of its atoms."""
    per_atom = reference.to(atomic_numbers.device)[atomic_numbers]
    return torch.zeros(num_graphs, dtype=per_atom.dtype, device=per_atom.device).index_add_(0, batch, per_atom)
