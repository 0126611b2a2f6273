"""Triton fused faithful E_GCL, backward: ``_faithful_message_bwd_kernel`` -> ``faithful_message_bwd``.

Per tile (layout of ``_faithful_common``), the forward's tiles are recomputed and the gradient of
``sum(gm m) + sum(gs s)`` pushed back through them::

    phase 1   z1 -> a1, act'(z1)                                    -> workspace A1, D1
    phase 2   z2 = a1 W2^T + b2 -> a, act'(z2); dw = gm[dst] . a     -> workspace A, D2
    phase 3   z3 = a Wc^T + bc -> dz3 = gs v act'(z3); dv, dbc       -> workspace DZ3  (coordinate MLP)
    phase 4   dz2 = (gm[dst] w + dz3 Wc) act'(z2); db2; dWc += dz3^T a -> workspace (over D2)
    phase 5   dW2 += dz2^T a1; dz1 = (dz2 W2) act'(z1): dP[dst] (segmented), dQ[src] -> workspace (over D1)
    phase 6   dR = dz1 C^T, dC += R^T dz1

dQ sums over the edges leaving each sender, which the receiver-ordered programs do not own: fp32
``atomic_add`` by default; in deterministic mode a second launch of the same kernel over the
source-sorted plan (``OWN`` = senders, ``OTH`` = receivers, X = Q, Y = P, gm gathered through the
receiver), which repeats phases 1-5 for that one sum. Weight gradients: atomics, or per-program
partials in deterministic mode (``_faithful_common``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TunedKernel, acc_dtype, act_and_grad, add_rc, check_i32, config, mm_mode, prepare, tile_mm
from ._faithful_common import (BLOCK_KR, BLOCK_KR_HOST, acc_add, compute_dtype, faithful_configs, grid,
                               interpret_config, kernel_class, seg_add, tile_edges, ws_load, ws_matmul, ws_outer,
                               ws_store)
from .codes import ACT_CODE

SCALARS = ["N", "F1", "F2", "F3", "K", "PER", "WS_ROWS", "HAS_PERM", "HAS_W", "HAS_V", "GM_OWN", "DET", "NEED_X",
           "NEED_Y", "NEED_R", "NEED_C", "NEED_W2", "NEED_B2", "NEED_W", "NEED_WC", "NEED_BC", "NEED_V", "ACT"]
NEEDS = ("P", "Q", "R", "C", "b1", "W2", "b2", "w", "Wc", "bc", "v")


def _bwd_configs() -> dict:
    # From ahead-of-time compiles: spill-free on sm_80, sm_90 and gfx942 (at most 235 registers fp32,
    # 224 fp64); not timed on a GPU. num_stages 1: software pipelining of the dot loops (2 stages) took
    # the backward to 255 registers and spilled 24-180 B at every tile size tried; 32-row tiles spilled
    # 200-330 B even unpipelined.
    return faithful_configs([config(BLOCK_E=16, BLOCK_F=16, BLOCK_N=32, num_warps=8, num_stages=1)],
                            [config(BLOCK_E=16, BLOCK_F=16, BLOCK_N=16, num_warps=8, num_stages=1)])


@triton.jit(do_not_specialize=SCALARS)
def _faithful_message_bwd_kernel(GM, GS, X, Y, OWN, OTH, PTR, PERM, R, C, B1, W2, B2, W, WC, BC, V, WS,
                                 DX, DY, DR, DW, DC, DW2, DB2, DWC, DBC, DV,
                                 N, F1, F2, F3, K, PER, WS_ROWS, HAS_PERM, HAS_W, HAS_V, GM_OWN, DET,
                                 NEED_X, NEED_Y, NEED_R, NEED_C, NEED_W2, NEED_B2, NEED_W, NEED_WC, NEED_BC, NEED_V,
                                 ACT, MM: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    i0 = pid * PER
    i1 = tl.minimum(i0 + PER, N)
    e_start = tl.load(PTR + i0)
    e_end = tl.load(PTR + i1)
    row_ws = WS_ROWS * (2 * F1 + 2 * F2 + F3)
    wsA1 = WS + pid.to(tl.int64) * row_ws
    wsD1 = wsA1 + WS_ROWS * F1
    wsA = wsD1 + WS_ROWS * F1
    wsD2 = wsA + WS_ROWS * F2  # act'(z2), then dz2
    wsZ3 = wsD2 + WS_ROWS * F2  # dz3
    # this program's weight-gradient partials (DET), or the shared buffers (atomics)
    part = pid.to(tl.int64) * DET
    DC_P = DC + part * BLOCK_KR * F1
    DW2_P = DW2 + part * F2 * F1
    DB2_P = DB2 + part * F2
    DWC_P = DWC + part * F3 * F2
    DBC_P = DBC + part * F3
    DV_P = DV + part * F3
    offs_e = tl.arange(0, BLOCK_E)
    offs_r = tl.arange(0, BLOCK_KR)
    rmask_k = offs_r < K
    for e0 in range(e_start, e_end, BLOCK_E):
        eid, emask, own, oth, d_lo, d_hi = tile_edges(PERM, OWN, OTH, e0, e_end, N, BLOCK_E, HAS_PERM)
        gm_row = oth
        if GM_OWN:
            gm_row = own
        wv = tl.full([BLOCK_E], 1.0, ACC)
        if HAS_W:
            wv = tl.load(W + eid, mask=emask, other=0.0).to(ACC)
        # phase 1: a1, act'(z1)
        for k0 in range(0, F1, BLOCK_F):
            offs_k = k0 + tl.arange(0, BLOCK_F)
            kmask = offs_k < F1
            m2 = emask[:, None] & kmask[None, :]
            z = tl.load(X + own[:, None] * F1 + offs_k[None, :], mask=m2, other=0.0).to(ACC)
            z += tl.load(Y + oth[:, None] * F1 + offs_k[None, :], mask=m2, other=0.0).to(ACC)
            z += tl.load(B1 + offs_k, mask=kmask, other=0.0).to(ACC)[None, :]
            z = add_rc(z, R, eid, emask, C, offs_k, kmask, K, F1, ACC)
            a1, d1 = act_and_grad(z, ACT)
            ws_store(wsA1, offs_e, offs_k, kmask, F1, tl.where(m2, a1, 0.0))
            ws_store(wsD1, offs_e, offs_k, kmask, F1, tl.where(m2, d1, 0.0))
        tl.debug_barrier()
        # phase 2: a, act'(z2), dw
        dw = tl.zeros([BLOCK_E], ACC)
        for n0 in range(0, F2, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < F2
            m2 = emask[:, None] & nmask[None, :]
            z2 = ws_matmul(wsA1, W2, offs_e, offs_n, nmask, F1, F1, 1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
            z2 += tl.load(B2 + offs_n, mask=nmask, other=0.0).to(ACC)[None, :]
            a, d2 = act_and_grad(z2, ACT)
            a = tl.where(m2, a, 0.0)
            ws_store(wsA, offs_e, offs_n, nmask, F2, a)
            ws_store(wsD2, offs_e, offs_n, nmask, F2, tl.where(m2, d2, 0.0))
            if NEED_W:
                gmt = tl.load(GM + gm_row[:, None] * F2 + offs_n[None, :], mask=m2, other=0.0).to(ACC)
                dw += tl.sum(gmt * a, axis=1)
        if NEED_W:
            tl.store(DW + eid, dw, mask=emask)
        tl.debug_barrier()
        # phase 3: dz3 = gs v act'(z3)
        gs = tl.zeros([BLOCK_E], ACC)
        if HAS_V:
            gs = tl.load(GS + eid, mask=emask, other=0.0).to(ACC)
            for n0 in range(0, F3, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < F3
                m2 = emask[:, None] & nmask[None, :]
                z3 = ws_matmul(wsA, WC, offs_e, offs_n, nmask, F2, F2, 1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
                z3 += tl.load(BC + offs_n, mask=nmask, other=0.0).to(ACC)[None, :]
                a3, d3 = act_and_grad(z3, ACT)
                v = tl.load(V + offs_n, mask=nmask, other=0.0).to(ACC)
                dz3 = tl.where(m2, gs[:, None] * v[None, :] * d3, 0.0)
                ws_store(wsZ3, offs_e, offs_n, nmask, F3, dz3)
                if NEED_V:
                    acc_add(DV_P, offs_n, nmask, tl.sum(tl.where(m2, a3, 0.0) * gs[:, None], axis=0), DET)
                if NEED_BC:
                    acc_add(DBC_P, offs_n, nmask, tl.sum(dz3, axis=0), DET)
            tl.debug_barrier()
            if NEED_WC:
                ws_outer(wsZ3, wsA, DWC_P, offs_e, F3, F2, DET, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
        # phase 4: dz2 = (gm w + dz3 Wc) act'(z2)
        for n0 in range(0, F2, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < F2
            m2 = emask[:, None] & nmask[None, :]
            ga = tl.load(GM + gm_row[:, None] * F2 + offs_n[None, :], mask=m2, other=0.0).to(ACC) * wv[:, None]
            if HAS_V:
                ga += ws_matmul(wsZ3, WC, offs_e, offs_n, nmask, F3, 1, F2, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
            dz2 = tl.where(m2, ga * ws_load(wsD2, offs_e, offs_n, nmask, F2), 0.0)
            if NEED_B2:
                acc_add(DB2_P, offs_n, nmask, tl.sum(dz2, axis=0), DET)
            tl.debug_barrier()  # every thread has read its D2 slice before it is overwritten
            ws_store(wsD2, offs_e, offs_n, nmask, F2, dz2)
        tl.debug_barrier()
        # phase 5: dW2, then dz1 = (dz2 W2) act'(z1) and its sums
        if NEED_W2:
            ws_outer(wsD2, wsA1, DW2_P, offs_e, F2, F1, DET, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
        if NEED_X + NEED_Y + NEED_R + NEED_C > 0:
            for k0 in range(0, F1, BLOCK_N):
                offs_k = k0 + tl.arange(0, BLOCK_N)
                kmask = offs_k < F1
                m2 = emask[:, None] & kmask[None, :]
                da1 = ws_matmul(wsD2, W2, offs_e, offs_k, kmask, F2, 1, F1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
                dz1 = tl.where(m2, da1 * ws_load(wsD1, offs_e, offs_k, kmask, F1), 0.0)
                if NEED_X:
                    seg_add(DX, own, emask, d_lo, d_hi, dz1, offs_k, kmask, F1)
                if NEED_Y:
                    tl.atomic_add(DY + oth[:, None] * F1 + offs_k[None, :], dz1, mask=m2)
                tl.debug_barrier()  # every thread has read its D1 slice before it is overwritten
                ws_store(wsD1, offs_e, offs_k, kmask, F1, dz1)
            tl.debug_barrier()
            # phase 6: dR = dz1 C^T, dC += R^T dz1 (from the workspace: fewer live registers)
            rm = emask[:, None] & rmask_k[None, :]
            if NEED_R:
                dr = ws_matmul(wsD1, C, offs_e, offs_r, rmask_k, F1, F1, 1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_KR)
                tl.store(DR + eid[:, None] * K + offs_r[None, :], dr, mask=rm)
            if NEED_C:
                r = tl.load(R + eid[:, None] * K + offs_r[None, :], mask=rm, other=0.0).to(ACC)
                for k0 in range(0, F1, BLOCK_N):
                    offs_k = k0 + tl.arange(0, BLOCK_N)
                    kmask = offs_k < F1
                    dc = tile_mm(tl.trans(r), ws_load(wsD1, offs_e, offs_k, kmask, F1), MM).to(ACC)
                    acc_add(DC_P, offs_r[:, None] * F1 + offs_k[None, :], rmask_k[:, None] & kmask[None, :], dc, DET)
        tl.debug_barrier()  # the next tile overwrites the workspace and may add to the same rows of DX


BWD = TunedKernel(_faithful_message_bwd_kernel, _bwd_configs(), key=["F1", "F2", "F3", "K"],
                  interpret=interpret_config)


def source_plan(src: torch.Tensor, num_sources: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ptr [N_src + 1], perm [E]) of the edges sorted by source (stable): the transposed CSR plan."""
    perm = torch.argsort(src, stable=True)
    ptr = torch.searchsorted(src[perm], torch.arange(num_sources + 1, device=src.device, dtype=src.dtype))
    return ptr, perm


