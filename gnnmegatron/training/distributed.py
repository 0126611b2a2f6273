"""Data- and tensor-parallel helpers of the trainer: groups, gradient reduction, global-norm
clipping and the per-rank optimizer files of TP checkpoints.

Layout (Megatron's order, tp fastest): with ``parallel.tp > 1`` the trainer calls
``init_layout(tp, 1, dp, groups="torch")`` (the same groups as megatron-core's, without its
~5 s import: the TP blocks use our own parallel linears); every rank of a TP group reads the same micro-batch
(the sampler is sharded by ``dp_rank``/``dp_size``) and holds ``H / tp`` of every block's hidden
units. Gradients are averaged over the data-parallel group only: TP-sharded parameters already
receive their exact gradients from the TP layers' collectives, and replicated parameters
(embedding, heads, norms, row-parallel biases) receive identical full gradients on every TP rank.

Gradient clipping uses the global norm of the single-device model (Megatron's approach): the
squared norms of TP-sharded gradients are summed over the TP group, replicated ones are counted
once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["TrainGroups", "clip_grad_norm", "dp_allreduce_grads", "is_tp_sharded", "optimizer_file",
           "split_params"]


@dataclass
class TrainGroups:
    """The trainer's view of the layout.

    Attributes:
        tp, dp: tensor- and data-parallel sizes.
        tp_rank, dp_rank: this rank's position.
        tp_group: group of the TP ranks (None when tp == 1).
        dp_group: group of the DP replicas; ``dist.group.WORLD`` when tp == 1 (plain DP), None
            when dp == 1.
        layout: the ``ParallelLayout`` (tp > 1) or None.
    """

    tp: int = 1
    dp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    tp_group: Any = None
    dp_group: Any = None
    layout: Any = None

    @classmethod
    def build(cls, tp: int, dp: int, rank: int) -> TrainGroups:
        """Collective when tp > 1 (creates the groups on every rank)."""
        if tp == 1:
            return cls(tp=1, dp=dp, tp_rank=0, dp_rank=rank, tp_group=None,
                       dp_group=dist.group.WORLD if dp > 1 else None)
        from gnnmegatron.parallel import init_layout

        layout = init_layout(tp=tp, pp=1, dp=dp, groups="torch")
        return cls(tp=tp, dp=dp, tp_rank=layout.tp_rank, dp_rank=layout.dp_rank, tp_group=layout.tp_group,
                   dp_group=layout.dp_group if dp > 1 else None, layout=layout)

    def describe(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": 1, "dp": self.dp}

    def dp_all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the data-parallel group in place (no-op at dp == 1).

        Host tensors (counters, metric sums) go through the GPU under NCCL, which reduces
        device tensors only.
        """
        if self.dp > 1:
            if not t.is_cuda and dist.get_backend(self.dp_group) == "nccl":
                buf = t.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(buf, group=self.dp_group)
                t.copy_(buf)
            else:
                dist.all_reduce(t, group=self.dp_group)
        return t


def is_tp_sharded(model: nn.Module) -> dict[int, bool]:
    """``{id(param): True if it is split over the TP group}``.

    Sharded: the weights of column- and row-parallel linears, the biases of column-parallel
    ones and the parameters a module names in ``tp_sharded_parameters`` (e.g. a TP block's
    grouped message weight); everything else (embedding, heads, norms, row-parallel biases) is
    replicated.
    """
    out = {id(p): False for p in model.parameters()}
    for mod in model.modules():
        for name in getattr(mod, "tp_sharded_parameters", ()):
            if getattr(mod, name, None) is not None:
                out[id(getattr(mod, name))] = True
        if hasattr(mod, "_weight_dim") and hasattr(mod, "_bias_sharded") and hasattr(mod, "tp_group"):
            out[id(mod.weight)] = True
            if mod.bias is not None and mod._bias_sharded:
                out[id(mod.bias)] = True
    return out


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(TP-sharded parameters, replicated parameters), each in ``model.parameters()`` order."""
    flags = is_tp_sharded(model)
    params = [p for p in model.parameters()]
    return [p for p in params if flags[id(p)]], [p for p in params if not flags[id(p)]]


def dp_allreduce_grads(params, groups: TrainGroups) -> None:
    """Average gradients over the data-parallel group (one all-reduce per tensor)."""
    if groups.dp == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=groups.dp_group)
            p.grad.div_(groups.dp)


@torch.no_grad()
def clip_grad_norm(sharded, replicated, max_norm: float | None, groups: TrainGroups) -> float:
    """Global gradient norm of the single-device model; scales gradients to ``max_norm`` if larger.

    Same formula as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``
    clamped to 1). ``max_norm=None`` only measures. Collective over the TP group.
    """
    sharded = [p.grad for p in sharded if p.grad is not None]
    replicated = [p.grad for p in replicated if p.grad is not None]
    grads = sharded + replicated
    if not grads:
        return 0.0
    ref = grads[0]
    sq_sharded = torch.zeros((), dtype=torch.float64, device=ref.device)
    for g in sharded:
        sq_sharded += torch.linalg.vector_norm(g).double() ** 2
    if groups.tp > 1:
        dist.all_reduce(sq_sharded, group=groups.tp_group)
    sq = sq_sharded
    for g in replicated:
        sq = sq + torch.linalg.vector_norm(g).double() ** 2
    total = sq.sqrt()
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return float(total)


def optimizer_file(main: Path, tp_rank: int, tp: int) -> Path:
    """Per-TP-rank optimizer state beside a checkpoint: ``step_X.optim-tp{r}of{tp}.pt``."""
    main = Path(main)
    return main.with_name(f"{main.stem}.optim-tp{tp_rank}of{tp}.pt")
