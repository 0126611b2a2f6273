"""Helpers of the pretraining job: process group, embedded data, activation checkpointing, subsets, report."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gnnmegatron.training.config import PretrainConfig

__all__ = ["checkpoint_blocks", "ensure_source_store", "ensure_store", "format_report", "init_distributed",
           "nested_subset"]


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialises torch.distributed when launched by torchrun; returns (rank, world_size).

    ``timeout_s`` bounds every collective (``train.collective_timeout_s``): a rank that waits
    longer for a peer fails instead of hanging. A process group initialised by the caller (e.g.
    ``run_distributed`` in tests) is used as is.
    """
    import datetime

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # one GPU per local rank, before any collective touches a device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    return dist.get_rank(), dist.get_world_size()


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Activation checkpointing: each message-passing block recomputes its forward in the backward.

    Wraps every block's ``forward`` (instance attribute, so module names and state-dict keys are
    unchanged) in ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (megatron-core's
    ``tensor_parallel.checkpoint`` needs CUDA). Works on single-device and ``parallelize``d models;
    the TP collectives of a block run again during recomputation, on every TP rank alike.
    Returns the number of blocks wrapped.
    """
    from torch.utils.checkpoint import checkpoint

    from gnnmegatron.models.egnn import named_blocks

    blocks = [block for _, block in named_blocks(model)]
    for block in blocks:
        if getattr(block, "_activation_checkpointed", False):
            continue
        forward = block.forward

        @functools.wraps(forward)
        def wrapped(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped
        block._activation_checkpointed = True
    return len(blocks)


def ensure_store(cfg: PretrainConfig, rank: int) -> Path:
    """Returns the store path, generating the embedded EMT dataset there first if asked and missing."""
    path = Path(cfg.data.store)
    if not path.exists():
        if cfg.data.emt is None:
            raise FileNotFoundError(
                f"data store {path} does not exist; create it with `gnnmegatron data emt --out {path}` "
                f"or `gnnmegatron data import FILES --out {path}`, or set data.emt in the config"
            )
        if rank == 0:
            from gnnmegatron.data.emt import EMTConfig, generate_emt_dataset

            print(f"generating the embedded EMT dataset at {path} ({cfg.data.emt})", flush=True)
            generate_emt_dataset(path, EMTConfig(**cfg.data.emt), progress=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def ensure_source_store(src, rank: int, index: int) -> Path:
    """The store of source entry ``src`` (``SourceConfig``, entry ``index`` of ``data.sources``),
    generated (``emt``, optionally shifted by ``emt_energy_offsets``) or imported (``import_from``)
    first when it is missing and the entry says how."""
    path = Path(src.store)
    what = f"data.sources[{index}] ({src.name!r})"
    if not path.exists():
        if src.emt is None and src.import_from is None:
            raise FileNotFoundError(
                f"{what}: store {path} does not exist; create it with `gnnmegatron data import FILES --out {path}` "
                f"(or `gnnmegatron data emt --out {path}`), give the entry import_from: FILES or emt: {{...}}, or "
                f"remove the entry from data.sources")
        if src.import_from is not None:
            missing = [f for f in src.import_from if not Path(f).exists()]
            if missing:
                raise FileNotFoundError(f"{what}: store {path} does not exist and its import_from file(s) {missing} "
                                        f"do not exist either; fix the paths or import the data yourself")
        if rank == 0:
            if src.import_from is not None:
                from gnnmegatron.data.importers import import_ase

                print(f"importing {src.import_from} into {path} (source {src.name!r})", flush=True)
                import_ase(src.import_from, path, source_names=[src.name] if len(src.import_from) == 1 else None,
                           progress=True)
            else:
                print(f"generating the embedded EMT dataset at {path} ({src.emt}"
                      + (f", energy offsets {src.emt_energy_offsets} eV/atom" if src.emt_energy_offsets else "")
                      + ")", flush=True)
                generate_emt_source(path, src.emt, src.emt_energy_offsets, name=src.name)
    if dist.is_initialized():
        dist.barrier()
    return path


def generate_emt_source(path, emt: dict, offsets: dict | None = None, name: str = "emt") -> None:
    """The embedded EMT dataset at ``path``; with ``offsets`` ({symbol: eV}) each structure's energy is
    shifted by ``sum_i offsets[z_i]``: EMT on another per-element energy reference, as a second source
    computed with other settings would be (forces and stress are unchanged)."""
    from gnnmegatron.data.emt import EMTConfig, generate_emt_dataset, iter_emt_structures

    cfg = EMTConfig(**emt)
    if not offsets:
        generate_emt_dataset(path, cfg, progress=True)
        return
    from ase.data import atomic_numbers as symbol_to_z

    from gnnmegatron.data.store import GraphStoreWriter

    unknown = sorted(set(offsets) - set(symbol_to_z))
    if unknown:
        raise ValueError(f"emt_energy_offsets: unknown chemical symbol(s) {unknown}")
    shift = np.zeros(119)
    for sym, value in offsets.items():
        shift[symbol_to_z[sym]] = float(value)

    def stream():
        for s in iter_emt_structures(cfg):
            s.pop("kind", None)
            s.pop("index", None)
            s["energy"] = float(s["energy"]) + float(shift[np.asarray(s["atomic_numbers"])].sum())
            yield s

    with GraphStoreWriter(path, producer="gnnmegatron.data.emt+offsets", sources=[name]) as writer:
        writer.append(stream(), source=0)


def nested_subset(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The first ``ceil(fraction * n)`` of a fixed permutation of ``indices`` (sorted): nested in ``fraction``."""
    if fraction >= 1:
        return indices
    order = np.random.default_rng([seed, 7919]).permutation(len(indices))
    keep = order[: int(np.ceil(fraction * len(indices)))]
    return np.sort(np.asarray(indices)[keep])


