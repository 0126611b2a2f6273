"""``faithful_message_aggregate``: HydraGNN's whole E_GCL edge MLP, summed per receiver, without an
[E, H] tensor (the ``message: faithful`` EGNN of the scaling study, fused).

::

    z1_ij = P_i + Q_j + R_ij C + b1          (P = h A^T, Q = h B^T: per-node GEMMs done by the caller)
    a_ij  = act(act(z1_ij) W2^T + b2)        (the edge MLP: Linear-act-Linear-act)
    m_i   = sum_{j : (i, j) in E} w_ij a_ij
    s_ij  = act(a_ij Wc^T + bc) . v          (optional: the coordinate MLP's per-edge scalar)

This equals ``edge_mlp(cat([h_i, h_j, rbf_ij]))`` followed by the envelope-weighted sum and
``coord_mlp``, with ``W1 = [A, B, C^T]`` split per node as in ``fused_message_aggregate``: the first
linear's two ``H x H`` blocks run once per node instead of once per edge. The rest of the MLP runs
tile by tile (``chunk`` edges at a time in the torch backend, ``BLOCK_E`` in the triton kernels):
no [E, H] tensor is stored for backward, which recomputes the tile's forward first (as
FlashAttention recomputes attention), and the double backward (conservative forces and stress)
does the same (``faithful_message_grad2``). Gradients reach P, Q, R, C, b1, W2, b2, w, Wc, bc, v;
the backward skips the ones the running backward pass will not use (a conservative-force pass asks
only for the geometry's: P, Q, R and w), which saves two of its six ``[chunk, H] x [H, H]`` products.

Backends: ``reference`` (plain torch on [E, H] tensors, autograd for every order: the oracle),
``torch`` (chunked, ``faithful_message_torch``: the CPU path) and ``triton`` (GPU kernels
``gnnmegatron.kernels.faithful_message``). Registered ops (``torch.library.custom_op``, with fake
implementations): ``gnnmegatron::faithful_message_fwd``, ``..._bwd`` and ``..._bwd2``.

Shapes:
    P [N, F1], Q [N_src, F1], edge_index [2, E] (row 0 = dst i, row 1 = src j), R [E, K], C [K, F1],
    b1 [F1], W2 [F2, F1], b2 [F2], w [E], Wc [F3, F2], bc [F3], v [F3] -> m [N, F2], s [E].
"""

from __future__ import annotations

import builtins  # the public function's `sorted` argument shadows the builtin

from typing import Optional, Sequence

import torch
import torch.nn.functional as Fn

from gnnmegatron.kernels.codes import MAX_K
from gnnmegatron.ops.activations import act, check_activation
from gnnmegatron.ops.dispatch import (CSRPlan, autocast_inputs, backend_requested, compute_dtype, csr_plan,
                                      deterministic, drop_zero, resolve_backend, wanted_grads)
from gnnmegatron.ops.faithful_message_grad2 import OUTPUTS as GRAD2_OUTPUTS
from gnnmegatron.ops.faithful_message_grad2 import faithful_bwd2_torch, faithful_message_bwd2_op
from gnnmegatron.ops.faithful_message_torch import NEEDS, faithful_bwd_torch, faithful_fwd_torch, tp_group_id, tp_reducer

Tensor = torch.Tensor
# positions of the differentiable tensors in the fwd op's inputs, in NEEDS order
_FWD_POS = dict(P=0, Q=1, R=6, C=7, b1=8, W2=9, b2=10, w=11, Wc=12, bc=13, v=14)


# ----------------------------------------------------------------------------- reference
def faithful_message_reference(P: Tensor, Q: Tensor, edge_index: Tensor, R: Tensor, C: Tensor, b1: Tensor | None,
                               W2: Tensor, b2: Tensor | None = None, w: Tensor | None = None,
                               Wc: Tensor | None = None, bc: Tensor | None = None, v: Tensor | None = None,
                               activation: str = "silu", tp: int = -1):
    """Plain torch oracle that materialises every [E, H] tensor (fp32 math for half inputs)."""
    dst, src = edge_index[0], edge_index[1]
    cdt = compute_dtype(P.dtype)

    def c(t):
        return t.to(cdt) if t is not None else None

    z1 = P.index_select(0, dst).to(cdt) + Q.index_select(0, src).to(cdt) + R.to(cdt) @ C.to(cdt)
    if b1 is not None:
        z1 = z1 + b1.to(cdt)
    reduce = tp_reducer(tp)
    if reduce is None:
        a = act(activation, Fn.linear(act(activation, z1), c(W2), c(b2)))
    else:  # tensor parallelism: partial products of this rank's first-layer units, summed over the ranks
        z2 = reduce(act(activation, z1) @ c(W2).t())
        a = act(activation, z2 + c(b2) if b2 is not None else z2)
    msg = a * w.to(cdt).unsqueeze(1) if w is not None else a
    m = msg.new_zeros((P.shape[0], W2.shape[0])).index_add(0, dst, msg).to(P.dtype)
    if v is None:
        return m
    s = act(activation, Fn.linear(a, c(Wc), c(bc))) @ v.to(cdt)
    return m, s.to(P.dtype)


