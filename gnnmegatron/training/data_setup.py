"""The trainer's data: one store or a mixture of sources, their splits, samplers, loaders and references.

``build_train_data`` opens the store of a single-store config (``data.store``) or every store of a
multi-source config (``data.sources``, creating missing ones the entries say how to make), splits
each by its own split settings and ``train_fraction``, and returns the samplers and loaders: a
``ChunkAwareSampler`` over the one store, or a ``MixtureSampler`` over the ``MixtureStore`` of all
sources (``gnnmegatron.data.mixture``), with the sampling probabilities of ``data.sampling``.
Validation reads every source's validation split in order (no shuffle), each capped by its
``max_val_graphs``. ``fit_references`` fits the per-element reference energies: one table, or one
per source on that source's training split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gnnmegatron.training.baselines import fit_reference_energies, fit_source_references
from gnnmegatron.training.config import ConfigError, PretrainConfig, SourceConfig
from gnnmegatron.training.runtime import ensure_source_store, ensure_store, nested_subset

__all__ = ["TrainData", "build_train_data", "fit_references", "source_report"]


@dataclass
class TrainData:
    """What the trainer reads.

    Attributes:
        sources: ``data.source_list()`` (one entry for a single-store config).
        source_weights: [S, 3] per-source loss weights (multi-source configs), else None.
        mixture: names, probabilities, train_graphs, sampling, temperature, epoch_graphs of a
            multi-source run (saved in checkpoints and model cards), else None.
        store: the ``GraphStore`` or ``MixtureStore`` the loaders read (joint indices).
        source_stores, source_splits: per source, its store and its splits (its own indices).
        splits: train/val/test indices in ``store``'s index space.
        train_sampler, val_sampler, train_loader, val_loader: as the names say.
    """

    sources: list[SourceConfig]
    source_weights: torch.Tensor | None
    mixture: dict[str, Any] | None
    store: Any
    source_stores: list
    source_splits: list[dict[str, np.ndarray]]
    splits: dict[str, np.ndarray]
    train_sampler: Any
    val_sampler: Any
    train_loader: Any
    val_loader: Any


def build_train_data(cfg: PretrainConfig, rank: int, dp_rank: int, dp: int, dtype: torch.dtype) -> TrainData:
    """Stores, splits, samplers and loaders of ``cfg`` for one data-parallel rank (see the module docstring)."""
    from gnnmegatron.data.mixture import MixtureSampler, MixtureStore, mixture_weights
    from gnnmegatron.data.sampler import ChunkAwareSampler, GraphLoader
    from gnnmegatron.data.store import GraphStore, split_indices

    sources = cfg.data.source_list()
    mixture = None
    if not cfg.data.multi_source:
        store = GraphStore(ensure_store(cfg, rank))
        source_stores = [store]
        splits = split_indices(len(store), cfg.data.splits, seed=cfg.data.split_seed)
        splits["train"] = nested_subset(splits["train"], cfg.data.train_fraction, cfg.data.split_seed)
        source_splits = [splits]
        val_idx = splits["val"]
        if cfg.data.max_val_graphs:
            val_idx = val_idx[: cfg.data.max_val_graphs]
        train_sampler = ChunkAwareSampler(
            store.atom_counts, store.graph_chunks, splits["train"], seed=cfg.seed, shuffle=True,
            budget_atoms=cfg.data.budget_atoms, max_graphs=cfg.data.max_graphs, dp_rank=dp_rank, dp_size=dp)
    else:
        source_stores, source_splits = [], []
        for i, src in enumerate(sources):
            one = GraphStore(ensure_source_store(src, rank, i))
            sp = split_indices(len(one), src.splits, seed=src.split_seed)
            sp["train"] = nested_subset(sp["train"], src.train_fraction, src.split_seed)
            if len(sp["train"]) == 0 or len(sp["val"]) == 0:
                raise ConfigError(f"data.sources[{i}] ({src.name!r}): {len(one)} graphs give {len(sp['train'])} "
                                  f"training and {len(sp['val'])} validation graphs (splits {src.splits}, "
                                  f"train_fraction {src.train_fraction}); every source needs both")
            source_stores.append(one)
            source_splits.append(sp)
        names = [s.name for s in sources]
        store = MixtureStore(source_stores, names)
        sizes = [len(sp["train"]) for sp in source_splits]
        probs = mixture_weights(sizes, cfg.data.sampling, temperature=cfg.data.temperature,
                                weights=[s.weight for s in sources] if cfg.data.sampling == "given" else None)
        mixture = {"names": names, "probabilities": probs.tolist(), "train_graphs": sizes,
                   "sampling": cfg.data.sampling, "temperature": cfg.data.temperature,
                   "epoch_graphs": cfg.data.epoch_graphs or int(sum(sizes))}
        glob = [{k: store.to_global(i, v) for k, v in sp.items()} for i, sp in enumerate(source_splits)]
        splits = {k: np.concatenate([g[k] for g in glob]) for k in ("train", "val", "test")}
        val_idx = np.concatenate([g["val"][: src.max_val_graphs] if src.max_val_graphs else g["val"]
                                  for g, src in zip(glob, sources)])
        train_sampler = MixtureSampler(
            store.atom_counts, store.graph_chunks, [g["train"] for g in glob], probs, seed=cfg.seed,
            epoch_graphs=cfg.data.epoch_graphs or None, budget_atoms=cfg.data.budget_atoms,
            max_graphs=cfg.data.max_graphs, dp_rank=dp_rank, dp_size=dp)
    val_sampler = ChunkAwareSampler(store.atom_counts, store.graph_chunks, val_idx, seed=cfg.seed, shuffle=False,
                                    budget_atoms=cfg.data.val_budget_atoms, max_graphs=cfg.data.max_graphs)
    # on a GPU the loaders copy and build neighbour lists on the device, on their own stream, a batch ahead
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    train_loader = GraphLoader(store, train_sampler, cutoff=cfg.data.cutoff, dtype=dtype, prefetch=cfg.data.prefetch,
                               device=device)
    val_loader = GraphLoader(store, val_sampler, cutoff=cfg.data.cutoff, dtype=dtype, prefetch=cfg.data.prefetch,
                             device=device)
    return TrainData(sources=sources, source_weights=cfg.loss_weights() if cfg.data.multi_source else None,
                     mixture=mixture, store=store, source_stores=source_stores, source_splits=source_splits,
                     splits=splits, train_sampler=train_sampler, val_sampler=val_sampler, train_loader=train_loader,
                     val_loader=val_loader)


def fit_references(data, cfg: PretrainConfig, model_cfg, warn: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """(reference energies, stats) on the training split(s) of ``data`` (a ``TrainData`` or the trainer):
    [max_z + 1] for a single-source model, [S, max_z + 1] for a multi-source one."""
    if data.mixture is None:
        reference, stats = fit_reference_energies(data.store, data.splits["train"], model_cfg.max_z,
                                                  max_graphs=cfg.data.stats_graphs)
    else:
        reference, stats = fit_source_references(
            data.source_stores, [sp["train"] for sp in data.source_splits], data.mixture["names"], model_cfg.max_z,
            max_graphs=cfg.data.stats_graphs)
        if not model_cfg.multi_source:  # one source entry: a single-source model
            reference = reference[0]
    for src, store in zip(data.sources, data.source_stores):
        seen = (stats.get("sources") or {}).get(src.name, stats)["elements"]
        unknown = sorted(set(store.metadata.get("elements", [])) - set(seen))
        if unknown and warn:
            print(f"warning: elements {unknown} occur in the store {src.store} but not in the sampled training graphs")
    return reference, stats


def source_report(data, stats: dict[str, Any], val: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Per source of a multi-source run: store, split sizes, sampling probability and validation errors
    with their ratios to that source's baselines (None for a single-store run)."""
    if data.mixture is None:
        return None
    out = []
    per = val.get("sources") or {}
    for k, src in enumerate(data.sources):
        v = per.get(src.name)
        row = {"name": src.name, "store": src.store, "train_fraction": src.train_fraction,
               "probability": data.mixture["probabilities"][k],
               "graphs": {s: int(len(ix)) for s, ix in data.source_splits[k].items()},
               "elements": (stats.get("sources") or {}).get(src.name, {}).get("elements"), "val": v}
        if v is not None:
            row["energy_mae_ratio_vs_composition"] = v["energy_mae_per_atom"] / max(
                v["baseline_energy_mae_per_atom"], 1e-12)
            row["force_mae_ratio_vs_zero"] = (v["force_mae"] / max(v["baseline_force_mae"], 1e-12)
                                              if v["force_components"] else None)
        out.append(row)
    return out
