"""``gnnmegatron evaluate RUN_OR_CHECKPOINT [STORE ...] [--split test]``: a checkpoint's errors on graph stores.

The metrics are the trainer's validation metrics, computed by the same ``ErrorAccumulator``
(gnnmegatron/training/losses.py): energy MAE and RMSE per atom (eV/atom) over energy-labelled
structures, force MAE and RMSE (eV/Å) over the force components of force-labelled ones, stress
MAE (eV/Å^3, conservative models on fully periodic cells with stress labels), and beside them
the two baselines of the trainer's report: the composition-only linear fit (the model's own
per-element reference energies, fitted on its training split) and zero forces. ``loss`` applies
the run's ``loss`` weights to the two MAEs, as validation does. A multi-source model is
evaluated per source (each store is one of its sources) and over all of them together.

Which structures: ``split`` ``val`` (default) is exactly the trainer's validation set (each
source's validation split, cut to its ``max_val_graphs``), so ``evaluate`` on the run's stores
reproduces the numbers the trainer logged for that checkpoint; ``test`` and ``train`` are those
splits of the run (recomputed from the checkpoint's config, as ``predict --split`` does);
``all`` is every graph of the store. Weights: the moving average when the checkpoint has one
(``weights="raw"`` for the trained weights); ``best=True`` takes a run's best checkpoint.

Writes ``out`` (JSON: the metrics overall and per source, their ratios to the baselines, counts,
the checkpoint, split and weights) and a parity plot beside it (``.png``: predicted against
reference energy per atom and force components, one colour per source).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["evaluate_checkpoint", "format_evaluation"]

SPLITS = ("val", "test", "train", "all")
_PLOT_POINTS = 50_000  # force components drawn per source in the parity plot (a seeded subsample)


def _sources(info, stores: list[str] | None) -> list[tuple[int, str, str]]:
    """``[(source id, source name, store path)]``: the given stores matched to the model's sources,
    or the run's own stores."""
    data = info.config.get("data") or {}
    entries = data.get("sources") or [{"name": (info.model_config.sources or ["data"])[0], "store": data.get("store")}]
    names = [e.get("name") for e in entries]
    if not stores:
        missing = [e.get("store") for e in entries if not e.get("store") or not Path(e["store"]).exists()]
        if missing:
            raise FileNotFoundError(f"the run's store(s) {missing} are not here; pass the store(s) to evaluate on")
        return [(k, n, e["store"]) for k, (n, e) in enumerate(zip(names, entries))]
    if not info.model_config.multi_source:
        if len(stores) != 1:
            raise ValueError(f"a single-source model is evaluated on one store at a time, got {len(stores)}: {stores}")
        return [(0, names[0], stores[0])]
    out = []
    for store in stores:
        match = [k for k, e in enumerate(entries) if e.get("store") and Path(e["store"]).resolve() == Path(store).resolve()]
        if not match:
            raise ValueError(f"store {store} is none of this multi-source model's stores "
                             f"{ {n: e.get('store') for n, e in zip(names, entries)} }; each store must be one of its "
                             f"sources (its energy reference and head)")
        out.append((match[0], names[match[0]], store))
    return out


def _indices(info, store: str, split: str, source: str | None) -> np.ndarray:
    from gnnmegatron.data.store import GraphStore
    from gnnmegatron.inference.predict import run_split_indices

    if split == "all":
        return np.arange(len(GraphStore(store)))
    idx = run_split_indices(info.config, store, split, source=source)
    if split == "val":  # the trainer validates on the first max_val_graphs of each source's split
        data = info.config.get("data") or {}
        cap = data.get("max_val_graphs") or 0
        for e in data.get("sources") or []:
            if e.get("name") == source and e.get("max_val_graphs") is not None:
                cap = e["max_val_graphs"]
        if cap:
            idx = idx[:cap]
    return idx


def _with_ratios(r: dict[str, Any], weights: tuple[float, float]) -> dict[str, Any]:
    r = dict(r, loss=weights[0] * r["energy_mae_per_atom"] + weights[1] * r["force_mae"])
    r["energy_mae_ratio_vs_composition"] = r["energy_mae_per_atom"] / max(r["baseline_energy_mae_per_atom"], 1e-12)
    r["force_mae_ratio_vs_zero"] = r["force_mae"] / max(r["baseline_force_mae"], 1e-12) if r["force_components"] else None
    return r


