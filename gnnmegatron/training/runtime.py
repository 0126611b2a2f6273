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

__all__ = ["checkpoint_blocks", "ensure_store", "format_report", "init_distributed", "nested_subset"]


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


def nested_subset(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The first ``ceil(fraction * n)`` of a fixed permutation of ``indices`` (sorted): nested in ``fraction``."""
    if fraction >= 1:
        return indices
    order = np.random.default_rng([seed, 7919]).permutation(len(indices))
    keep = order[: int(np.ceil(fraction * len(indices)))]
    return np.sort(np.asarray(indices)[keep])


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
        f"  wrote {Path(run_dir) / 'checkpoints'}, {Path(run_dir) / 'metrics.jsonl'}, "
        f"{Path(run_dir) / 'loss_curve.png'}, {Path(run_dir) / 'report.json'}",
    ]
    return "\n".join(lines)