# ----------------------------------------------------------------------------- forward op
@torch.library.custom_op("gnnmegatron::faithful_message_fwd", mutates_args=())
def faithful_message_fwd(P: Tensor, Q: Tensor, dst: Tensor, src: Tensor, ptr: Tensor, perm: Optional[Tensor],
                         R: Tensor, C: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, w: Optional[Tensor],
                         Wc: Optional[Tensor], bc: Optional[Tensor], v: Optional[Tensor], activation: str,
                         backend: str, deterministic: bool, tp: int) -> tuple[Tensor, Tensor]:
    """``(m [N, F2], s [E] or [0])``; ``dst`` in caller order, ``ptr``/``perm`` its CSR plan; ``tp``: the
    tensor-parallel group id (``tp_group_id``; -1 none)."""
    if backend == "triton":
        from gnnmegatron.kernels.faithful_message import faithful_message_fwd as launch
        return launch(P, Q, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, deterministic, dst=dst)
    m, s = faithful_fwd_torch(P, Q, dst, src, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, tp)
    return m.to(P.dtype), s.to(P.dtype)


@faithful_message_fwd.register_fake
def _(P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, backend, deterministic, tp):
    return P.new_empty((P.shape[0], W2.shape[0])), P.new_empty((R.shape[0],) if v is not None else (0,))


# ----------------------------------------------------------------------------- backward op
@torch.library.custom_op("gnnmegatron::faithful_message_bwd", mutates_args=())
def faithful_message_bwd(gm: Tensor, gs: Optional[Tensor], P: Tensor, Q: Tensor, dst: Tensor, src: Tensor,
                         ptr: Tensor, perm: Optional[Tensor], R: Tensor, C: Tensor, b1: Tensor, W2: Tensor,
                         b2: Tensor, w: Optional[Tensor], Wc: Optional[Tensor], bc: Optional[Tensor],
                         v: Optional[Tensor], activation: str, backend: str, needs: Sequence[bool],
                         deterministic: bool, tp: int) -> list[Tensor]:
    """``[dP, dQ, dR, dC, db1, dW2, db2, dw, dWc, dbc, dv]``; an entry not in ``needs`` (or of an
    absent input) is empty."""
    needs = [bool(n) for n in needs]
    if backend == "triton":
        from gnnmegatron.kernels.faithful_message import faithful_message_bwd as launch
        return list(launch(gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, needs,
                           deterministic=deterministic))
    return faithful_bwd_torch(gm, gs, P, Q, dst, src, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, needs, tp)


@faithful_message_bwd.register_fake
def _(gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, backend, needs, deterministic,
      tp):
    full = [P, Q, R, C, b1, W2, b2, w, Wc, bc, v]
    return [t.new_empty(t.shape) if (n and t is not None) else P.new_empty(0) for t, n in zip(full, needs)]


# ----------------------------------------------------------------------------- autograd
def _fwd_setup(ctx, inputs, output):
    P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, backend, det, tp = inputs
    ctx.activation, ctx.backend, ctx.deterministic, ctx.tp = activation, backend, det, tp
    ctx.save_for_backward(P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v)


def _fwd_backward(ctx, gm, gs):
    P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v = ctx.saved_tensors
    saved = dict(P=P, Q=Q, R=R, C=C, b1=b1, W2=W2, b2=b2, w=w, Wc=Wc, bc=bc, v=v)
    needs = wanted_grads([ctx.needs_input_grad[_FWD_POS[k]] for k in NEEDS], [saved[k] for k in NEEDS])
    if gm is None:
        gm = P.new_zeros((P.shape[0], W2.shape[0]))
    if v is None:
        gs = None
    elif gs is None:
        gs = P.new_zeros(R.shape[0])
    grads = [None] * 19
    if any(needs):
        outs = faithful_message_bwd(gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v,
                                    ctx.activation, ctx.backend, needs, ctx.deterministic, ctx.tp)
        for k, o, n in zip(NEEDS, outs, needs):
            grads[_FWD_POS[k]] = o if n else None
    return tuple(grads)