def evaluate_checkpoint(model_path, stores: list[str] | None = None, *, split: str = "val",
                        out: str | Path | None = "evaluation.json", weights: str | None = None, best: bool = False,
                        batch_atoms: int | None = None, device: str | None = None, dtype: str | None = None,
                        plot: bool = True) -> dict[str, Any]:
    """Evaluates a checkpoint (or a run's latest / best one) on graph stores; see the module docstring.

    Args:
        model_path: checkpoint directory or file, or run directory.
        stores: graph stores, each one of the model's sources (default: the run's own stores).
        split: ``val`` (the trainer's validation set), ``test``, ``train`` or ``all``.
        out: the JSON to write (the PNG goes beside it), or None to write nothing.
        weights, best: see ``gnnmegatron.inference.load_model``.
        batch_atoms: atoms per batch (default: the run's ``data.val_budget_atoms``).
        device, dtype: default ``cuda`` when available, else ``cpu``; the training dtype.

    Returns:
        The result dict (also written as JSON).
    """
    from gnnmegatron.data.batch import collate
    from gnnmegatron.data.store import GraphStore
    from gnnmegatron.inference.loading import describe, load_model
    from gnnmegatron.inference.predict import batches_by_atoms
    from gnnmegatron.training.baselines import composition_energy
    from gnnmegatron.training.losses import ErrorAccumulator

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if out is not None and Path(out).is_dir():
        raise ValueError(f"out {out} is a directory; give the JSON file to write (the PNG goes beside it)")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, info = load_model(model_path, device=device, dtype=dtype, weights=weights, best=best)
    cfg = model.cfg
    multi = cfg.multi_source
    data = info.config.get("data") or {}
    batch_atoms = int(batch_atoms or data.get("val_budget_atoms") or data.get("budget_atoms") or 4096)
    loss_cfg = info.config.get("loss") or {}
    loss_weights = (float(loss_cfg.get("energy_weight", 1.0)), float(loss_cfg.get("force_weight", 1.0)))
    conservative = cfg.force_mode == "conservative"
    mdtype = model.embedding.weight.dtype
    plan = _sources(info, stores)
    acc = ErrorAccumulator(len(cfg.sources) if multi else 1)
    parity: dict[str, dict[str, list]] = {}
    t0 = time.perf_counter()
    for sid, name, store_path in plan:
        store = GraphStore(store_path)
        idx = _indices(info, store_path, split, name if multi else None)
        points = parity.setdefault(name, {"e_pred": [], "e_ref": [], "f_pred": [], "f_ref": []})
        structures = (s for start in range(0, len(idx), 1024) for s in store.get_many(idx[start:start + 1024]))
        known = _known_elements(info, sid, name if multi else None, store, store_path)
        for chunk in batches_by_atoms(structures, batch_atoms):
            if known is not None:
                _check_elements(chunk, set(known), store_path)
            batch = collate([dict(s, source=sid) for s in chunk], cfg.cutoff, dtype=mdtype, device=device)
            periodic = bool(batch["pbc"].all().item())
            with torch.no_grad():
                out_ = model(batch, compute_forces=True, compute_stress=conservative and periodic)
            base = composition_energy(model.reference_energies.double(), batch["atomic_numbers"], batch["batch"],
                                      int(batch["num_atoms"].numel()), batch.get("source") if multi else None)
            acc.update(out_, batch, base)
            n = batch["num_atoms"].double()
            e_mask = batch["has_energy"].bool() if "has_energy" in batch else torch.ones_like(n, dtype=torch.bool)
            points["e_pred"].append((out_["energy"].double() / n)[e_mask].cpu().numpy())
            points["e_ref"].append((batch["energy"].double() / n)[e_mask].cpu().numpy())
            if "forces" in batch:
                f_mask = (batch["has_forces"].bool() if "has_forces" in batch
                          else torch.ones_like(n, dtype=torch.bool)).index_select(0, batch["batch"])
                points["f_pred"].append(out_["forces"].double()[f_mask].reshape(-1).cpu().numpy())
                points["f_ref"].append(batch["forces"].double()[f_mask].reshape(-1).cpu().numpy())
    seconds = time.perf_counter() - t0
    overall = _with_ratios(acc.result(), loss_weights)
    result: dict[str, Any] = {
        "model": describe(info), "checkpoint": str(info.path), "step": info.step, "weights": info.weights,
        "split": split, "stores": {name: str(p) for _, name, p in plan}, "device": str(device),
        "dtype": str(mdtype).replace("torch.", ""), "seconds": seconds, **overall,
        "units": {"energy_mae_per_atom": "eV/atom", "force_mae": "eV/Å", "stress_mae": "eV/Å^3"},
    }
    if multi:
        per = acc.per_source()
        result["sources"] = {name: _with_ratios(per[sid], loss_weights) for sid, name, _ in plan}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if plot:
            result["plot"] = str(_parity_plot(parity, out.with_suffix(".png"), result))
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        result["out"] = str(out)
    return result


