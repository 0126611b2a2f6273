"""Tensor-, pipeline- and data-parallel helpers of the trainer: groups, gradient reduction and
global-norm clipping.

Layout (Megatron's order: tp fastest, then dp, then pp): the trainer calls
``init_layout(tp, pp, dp, groups="torch")`` (the same groups as megatron-core's, without its
~5 s import: the TP blocks use our own parallel linears). The tp x pp ranks of one model replica
read the same micro-batches (the sampler is sharded by ``dp_rank``/``dp_size`` only); each holds
``H / tp`` of the hidden units of its pipeline stage's blocks. Gradients are averaged over the
data-parallel group only: TP-sharded parameters already receive their exact gradients from the TP
layers' collectives, replicated ones identical full gradients on every TP rank, and each pipeline
stage owns its parameters.

Gradient clipping uses the global norm of the single-device model (Megatron's approach): squared
norms of TP-sharded gradients are summed over the TP group, replicated ones counted once, and the
stages' sums added over the pipeline group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradReducer", "TrainGroups", "clip_grad_norm", "dp_allreduce_grads", "is_tp_sharded", "split_params"]


@dataclass
class TrainGroups:
    """The trainer's view of the layout.

    Attributes:
        tp, pp, dp: tensor-, pipeline- and data-parallel sizes.
        tp_rank, pp_rank, dp_rank: this rank's position.
        tp_group, pp_group, dp_group: groups of this rank (None for size 1).
        layout: the ``ParallelLayout``.
    """

    tp: int = 1
    dp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    tp_group: Any = None
    dp_group: Any = None
    layout: Any = None
    pp: int = 1
    pp_rank: int = 0
    pp_group: Any = None

    @classmethod
    def build(cls, tp: int, dp: int, rank: int, pp: int = 1) -> TrainGroups:
        """Collective when the world has more than one rank (creates the groups on every rank)."""
        from gnnmegatron.parallel.layout import init_layout, single

        if tp * pp * dp == 1:
            layout = single()
        else:
            layout = init_layout(tp=tp, pp=pp, dp=dp, groups="torch")
        return cls(tp=tp, dp=dp, tp_rank=layout.tp_rank, dp_rank=layout.dp_rank, tp_group=layout.tp_group,
                   dp_group=layout.dp_group if dp > 1 else None, layout=layout, pp=pp, pp_rank=layout.pp_rank,
                   pp_group=layout.pp_group if pp > 1 else None)

    def describe(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logger(self) -> bool:
        """The rank that logs, validates and writes run files: tp rank 0, dp rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    @property
    def last_stage_rank(self) -> int:
        """Global rank of this rank's counterpart on the last pipeline stage."""
        return self.layout.pp_ranks[-1]

    def _reduce(self, t: torch.Tensor, group, op=None) -> torch.Tensor:
        kwargs = {} if op is None else {"op": op}
        if not t.is_cuda and dist.get_backend(group) == "nccl":  # NCCL reduces device tensors only
            buf = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buf, group=group, **kwargs)
            t.copy_(buf)
        else:
            dist.all_reduce(t, group=group, **kwargs)
        return t

    def dp_all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the data-parallel group in place (no-op at dp == 1)."""
        if self.dp > 1:
            self._reduce(t, self.dp_group)
        return t

    def pp_all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the pipeline group in place (no-op at pp == 1)."""
        if self.pp > 1:
            self._reduce(t, self.pp_group)
        return t

    def from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """Every stage gets the last stage's ``t`` (in place; a sum with zeros from the others)."""
        if self.pp > 1:
            if not self.is_last_stage:
                t.zero_()
            self._reduce(t, self.pp_group)
        return t

    def world_any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (one tiny all-reduce over the world)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        self._reduce(t, None, dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def is_tp_sharded(model: nn.Module) -> dict[int, bool]:
    """``{id(param): True if it is split over the TP group}``.

    The parallel layers mark their split parameters: a module lists their names in
    ``tp_sharded_parameters`` (the column-parallel linears their weight and bias, the row-parallel
    ones their weight, a TP block its grouped message weight; gnnmegatron/parallel/linear.py,
    egnn_tp.py). Everything else (embedding, heads, norms, row-parallel biases) is replicated.
    """
    out = {id(p): False for p in model.parameters()}
    for mod in model.modules():
        for name in getattr(mod, "tp_sharded_parameters", ()):
            if getattr(mod, name, None) is not None:
                out[id(getattr(mod, name))] = True
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


class GradReducer:
    """Data-parallel gradient averaging in flat buckets, overlapped with the backward pass.

    Parameters are grouped, in reverse registration order (roughly the order the backward pass
    finishes them), into buckets of about ``bucket_bytes`` of one dtype and device, each with one
    persistent flat buffer. While :meth:`arm`-ed, a hook on every parameter
    (``register_post_accumulate_grad_hook``) notes when its gradient is final; when all of a
    bucket's gradients are, the bucket is copied into its buffer and its all-reduce starts
    asynchronously, so communication runs while the backward pass computes the earlier layers.
    :meth:`finish` launches whatever is left (buckets with unused parameters: those count as
    zeros, as a per-tensor all-reduce would skip them on every rank alike), waits, divides by dp
    and copies the averages back into ``.grad``.

    Arm only for the backward that completes the step's gradients: the last micro-batch's
    backward at pp = 1. With gradient accumulation over earlier micro-batches, or a pipeline
    whose sweeps accumulate into the same parameters several times, leave it unarmed and call
    :meth:`finish`, which then reduces every bucket at the end (still one collective per bucket,
    not per tensor).
    """

    def __init__(self, params, groups: TrainGroups, bucket_bytes: int = 25 * 2 ** 20):
        self.groups = groups
        params = [p for p in params if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = []
        current: list[nn.Parameter] = []
        size = 0
        for p in reversed(params):
            if current and (size + p.numel() * p.element_size() > bucket_bytes or p.dtype != current[0].dtype
                            or p.device != current[0].device):
                self.buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(current)
        # each buffer ends with one flag per parameter: 1 where this rank has a gradient, so that a
        # parameter no rank has a gradient for keeps grad None (as the optimizer expects)
        self.flat = [torch.zeros(sum(p.numel() for p in b) + len(b), dtype=b[0].dtype, device=b[0].device)
                     for b in self.buckets]
        self.where = {}
        for k, b in enumerate(self.buckets):
            off = 0
            for p in b:
                self.where[id(p)] = (k, off)
                off += p.numel()
        self.armed = False
        self.ready = [0] * len(self.buckets)
        self.works: list = [None] * len(self.buckets)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        self.bytes_per_step = sum(f.numel() * f.element_size() for f in self.flat)

    def arm(self) -> None:
        self.armed = True

    def _hook(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        k, _ = self.where[id(p)]
        self.ready[k] += 1
        if self.ready[k] == len(self.buckets[k]) and self.works[k] is None:
            self._launch(k)

    @torch.no_grad()
    def _launch(self, k: int) -> None:
        flat = self.flat[k]
        bucket = self.buckets[k]
        flags = flat[flat.numel() - len(bucket):]
        off = 0
        for j, p in enumerate(bucket):
            n = p.numel()
            if p.grad is None:
                flat[off:off + n].zero_()
                flags[j] = 0
            else:
                flat[off:off + n].copy_(p.grad.reshape(-1))
                flags[j] = 1
            off += n
        self.works[k] = dist.all_reduce(flat, group=self.groups.dp_group, async_op=True)

    @torch.no_grad()
    def finish(self) -> None:
        """Complete every bucket's all-reduce and write the averaged gradients (collective over dp)."""
        for k in range(len(self.buckets)):
            if self.works[k] is None:
                self._launch(k)
        for k, work in enumerate(self.works):
            work.wait()
            bucket = self.buckets[k]
            flat = self.flat[k]
            flags = flat[flat.numel() - len(bucket):].clone()
            flat.div_(self.groups.dp)
            off = 0
            for j, p in enumerate(bucket):
                n = p.numel()
                if flags[j] == 0:
                    p.grad = None
                elif p.grad is None:
                    p.grad = flat[off:off + n].view_as(p).clone()
                else:
                    p.grad.copy_(flat[off:off + n].view_as(p))
                off += n
        self.armed = False
        self.ready = [0] * len(self.buckets)
        self.works = [None] * len(self.buckets)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def clip_grad_norm(sharded, replicated, max_norm: float | None, groups: TrainGroups) -> float:
    """Global gradient norm of the single-device model; scales gradients to ``max_norm`` if larger.

    Same formula as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``
    clamped to 1). Tensor-parallel shards' squares are summed over the TP group, replicated
    tensors counted once; pipeline stages hold disjoint parameters, so their sums add over the
    pipeline group. ``max_norm=None`` only measures. Collective over the TP and pipeline groups.
    """
    sharded = [p.grad for p in sharded if p.grad is not None]
    replicated = [p.grad for p in replicated if p.grad is not None]
    grads = sharded + replicated
    ref = grads[0] if grads else None
    device = ref.device if ref is not None else torch.device("cpu")
    sq_sharded = torch.zeros((), dtype=torch.float64, device=device)
    for g in sharded:
        sq_sharded += torch.linalg.vector_norm(g).double() ** 2
    if groups.tp > 1:
        dist.all_reduce(sq_sharded, group=groups.tp_group)
    sq = sq_sharded
    for g in replicated:
        sq = sq + torch.linalg.vector_norm(g).double() ** 2
    if groups.pp > 1:
        sq = groups.pp_all_reduce(sq.reshape(1)).reshape(())
    total = sq.sqrt()
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return float(total)