faithful_message_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)

# positions of the double backward's inputs (the bwd op's differentiable inputs) in GRAD2_OUTPUTS order
_BWD_POS = dict(gm=0, gs=1, P=2, Q=3, R=8, C=9, b1=10, W2=11, b2=12, w=13, Wc=14, bc=15, v=16)


def _bwd_setup(ctx, inputs, output):
    gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, backend, needs, det, tp = inputs
    ctx.activation, ctx.backend, ctx.deterministic, ctx.tp = activation, backend, det, tp
    ctx.save_for_backward(gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v)


def _bwd_backward(ctx, *grads):
    """Double backward: the bwd2 op, or its torch twin under autograd when grad mode is on."""
    gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v = ctx.saved_tensors
    saved = dict(gm=gm, gs=gs, P=P, Q=Q, R=R, C=C, b1=b1, W2=W2, b2=b2, w=w, Wc=Wc, bc=bc, v=v)
    wanted = wanted_grads([ctx.needs_input_grad[_BWD_POS[k]] for k in GRAD2_OUTPUTS], [saved[k] for k in GRAD2_OUTPUTS])
    need = dict(zip(GRAD2_OUTPUTS, wanted))
    if len(grads) == 1 and isinstance(grads[0], (list, tuple)):  # list-returning ops get one list
        grads = tuple(grads[0])
    # per-edge / per-node cotangents as they come; the weights' ones dropped when all zero (not under
    # tensor parallelism: every rank must take the same path, the same collectives)
    limit = 0 if ctx.tp >= 0 else 1 << 24
    tangents = [drop_zero(g, limit=(0 if k in ("P", "Q", "R", "w") else limit)) if g is not None and g.numel()
                else None for k, g in zip(("P", "Q", "R", "C", "b1", "W2", "b2", "w", "Wc", "bc", "v"), grads)]
    if not any(need.values()) or all(t is None for t in tangents):
        out = {k: None for k in GRAD2_OUTPUTS}
    elif torch.is_grad_enabled():
        out = faithful_bwd2_torch(gm, gs, P, Q, dst, src, perm, R, C, b1, W2, b2, w, Wc, bc, v, ctx.activation,
                                  tangents, need, ctx.tp)
    else:
        res = faithful_message_bwd2_op(gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v,
                                       *tangents, ctx.activation, ctx.backend, [need[k] for k in GRAD2_OUTPUTS],
                                       ctx.deterministic, ctx.tp)
        out = {k: (t if need[k] else None) for k, t in zip(GRAD2_OUTPUTS, res)}
    result = [None] * 22
    for k in GRAD2_OUTPUTS:
        result[_BWD_POS[k]] = out[k]
    return tuple(result)


faithful_message_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


# ----------------------------------------------------------------------------- public
def faithful_message_aggregate(P: Tensor, Q: Tensor, edge_index: Tensor, R: Tensor, C: Tensor, b1: Tensor | None,
                               W2: Tensor, b2: Tensor | None = None, w: Tensor | None = None,
                               Wc: Tensor | None = None, bc: Tensor | None = None, v: Tensor | None = None, *,
                               activation: str = "silu", sorted: bool | None = None, plan: CSRPlan | None = None,
                               backend: str | None = None, tp_group=None):
    """``m_i = sum_j w_ij act(act(P_i + Q_j + R_ij C + b1) W2^T + b2)`` and optionally the coordinate
    scalars ``s_ij = act(a_ij Wc^T + bc) . v``, without an [E, H] tensor.

    Args:
        P: [N, F1] receiver projections (``h @ A^T``, ``A = edge_mlp[0].weight[:, :H]``).
        Q: [N_src, F1] neighbour projections (``h @ B^T``).
        edge_index: [2, E] int64, row 0 = dst i, row 1 = src j (sorted by dst or not).
        R: [E, K] radial basis features; C: [K, F1] radial weight (``edge_mlp[0].weight[:, 2H:].T``).
        b1: [F1] first bias (optional). W2: [F2, F1], b2: [F2]: the second edge linear (``edge_mlp[2]``).
        w: [E] per-edge envelope (optional, 1 when absent).
        Wc: [F3, F2], bc: [F3], v: [F3]: the coordinate MLP ``Linear(F2, F3) -> act -> v`` (all three or
            none; ``bc`` may be None).
        activation: ``"silu"`` (default), ``"gelu"``, ``"tanh"`` or ``"softplus"`` (both activations).
        sorted: dst known sorted / unsorted / ``None`` to check.
        plan: shared ``CSRPlan`` of ``edge_index[0]`` (then ``sorted`` is ignored).
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or ``None``/``"auto"``.
        tp_group: tensor parallelism (the faithful block's Megatron layout, ``TPEGCLFaithful``): P, Q,
            C and b1 hold this rank's slice of the first layer's units and W2 [F2, F1/tp] the matching
            input columns of the second linear (row-parallel). Each tile's partial ``a1 W2^T`` is then
            summed over the group (an all-reduce of ``chunk x F2`` per chunk, again in the backward's
            recompute and, stacked with its tangent, in the double backward); everything after it,
            ``m`` and ``s`` included, is replicated. Torch backend only (on any device).

    Returns:
        ``m`` [N, F2], or ``(m, s)`` with ``s`` [E] when ``v`` is given; dtype of P.

    Under ``torch.autocast`` every float input is first cast to the autocast dtype (as the GEMMs it
    replaces would be); otherwise they must share one dtype.
    """
    check_activation(activation)
    (P, Q, R, C, b1, W2, b2, w, Wc, bc, v), autocast_off = autocast_inputs(P.device, P, Q, R, C, b1, W2, b2, w, Wc,
                                                                          bc, v)
    with autocast_off:
        return _faithful(P, Q, edge_index, R, C, b1, W2, b2, w, Wc, bc, v, activation, sorted, plan, backend,
                         tp_group_id(tp_group))