def _known_elements(info, sid: int, source: str | None, store, store_path) -> list[int] | None:
    """Elements the model trained on for this source: those of the sampled training graphs (the
    reference-energy fit reads at most ``data.stats_graphs``), and, when ``store_path`` is that source's
    own training store, every element its metadata lists (the trainer trained on all of its graphs)."""
    known = info.source_elements(source)
    if known is None:
        return None
    data = info.config.get("data") or {}
    entries = data.get("sources") or [{"store": data.get("store")}]
    own = entries[sid].get("store") if sid < len(entries) else None
    if own and Path(own).resolve() == Path(store_path).resolve():
        known = sorted(set(known) | {int(z) for z in store.metadata.get("elements", [])})
    return known


def _check_elements(structures: list[dict], known: set[int], store_path) -> None:
    """UnknownElementError for the first structure holding an element the model never saw: its errors
    there would say nothing about the model (``predict`` and the calculator refuse them too)."""
    from ase.data import chemical_symbols

    from gnnmegatron.inference.calculator import UnknownElementError, format_elements

    for s in structures:
        bad = sorted(set(np.asarray(s["atomic_numbers"]).tolist()) - known)
        if bad:
            raise UnknownElementError(
                f"graph {s.get('index')} of {store_path} contains {format_elements(bad)}, which the model has never "
                f"seen (it knows {', '.join(chemical_symbols[z] for z in sorted(known))}); evaluate it on stores "
                f"of the elements it was trained on")


def _parity_plot(parity: dict[str, dict[str, list]], path: Path, result: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    rng = np.random.default_rng(0)
    for name, pts in parity.items():
        per = (result.get("sources") or {}).get(name, result)
        e_pred, e_ref = (np.concatenate(pts[k]) if pts[k] else np.zeros(0) for k in ("e_pred", "e_ref"))
        axes[0].scatter(e_ref, e_pred, s=6, alpha=0.6,
                        label=f"{name}: MAE {1000 * per['energy_mae_per_atom']:.1f} meV/atom ({len(e_ref)})")
        f_pred, f_ref = (np.concatenate(pts[k]) if pts[k] else np.zeros(0) for k in ("f_pred", "f_ref"))
        if len(f_ref) > _PLOT_POINTS:
            keep = rng.choice(len(f_ref), _PLOT_POINTS, replace=False)
            f_pred, f_ref = f_pred[keep], f_ref[keep]
        if len(f_ref):
            axes[1].scatter(f_ref, f_pred, s=3, alpha=0.4,
                            label=f"{name}: MAE {1000 * per['force_mae']:.1f} meV/Å")
    for ax, what in ((axes[0], "energy per atom (eV/atom)"), (axes[1], "force component (eV/Å)")):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="gray", lw=1)
        ax.set(xlabel=f"reference {what}", ylabel=f"predicted {what}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(result['checkpoint']).name} ({result['weights']} weights), {result['split']} split")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_evaluation(result: dict[str, Any]) -> str:
    """The human-readable table ``gnnmegatron evaluate`` prints."""
    def row(label, r):
        f = (f"{1000 * r['force_mae']:10.1f}{1000 * r['baseline_force_mae']:10.1f}" if r["force_components"]
             else f"{'n/a':>10s}{'n/a':>10s}")
        s = f"{1000 * r['stress_mae']:10.3f}" if r.get("stress_mae") is not None else f"{'n/a':>10s}"
        return (f"  {label[:24]:24s}{int(r['graphs']):8d}{1000 * r['energy_mae_per_atom']:10.2f}"
                f"{1000 * r['baseline_energy_mae_per_atom']:10.2f}{f}{s}")

    lines = [f"{result['model']}", f"  {result['split']} split, {result['weights']} weights, {result['seconds']:.1f} s",
             f"  {'':24s}{'graphs':>8s}{'energy':>10s}{'comp fit':>10s}{'forces':>10s}{'zero F':>10s}{'stress':>10s}"
             f"   (meV/atom, meV/Å, meV/Å^3)"]
    lines.append(row("all", result))
    for name, r in (result.get("sources") or {}).items():
        lines.append(row(name, r))
    if result.get("out"):
        lines.append(f"  wrote {result['out']}" + (f" and {result['plot']}" if result.get("plot") else ""))
    return "\n".join(lines)
