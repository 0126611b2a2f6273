"""Batched inference over a graph store or an ASE-readable file, with errors against references.

``predict(model, inputs, "preds.npz")`` runs the model over every structure of ``inputs``
(batches filled up to ``batch_atoms`` atoms, a tqdm bar showing atoms/s) and writes two files:

``preds.npz`` (numpy, ragged per-atom arrays concatenated in input order; G structures, N atoms):

=========================  =========  =========================================================
key                        shape      meaning (unit)
=========================  =========  =========================================================
index                      [G]        graph index in the store, or frame number in the file
num_atoms                  [G]        atoms per structure
atom_offsets               [G+1]      atoms of structure g are atom_offsets[g]:atom_offsets[g+1]
atomic_numbers             [N]        elements
energy                     [G]        predicted energy (eV)
forces                     [N, 3]     predicted forces (eV/Å)
stress                     [G, 3, 3]  predicted stress (eV/Å^3, ASE sign); conservative models
                                      only, NaN for structures not periodic along all axes
ref_energy                 [G]        reference energy (eV), NaN where the input has none
ref_forces                 [N, 3]     reference forces (eV/Å), NaN where the input has none
ref_stress                 [G, 3, 3]  reference stress (eV/Å^3), NaN where the input has none
energy_error_per_atom      [G]        (predicted - reference) / num_atoms (eV/atom), NaN if no ref
force_mae                  [G]        mean |predicted - reference| over the 3n force components
                                      of each structure (eV/Å), NaN if no reference
stress_mae                 [G]        mean |predicted - reference| over the 9 components
                                      (eV/Å^3), NaN if either is missing
=========================  =========  =========================================================

``preds.json``: the summary ``predict`` returns: counts, ``energy_mae_per_atom`` (mean over
structures of |error| per atom), ``energy_rmse_per_atom``, ``force_mae`` and ``force_rmse`` (over
all force components of all structures with references) and ``stress_mae``, computed by the
trainer's ``ErrorAccumulator`` (gnnmegatron/training/losses.py), so they mean what validation's
numbers mean; timing (``atoms_per_s``), model, weights (``ema``: the moving average of the
weights, the default when the checkpoint has one; ``raw``) and input.

Reading it back::

    p = np.load("preds.npz"); g = 3
    forces_g = p["forces"][p["atom_offsets"][g]:p["atom_offsets"][g + 1]]
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["batches_by_atoms", "format_summary", "iter_input_structures", "predict", "run_split_indices"]

_STORE_READ_GRAPHS = 1024  # graphs read per get_many call: the store decodes each chunk once per call


def _is_graph_store(path: Path) -> bool:
    if not path.is_dir():
        return False
    try:
        import zarr

        from gnnmegatron.data.schema import STORE_FORMAT

        return dict(zarr.open_group(str(path), mode="r").attrs).get("format") == STORE_FORMAT
    except Exception:
        return False


def iter_input_structures(inputs, *, indices: Sequence[int] | None = None, index: str = ":",
                          format: str | None = None) -> tuple[Iterator[dict], int | None, str]:
    """Structure dicts of ``inputs`` in order, with ``index`` set: (iterator, atom total or None, description).

    ``inputs``: a graph store directory (``indices`` selects graphs, default all), an ASE-readable
    file (``index`` / ``format`` as in ``ase.io.iread``), or a sequence of ``ase.Atoms`` / structure dicts.
    """
    from gnnmegatron.data.importers import atoms_to_structure, iter_frames

    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if _is_graph_store(path):
            from gnnmegatron.data.store import GraphStore

            store = GraphStore(path)
            idx = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
            total = int(store.atom_counts[idx].sum()) if len(idx) else 0

            def from_store():
                for start in range(0, len(idx), _STORE_READ_GRAPHS):
                    yield from store.get_many(idx[start:start + _STORE_READ_GRAPHS])
            return from_store(), total, f"graph store {path} ({len(idx)} graphs)"
        if not path.exists() and "://" not in str(inputs):
            raise FileNotFoundError(f"input {path} does not exist; give a graph store or an ASE-readable file")
        if indices is not None:
            raise ValueError("indices= selects graphs of a graph store; for files use index= (ASE syntax)")
        from gnnmegatron.data.formats.ase_files import parse_index

        parse_index(index)  # a bad selection is an error naming it, before the model runs

        def from_file():
            from ase.io.formats import UnknownFileTypeError

            try:
                for k, (label, atoms) in enumerate(iter_frames(str(inputs), index=index, format=format)):
                    yield dict(atoms_to_structure(atoms), index=k, label=label)
            except (UnknownFileTypeError, OSError, RuntimeError) as exc:  # ASE's readers: unknown type, bad frame
                kind = "unknown file type" if isinstance(exc, UnknownFileTypeError) else type(exc).__name__
                what = (f"a directory that is not a graph store (`gnnmegatron data info {inputs}` says why) and "
                        f"cannot be read by ASE" if path.is_dir() else "cannot be read as an ASE file")
                raise ValueError(f"input {inputs}: {what} ({kind}: {exc}); give a graph store or an ASE-readable "
                                 f"file (format={format or 'from the name'})") from None
        return from_file(), None, f"file {inputs} (index {index!r})"
    if isinstance(inputs, Iterable):
        items = list(inputs)

        def from_items():
            for k, item in enumerate(items):
                s = atoms_to_structure(item) if hasattr(item, "get_positions") else dict(item)
                s.setdefault("index", k)
                yield s
        total = sum(len(s["atomic_numbers"]) if isinstance(s, dict) else len(s) for s in items)
        return from_items(), total, f"{len(items)} structures"
    raise TypeError(f"inputs must be a store path, a file path or a sequence of structures, got {type(inputs).__name__}")


def run_split_indices(config: dict, store_path, split: str, source: str | None = None) -> np.ndarray:
    """Graph indices of split ``split`` of a training run, as ``Trainer`` computes them.

    Args:
        config: the run's pretraining config as a dict (``ModelInfo.config``).
        store_path: the graph store the run trained on (for a multi-source run: that source's store).
        split: ``"train"`` (after ``data.train_fraction``), ``"val"`` or ``"test"``.
        source: a multi-source run's source name (each has its own split of its own store).
    """
    from gnnmegatron.data.store import GraphStore, split_indices
    from gnnmegatron.training.runtime import nested_subset

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    data = config.get("data") or {}
    if "splits" not in data:
        raise ValueError("the checkpoint's config has no data.splits; pass indices= instead of split=")
    if not _is_graph_store(Path(store_path)):
        raise ValueError(f"split= needs the run's graph store as inputs, got {store_path}")
    splits, seed, fraction, trained_on = data["splits"], data.get("split_seed", 0), data.get("train_fraction", 1.0), \
        data.get("store")
    if data.get("sources"):
        names = [e.get("name") for e in data["sources"]]
        if source is None:
            raise ValueError(f"the run trained on several sources {names}, each split on its own; give source=NAME "
                             f"(--source) with split=")
        if source not in names:
            from gnnmegatron.inference.loading import UnknownSourceError

            raise UnknownSourceError(f"unknown source {source!r}; the run's sources are {names}")
        entry = data["sources"][names.index(source)]
        trained_on = entry.get("store")
        splits = entry.get("splits") or splits
        seed = entry.get("split_seed") if entry.get("split_seed") is not None else seed
        fraction = entry.get("train_fraction", 1.0)
    if trained_on and Path(trained_on).resolve() != Path(store_path).resolve():
        print(f"warning: the model was trained on {trained_on}, splitting {store_path} the same way", file=sys.stderr)
    parts = split_indices(len(GraphStore(store_path)), splits, seed=seed)
    if split == "train":
        return nested_subset(parts["train"], fraction, seed)
    return parts[split]


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines of a ``predict`` summary (for the command line)."""
    def fmt(key, scale, unit, digits):
        v = summary.get(key)
        return "n/a" if v is None else f"{scale * v:.{digits}f} {unit}"

    return "\n".join([
        f"predicted {summary['structures']} structures ({summary['atoms']} atoms) in {summary['seconds']:.1f} s "
        f"({summary['atoms_per_s']:,.0f} atoms/s) on {summary['device']} ({summary['dtype']})",
        f"  energy MAE {fmt('energy_mae_per_atom', 1000, 'meV/atom', 2)} over {summary['with_energy']} structures "
        f"with a reference; force MAE {fmt('force_mae', 1000, 'meV/Å', 1)} over {summary['with_forces']}; "
        f"stress MAE {fmt('stress_mae', 1000, 'meV/Å^3', 3)} over {summary['with_stress']}",
        f"  wrote {summary['out']} and {Path(summary['out']).with_suffix('.json')}",
    ])


def batches_by_atoms(structures: Iterator[dict], batch_atoms: int) -> Iterator[list[dict]]:
    """Consecutive structures up to ``batch_atoms`` atoms (a larger structure goes alone)."""
    batch, atoms = [], 0
    for s in structures:
        n = len(s["atomic_numbers"])
        if batch and atoms + n > batch_atoms:
            yield batch
            batch, atoms = [], 0
        batch.append(s)
        atoms += n
    if batch:
        yield batch


def _ref(value, shape) -> np.ndarray:
    if value is None:
        return np.full(shape, np.nan)
    arr = np.asarray(value, dtype=np.float64)
    if shape == (3, 3) and arr.shape == (6,):
        from gnnmegatron.data.batch import voigt_to_matrix

        arr = voigt_to_matrix(arr)
    return arr.reshape(shape)


def _labels(structs: list[dict], batch: dict, periodic: np.ndarray) -> dict[str, torch.Tensor]:
    """The reference labels of a batch of input structures, as ``ErrorAccumulator`` reads them (CPU,
    float64, zeros where a structure has none, ``has_*`` masks; stress only on periodic cells)."""
    n = [len(s["atomic_numbers"]) for s in structs]
    energy = np.array([np.nan if s.get("energy") is None else float(s["energy"]) for s in structs])
    forces = [_ref(s.get("forces"), (k, 3)) for s, k in zip(structs, n)]
    stress = np.stack([_ref(s.get("stress"), (3, 3)) for s in structs])
    has_f = np.array([bool(np.isfinite(f).all()) for f in forces])
    has_s = np.isfinite(stress).all(axis=(1, 2)) & periodic
    return {"num_atoms": batch["num_atoms"].cpu(), "batch": batch["batch"].cpu(),
            "energy": torch.from_numpy(np.nan_to_num(energy)), "has_energy": torch.from_numpy(np.isfinite(energy)),
            "forces": torch.from_numpy(np.nan_to_num(np.concatenate(forces))), "has_forces": torch.from_numpy(has_f),
            "stress": torch.from_numpy(np.nan_to_num(stress)), "has_stress": torch.from_numpy(has_s)}


def _name(s: dict, k: int) -> str:
    """How an error names a structure: its frame in the file ("frame 3"), else its index in the input."""
    return s.get("label") or f"structure {s.get('index', k)}"


def _structure_named(exc: Exception, structs: list[dict]) -> str:
    """``exc``'s message with its batch-local "graph K"/"structure K" replaced by the structure's name
    (and collate's batch-to-store index note dropped: the name says it)."""
    import re

    def name(m):
        k = int(m.group(2))
        return _name(structs[k], k) if k < len(structs) else m.group(0)
    text = re.sub(r" \[batch-local graph -> store index: .*\]$", "", str(exc))
    return re.sub(r"\b(graph|structure) (\d+)", name, text, count=1)


def _refuse_close_atoms(batch: dict, structs: list[dict], input_desc: str) -> None:
    """ValueError for atoms closer than ``MIN_DISTANCE`` (as the stores refuse at import)."""
    from gnnmegatron.data.schema import MIN_DISTANCE

    ei = batch["edge_index"]
    if ei.shape[1] == 0:
        return
    cell = batch["cell"].double()[batch["batch"][ei[0]]]
    vec = (batch["positions"].double()[ei[1]] - batch["positions"].double()[ei[0]]
           + torch.einsum("ek,ekl->el", batch["edge_shift"].double(), cell))
    d = torch.linalg.vector_norm(vec, dim=1)
    close = d < MIN_DISTANCE
    if bool(close.any()):
        e = int(torch.nonzero(close)[0, 0])
        i, j = int(ei[0, e]), int(ei[1, e])
        g = int(batch["batch"][i])
        start = int(batch["ptr"][g])
        raise ValueError(f"{input_desc}: {_name(structs[g], g)}: atoms {i - start} and {j - start} are "
                         f"{float(d[e]):.3g} Å apart, closer than {MIN_DISTANCE} Å; the structure is broken")


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def predict(model_path, inputs, out_path, *, batch_atoms: int = 4096, device: str | torch.device | None = None,
            dtype: torch.dtype | str | None = None, indices: Sequence[int] | None = None,
            split: str | None = None, index: str = ":", format: str | None = None, progress: bool = True,
            trust: bool = False, source: str | None = None, weights: str | None = None,
            best: bool = False) -> dict[str, Any]:
    """Predicts energies, forces (and stress) for every structure of ``inputs``; writes .npz + .json.

    Args:
        model_path: checkpoint file, run directory (latest checkpoint) or an ``AtomisticModel``.
        inputs: graph store directory, ASE-readable file, or a sequence of ``ase.Atoms``/structure dicts.
        out_path: the ``.npz`` to write; the summary goes to the same name with ``.json``.
        batch_atoms: atoms per batch (a larger structure forms its own batch).
        device: default ``cuda`` when available, else ``cpu``.
        dtype: model dtype; default the dtype the checkpoint was trained in (float32 for a model object).
        indices: graphs of a store to predict (default all).
        split: ``"train"``, ``"val"`` or ``"test"``: the graphs of that split of the model's training
            run (recomputed from the checkpoint's ``data.splits`` / ``split_seed`` / ``train_fraction``,
            as the trainer does); ``inputs`` must be that run's store.
        index, format: frame selection and format of an ASE file (``ase.io.iread`` syntax).
        progress: show a tqdm bar (atoms and atoms/s) on stderr.
        trust: see ``load_model``.
        source: for a model trained on several sources, the name of the source whose energy
            reference and head to use (required there; an unknown name raises
            ``UnknownSourceError`` listing the known ones); with ``split=`` also the source whose
            split of its store is meant.
        weights, best: which weights and which checkpoint of a run (``load_model``): by default the
            moving average of the weights when the checkpoint has one, of the latest checkpoint.

    Returns:
        The summary dict (also written as JSON).

    Raises:
        UnknownElementError: a structure holds an element the model has never seen (names it and
            the structure's index).
    """
    from ase.data import chemical_symbols
    from tqdm import tqdm

    from gnnmegatron.data.batch import collate
    from gnnmegatron.inference.calculator import UnknownElementError, format_elements
    from gnnmegatron.training.losses import ErrorAccumulator
    from gnnmegatron.inference.loading import check_device, describe, load_model, resolve_dtype, resolve_source
    from gnnmegatron.models import AtomisticModel

    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"out_path {out_path} is a directory; give the .npz file to write")
    if out_path.suffix != ".npz":
        raise ValueError(f"out_path must end in .npz (the summary is written beside it as .json), got {out_path}")
    if not (isinstance(batch_atoms, int) and batch_atoms >= 1):
        raise ValueError(f"batch_atoms must be an integer >= 1, got {batch_atoms!r}")
    device = check_device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(model_path, AtomisticModel):
        model = model_path.to(device=device, dtype=resolve_dtype(dtype or "float32")).eval()
        info, known, model_desc = None, None, "AtomisticModel object"
    else:
        model, info = load_model(model_path, device=device, dtype=dtype, trust=trust, weights=weights, best=best)
        known, model_desc = info.elements, describe(info)
    source_id = resolve_source(model.cfg, source)
    if source_id is not None:
        model_desc += f", source {source!r}"
        if info is not None:
            known = info.source_elements(source)
    dtype = model.embedding.weight.dtype
    cutoff = float(model.cfg.cutoff)
    conservative = model.cfg.force_mode == "conservative"
    known_set = None if known is None else set(known)
    known_desc = (", ".join(chemical_symbols[z] for z in sorted(known_set)) if known_set is not None
                  else f"atomic numbers 1..{model.cfg.max_z}")

    if split is not None:
        if indices is not None:
            raise ValueError("give either indices= or split=, not both")
        if info is None:
            raise ValueError("split= needs a checkpoint (its training config defines the split), not a model object")
        indices = run_split_indices(info.config, inputs, split, source=source)
    structures, total_atoms, input_desc = iter_input_structures(inputs, indices=indices, index=index, format=format)
    cols: dict[str, list] = {k: [] for k in ("index", "num_atoms", "atomic_numbers", "energy", "forces", "stress",
                                              "ref_energy", "ref_forces", "ref_stress")}
    bar = tqdm(total=total_atoms, unit="atom", unit_scale=True, desc="predict", dynamic_ncols=True,
               mininterval=0.5, file=sys.stderr, disable=not progress)
    acc = ErrorAccumulator()
    t0 = time.perf_counter()
    try:
        for batch_structs in batches_by_atoms(structures, batch_atoms):
            for s in batch_structs:
                z = np.asarray(s["atomic_numbers"], dtype=np.int64)
                bad = sorted(set(z.tolist()) - known_set) if known_set is not None else \
                    sorted(set(z[(z < 1) | (z > model.cfg.max_z)].tolist()))
                if bad:
                    raise UnknownElementError(
                        f"structure {s.get('index')} of {input_desc} contains {format_elements(bad)}, which the "
                        f"model has never seen (it knows {known_desc})")
            geometry = [dict({k: s.get(k) for k in ("atomic_numbers", "positions", "cell", "pbc")},
                             source=source_id or 0) for s in batch_structs]
            try:
                batch = collate(geometry, cutoff, dtype=dtype, device=device)
            except ValueError as exc:  # non-finite values, coincident atoms: name the input and the structure
                raise ValueError(f"{input_desc}: {_structure_named(exc, batch_structs)}") from None
            _refuse_close_atoms(batch, batch_structs, input_desc)
            periodic = batch["pbc"].all(dim=1).cpu().numpy()
            with torch.no_grad():
                out = model(batch, compute_forces=True, compute_stress=conservative and bool(periodic.any()))
            ptr = batch["ptr"].cpu().numpy()
            energy = out["energy"].double().cpu().numpy()
            forces = out["forces"].double().cpu().numpy()
            stress = out["stress"].double().cpu().numpy() if "stress" in out else None
            acc.update({k: v.detach().cpu() for k, v in out.items() if k in ("energy", "forces", "stress")},
                       _labels(batch_structs, batch, periodic))
            for g, s in enumerate(batch_structs):
                n = int(ptr[g + 1] - ptr[g])
                cols["index"].append(int(s.get("index", len(cols["index"]))))
                cols["num_atoms"].append(n)
                cols["atomic_numbers"].append(np.asarray(s["atomic_numbers"], dtype=np.int64))
                cols["energy"].append(energy[g])
                cols["forces"].append(forces[ptr[g]:ptr[g + 1]])
                cols["stress"].append(stress[g] if stress is not None and periodic[g] else np.full((3, 3), np.nan))
                cols["ref_energy"].append(float(s["energy"]) if s.get("energy") is not None else np.nan)
                cols["ref_forces"].append(_ref(s.get("forces"), (n, 3)))
                cols["ref_stress"].append(_ref(s.get("stress"), (3, 3)))
            bar.update(int(ptr[-1]))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    num_atoms = np.asarray(cols["num_atoms"], dtype=np.int64)
    G = len(num_atoms)
    arrays = {
        "index": np.asarray(cols["index"], dtype=np.int64),
        "num_atoms": num_atoms,
        "atom_offsets": np.concatenate([[0], np.cumsum(num_atoms)]).astype(np.int64),
        "atomic_numbers": np.concatenate(cols["atomic_numbers"]) if G else np.zeros(0, np.int64),
        "energy": np.asarray(cols["energy"], dtype=np.float64),
        "forces": np.concatenate(cols["forces"]) if G else np.zeros((0, 3)),
        "ref_energy": np.asarray(cols["ref_energy"], dtype=np.float64),
        "ref_forces": np.concatenate(cols["ref_forces"]) if G else np.zeros((0, 3)),
        "ref_stress": np.asarray(cols["ref_stress"], dtype=np.float64).reshape(G, 3, 3),
    }
    if conservative:
        arrays["stress"] = np.asarray(cols["stress"], dtype=np.float64).reshape(G, 3, 3)
    arrays["energy_error_per_atom"] = (arrays["energy"] - arrays["ref_energy"]) / np.maximum(num_atoms, 1)
    force_diff = arrays["forces"] - arrays["ref_forces"]
    per_atom_abs = np.abs(force_diff).sum(axis=1)  # NaN where the structure has no reference forces
    sums = np.add.reduceat(per_atom_abs, arrays["atom_offsets"][:-1]) if G else np.zeros(0)
    arrays["force_mae"] = sums / np.maximum(3 * num_atoms, 1)
    if conservative:
        arrays["stress_mae"] = np.abs(arrays["stress"] - arrays["ref_stress"]).mean(axis=(1, 2))
    else:
        arrays["stress_mae"] = np.full(G, np.nan)

    m = acc.result()
    summary = {
        "model": model_desc,
        "model_path": str(info.path) if info is not None else None,
        "model_step": info.step if info is not None else None,
        "source": source if source_id is not None else None,
        "inputs": input_desc,
        "out": str(out_path),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "structures": G,
        "atoms": int(num_atoms.sum()),
        "with_energy": int(np.isfinite(arrays["ref_energy"]).sum()),
        "with_forces": int(np.isfinite(arrays["force_mae"]).sum()),
        "with_stress": int(np.isfinite(arrays["stress_mae"]).sum()),
        "weights": info.weights if info is not None else None,
        "energy_mae_per_atom": m["energy_mae_per_atom"] if m["energy_graphs"] else None,
        "energy_rmse_per_atom": m["energy_rmse_per_atom"] if m["energy_graphs"] else None,
        "force_mae": m["force_mae"] if m["force_components"] else None,
        "force_rmse": m["force_rmse"] if m["force_components"] else None,
        "stress_mae": m["stress_mae"],
        "units": {"energy": "eV", "energy_mae_per_atom": "eV/atom", "force_mae": "eV/Å", "stress_mae": "eV/Å^3"},
        "seconds": seconds,
        "atoms_per_s": float(num_atoms.sum()) / max(seconds, 1e-9),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savez(out_path, arrays)
    json_path = out_path.with_suffix(".json")
    tmp = json_path.with_name(f".{json_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    return summary
