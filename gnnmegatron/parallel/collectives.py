"""Tensor-parallel collectives as autograd Functions, correct to any order of differentiation.

Megatron's four region maps, in two pairs. Each Function's backward is the *paired* Function's
``apply``, so with ``create_graph=True`` (conservative forces: energy -> forces by autograd ->
loss on forces -> parameter gradients) the backward is itself recorded in the graph and
differentiated correctly again:

=========================  ===========================  ===========================
function                   forward                      backward
=========================  ===========================  ===========================
``copy_to_tp_region``      identity                     all-reduce (sum)
``reduce_from_tp_region``  all-reduce (sum)             identity
``scatter_to_tp_region``   keep this rank's last-dim    all-gather along last dim
                           slice
``gather_from_tp_region``  all-gather along last dim    keep this rank's slice
``all_reduce_sum_scalars`` all-reduce (sum), counted    identity
                           as ``"edge_scalars"``
=========================  ===========================  ===========================

Why the pairing matters: megatron-core's ``_ReduceFromModelParallelRegion.backward`` returns
``grad_output`` unchanged (not through a Function), so under double backward the identity's
own adjoint -- an all-reduce, the gradient w.r.t. a replicated ``grad_output`` being the sum
of the ranks' partial uses -- is lost. Here ``reduce_from``'s backward is ``copy_to.apply``,
whose backward all-reduces. (Evidence: ``tests/parallel/test_parallel_linear.py``.)

Communication: plain ``torch.distributed`` calls (``all_reduce`` on a contiguous clone,
``all_gather`` into a list) inside ``Function.forward``. ``forward`` runs with grad mode off,
so the in-place collective never touches the autograd graph; the clone keeps the caller's
tensor (which another op may have saved for its backward) unmodified. These calls work on
gloo (CPU) and NCCL (CUDA) alike. ``torch.distributed.nn.functional`` is not used: its
all-reduce backward is an all-reduce (the "sum of per-rank losses" convention), not
Megatron's identity. Functional collectives (``_functional_collectives``) have no autograd.

Groups: ``group=None`` means *no tensor parallelism* (one rank; e.g. ``single()`` layouts
without ``torch.distributed``) -- unlike ``torch.distributed``, where ``None`` is the world
group. Pass ``dist.group.WORLD`` explicitly for the world. Every function returns its input
unchanged when the group has one rank, so tp=1 runs the same code and communicates nothing.

Shapes: any ``[..., F]``; the split/gather functions act on the last dim, which must divide
evenly by the group size (``F_local = F / g``), as in Megatron.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .comm_stats import _ACTIVE, _record

__all__ = [
    "all_gather_along_dim",
    "all_reduce_sum_scalars",
    "copy_to_tp_region",
    "gather_from_tp_region",
    "group_rank",
    "group_size",
    "reduce_from_tp_region",
    "scatter_to_tp_region",
]


def group_size(group) -> int:
    """Ranks in ``group``; 1 for ``None`` (no tensor parallelism)."""
    if group is None:
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside ``group``; 0 for ``None``."""
    if group is None:
        return 0
    return dist.get_rank(group)


# ----------------------------------------------------------------------------- primitives
def _all_reduce(x: torch.Tensor, group, name: str, direction: str) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    t0 = time.perf_counter() if _ACTIVE else 0.0
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    if _ACTIVE:
        _record(name, "all_reduce", out, dist.get_world_size(group), direction, time.perf_counter() - t0)
    return out


def _all_gather(x: torch.Tensor, group, dim: int, name: str, direction: str) -> torch.Tensor:
    x = x.contiguous()
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    t0 = time.perf_counter() if _ACTIVE else 0.0
    dist.all_gather(parts, x, group=group)
    if _ACTIVE:
        _record(name, "all_gather", x, size, direction, time.perf_counter() - t0)
    return torch.cat(parts, dim=dim)


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    full = x.shape[-1]
    if full % size:
        raise ValueError(f"last dim {full} of a {tuple(x.shape)} tensor is not divisible by the group size {size}")
    local = full // size
    start = dist.get_rank(group) * local
    return x[..., start : start + local].contiguous()


# ----------------------------------------------------------------------------- Functions
class _CopyToTPRegion(torch.autograd.Function):
    """fwd: identity, bwd: all-reduce (backward = ``_ReduceFromTPRegion.apply``)."""

    @staticmethod
    def forward(ctx, x, group, name):
        ctx.group, ctx.name = group, name
        return x

    @staticmethod
    def backward(ctx, grad):
        return _ReduceFromTPRegion.apply(grad, ctx.group, ctx.name, "bwd"), None, None


