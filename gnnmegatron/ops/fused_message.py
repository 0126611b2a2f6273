"""``fused_message_aggregate``: EGNN's first edge layer, gathered, activated and summed per node.

::

    z_ij = P_i + Q_j + R_ij C + b          (P = h A^T, Q = h B^T: per-node GEMMs done by the caller)
    m_i  = sum_{j : (i, j) in E} w_ij act(z_ij)
    s_ij = act(z_ij) . v                    (optional per-edge scalars: coordinate / force heads)

No ``[E, F]`` tensor is stored for backward: the backward op recomputes ``z`` chunk by chunk
(torch backend) or tile by tile (triton backend). Gradients reach P, Q, R, C, b, w and v.

Double backward (conservative-force training differentiates the backward once more): the
``gnnmegatron::fused_message_bwd2`` op (``fused_message_grad2``): closed-form formulas, as a
triton kernel or chunk by chunk in torch (its twin). When grad mode is on inside the double
backward (a third derivative will be taken) the torch twin runs under autograd instead.

Deterministic mode (``gnnmegatron.ops.dispatch.deterministic``): the triton backend sums dQ over
a source-sorted plan instead of fp32 atomics and skips autotuning; see ``kernels/fused_message_bwd.py``.

Registered ops (``torch.library.custom_op``, with fake implementations for torch.compile):
``gnnmegatron::fused_message_fwd``, ``gnnmegatron::fused_message_bwd`` and
``gnnmegatron::fused_message_bwd2``.

Shapes:
    P [N, F], Q [N_src, F], edge_index [2, E] (row 0 = dst i, row 1 = src j), R [E, K],
    C [K, F], b [F], w [E], v [F] -> m [N, F], s [E].
"""

from __future__ import annotations

import builtins  # the public function's `sorted` argument shadows the builtin

from typing import Optional, Sequence

import torch

from gnnmegatron.kernels.codes import MAX_K
from gnnmegatron.ops.activations import act, check_activation
from gnnmegatron.ops.dispatch import (CSRPlan, autocast_inputs, backend_requested, compute_dtype, csr_plan,
                                      deterministic, drop_zero, resolve_backend, wanted_grads)
from gnnmegatron.ops.fused_message_grad2 import OUTPUTS as GRAD2_OUTPUTS
from gnnmegatron.ops.fused_message_grad2 import fused_message_bwd2_op, fused_message_bwd2_torch
from gnnmegatron.ops.fused_message_torch import fused_message_bwd_torch, fused_message_fwd_torch

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- reference
def fused_message_reference(P: Tensor, Q: Tensor, edge_index: Tensor, R: Tensor, C: Tensor, b: Tensor | None = None,
                            w: Tensor | None = None, v: Tensor | None = None, activation: str = "silu"):
    """Plain torch oracle that materialises the [E, F] pre-activations (fp32 math for half inputs)."""
    dst, src = edge_index[0], edge_index[1]
    cdt = compute_dtype(P.dtype)
    # index_select, not P[dst]: its backward is index_add, deterministic on CPU threads (advanced
    # indexing's backward, index_put_ with accumulate, is not)
    z = P.index_select(0, dst).to(cdt) + Q.index_select(0, src).to(cdt) + R.to(cdt) @ C.to(cdt)
    if b is not None:
        z = z + b.to(cdt)
    a = act(activation, z)
    msg = a * w.to(cdt).unsqueeze(1) if w is not None else a
    m = msg.new_zeros((P.shape[0], P.shape[1])).index_add(0, dst, msg).to(P.dtype)
    if v is None:
        return m
    return m, (a @ v.to(cdt)).to(P.dtype)


# ----------------------------------------------------------------------------- forward op
@torch.library.custom_op("gnnmegatron::fused_message_fwd", mutates_args=())
def fused_message_fwd(P: Tensor, Q: Tensor, dst: Tensor, src: Tensor, ptr: Tensor, perm: Optional[Tensor],
                      R: Tensor, C: Tensor, b: Tensor, w: Optional[Tensor], v: Optional[Tensor],
                      activation: str, backend: str, deterministic: bool) -> tuple[Tensor, Tensor]:
    """``(m [N, F], s [E] or [0])``; ``dst`` in caller order, ``ptr``/``perm`` its CSR plan."""
    if backend == "triton":
        from gnnmegatron.kernels.fused_message import fused_message_fwd as launch
        return launch(P, Q, src, ptr, perm, R, C, b, w, v, activation, deterministic)
    return fused_message_fwd_torch(P, Q, dst, src, perm, R, C, b, w, v, activation)


@fused_message_fwd.register_fake
def _(P, Q, dst, src, ptr, perm, R, C, b, w, v, activation, backend, deterministic):
    return P.new_empty(P.shape), P.new_empty((R.shape[0],) if v is not None else (0,))


