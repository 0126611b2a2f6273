"""Per-element reference energies (the composition-only linear baseline) and target statistics.

The fit solves ``E_g ≈ sum_Z n_gZ * e_Z`` by least squares over training graphs; the model
adds ``e_Z`` per atom and learns only the remainder. The same fit evaluated on the
validation split is the composition baseline that the demo reports beside the model.
Multi-source runs fit one table per source, on that source's training split only
(``fit_source_references``): sources computed with other DFT settings sit on other energy
scales, and each table absorbs its source's offsets. Graphs without an energy label are left
out of the energy fit, graphs without forces out of the force statistics.
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
    rows, energies, f_sq, f_count, seen = [], [], 0.0, 0, set()
    for start in range(0, len(chosen), read_batch):
        for s in store.get_many(chosen[start:start + read_batch]):
            where = f"graph {s.get('index')} of {getattr(store, 'path', 'the store')}"
            z = np.asarray(s["atomic_numbers"], dtype=np.int64)
            if z.max(initial=0) > max_z:
                raise ValueError(f"{where}: atomic number {int(z.max())} exceeds the model's max_z={max_z}")
            seen.update(np.unique(z).tolist())
            if s.get("forces") is not None:
                f = np.asarray(s["forces"], dtype=np.float64)
                if not np.isfinite(f).all():
                    raise ValueError(f"{where}: its forces are not finite; the store is damaged "
                                     f"(`gnnmegatron data info --verify` checks it), re-import the data")
                f_sq += float((f * f).sum())
                f_count += f.size
            if s.get("energy") is None:
                continue
            if not np.isfinite(float(s["energy"])):
                raise ValueError(f"{where}: its energy is {float(s['energy'])}; the store is damaged "
                                 f"(`gnnmegatron data info --verify` checks it), re-import the data")
            rows.append(np.bincount(z, minlength=max_z + 1))
            energies.append(float(s["energy"]))
    if not rows:
        raise ValueError(f"no training graphs with an energy label to fit reference energies on "
                         f"({len(chosen)} graphs read)")
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
        "elements": sorted(int(z) for z in seen),
        "graphs": int(len(rows)),
    }
    return torch.from_numpy(reference), stats


def fit_source_references(stores, indices, names, max_z: int, max_graphs: int = 20000):
    """Per-source reference energies: one least-squares fit per source on its own training graphs.

    Args:
        stores: one store per source (each with ``get_many``).
        indices: per source, its training graph indices (in its own store).
        names: the sources' names.
        max_z, max_graphs: as :func:`fit_reference_energies` (``max_graphs`` per source).

    Returns:
        (reference [S, max_z + 1] float64 tensor in eV, stats dict: ``elements`` (union), ``force_rms``
        (over all sources' force components), ``graphs`` (sum), ``residual_rms_per_atom`` (over all),
        and ``sources``: {name: that source's stats}).
    """
    if not (len(stores) == len(indices) == len(names)):
        raise ValueError(f"fit_source_references: {len(stores)} stores, {len(indices)} index sets and "
                         f"{len(names)} names; give one of each per source")
    tables, per = [], {}
    for store, idx, name in zip(stores, indices, names):
        try:
            ref, st = fit_reference_energies(store, idx, max_z, max_graphs=max_graphs)
        except ValueError as exc:
            raise ValueError(f"source {name!r}: {exc}") from exc
        tables.append(ref)
        per[name] = st
    graphs = sum(st["graphs"] for st in per.values())
    # force rms over all sources: weight each source's mean square by its graphs read (an estimate;
    # the model's energy_scale only needs the order of magnitude)
    f2 = sum(st["force_rms"] ** 2 * st["graphs"] for st in per.values()) / max(graphs, 1)
    res2 = sum(st["residual_rms_per_atom"] ** 2 * st["graphs"] for st in per.values()) / max(graphs, 1)
    stats = {
        "force_rms": float(np.sqrt(f2)),
        "residual_rms_per_atom": float(np.sqrt(res2)),
        "elements": sorted({z for st in per.values() for z in st["elements"]}),
        "graphs": int(graphs),
        "sources": per,
    }
    return torch.stack(tables), stats


def composition_energy(reference: torch.Tensor, atomic_numbers: torch.Tensor, batch: torch.Tensor,
                       num_graphs: int, source: torch.Tensor | None = None) -> torch.Tensor:
    """Composition-baseline energy per graph, [B] (eV): sum of reference energies of its atoms.

    ``reference`` is [max_z + 1], or [S, max_z + 1] with ``source`` [B] (each graph's source id).
    """
    reference = reference.to(atomic_numbers.device)
    if reference.dim() == 2:
        if source is None:
            raise ValueError("per-source reference energies need each graph's source id")
        per_atom = reference[source.index_select(0, batch), atomic_numbers]
    else:
        per_atom = reference[atomic_numbers]
    return torch.zeros(num_graphs, dtype=per_atom.dtype, device=per_atom.device).index_add_(0, batch, per_atom)