def faithful_message_bwd(gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, needs,
                         deterministic=False):
    """Launch the backward: ``[dP, dQ, dR, dC, db1, dW2, db2, dw, dWc, dbc, dv]`` (``NEEDS`` order; empty
    where not wanted). ``dst``/``src``: [E] endpoints in caller order; ``ptr``/``perm``: the receivers'
    CSR plan. Half inputs run in fp32; any tensor may be a strided view."""
    from ._common import target_kind
    from .faithful_message import _ws_rows

    dtypes = dict(P=P.dtype, Q=Q.dtype, R=R.dtype, C=C.dtype, b1=b1.dtype, W2=W2.dtype, b2=b2.dtype,
                  w=w.dtype if w is not None else P.dtype, Wc=Wc.dtype if Wc is not None else P.dtype,
                  bc=bc.dtype if bc is not None else P.dtype, v=v.dtype if v is not None else P.dtype)
    cdt = compute_dtype(P.dtype)
    gm, gs, P, Q, R, C, b1, W2, b2, w, Wc, bc, v = prepare(*[t.to(cdt) if t is not None else None for t in
                                                             (gm, gs, P, Q, R, C, b1, W2, b2, w, Wc, bc, v)])
    dst, src, ptr, perm = prepare(dst.long(), src.long(), ptr.long(), perm.long() if perm is not None else None)
    N, F1 = P.shape
    F2 = W2.shape[0]
    E, K = R.shape
    N_src = Q.shape[0]
    coord = v is not None
    F3 = Wc.shape[0] if coord else 0
    check_i32(N=N, N_src=N_src, E=E, F1=F1, F2=F2, F3=F3, K=K)
    need = {k: bool(n) for k, n in zip(NEEDS, needs)}
    need["w"] &= w is not None
    for k in ("Wc", "bc", "v"):
        need[k] &= coord
    cls = kernel_class(cdt)
    acc_tl, acc_torch = acc_dtype(cdt)
    dev = P.device
    itemsize = torch.finfo(acc_torch).bits // 8
    det = bool(deterministic)

    def buf(shape, on):
        return torch.zeros(shape, dtype=acc_torch, device=dev) if on else torch.empty(0, dtype=acc_torch, device=dev)

    dP = buf((N, F1), need["P"] or need["b1"])
    dQ = buf((N_src, F1), need["Q"])
    dR = buf((E, K), need["R"])
    dw = buf((E,), need["w"])
    dummy = torch.empty(0, dtype=acc_torch, device=dev)
    partial_shapes = dict(C=(BLOCK_KR_HOST, F1), W2=(F2, F1), b2=(F2,), Wc=(F3, F2), bc=(F3,), v=(F3,))
    partial_bytes = sum(int(torch.tensor(s).prod()) for k, s in partial_shapes.items() if need[k]) * itemsize
    ws_rows = _ws_rows(BWD, cls, target_kind(dev))
    row_bytes = (2 * F1 + 2 * F2 + F3) * itemsize
    consts = dict(MM=mm_mode(cdt, dev), ACC=acc_tl)
    act = ACT_CODE[activation]
    run = E > 0 and F1 > 0 and F2 > 0
    atomic_dq = need["Q"] and not det
    parts = {}
    if run and (need["P"] or need["b1"] or atomic_dq or need["R"] or need["C"] or need["W2"] or need["b2"]
                or need["w"] or need["Wc"] or need["bc"] or need["v"]):
        programs, per = grid(N, dev, row_bytes, ws_rows, partial_bytes, det)
        rows = programs if det else 1
        parts = {k: buf((rows,) + s, need[k]) for k, s in partial_shapes.items()}
        ws = torch.empty(programs * ws_rows * (2 * F1 + 2 * F2 + F3), dtype=acc_torch, device=dev)
        args = (gm, gs if coord else b1, P, Q, dst, src, ptr, perm if perm is not None else ptr, R, C, b1, W2, b2,
                w if w is not None else b1, Wc if coord else W2, bc if coord else b1, v if coord else b1, ws,
                dP if dP.numel() else dummy, dQ if atomic_dq else dummy, dR if need["R"] else dummy,
                dw if need["w"] else dummy, parts["C"], parts["W2"], parts["b2"], parts["Wc"], parts["bc"], parts["v"],
                N, F1, F2, F3, K, per, ws_rows, int(perm is not None), int(w is not None), int(coord), 1, int(det),
                int(need["P"] or need["b1"]), int(atomic_dq), int(need["R"]), int(need["C"]), int(need["W2"]),
                int(need["b2"]), int(need["w"]), int(need["Wc"]), int(need["bc"]), int(need["v"]), act)
        BWD.launch(cls, (programs,), args, consts, det)
    if run and need["Q"] and det:  # dQ over the source-sorted plan: every sender's row has one writer
        src_ptr, src_perm = prepare(*source_plan(src, N_src))
        programs, per = grid(N_src, dev, row_bytes, ws_rows, 0, det)
        ws = torch.empty(programs * ws_rows * (2 * F1 + 2 * F2 + F3), dtype=acc_torch, device=dev)
        args = (gm, gs if coord else b1, Q, P, src, dst, src_ptr, src_perm, R, C, b1, W2, b2,
                w if w is not None else b1, Wc if coord else W2, bc if coord else b1, v if coord else b1, ws,
                dQ, dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy,
                N_src, F1, F2, F3, K, per, ws_rows, 1, int(w is not None), int(coord), 0, 1,
                1, 0, 0, 0, 0, 0, 0, 0, 0, 0, act)
        BWD.launch(cls, (programs,), args, consts, det)

    def empty():  # a fresh tensor per output: custom-op outputs must not alias each other
        return torch.empty(0, dtype=dtypes["P"], device=dev)

    def total(name):
        p = parts.get(name)
        if p is None or p.numel() == 0:
            return torch.zeros(partial_shapes[name], dtype=acc_torch, device=dev)
        return p.sum(0)

    dC = total("C")[:K] if need["C"] else None
    res = dict(P=dP if need["P"] else None, Q=dQ if need["Q"] else None, R=dR if need["R"] else None, C=dC,
               b1=dP.sum(0) if need["b1"] else None, W2=total("W2") if need["W2"] else None,
               b2=total("b2") if need["b2"] else None, w=dw if need["w"] else None,
               Wc=total("Wc") if need["Wc"] else None, bc=total("bc") if need["bc"] else None,
               v=total("v") if need["v"] else None)
    return [res[k].to(dtypes[k], copy=True) if res[k] is not None else empty() for k in NEEDS]