# ----------------------------------------------------------------------------- backward op
@torch.library.custom_op("gnnmegatron::fused_message_bwd", mutates_args=())
def fused_message_bwd(gm: Tensor, gs: Optional[Tensor], P: Tensor, Q: Tensor, dst: Tensor, src: Tensor, ptr: Tensor,
                      perm: Optional[Tensor], R: Tensor, C: Tensor, b: Tensor, w: Optional[Tensor], v: Optional[Tensor],
                      src_ptr: Optional[Tensor], src_perm: Optional[Tensor], activation: str, backend: str,
                      needs: Sequence[bool], deterministic: bool) -> list[Tensor]:
    """``[dP, dQ, dR, dC, db, dw, dv]``; an entry not in ``needs`` (or dw/dv without w/v) is empty.

    ``src_ptr``/``src_perm``: the source-sorted plan (deterministic triton dQ; built when absent)."""
    needs = [bool(n) for n in needs]
    if backend == "triton":
        from gnnmegatron.kernels.fused_message import fused_message_bwd as launch
        return list(launch(gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, activation, needs, src_ptr, src_perm,
                           deterministic))
    return list(fused_message_bwd_torch(gm, gs, P, Q, dst, src, perm, R, C, b, w, v, activation, needs))


def _bwd_shapes(P, Q, R, C, b, w, v, needs):
    full = [P, Q, R, C, b, w, v]
    return [t.new_empty(t.shape) if (n and t is not None) else P.new_empty(0) for t, n in zip(full, needs)]


@fused_message_bwd.register_fake
def _(gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, src_ptr, src_perm, activation, backend, needs,
      deterministic):
    return _bwd_shapes(P, Q, R, C, b, w, v, needs)


# ----------------------------------------------------------------------------- autograd
def _fwd_setup(ctx, inputs, output):
    P, Q, dst, src, ptr, perm, R, C, b, w, v, activation, backend, det = inputs
    ctx.activation, ctx.backend, ctx.deterministic = activation, backend, det
    ctx.save_for_backward(P, Q, dst, src, ptr, perm, R, C, b, w, v)


def _source_plan(ctx_backend: str, det: bool, src: Tensor, num_sources: int, need_q: bool):
    """The source-sorted plan, built once per backward where the deterministic triton dQ needs it."""
    if not (ctx_backend == "triton" and det and need_q):
        return None, None
    perm = torch.argsort(src, stable=True)
    ptr = torch.searchsorted(src[perm], torch.arange(num_sources + 1, device=src.device, dtype=src.dtype))
    return ptr, perm


def _fwd_backward(ctx, gm, gs):
    P, Q, dst, src, ptr, perm, R, C, b, w, v = ctx.saved_tensors
    ng = ctx.needs_input_grad
    needs = wanted_grads([ng[0], ng[1], ng[6], ng[7], ng[8], ng[9], ng[10]], [P, Q, R, C, b, w, v])
    if not any(needs):
        return (None,) * 14
    if gm is None:
        gm = torch.zeros_like(P)
    if v is None:
        gs = None
    elif gs is None:
        gs = P.new_zeros(R.shape[0])
    src_ptr, src_perm = _source_plan(ctx.backend, ctx.deterministic, src, Q.shape[0], needs[1])
    outs = fused_message_bwd(gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, src_ptr, src_perm,
                             ctx.activation, ctx.backend, needs, ctx.deterministic)
    dP, dQ, dR, dC, db, dw, dv = [o if n else None for o, n in zip(outs, needs)]
    return dP, dQ, None, None, None, None, dR, dC, db, dw, dv, None, None, None


fused_message_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _bwd_setup(ctx, inputs, output):
    gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, src_ptr, src_perm, activation, backend, needs, det = inputs
    ctx.activation, ctx.backend, ctx.deterministic = activation, backend, det
    ctx.save_for_backward(gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, src_ptr, src_perm)


def _bwd_backward(ctx, *grads):
    """Double backward: the bwd2 op, or its torch twin under autograd when grad mode is on."""
    gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, src_ptr, src_perm = ctx.saved_tensors
    ng = ctx.needs_input_grad
    need = dict(zip(("gm", "gs", "P", "Q", "R", "C", "b", "w", "v"), wanted_grads(
        [ng[0], ng[1], ng[2], ng[3], ng[8], ng[9], ng[10], ng[11], ng[12]], [gm, gs, P, Q, R, C, b, w, v])))
    if len(grads) == 1 and isinstance(grads[0], (list, tuple)):  # list-returning ops get one list
        grads = tuple(grads[0])
    # per-edge / per-node cotangents as they come; the weights' ones dropped when all zero
    gg = [drop_zero(g, limit=(0 if k in ("P", "Q", "R", "w") else 1 << 24)) if g is not None and g.numel() else None
          for k, g in zip(("P", "Q", "R", "C", "b", "w", "v"), grads)]
    if not any(need.values()):
        out = {k: None for k in GRAD2_OUTPUTS}
    elif torch.is_grad_enabled():
        out = fused_message_bwd2_torch(gm, gs, P, Q, dst, src, perm, R, C, b, w, v, ctx.activation, gg, need)
    else:
        if src_ptr is None:
            src_ptr, src_perm = _source_plan(ctx.backend, ctx.deterministic, src, Q.shape[0], need["Q"])
        res = fused_message_bwd2_op(gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, *gg, src_ptr, src_perm,
                                    ctx.activation, ctx.backend, [need[k] for k in GRAD2_OUTPUTS],
                                    ctx.deterministic)
        out = {k: (t if need[k] else None) for k, t in zip(GRAD2_OUTPUTS, res)}
    return (out["gm"], out["gs"], out["P"], out["Q"], None, None, None, None, out["R"], out["C"], out["b"],
            out["w"], out["v"], None, None, None, None, None, None)