class _ReduceFromTPRegion(torch.autograd.Function):
    """fwd: all-reduce, bwd: identity (backward = ``_CopyToTPRegion.apply``)."""

    @staticmethod
    def forward(ctx, x, group, name, direction):
        ctx.group, ctx.name = group, name
        return _all_reduce(x, group, name, direction)

    @staticmethod
    def backward(ctx, grad):
        return _CopyToTPRegion.apply(grad, ctx.group, ctx.name), None, None, None


class _ScatterToTPRegion(torch.autograd.Function):
    """fwd: split (keep this rank's last-dim slice), bwd: all-gather (``_GatherFromTPRegion.apply``)."""

    @staticmethod
    def forward(ctx, x, group, name):
        ctx.group, ctx.name = group, name
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _GatherFromTPRegion.apply(grad, ctx.group, ctx.name, "bwd"), None, None


class _GatherFromTPRegion(torch.autograd.Function):
    """fwd: all-gather along the last dim, bwd: split (``_ScatterToTPRegion.apply``)."""

    @staticmethod
    def forward(ctx, x, group, name, direction):
        ctx.group, ctx.name = group, name
        return _all_gather(x, group, -1, name, direction)

    @staticmethod
    def backward(ctx, grad):
        return _ScatterToTPRegion.apply(grad, ctx.group, ctx.name), None, None, None


# ----------------------------------------------------------------------------- public API
def copy_to_tp_region(x: torch.Tensor, group, name: str = "copy_to_tp_region") -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input. fwd: identity, bwd: all-reduce.

    Use before a column-parallel op: each rank's use of ``x`` yields a partial gradient, and
    the all-reduce sums them. Shapes: ``[..., F] -> [..., F]``.
    """
    if group_size(group) == 1:
        return x
    return _CopyToTPRegion.apply(x, group, name)


def reduce_from_tp_region(x: torch.Tensor, group, name: str = "reduce_from_tp_region") -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results. fwd: all-reduce, bwd: identity.

    Use after a row-parallel op. Shapes: ``[..., F] -> [..., F]`` (replicated).
    """
    if group_size(group) == 1:
        return x
    return _ReduceFromTPRegion.apply(x, group, name, "fwd")


def scatter_to_tp_region(x: torch.Tensor, group, name: str = "scatter_to_tp_region") -> torch.Tensor:
    """Keep this rank's slice of the last dim. fwd: split, bwd: all-gather.

    Shapes: ``[..., F] -> [..., F / g]``.
    """
    if group_size(group) == 1:
        return x
    return _ScatterToTPRegion.apply(x, group, name)


def gather_from_tp_region(x: torch.Tensor, group, name: str = "gather_from_tp_region") -> torch.Tensor:
    """Concatenate the ranks' slices along the last dim. fwd: all-gather, bwd: split.

    Shapes: ``[..., F / g] -> [..., F]`` (rank order).
    """
    if group_size(group) == 1:
        return x
    return _GatherFromTPRegion.apply(x, group, name, "fwd")


def all_reduce_sum_scalars(s: torch.Tensor, group, name: str = "edge_scalars") -> torch.Tensor:
    """Sum per-edge partial dot products over the TP group. fwd: all-reduce, bwd: identity.

    Same Function as :func:`reduce_from_tp_region`; recorded as ``"edge_scalars"`` so a
    CommCounter can tell the E-scalar reduction (the per-edge scalar step of the TP plan in docs/architecture.md) from the
    N x H ones. Shapes: ``[E]`` or ``[E, k]`` -> same (replicated).
    """
    if group_size(group) == 1:
        return s
    return _ReduceFromTPRegion.apply(s, group, name, "fwd")


@torch.no_grad()
def all_gather_along_dim(x: torch.Tensor, dim: int, group, name: str = "all_gather") -> torch.Tensor:
    """Concatenate the ranks' equal-shaped ``x`` along ``dim``, without autograd.

    For parameter and gradient gathering (``full_weight()``, tests); counted with
    direction ``"fwd"``. Returns ``x`` unchanged for a one-rank group.
    """
    if group_size(group) == 1:
        return x
    return _all_gather(x, group, dim, name, "fwd")
