"""``segment_reduce``: sum, mean or max of the rows of ``src`` that share a segment id.

``out[i] = reduce_{e : index[e] = i} src[e]`` for sorted (CSR) or unsorted segment ids.
Empty segments give 0 for every reduction (PyG/torch-scatter convention). Max returns the
first maximal row per feature (in destination-sorted order) and routes its gradient there.

Shapes:
    src [E, *D], index [E] (or ptr [N + 1]) -> out [N, *D].
"""

from __future__ import annotations

from typing import Optional

import torch

from gnnmegatron.ops.dispatch import (CSRPlan, compute_dtype, csr_plan, deterministic, ptr_to_index, resolve_backend,
                                      settings)

REDUCTIONS = ("sum", "mean", "max")


# ----------------------------------------------------------------------------- reference
def segment_reduce_reference(src: torch.Tensor, index: torch.Tensor, num_segments: int,
                             reduce: str = "sum") -> torch.Tensor:
    """Plain torch oracle (``index_add`` / ``scatter_reduce``; autograd does the gradients)."""
    shape = (num_segments,) + tuple(src.shape[1:])
    cdt = compute_dtype(src.dtype)
    x = src.to(cdt)
    if reduce == "sum":
        out = x.new_zeros(shape).index_add(0, index, x)
    else:
        idx = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
        out = x.new_zeros(shape).scatter_reduce(0, idx, x, "mean" if reduce == "mean" else "amax",
                                                include_self=False)
    return out.to(src.dtype)