def _faithful(P, Q, edge_index, R, C, b1, W2, b2, w, Wc, bc, v, activation, sorted, plan, backend, tp):
    N, F1 = P.shape
    E = edge_index.shape[1]
    problems = []
    if Q.dim() != 2 or Q.shape[1] != F1:
        problems.append(f"Q {list(Q.shape)} must be [N_src, F1={F1}]")
    if R.dim() != 2 or R.shape[0] != E:
        problems.append(f"R {list(R.shape)} must be [E={E}, K]")
    K = R.shape[1] if R.dim() == 2 else -1
    if tuple(C.shape) != (K, F1):
        problems.append(f"C {list(C.shape)} must be [K={K}, F1={F1}]")
    if W2.dim() != 2 or W2.shape[1] != F1:
        problems.append(f"W2 {list(W2.shape)} must be [F2, F1={F1}]")
    F2 = W2.shape[0] if W2.dim() == 2 else -1
    if (Wc is None) != (v is None):
        problems.append("Wc and v come together (the coordinate MLP), got only one of them")
    F3 = v.shape[0] if v is not None and v.dim() == 1 else -1
    shapes = [("b1", b1, (F1,)), ("b2", b2, (F2,)), ("w", w, (E,))]
    if v is not None:
        shapes += [("Wc", Wc, (F3, F2)), ("bc", bc, (F3,))]
    elif bc is not None:
        problems.append("bc given without Wc and v")
    for name, t, shape in shapes:
        if t is not None and tuple(t.shape) != shape:
            problems.append(f"{name} {list(t.shape)} must be {list(shape)}")
    dtypes = {t.dtype for t in (P, Q, R, C, b1, W2, b2, w, Wc, bc, v) if t is not None}
    if len(dtypes) != 1:
        problems.append(f"all float inputs must share one dtype, got {builtins.sorted(str(d) for d in dtypes)}")
    if problems:
        raise ValueError("faithful_message_aggregate: " + "; ".join(problems))
    name = resolve_backend(backend, P.device)
    if name == "triton" and K > MAX_K:
        if backend_requested(backend):
            raise ValueError(f"faithful_message_aggregate: the triton backend takes K <= {MAX_K} radial functions, "
                             f"got K={K}; use backend='torch'")
        name = "torch"  # chosen by device: the chunked torch path runs on CUDA too
    if name == "triton" and tp >= 0:
        if backend_requested(backend):
            raise ValueError("faithful_message_aggregate: tensor parallelism (tp_group) runs on the torch backend "
                             "(its chunks all-reduce between layers); use backend='torch'")
        name = "torch"
    if name == "reference":
        return faithful_message_reference(P, Q, edge_index, R, C, b1, W2, b2, w, Wc, bc, v, activation, tp)
    if plan is None:
        plan = csr_plan(edge_index[0], N, sorted)
    b1 = b1 if b1 is not None else P.new_zeros(F1)
    b2 = b2 if b2 is not None else P.new_zeros(F2)
    if v is not None and bc is None:
        bc = P.new_zeros(F3)
    m, s = faithful_message_fwd(P, Q, plan.index, edge_index[1], plan.ptr, plan.perm, R, C, b1, W2, b2, w, Wc, bc, v,
                                activation, name, deterministic(), tp)
    return m if v is None else (m, s)
