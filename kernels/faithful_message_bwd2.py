"""Triton fused faithful E_GCL, double backward of a force loss: ``_faithful_message_bwd2_kernel`` ->
``faithful_message_bwd2``.

Forward-over-reverse (formulas in ``gnnmegatron.ops.faithful_message_grad2``): with the tangents a
conservative-force pass produces -- on P, Q, R and w -- each tile's edge MLP is pushed forward with
its tangent, and ``sum(gm . m') + sum(gs s')`` pulled back::

    phase 1   z1, z1' -> a1, a1' = s1 z1', s1, ss1 z1'                      -> workspace (4 x F1)
    phase 2   [z2; z2'] = [a1; a1'] W2^T -> a, a', s2, ss2 z2'; dgm += w a' + tw a, dw = gm . a'
    phase 3   [z3; z3'] = [a; a'] Wc^T -> a3' = s3 z3': dgs, dv; z3~ = gs v ss3 z3', z3'~ = gs v s3;
              dbc; dWc += z3~^T a + z3'~^T a'                                  (coordinate MLP)
    phase 4   a~ = gm tw + z3~ Wc, a'~ = gm w + z3'~ Wc -> z2~ = ss2 z2' a'~ + s2 a~, z2'~ = s2 a'~; db2
    phase 5   dW2 += z2~^T a1 + z2'~^T a1'; a1~ = z2~ W2, a1'~ = z2'~ W2 -> z1~ = ss1 z1' a1'~ + s1 a1~:
              dP[dst] (segmented), dQ[src]                              -> workspace z1~, z1'~ = s1 a1'~
    phase 6   dR = z1~ C^T, dC += R^T z1~ + tR^T z1'~

Tangents on the weights (which a force loss never produces; gradgradcheck does) go to the chunked
torch twin, on any device. dQ, weight gradients and deterministic mode as in the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TunedKernel, acc_dtype, act_grads2, add_rc, check_i32, config, mm_mode, prepare, tile_mm
from ._faithful_common import (BLOCK_KR, BLOCK_KR_HOST, acc_add, compute_dtype, faithful_configs, grid,
                               interpret_config, kernel_class, seg_add, tile_edges, ws_load, ws_matmul, ws_outer,
                               ws_store)
from .codes import ACT_CODE

SCALARS = ["N", "F1", "F2", "F3", "K", "PER", "WS_ROWS", "HAS_PERM", "HAS_W", "HAS_V", "GM_OWN", "DET", "HAS_TX",
           "HAS_TY", "HAS_TR", "HAS_TW", "NEED_GM", "NEED_GS", "NEED_X", "NEED_Y", "NEED_R", "NEED_C", "NEED_W2",
           "NEED_B2", "NEED_W", "NEED_WC", "NEED_BC", "NEED_V", "ACT"]
OUTPUTS = ("gm", "gs", "P", "Q", "R", "C", "b1", "W2", "b2", "w", "Wc", "bc", "v")


def _bwd2_configs() -> dict:
    # From ahead-of-time compiles: spill-free on sm_80, sm_90 and gfx942 (at most 240 registers fp32,
    # 255 fp64 on gfx942); not timed on a GPU. Unpipelined (num_stages 1) and 16 x 16 x 16: the double
    # backward keeps two products per layer (primal and tangent) live, and 32-wide output tiles spilled
    # 8-256 B.
    return faithful_configs([config(BLOCK_E=16, BLOCK_F=16, BLOCK_N=16, num_warps=8, num_stages=1)],
                            [config(BLOCK_E=16, BLOCK_F=16, BLOCK_N=16, num_warps=8, num_stages=1)])


@triton.jit(do_not_specialize=SCALARS)
def _faithful_message_bwd2_kernel(GM, GS, X, Y, OWN, OTH, PTR, PERM, R, C, B1, W2, B2, W, WC, BC, V,
                                  TX, TY, TR, TW, WS,
                                  DGM, DGS, DX, DY, DR, DW, DC, DW2, DB2, DWC, DBC, DV,
                                  N, F1, F2, F3, K, PER, WS_ROWS, HAS_PERM, HAS_W, HAS_V, GM_OWN, DET,
                                  HAS_TX, HAS_TY, HAS_TR, HAS_TW, NEED_GM, NEED_GS, NEED_X, NEED_Y, NEED_R, NEED_C,
                                  NEED_W2, NEED_B2, NEED_W, NEED_WC, NEED_BC, NEED_V, ACT,
                                  MM: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    i0 = pid * PER
    i1 = tl.minimum(i0 + PER, N)
    e_start = tl.load(PTR + i0)
    e_end = tl.load(PTR + i1)
    wsA1 = WS + pid.to(tl.int64) * WS_ROWS * (4 * F1 + 4 * F2 + 2 * F3)
    wsDA1 = wsA1 + WS_ROWS * F1      # a1'
    wsS1 = wsDA1 + WS_ROWS * F1      # s1
    wsSS1 = wsS1 + WS_ROWS * F1      # ss1 z1'
    wsA = wsSS1 + WS_ROWS * F1       # a
    wsDA = wsA + WS_ROWS * F2        # a'
    wsS2 = wsDA + WS_ROWS * F2       # s2, then z2~
    wsSS2 = wsS2 + WS_ROWS * F2      # ss2 z2', then z2'~
    wsB3 = wsSS2 + WS_ROWS * F2      # z3~
    wsB3d = wsB3 + WS_ROWS * F3      # z3'~
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
        twv = tl.zeros([BLOCK_E], ACC)
        if HAS_TW:
            twv = tl.load(TW + eid, mask=emask, other=0.0).to(ACC)
        # phase 1: layer 1 and its tangent
        for k0 in range(0, F1, BLOCK_F):
            offs_k = k0 + tl.arange(0, BLOCK_F)
            kmask = offs_k < F1
            m2 = emask[:, None] & kmask[None, :]
            z = tl.load(X + own[:, None] * F1 + offs_k[None, :], mask=m2, other=0.0).to(ACC)
            z += tl.load(Y + oth[:, None] * F1 + offs_k[None, :], mask=m2, other=0.0).to(ACC)
            z += tl.load(B1 + offs_k, mask=kmask, other=0.0).to(ACC)[None, :]
            z = add_rc(z, R, eid, emask, C, offs_k, kmask, K, F1, ACC)
            dz = tl.zeros([BLOCK_E, BLOCK_F], ACC)
            if HAS_TX:
                dz += tl.load(TX + own[:, None] * F1 + offs_k[None, :], mask=m2, other=0.0).to(ACC)
            if HAS_TY:
                dz += tl.load(TY + oth[:, None] * F1 + offs_k[None, :], mask=m2, other=0.0).to(ACC)
            if HAS_TR:
                dz = add_rc(dz, TR, eid, emask, C, offs_k, kmask, K, F1, ACC)
            a1, s1, ss1 = act_grads2(z, ACT)
            ws_store(wsA1, offs_e, offs_k, kmask, F1, tl.where(m2, a1, 0.0))
            ws_store(wsDA1, offs_e, offs_k, kmask, F1, tl.where(m2, s1 * dz, 0.0))
            ws_store(wsS1, offs_e, offs_k, kmask, F1, tl.where(m2, s1, 0.0))
            ws_store(wsSS1, offs_e, offs_k, kmask, F1, tl.where(m2, ss1 * dz, 0.0))
        tl.debug_barrier()
        # phase 2: layer 2 and its tangent; m' = sum w a' + tw a; dw = gm . a'
        dw = tl.zeros([BLOCK_E], ACC)
        for n0 in range(0, F2, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < F2
            m2 = emask[:, None] & nmask[None, :]
            z2 = ws_matmul(wsA1, W2, offs_e, offs_n, nmask, F1, F1, 1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
            z2 += tl.load(B2 + offs_n, mask=nmask, other=0.0).to(ACC)[None, :]
            dz2 = ws_matmul(wsDA1, W2, offs_e, offs_n, nmask, F1, F1, 1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
            a, s2, ss2 = act_grads2(z2, ACT)
            a = tl.where(m2, a, 0.0)
            da = tl.where(m2, s2 * dz2, 0.0)
            ws_store(wsA, offs_e, offs_n, nmask, F2, a)
            ws_store(wsDA, offs_e, offs_n, nmask, F2, da)
            ws_store(wsS2, offs_e, offs_n, nmask, F2, tl.where(m2, s2, 0.0))
            ws_store(wsSS2, offs_e, offs_n, nmask, F2, tl.where(m2, ss2 * dz2, 0.0))
            if NEED_GM:
                seg_add(DGM, own, emask, d_lo, d_hi, da * wv[:, None] + a * twv[:, None], offs_n, nmask, F2)
            if NEED_W:
                gmt = tl.load(GM + gm_row[:, None] * F2 + offs_n[None, :], mask=m2, other=0.0).to(ACC)
                dw += tl.sum(gmt * da, axis=1)
        if NEED_W:
            tl.store(DW + eid, dw, mask=emask)
        tl.debug_barrier()
        # phase 3: the coordinate MLP and its tangent
        if HAS_V:
            gs = tl.load(GS + eid, mask=emask, other=0.0).to(ACC)
            dgs = tl.zeros([BLOCK_E], ACC)
            for n0 in range(0, F3, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < F3
                m2 = emask[:, None] & nmask[None, :]
                z3 = ws_matmul(wsA, WC, offs_e, offs_n, nmask, F2, F2, 1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
                z3 += tl.load(BC + offs_n, mask=nmask, other=0.0).to(ACC)[None, :]
                dz3 = ws_matmul(wsDA, WC, offs_e, offs_n, nmask, F2, F2, 1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
                _, s3, ss3 = act_grads2(z3, ACT)
                v = tl.load(V + offs_n, mask=nmask, other=0.0).to(ACC)
                da3 = tl.where(m2, s3 * dz3, 0.0)
                dgs += tl.sum(da3 * v[None, :], axis=1)
                if NEED_V:
                    acc_add(DV_P, offs_n, nmask, tl.sum(da3 * gs[:, None], axis=0), DET)
                gv = gs[:, None] * v[None, :]
                b3 = tl.where(m2, gv * ss3 * dz3, 0.0)
                ws_store(wsB3, offs_e, offs_n, nmask, F3, b3)
                ws_store(wsB3d, offs_e, offs_n, nmask, F3, tl.where(m2, gv * s3, 0.0))
                if NEED_BC:
                    acc_add(DBC_P, offs_n, nmask, tl.sum(b3, axis=0), DET)
            if NEED_GS:
                tl.store(DGS + eid, dgs, mask=emask)
            tl.debug_barrier()
            if NEED_WC:
                ws_outer(wsB3, wsA, DWC_P, offs_e, F3, F2, DET, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
                ws_outer(wsB3d, wsDA, DWC_P, offs_e, F3, F2, DET, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
        # phase 4: a~, a'~ -> z2~, z2'~ (over s2 and ss2 z2')
        for n0 in range(0, F2, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < F2
            m2 = emask[:, None] & nmask[None, :]
            gmt = tl.load(GM + gm_row[:, None] * F2 + offs_n[None, :], mask=m2, other=0.0).to(ACC)
            bar_a = gmt * twv[:, None]
            bar_da = gmt * wv[:, None]
            if HAS_V:
                bar_a += ws_matmul(wsB3, WC, offs_e, offs_n, nmask, F3, 1, F2, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
                bar_da += ws_matmul(wsB3d, WC, offs_e, offs_n, nmask, F3, 1, F2, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
            s2 = ws_load(wsS2, offs_e, offs_n, nmask, F2)
            z2b = tl.where(m2, ws_load(wsSS2, offs_e, offs_n, nmask, F2) * bar_da + s2 * bar_a, 0.0)
            dz2b = tl.where(m2, s2 * bar_da, 0.0)
            if NEED_B2:
                acc_add(DB2_P, offs_n, nmask, tl.sum(z2b, axis=0), DET)
            tl.debug_barrier()  # every thread has read its S2 / SS2 slice before it is overwritten
            ws_store(wsS2, offs_e, offs_n, nmask, F2, z2b)
            ws_store(wsSS2, offs_e, offs_n, nmask, F2, dz2b)
        tl.debug_barrier()
        # phase 5: dW2; a1~, a1'~ -> z1~ and its sums
        if NEED_W2:
            ws_outer(wsS2, wsA1, DW2_P, offs_e, F2, F1, DET, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
            ws_outer(wsSS2, wsDA1, DW2_P, offs_e, F2, F1, DET, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
        if NEED_X + NEED_Y + NEED_R + NEED_C > 0:
            for k0 in range(0, F1, BLOCK_N):
                offs_k = k0 + tl.arange(0, BLOCK_N)
                kmask = offs_k < F1
                m2 = emask[:, None] & kmask[None, :]
                bar_a1 = ws_matmul(wsS2, W2, offs_e, offs_k, kmask, F2, 1, F1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
                bar_da1 = ws_matmul(wsSS2, W2, offs_e, offs_k, kmask, F2, 1, F1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_N)
                s1 = ws_load(wsS1, offs_e, offs_k, kmask, F1)
                z1b = tl.where(m2, ws_load(wsSS1, offs_e, offs_k, kmask, F1) * bar_da1 + s1 * bar_a1, 0.0)
                if NEED_X:
                    seg_add(DX, own, emask, d_lo, d_hi, z1b, offs_k, kmask, F1)
                if NEED_Y:
                    tl.atomic_add(DY + oth[:, None] * F1 + offs_k[None, :], z1b, mask=m2)
                tl.debug_barrier()  # every thread has read its S1 / SS1 slice before it is overwritten
                ws_store(wsS1, offs_e, offs_k, kmask, F1, z1b)                                  # z1~
                ws_store(wsSS1, offs_e, offs_k, kmask, F1, tl.where(m2, s1 * bar_da1, 0.0))      # z1'~
            tl.debug_barrier()
            # phase 6: dR = z1~ C^T, dC += R^T z1~ + tR^T z1'~ (from the workspace: fewer live registers)
            rm = emask[:, None] & rmask_k[None, :]
            if NEED_R:
                dr = ws_matmul(wsS1, C, offs_e, offs_r, rmask_k, F1, F1, 1, ACC, MM, BLOCK_E, BLOCK_F, BLOCK_KR)
                tl.store(DR + eid[:, None] * K + offs_r[None, :], dr, mask=rm)
            if NEED_C:
                r = tl.load(R + eid[:, None] * K + offs_r[None, :], mask=rm, other=0.0).to(ACC)
                for k0 in range(0, F1, BLOCK_N):
                    offs_k = k0 + tl.arange(0, BLOCK_N)
                    kmask = offs_k < F1
                    dc = tile_mm(tl.trans(r), ws_load(wsS1, offs_e, offs_k, kmask, F1), MM).to(ACC)
                    acc_add(DC_P, offs_r[:, None] * F1 + offs_k[None, :], rmask_k[:, None] & kmask[None, :], dc, DET)
                if HAS_TR:
                    r = tl.load(TR + eid[:, None] * K + offs_r[None, :], mask=rm, other=0.0).to(ACC)
                    for k0 in range(0, F1, BLOCK_N):
                        offs_k = k0 + tl.arange(0, BLOCK_N)
                        kmask = offs_k < F1
                        dc = tile_mm(tl.trans(r), ws_load(wsSS1, offs_e, offs_k, kmask, F1), MM).to(ACC)
                        acc_add(DC_P, offs_r[:, None] * F1 + offs_k[None, :], rmask_k[:, None] & kmask[None, :], dc,
                                DET)
        tl.debug_barrier()  # the next tile overwrites the workspace and may add to the same rows


BWD2 = TunedKernel(_faithful_message_bwd2_kernel, _bwd2_configs(), key=["F1", "F2", "F3", "K"],
                   interpret=interpret_config)


def faithful_message_bwd2(gm, gs, P, Q, dst, src, ptr, perm, R, C, b1, W2, b2, w, Wc, bc, v, activation, tangents,
                          need, deterministic=False):
    """Launch the double backward: ``{name: gradient or None}`` for ``OUTPUTS``.

    ``tangents``: the 11 cotangents (tP, tQ, tR, tC, tb1, tW2, tb2, tw, tWc, tbc, tv), ``None`` where
    absent; this kernel takes those of P, Q, R and w (a force loss's), the op sends the others to the
    torch twin. ``need``: name -> wanted."""
    from ._common import target_kind
    from .faithful_message import _ws_rows
    from .faithful_message_bwd import source_plan

    tP, tQ, tR, tC, tb1, tW2, tb2, tw, tWc, tbc, tv = tangents
    if any(t is not None for t in (tC, tb1, tW2, tb2, tWc, tbc, tv)):
        raise ValueError("the triton double backward takes tangents on P, Q, R and w only")
    coord = v is not None
    if w is None:
        tw = None
    dtypes = dict(gm=P.dtype, gs=P.dtype, P=P.dtype, Q=Q.dtype, R=R.dtype, C=C.dtype, b1=b1.dtype, W2=W2.dtype,
                  b2=b2.dtype, w=w.dtype if w is not None else P.dtype, Wc=Wc.dtype if coord else P.dtype,
                  bc=bc.dtype if coord else P.dtype, v=v.dtype if coord else P.dtype)
    cdt = compute_dtype(P.dtype)
    gm, gs, P, Q, R, C, b1, W2, b2, w, Wc, bc, v, tP, tQ, tR, tw = prepare(
        *[t.to(cdt) if t is not None else None for t in (gm, gs, P, Q, R, C, b1, W2, b2, w, Wc, bc, v, tP, tQ, tR,
                                                          tw)])
    dst, src, ptr, perm = prepare(dst.long(), src.long(), ptr.long(), perm.long() if perm is not None else None)
    N, F1 = P.shape
    F2 = W2.shape[0]
    E, K = R.shape
    N_src = Q.shape[0]
    F3 = Wc.shape[0] if coord else 0
    check_i32(N=N, N_src=N_src, E=E, F1=F1, F2=F2, F3=F3, K=K)
    need = {k: bool(need.get(k)) for k in OUTPUTS}
    need["gs"] &= coord
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

    dgm = buf((N, F2), need["gm"])
    dgs = buf((E,), need["gs"])
    dP = buf((N, F1), need["P"] or need["b1"])
    dQ = buf((N_src, F1), need["Q"])
    dR = buf((E, K), need["R"])
    dw = buf((E,), need["w"])
    dummy = torch.empty(0, dtype=acc_torch, device=dev)
    partial_shapes = dict(C=(BLOCK_KR_HOST, F1), W2=(F2, F1), b2=(F2,), Wc=(F3, F2), bc=(F3,), v=(F3,))
    partial_bytes = sum(int(torch.tensor(s).prod()) for k, s in partial_shapes.items() if need[k]) * itemsize
    ws_rows = _ws_rows(BWD2, cls, target_kind(dev))
    width = 4 * F1 + 4 * F2 + 2 * F3
    consts = dict(MM=mm_mode(cdt, dev), ACC=acc_tl)
    act = ACT_CODE[activation]
    run = E > 0 and F1 > 0 and F2 > 0
    atomic_dq = need["Q"] and not det
    parts = {}

    def opt(t):  # absent inputs: any tensor of the compute dtype (never read)
        return t if t is not None else b1

    has_t = (int(tR is not None), int(tw is not None))
    if run and (atomic_dq or any(need[k] for k in OUTPUTS if k != "Q")):
        programs, per = grid(N, dev, width * itemsize, ws_rows, partial_bytes, det)
        rows = programs if det else 1
        parts = {k: buf((rows,) + s, need[k]) for k, s in partial_shapes.items()}
        ws = torch.empty(programs * ws_rows * width, dtype=acc_torch, device=dev)
        args = (gm, opt(gs), P, Q, dst, src, ptr, perm if perm is not None else ptr, R, C, b1, W2, b2, opt(w),
                opt(Wc), opt(bc), opt(v), opt(tP), opt(tQ), opt(tR), opt(tw), ws,
                dgm if need["gm"] else dummy, dgs if need["gs"] else dummy, dP if dP.numel() else dummy,
                dQ if atomic_dq else dummy, dR if need["R"] else dummy, dw if need["w"] else dummy,
                parts["C"], parts["W2"], parts["b2"], parts["Wc"], parts["bc"], parts["v"],
                N, F1, F2, F3, K, per, ws_rows, int(perm is not None), int(w is not None), int(coord), 1, int(det),
                int(tP is not None), int(tQ is not None), *has_t, int(need["gm"]), int(need["gs"]),
                int(need["P"] or need["b1"]), int(atomic_dq), int(need["R"]), int(need["C"]), int(need["W2"]),
                int(need["b2"]), int(need["w"]), int(need["Wc"]), int(need["bc"]), int(need["v"]), act)
        BWD2.launch(cls, (programs,), args, consts, det)
    if run and need["Q"] and det:  # roles of P/tP and Q/tQ swapped, one writer per sender row
        src_ptr, src_perm = prepare(*source_plan(src, N_src))
        programs, per = grid(N_src, dev, width * itemsize, ws_rows, 0, det)
        ws = torch.empty(programs * ws_rows * width, dtype=acc_torch, device=dev)
        args = (gm, opt(gs), Q, P, src, dst, src_ptr, src_perm, R, C, b1, W2, b2, opt(w), opt(Wc), opt(bc), opt(v),
                opt(tQ), opt(tP), opt(tR), opt(tw), ws,
                dummy, dummy, dQ, dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy,
                N_src, F1, F2, F3, K, per, ws_rows, 1, int(w is not None), int(coord), 0, 1,
                int(tQ is not None), int(tP is not None), *has_t, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, act)
        BWD2.launch(cls, (programs,), args, consts, det)

    def total(name):
        p = parts.get(name)
        if p is None or p.numel() == 0:
            return torch.zeros(partial_shapes[name], dtype=acc_torch, device=dev)
        return p.sum(0)

    res = dict(gm=dgm if need["gm"] else None, gs=dgs if need["gs"] else None, P=dP if need["P"] else None,
               Q=dQ if need["Q"] else None, R=dR if need["R"] else None, C=total("C")[:K] if need["C"] else None,
               b1=dP.sum(0) if need["b1"] else None, W2=total("W2") if need["W2"] else None,
               b2=total("b2") if need["b2"] else None, w=dw if need["w"] else None,
               Wc=total("Wc") if need["Wc"] else None, bc=total("bc") if need["bc"] else None,
               v=total("v") if need["v"] else None)
    return {k: (res[k].to(dtypes[k], copy=True) if res[k] is not None else None) for k in OUTPUTS}