# ----------------------------------------------------------------------------- torch backend
def _torch_forward(src2: torch.Tensor, index: torch.Tensor, ptr: torch.Tensor,
                   reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    E, F = src2.shape
    N = ptr.numel() - 1
    cdt = compute_dtype(src2.dtype)
    if reduce in ("sum", "mean"):
        out = torch.zeros((N, F), dtype=cdt, device=src2.device).index_add_(0, index, src2.to(cdt))
        if reduce == "mean":
            out /= (ptr[1:] - ptr[:-1]).clamp_min(1).to(cdt).unsqueeze(1)
        return out.to(src2.dtype), src2.new_empty(0, dtype=torch.long)
    out = torch.zeros((N, F), dtype=src2.dtype, device=src2.device)
    out.scatter_reduce_(0, index.view(-1, 1).expand(-1, F), src2, "amax", include_self=False)
    # arg: the smallest edge id attaining the max, per feature; chunked so that the [chunk, F]
    # comparison temporaries stay small. Empty segments keep the sentinel E.
    arg = torch.full((N, F), E, dtype=torch.long, device=src2.device)
    step = settings.edges_per_chunk(F)
    for e0 in range(0, E, step):
        idx = index[e0:e0 + step]
        hit = src2[e0:e0 + step] == out[idx]
        ids = torch.arange(e0, e0 + idx.numel(), device=src2.device).unsqueeze(1)
        cand = torch.where(hit, ids, E)
        arg.scatter_reduce_(0, idx.view(-1, 1).expand(-1, F), cand, "amin", include_self=True)
    return out, arg


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("gnnmegatron::segment_reduce", mutates_args=())
def _segment_reduce_op(src: torch.Tensor, index: torch.Tensor, ptr: torch.Tensor, perm: Optional[torch.Tensor],
                       reduce: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, F] rows -> ([N, F] out, [N, F] int64 arg of max or an empty tensor). ``arg`` = E where empty."""
    if backend == "triton":
        from gnnmegatron.kernels.segment_reduce import segment_reduce_fwd
        return segment_reduce_fwd(src, ptr, perm, reduce, deterministic())
    src = src.contiguous()
    return _torch_forward(src, index, ptr, reduce)


@_segment_reduce_op.register_fake
def _(src, index, ptr, perm, reduce, backend):
    n = ptr.shape[0] - 1
    out = src.new_empty((n, src.shape[1]))
    arg = src.new_empty((n, src.shape[1]), dtype=torch.long) if reduce == "max" else src.new_empty(0, dtype=torch.long)
    return out, arg


def _setup(ctx, inputs, output):
    src, index, ptr, perm, reduce, backend = inputs
    ctx.reduce = reduce
    ctx.num_edges = src.shape[0]
    ctx.save_for_backward(index, ptr, output[1])


def _backward(ctx, grad_out, grad_arg):
    """Sum: gather; mean: gather / count; max: scatter to the arg rows. All plain torch ops,
    so they are differentiable again (double backward is a segment sum / gather)."""
    index, ptr, arg = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 6
    if ctx.reduce == "sum":
        g = grad_out.index_select(0, index)  # differentiable again through index_add (deterministic)
    elif ctx.reduce == "mean":
        count = (ptr[1:] - ptr[:-1]).clamp_min(1).to(grad_out.dtype).unsqueeze(1)
        g = (grad_out / count).index_select(0, index)
    else:
        E, F = ctx.num_edges, grad_out.shape[1]
        g = grad_out.new_zeros((E + 1, F)).scatter(0, arg, grad_out)[:E]
    return g, None, None, None, None, None


_segment_reduce_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public
def segment_reduce(src: torch.Tensor, index_or_ptr: torch.Tensor | None = None, num_segments: int | None = None,
                   reduce: str = "sum", *, layout: str = "index", sorted: bool | None = None,
                   plan: CSRPlan | None = None, backend: str | None = None) -> torch.Tensor:
    """Reduce the rows of ``src`` per segment.

    Args:
        src: [E, *D] rows (float16/bfloat16/float32/float64; accumulation is fp32 or better).
        index_or_ptr: ``layout="index"``: [E] int64 segment id per row (sorted or not);
            ``layout="ptr"``: [N + 1] CSR pointer, rows already grouped by segment.
            May be ``None`` when ``plan`` is given.
        num_segments: N (required for ``layout="index"`` unless ``plan`` is given).
        reduce: ``"sum"``, ``"mean"`` or ``"max"``; empty segments give 0.
        layout: ``"index"`` or ``"ptr"``.
        sorted: index known sorted (``True``), unsorted (``False``), or ``None`` to check.
        plan: a ``CSRPlan`` from ``csr_plan(index, N)`` to share between ops on one graph.
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or ``None``/``"auto"`` (see dispatch).

    Returns:
        [N, *D] in the dtype of ``src``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {list(REDUCTIONS)}, got {reduce!r}")
    if plan is None:
        if index_or_ptr is None:
            raise ValueError("segment_reduce needs index_or_ptr or plan")
        if layout == "ptr":
            ptr = index_or_ptr.to(torch.long)
            if ptr.numel() - 1 != (num_segments if num_segments is not None else ptr.numel() - 1):
                raise ValueError(f"ptr has {ptr.numel()} entries, so {ptr.numel() - 1} segments, "
                                 f"but num_segments={num_segments}")
            plan = CSRPlan(ptr, None, ptr_to_index(ptr))
        elif layout == "index":
            if num_segments is None:
                raise ValueError("segment_reduce(layout='index') needs num_segments")
            plan = csr_plan(index_or_ptr, num_segments, sorted)
        else:
            raise ValueError(f"layout must be 'index' or 'ptr', got {layout!r}")
    num = plan.ptr.numel() - 1
    if src.shape[0] != plan.index.numel():
        raise ValueError(f"src has {src.shape[0]} rows but the index has {plan.index.numel()} entries")
    name = resolve_backend(backend, src.device)
    if name == "reference":
        return segment_reduce_reference(src, plan.index, num, reduce)
    rest = tuple(src.shape[1:])
    width = 1
    for d in rest:
        width *= d
    if width == 0:
        return src.new_zeros((num,) + rest)
    src2 = src.reshape(src.shape[0], width)
    out, _ = _segment_reduce_op(src2, plan.index, plan.ptr, plan.perm, reduce, name)
    return out.reshape((num,) + rest)