fused_message_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


# ----------------------------------------------------------------------------- public
def fused_message_aggregate(P: Tensor, Q: Tensor, edge_index: Tensor, R: Tensor, C: Tensor, b: Tensor | None = None,
                            w: Tensor | None = None, v: Tensor | None = None, *, activation: str = "silu",
                            sorted: bool | None = None, plan: CSRPlan | None = None, backend: str | None = None):
    """``m_i = sum_j w_ij act(P_i + Q_j + R_ij C + b)`` and optionally ``s_ij = act(...) . v``.

    Args:
        P: [N, F] receiver projections (``h @ A^T``), one row per destination node.
        Q: [N_src, F] neighbour projections (``h @ B^T``).
        edge_index: [2, E] int64, row 0 = dst i, row 1 = src j (sorted by dst or not).
        R: [E, K] radial basis features.
        C: [K, F] radial weight; ``b``: [F] bias (optional).
        w: [E] per-edge envelope (optional, 1 when absent).
        v: [F] vector of the per-edge scalars (optional).
        activation: ``"silu"`` (default), ``"gelu"``, ``"tanh"`` or ``"softplus"``.
        sorted: dst known sorted / unsorted / ``None`` to check.
        plan: shared ``CSRPlan`` of ``edge_index[0]`` (then ``sorted`` is ignored).
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or ``None``/``"auto"``.

    Returns:
        ``m`` [N, F], or ``(m, s)`` with ``s`` [E] when ``v`` is given; dtype of P.

    Under ``torch.autocast`` every float input is first cast to the autocast dtype (see
    :func:`gnnmegatron.ops.dispatch.autocast_inputs`); otherwise they must share one dtype.
    """
    check_activation(activation)
    (P, Q, R, C, b, w, v), autocast_off = autocast_inputs(P.device, P, Q, R, C, b, w, v)
    with autocast_off:
        return _fused_message_aggregate(P, Q, edge_index, R, C, b, w, v, activation, sorted, plan, backend)


def _fused_message_aggregate(P, Q, edge_index, R, C, b, w, v, activation, sorted, plan, backend):
    N, F = P.shape
    E = edge_index.shape[1]
    problems = []
    if Q.dim() != 2 or Q.shape[1] != F:
        problems.append(f"Q {list(Q.shape)} must be [N_src, F={F}]")
    if R.dim() != 2 or R.shape[0] != E:
        problems.append(f"R {list(R.shape)} must be [E={E}, K]")
    K = R.shape[1] if R.dim() == 2 else -1
    if tuple(C.shape) != (K, F):
        problems.append(f"C {list(C.shape)} must be [K={K}, F={F}]")
    for name, t, shape in (("b", b, (F,)), ("w", w, (E,)), ("v", v, (F,))):
        if t is not None and tuple(t.shape) != shape:
            problems.append(f"{name} {list(t.shape)} must be {list(shape)}")
    dtypes = {t.dtype for t in (P, Q, R, C, b, w, v) if t is not None}
    if len(dtypes) != 1:
        problems.append(f"all float inputs must share one dtype, got {builtins.sorted(str(d) for d in dtypes)}")
    if problems:
        raise ValueError("fused_message_aggregate: " + "; ".join(problems))
    name = resolve_backend(backend, P.device)
    if name == "triton" and K > MAX_K:
        if backend_requested(backend):
            raise ValueError(f"fused_message_aggregate: the triton backend takes K <= {MAX_K} radial functions, got "
                             f"K={K}; use backend='torch'")
        name = "torch"  # chosen by device: the chunked torch path runs on CUDA too
    if name == "reference":
        return fused_message_reference(P, Q, edge_index, R, C, b, w, v, activation)
    if plan is None:
        plan = csr_plan(edge_index[0], N, sorted)
    if b is None:
        b = P.new_zeros(F)
    m, s = fused_message_fwd(P, Q, plan.index, edge_index[1], plan.ptr, plan.perm, R, C, b, w, v, activation, name,
                             deterministic())
    return m if v is None else (m, s)