def _source_lines(sources: dict[str, dict]) -> list[str]:
    """Per-source validation rows of the final report (multi-source runs)."""
    if not sources:
        return []
    lines = [f"  per source:{'':17s}{'energy':>12s}{'baseline':>12s}{'forces':>10s}{'zero F':>10s}"
             f"   (meV/atom, meV/Å; baselines: that source's composition fit, zero forces)"]
    for name, m in sources.items():
        forces = (f"{1000 * m['force_mae']:10.1f}{1000 * m['baseline_force_mae']:10.1f}" if m.get("force_components")
                  else f"{'n/a':>10s}{'n/a':>10s}")
        lines.append(f"  {name[:26]:26s} {1000 * m['energy_mae_per_atom']:12.2f}"
                     f"{1000 * m['baseline_energy_mae_per_atom']:12.2f}{forces}   ({int(m['graphs'])} graphs)")
    return lines


def format_report(report: dict[str, Any], run_dir: str | Path) -> str:
    """The human-readable summary printed at the end of pretraining."""
    v = report["val"]
    e_ratio, f_ratio = report["energy_mae_ratio_vs_composition"], report["force_mae_ratio_vs_zero"]
    lines = [
        f"validation ({int(v['graphs'])} graphs, {int(v['atoms'])} atoms) after {report['step']} steps "
        f"({report['train_seconds'] / 60:.1f} min), {report['preset']} with {report['parameters']:,} parameters",
        f"  {'':28s}{'model':>12s}{'baseline':>12s}{'ratio':>8s}",
        f"  {'energy MAE (meV/atom)':28s}{1000 * v['energy_mae_per_atom']:12.2f}"
        f"{1000 * v['baseline_energy_mae_per_atom']:12.2f}{e_ratio:8.3f}   baseline: composition-only linear fit",
        f"  {'force MAE (meV/Å)':28s}{1000 * v['force_mae']:12.1f}{1000 * v['baseline_force_mae']:12.1f}"
        f"{f_ratio:8.3f}   baseline: zero forces",
        f"  target ratio <= 0.5: energy {'met' if e_ratio <= 0.5 else 'NOT met'}, forces {'met' if f_ratio <= 0.5 else 'NOT met'}",
        *_source_lines(v.get("sources") or {}),
        f"  wrote {Path(run_dir) / 'checkpoints'}, {Path(run_dir) / 'metrics.jsonl'}, "
        f"{Path(run_dir) / 'loss_curve.png'}, {Path(run_dir) / 'report.json'}",
    ]
    return "\n".join(lines)
