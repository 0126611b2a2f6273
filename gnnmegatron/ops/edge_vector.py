"""``edge_vector_aggregate``: ``out[i] = sum_{e : dst_e = i} vec_e * g_e``.

The coordinate update of E(n)-GNN (``vec = r_ij``, ``g = -s_ij / (|r_ij| + 1)``) and the
direct force head (``vec = r_ij``, ``g = w_ij phi_f(a_ij) / |r_ij|``) are this op.

Shapes:
    vec [E, 3] (any trailing width D works), g [E], dst [E] -> out [N, D].
"""

from __future__ import annotations

from typing import Optional

import torch

from gnnmegatron.ops.dispatch import CSRPlan, autocast_inputs, compute_dtype, csr_plan, deterministic, resolve_backend


def edge_vector_aggregate_reference(vec: torch.Tensor, g: torch.Tensor, dst: torch.Tensor,
                                    num_nodes: int) -> torch.Tensor:
    """Plain torch oracle: ``zeros(N, D).index_add(0, dst, vec * g[:, None])``."""
    cdt = compute_dtype(vec.dtype)
    out = vec.new_zeros((num_nodes, vec.shape[1]), dtype=cdt).index_add(0, dst, vec.to(cdt) * g.to(cdt).unsqueeze(1))
    return out.to(vec.dtype)


@torch.library.custom_op("gnnmegatron::edge_vector_aggregate", mutates_args=())
def _edge_vector_op(vec: torch.Tensor, g: torch.Tensor, index: torch.Tensor, ptr: torch.Tensor,
                    perm: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "triton":  # the launcher makes its inputs contiguous and aligned
        from gnnmegatron.kernels.edge_vector import edge_vector_aggregate_fwd
        return edge_vector_aggregate_fwd(vec, g, ptr, perm, deterministic())
    vec, g = vec.contiguous(), g.contiguous()
    # torch backend: the [E, D] product is no larger than vec itself, so no chunking is needed
    return edge_vector_aggregate_reference(vec, g, index, ptr.numel() - 1)


@_edge_vector_op.register_fake
def _(vec, g, index, ptr, perm, backend):
    return vec.new_empty((ptr.shape[0] - 1, vec.shape[1]))


def _setup(ctx, inputs, output):
    vec, g, index, ptr, perm, backend = inputs
    ctx.save_for_backward(vec, g, index)


def _backward(ctx, grad_out):
    """``dvec_e = grad_out[dst_e] g_e``, ``dg_e = grad_out[dst_e] . vec_e``: a gather and an
    elementwise product in plain torch, hence differentiable again (double backward)."""
    vec, g, index = ctx.saved_tensors
    go = grad_out.index_select(0, index)  # its own backward is index_add: deterministic on CPU
    dvec = go * g.unsqueeze(1).to(go.dtype) if ctx.needs_input_grad[0] else None
    dg = (go * vec.to(go.dtype)).sum(1).to(g.dtype) if ctx.needs_input_grad[1] else None
    return (dvec.to(vec.dtype) if dvec is not None else None), dg, None, None, None, None


_edge_vector_op.register_autograd(_backward, setup_context=_setup)


def edge_vector_aggregate(vec: torch.Tensor, g: torch.Tensor, edge_index: torch.Tensor | None = None,
                          num_nodes: int | None = None, *, sorted: bool | None = None, plan: CSRPlan | None = None,
                          backend: str | None = None) -> torch.Tensor:
    """Sum edge vectors scaled by per-edge scalars into their destination nodes.

    Args:
        vec: [E, D] edge vectors (D = 3 for coordinates and forces).
        g: [E] per-edge scalars.
        edge_index: [2, E] int64 (row 0 = dst i, row 1 = src j) or the [E] dst row alone.
            May be ``None`` when ``plan`` is given.
        num_nodes: N (needed unless ``plan`` is given).
        sorted: dst known sorted / unsorted / ``None`` to check.
        plan: shared ``CSRPlan`` of dst.
        backend: see ``gnnmegatron.ops.dispatch``.

    Returns:
        [N, D] in the dtype of ``vec`` (the wider of ``vec`` and ``g`` under ``torch.autocast``).
    """
    if plan is None:
        if edge_index is None or num_nodes is None:
            raise ValueError("edge_vector_aggregate needs edge_index and num_nodes, or plan")
        dst = edge_index[0] if edge_index.dim() == 2 else edge_index
        plan = csr_plan(dst, num_nodes, sorted)
    E = plan.index.numel()
    if vec.dim() != 2 or vec.shape[0] != E or g.shape != (E,):
        raise ValueError(f"edge_vector_aggregate needs vec [E, D] and g [E] with E={E}, got {list(vec.shape)} "
                         f"and {list(g.shape)}")
    name = resolve_backend(backend, vec.device)
    (vec, g), autocast_off = autocast_inputs(vec.device, vec, g, promote=True)
    with autocast_off:
        if name == "reference":
            return edge_vector_aggregate_reference(vec, g, plan.index, plan.ptr.numel() - 1)
        return _edge_vector_op(vec, g, plan.index, plan.ptr, plan.perm, name)
