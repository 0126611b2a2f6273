"""Triton fused faithful E_GCL, forward: ``_faithful_message_fwd_kernel`` -> ``faithful_message_fwd``.

Per tile of ``BLOCK_E`` destination-sorted edges (layout, workspace and segmented sums in
``_faithful_common``)::

    phase 1   a1 = act(P[dst] + Q[src] + R C + b1)           -> workspace (BLOCK_E x F1)
    phase 2   a  = act(a1 W2^T + b2)   (tl.dot over F1)       -> m[dst] += w a (segmented), workspace
    phase 3   s  = act(a Wc^T + bc) . v (tl.dot over F2)      -> s[e]            (coordinate MLP only)

The backward (``faithful_message_bwd``) and double backward (``faithful_message_bwd2``) recompute the
same tiles; ``gnnmegatron.ops.faithful_message`` wraps all three in autograd. fp32 accumulation
(fp64 for fp64), int64 offsets, every load masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TunedKernel, acc_dtype, act_and_grad, add_rc, check_i32, config, mm_mode, prepare
from ._faithful_common import (compute_dtype, faithful_configs, grid, interpret_config, kernel_class, seg_add,
                               tile_edges, ws_matmul, ws_store)
from .codes import ACT_CODE

SCALARS = ["N", "F1", "F2", "F3", "K", "PER", "WS_ROWS", "HAS_PERM", "HAS_W", "HAS_V", "ACT"]


def _fwd_configs() -> dict:
    # From ahead-of-time compiles (python -m gnnmegatron.kernels.aot): spill-free on sm_80, sm_90 and
    # gfx942 (fp32 at most 211 registers, fp64 204); not timed on a GPU (none available). 32 edges per
    # tile halve the per-tile work (workspace round trips, segmented sums) of 16; fp64 tiles are half
    # as tall (the same bytes). num_stages 2: the forward's dot loops have registers to pipeline.
    return faithful_configs([config(BLOCK_E=32, BLOCK_F=32, BLOCK_N=32, num_warps=8)],
                            [config(BLOCK_E=16, BLOCK_F=32, BLOCK_N=32, num_warps=8)])


@triton.jit(do_not_specialize=SCALARS)
def _faithful_message_fwd_kernel(P, Q, DST, SRC, PTR, PERM, R, C, B1, W2, B2, W, WC, BC, V, WS, M, S,
                                 N, F1, F2, F3, K, PER, WS_ROWS, HAS_PERM, HAS_W, HAS_V, ACT,
                                 MM: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    i0 = pid * PER
    i1 = tl.minimum(i0 + PER, N)
    e_start = tl.load(PTR + i0)
    e_end = tl.load(PTR + i1)
    ws1 = WS + pid.to(tl.int64) * WS_ROWS * (F1 + F2)  # a1 rows (width F1), then a rows (width F2)
    ws2 = ws1 + WS_ROWS * F1
    offs_e = tl.arange(0, BLOCK_E)
    for e0 in range(e_start, e_end, BLOCK_E):
        eid, emask, own, oth, d_lo, d_hi = tile_edges(PERM, DST, SRC, e0, e_end, N, BLOCK_E, HAS_PERM)
        wv = tl.full([BLOCK_E], 1.0, ACC)
        if HAS_W:
            wv = tl.load(W + eid, mask=emask, other=0.0).to(ACC)
        # phase 1: a1
        for k0 in range(0, F1, BLOCK_F):
            offs_k = k0 + tl.arange(0, BLOCK_F)
            kmask = offs_k < F1
            m2 = emask[:, None] & kmask[None, :]
            z = tl.load(P + own[:, None] * F1 + offs_k[None, :], mask=m2, other=0.0).to(ACC)
            z += tl.load(Q + oth[:, None] * F1 + offs_k[None, :], mask=m2, other=0.0).to(ACC)
            z += tl.load(B1 + offs_k, mask=kmask, other=0.0).to(ACC)[None, :]
            z = add_rc(z, R, eid, emask, C, offs_k, kmask, K, F1, ACC)
            a1, _ = act_and_grad(z, ACT)
            ws_store(ws1, offs_e, offs_k, kmask, F1, tl.where(m2, a1, 0.0))
        tl.debug_barrier()
        # phase 2: a, the messages
        for n0 in range(0, F2, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < F2
            z2 = ws_matmul(ws1, W2, offs_e, offs_n, nmask, F1, F1, 1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
            z2 += tl.load(B2 + offs_n, mask=nmask, other=0.0).to(ACC)[None, :]
            a, _ = act_and_grad(z2, ACT)
            a = tl.where(emask[:, None] & nmask[None, :], a, 0.0)
            if HAS_V:
                ws_store(ws2, offs_e, offs_n, nmask, F2, a)
            seg_add(M, own, emask, d_lo, d_hi, a * wv[:, None], offs_n, nmask, F2)
        # phase 3: the coordinate MLP's scalar
        if HAS_V:
            tl.debug_barrier()
            s = tl.zeros([BLOCK_E], ACC)
            for n0 in range(0, F3, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < F3
                z3 = ws_matmul(ws2, WC, offs_e, offs_n, nmask, F2, F2, 1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
                z3 += tl.load(BC + offs_n, mask=nmask, other=0.0).to(ACC)[None, :]
                a3, _ = act_and_grad(z3, ACT)
                v = tl.load(V + offs_n, mask=nmask, other=0.0).to(ACC)
                s += tl.sum(tl.where(nmask[None, :], a3, 0.0) * v[None, :], axis=1)
            tl.store(S + eid, s, mask=emask)
        tl.debug_barrier()  # the next tile overwrites the workspace and may add to the same rows of M


FWD = TunedKernel(_faithful_message_fwd_kernel, _fwd_configs(), key=["F1", "F2", "F3", "K"],
                  interpret=interpret_config)


def _ws_rows(kernel: TunedKernel, cls, kind: str) -> int:
    """Workspace rows per program: the largest BLOCK_E among the configs a launch may use."""
    from ._common import INTERPRET
    from ._faithful_common import INTERPRET_CONFIG
    if INTERPRET:
        return INTERPRET_CONFIG["BLOCK_E"]
    return max(c.kwargs["BLOCK_E"] for c in kernel.candidates(cls, kind))


def faithful_message_fwd(P, Q, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, deterministic=False,
                         dst=None):
    """Launch the forward: returns (m [N, F2] in P's dtype, s [E] or [0]).

    ``dst``: receivers in caller order (derived from ``ptr`` and ``perm`` when absent). Half inputs
    run in fp32; any tensor may be a strided view (made contiguous and aligned here)."""
    from ._common import target_kind
    out_dtype = P.dtype
    cdt = compute_dtype(P.dtype)
    P, Q, R, C, b1, W2, b2, w, Wc, bc, v = prepare(*[t.to(cdt) if t is not None else None
                                                     for t in (P, Q, R, C, b1, W2, b2, w, Wc, bc, v)])
    N, F1 = P.shape
    F2 = W2.shape[0]
    E, K = R.shape
    F3 = Wc.shape[0] if v is not None else 0
    if dst is None:
        counts = ptr[1:] - ptr[:-1]
        rows = torch.repeat_interleave(torch.arange(N, device=P.device), counts)
        dst = rows if perm is None else torch.empty_like(rows).index_put_((perm,), rows)
    src, ptr, dst, perm = prepare(src.long(), ptr.long(), dst.long(), perm.long() if perm is not None else None)
    check_i32(N=N, E=E, F1=F1, F2=F2, F3=F3, K=K)
    cls = kernel_class(cdt)
    acc_tl, acc_torch = acc_dtype(cdt)
    m = torch.zeros((N, F2), dtype=acc_torch, device=P.device)
    s = torch.zeros(E if v is not None else 0, dtype=acc_torch, device=P.device)
    if N == 0 or E == 0 or F2 == 0:
        return m.to(out_dtype), s.to(out_dtype)
    ws_rows = _ws_rows(FWD, cls, target_kind(P.device))
    itemsize = torch.finfo(acc_torch).bits // 8
    programs, per = grid(N, P.device, (F1 + F2) * itemsize, ws_rows, 0, deterministic)
    ws = torch.empty(programs * ws_rows * (F1 + F2), dtype=acc_torch, device=P.device)
    args = (P, Q, dst, src, ptr, perm if perm is not None else ptr, R, C, b1, W2, b2, w if w is not None else b1,
            Wc if v is not None else W2, bc if v is not None else b1, v if v is not None else b1, ws, m, s,
            N, F1, F2, F3, K, per, ws_rows, int(perm is not None), int(w is not None), int(v is not None),
            ACT_CODE[activation])
    FWD.launch(cls, (programs,), args, dict(MM=mm_mode(cdt, P.device), ACC=acc_tl), deterministic)
    return m.to(out_dtype), s.to(out_dtype)


# the backward launchers, re-exported so that callers import one module
from .faithful_message_bwd import faithful_message_bwd  # noqa: E402,F401
from .faithful_message_bwd2 import faithful_message_bwd2  # noqa: E402,F401
