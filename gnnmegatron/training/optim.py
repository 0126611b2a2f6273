"""AdamW and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from gnnmegatron.training.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int, plateau_scale: float = 1.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine decay.

    Warm-up rises from lr/warmup_steps to lr over ``warmup_steps`` steps; the cosine then
    falls to ``min_lr_ratio * lr`` at ``max_steps``. Under ``schedule: plateau`` the rate after
    warm-up is ``lr * plateau_scale`` (the monitor's cuts, gnnmegatron/training/monitor.py).
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "plateau":
        return cfg.lr * plateau_scale
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, dp_group=None) -> torch.optim.Optimizer:
    """AdamW; biases, norms and embeddings get no weight decay (as in Megatron-LM).

    With ``cfg.zero_stage == 1`` and a data-parallel group of more than one rank, the AdamW state
    is sharded over ``dp_group`` by ``torch.distributed.optim.ZeroRedundancyOptimizer`` (whole
    parameters assigned greedily, largest first, to the least-loaded rank; each rank steps its own
    and broadcasts them). Its ``state_dict`` needs :func:`consolidate` first on every rank of the
    group and then holds the full, unsharded AdamW state, loadable under any dp.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in name or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Empty groups are dropped (ZeRO cannot partition them), in both cases, so that the state dicts
    # of zero_stage 0 and 1 have the same groups and load into each other.
    groups = [g for g in groups if g["params"]]
    if cfg.zero_stage == 1 and dp_group is not None and dist.get_world_size(dp_group) > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=dp_group,
                                       parameters_as_bucket_view=False, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    """True for a ZeRO-1 optimizer (state sharded over the data-parallel group)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def consolidate(optimizer: torch.optim.Optimizer) -> None:
    """Collective over the DP group for a ZeRO-1 optimizer: gathers the full state on DP rank 0.

    A no-op for a replicated optimizer. Call on every rank before ``state_dict()`` on DP rank 0.
    """
    if is_sharded(optimizer):
        optimizer.consolidate_state_dict(to=0)


def release_consolidated(optimizer: torch.optim.Optimizer) -> None:
    """Frees the full state a ZeRO-1 :func:`consolidate` left on DP rank 0 (once it is saved)."""
    if is_sharded(optimizer) and hasattr(optimizer, "_all_state_dicts"):
        optimizer._all_state_dicts = []


def local_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer-state tensors this rank holds (its shard under ZeRO-1)."""
    inner = optimizer.optim if is_sharded(optimizer) else optimizer
    return sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
               if torch.is_tensor(t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
