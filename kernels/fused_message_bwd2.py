"""Triton fused message aggregation, double backward: ``_fused_message_bwd2_kernel`` ->
``fused_message_bwd2`` (the conservative-force hot path: a force loss differentiates the
backward once more).

Given the backward's inputs and the cotangents of its outputs ``gg = (ggP, ggQ, ggR, ggC, ggb,
ggw, ggv)``, with per edge e = (i, j) (``a``, ``a'``, ``a''`` the activation and its
derivatives at z, ``g = gm_i w + gs v``, ``dz = g a'``)::

    G = ggP_i + ggQ_j + ggR_e C + R_e ggC + ggb          H = a' G
    T = g a'' G + (ggw_e gm_i + gs_e ggv) a'             (d/dz of the scalar being differentiated)
    dgm_i = sum_e w_e H + ggw_e a      dgs_e = v . H + a . ggv      dw_e = gm_i . H
    dP_i = sum_e T    dQ_j = sum_e T   dR_e = T C^T + dz ggC^T      db = sum_e T
    dC = sum_e R_e^T T + ggR_e^T dz    dv = sum_e gs_e H

(``gnnmegatron.ops.fused_message_grad2`` has the same formulas in torch, chunk by chunk: the
torch twin.) Layout, owned-row sums, full-F edge sums, partial buffers and the two ways of
getting the source-side sum dQ (fp32 atomics, or deterministically a second launch over the
source-sorted plan with the roles of P/ggP and Q/ggQ swapped) are those of the backward.
"""

from __future__ import annotations

import torch
import triton.language as tl
import triton

from ._common import (TunedKernel, acc_dtype, act_grads2, check_i32, config, edge_block, mm_mode, per_kind,
                      prepare, tile_mm)
from .codes import ACT_CODE
from ._fused_common import interpret_config, kernel_class
from .fused_message_bwd import launch_bwd, source_plan

HAS = ["HAS_PERM", "HAS_W", "HAS_V", "GM_OTHER", "HAS_GGX", "HAS_GGY", "HAS_GGR", "HAS_GGC", "HAS_GGB", "HAS_GGW",
       "HAS_GGV"]
NEED = ["NEED_GM", "NEED_GS", "NEED_X", "NEED_Y", "NEED_R", "NEED_C", "NEED_W", "NEED_V"]
SCALARS = ["N", "F", "K", "PER"] + HAS + NEED + ["ACT"]


def _bwd2_configs() -> dict:
    # The double backward keeps about ten [BLOCK_E, BLOCK_F] tiles live (z, a, a', a'', g, dz,
    # G, H, T, a gathered row) plus the dR tile and dC accumulator. Chosen from ahead-of-time
    # compiles, each free of spills on its targets; not timed on a GPU. 32 x 32 spilled 32-650 B
    # on sm_80 at every BLOCK_K; at BLOCK_K 64 only 16 x 16 at 4 warps stays spill-free there.
    # fp64: 16 x 16 at 8 warps on NVIDIA (4 warps spilled 8-168 B at BLOCK_K 32/64 on sm_80/sm_90);
    # on gfx942 8 warps of fp64 16 x 16 spilled 1-1.3 KB of scratch, 4 warps did not.
    # With triton 3.6 on sm_80, 16 x 32 at 8 warps spilled 96-104 B at BLOCK_K 32 and 16 x 16 at 4
    # warps 56-64 B at BLOCK_K 64 (both at the 255-register cap with triton 3.9): NVIDIA takes
    # 16 x 16 at BLOCK_K 32, and 8 warps at BLOCK_K 64.
    out = {}
    for dt in ("fp16", "bf16", "fp32"):
        both = [config(BLOCK_E=16, BLOCK_F=32, num_warps=8), config(BLOCK_E=16, BLOCK_F=16)]
        out[(dt, 16)] = per_kind(both)
        out[(dt, 32)] = per_kind(both[1:], both)
        out[(dt, 64)] = per_kind([config(BLOCK_E=16, BLOCK_F=16, num_warps=8)], [config(BLOCK_E=16, BLOCK_F=16)])
    out[("fp64", 16)] = per_kind([config(BLOCK_E=16, BLOCK_F=16), config(BLOCK_E=16, BLOCK_F=16, num_warps=8)],
                                 [config(BLOCK_E=16, BLOCK_F=16)])
    out[("fp64", 32)] = per_kind([config(BLOCK_E=16, BLOCK_F=16, num_warps=8),
                                  config(BLOCK_E=16, BLOCK_F=32, num_warps=8)],
                                 [config(BLOCK_E=16, BLOCK_F=32, num_warps=8), config(BLOCK_E=16, BLOCK_F=16)])
    out[("fp64", 64)] = per_kind([config(BLOCK_E=16, BLOCK_F=16, num_warps=8)],
                                 [config(BLOCK_E=16, BLOCK_F=16), config(BLOCK_E=16, BLOCK_F=32, num_warps=8)])
    return out


@triton.jit(do_not_specialize=SCALARS)
def _fused_message_bwd2_kernel(GM, GS, X, Y, OTHER, PTR, PERM, R, C, B, W, V,
                               GGX, GGY, GGR, GGC, GGB, GGW, GGV,
                               DGM, DGS, DX, DY, DR, DW, DC_PART, DV_PART, N, F, K, PER,
                               HAS_PERM, HAS_W, HAS_V, GM_OTHER, HAS_GGX, HAS_GGY, HAS_GGR, HAS_GGC, HAS_GGB, HAS_GGW,
                               HAS_GGV, NEED_GM, NEED_GS, NEED_X, NEED_Y, NEED_R, NEED_C, NEED_W, NEED_V, ACT,
                               MM: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    i0 = pid * PER
    count = tl.minimum(PER, N - i0)  # the owned rows [i0, i0 + count)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < F
        ckmask = kmask[:, None] & fmask[None, :]
        bias = tl.load(B + offs_f, mask=fmask, other=0.0).to(ACC)
        v = tl.zeros([BLOCK_F], ACC)
        if HAS_V:
            v = tl.load(V + offs_f, mask=fmask, other=0.0).to(ACC)
        ggv = tl.zeros([BLOCK_F], ACC)
        if HAS_GGV:
            ggv = tl.load(GGV + offs_f, mask=fmask, other=0.0).to(ACC)
        ggb = tl.zeros([BLOCK_F], ACC)
        if HAS_GGB:
            ggb = tl.load(GGB + offs_f, mask=fmask, other=0.0).to(ACC)
        dc_acc = tl.zeros([BLOCK_K, BLOCK_F], ACC)
        dv_acc = tl.zeros([BLOCK_F], ACC)
        for n in range(0, count):
            i = i0 + n
            start = tl.load(PTR + i)
            end = tl.load(PTR + i + 1)
            row = i.to(tl.int64) * F
            x = tl.load(X + row + offs_f, mask=fmask, other=0.0).to(ACC)
            gm_own = tl.zeros([BLOCK_F], ACC)
            if GM_OTHER == 0:
                gm_own = tl.load(GM + row + offs_f, mask=fmask, other=0.0).to(ACC)
            ggx = ggb
            if HAS_GGX:
                ggx += tl.load(GGX + row + offs_f, mask=fmask, other=0.0).to(ACC)
            dx_acc = tl.zeros([BLOCK_F], ACC)
            dgm_acc = tl.zeros([BLOCK_F], ACC)
            for e0 in range(start, end, BLOCK_E):
                eid, emask = edge_block(PERM, e0, end, BLOCK_E, HAS_PERM)
                j = tl.load(OTHER + eid, mask=emask, other=0)
                mask2 = emask[:, None] & fmask[None, :]
                rmask = emask[:, None] & kmask[None, :]
                y = tl.load(Y + j[:, None] * F + offs_f[None, :], mask=mask2, other=0.0).to(ACC)
                # z and the K-terms of G (ggR C + R ggC): rank-1 updates over k
                z = x[None, :] + y + bias[None, :]
                G = tl.broadcast_to(ggx[None, :], [BLOCK_E, BLOCK_F])
                for k in range(0, K):
                    r_k = tl.load(R + eid * K + k, mask=emask, other=0.0).to(ACC)
                    c_k = tl.load(C + k * F + offs_f, mask=fmask, other=0.0).to(ACC)
                    z += r_k[:, None] * c_k[None, :]
                    if HAS_GGR:
                        ggr_k = tl.load(GGR + eid * K + k, mask=emask, other=0.0).to(ACC)
                        G += ggr_k[:, None] * c_k[None, :]
                    if HAS_GGC:
                        ggc_k = tl.load(GGC + k * F + offs_f, mask=fmask, other=0.0).to(ACC)
                        G += r_k[:, None] * ggc_k[None, :]
                a, a1, a2 = act_grads2(z, ACT)
                a = tl.where(mask2, a, 0.0)
                if GM_OTHER:
                    gmt = tl.load(GM + j[:, None] * F + offs_f[None, :], mask=mask2, other=0.0).to(ACC)
                else:
                    gmt = tl.broadcast_to(gm_own[None, :], [BLOCK_E, BLOCK_F])
                wv = tl.full([BLOCK_E], 1.0, ACC)
                if HAS_W:
                    wv = tl.load(W + eid, mask=emask, other=0.0).to(ACC)
                gs = tl.zeros([BLOCK_E], ACC)
                if HAS_V:
                    gs = tl.load(GS + eid, mask=emask, other=0.0).to(ACC)
                g = gmt * wv[:, None] + gs[:, None] * v[None, :]
                dz = tl.where(mask2, g * a1, 0.0)
                if HAS_GGY:  # G: the direction in which dz is differentiated
                    G += tl.load(GGY + j[:, None] * F + offs_f[None, :], mask=mask2, other=0.0).to(ACC)
                H = tl.where(mask2, a1 * G, 0.0)
                coef = tl.zeros([BLOCK_E, BLOCK_F], ACC)
                ggw = tl.zeros([BLOCK_E], ACC)
                if HAS_GGW:
                    ggw = tl.load(GGW + eid, mask=emask, other=0.0).to(ACC)
                    coef += ggw[:, None] * gmt
                if HAS_GGV:
                    coef += gs[:, None] * ggv[None, :]
                T = tl.where(mask2, g * a2 * G + coef * a1, 0.0)
                dx_acc += tl.sum(T, axis=0)
                if NEED_GM:
                    dgm_acc += tl.sum(wv[:, None] * H + ggw[:, None] * a, axis=0)
                if NEED_Y:
                    tl.atomic_add(DY + j[:, None] * F + offs_f[None, :], T, mask=mask2)
                if NEED_GS:
                    dgs = tl.sum(v[None, :] * H + a * ggv[None, :], axis=1)
                    if f0 > 0:
                        dgs += tl.load(DGS + eid, mask=emask, other=0.0)
                    tl.store(DGS + eid, dgs, mask=emask)
                if NEED_W:
                    dw = tl.sum(gmt * H, axis=1)
                    if f0 > 0:
                        dw += tl.load(DW + eid, mask=emask, other=0.0)
                    tl.store(DW + eid, dw, mask=emask)
                if NEED_R:  # T C^T + dz ggC^T, a row reduction per k
                    dr = tl.zeros([BLOCK_E, BLOCK_K], ACC)
                    for k in range(0, K):
                        c_k = tl.load(C + k * F + offs_f, mask=fmask, other=0.0).to(ACC)
                        prod = T * c_k[None, :]
                        if HAS_GGC:
                            ggc_k = tl.load(GGC + k * F + offs_f, mask=fmask, other=0.0).to(ACC)
                            prod += dz * ggc_k[None, :]
                        dr = tl.where(offs_k[None, :] == k, tl.sum(prod, axis=1)[:, None], dr)
                    if f0 > 0:
                        dr += tl.load(DR + eid[:, None] * K + offs_k[None, :], mask=rmask, other=0.0)
                    tl.store(DR + eid[:, None] * K + offs_k[None, :], dr, mask=rmask)
                if NEED_C:
                    r = tl.load(R + eid[:, None] * K + offs_k[None, :], mask=rmask, other=0.0).to(ACC)
                    dc_acc += tile_mm(tl.trans(r), T, MM).to(ACC)
                    if HAS_GGR:
                        ggr = tl.load(GGR + eid[:, None] * K + offs_k[None, :], mask=rmask, other=0.0).to(ACC)
                        dc_acc += tile_mm(tl.trans(ggr), dz, MM).to(ACC)
                if NEED_V:
                    dv_acc += tl.sum(gs[:, None] * H, axis=0)
            if NEED_X:
                tl.store(DX + row + offs_f, dx_acc, mask=fmask)
            if NEED_GM:
                tl.store(DGM + row + offs_f, dgm_acc, mask=fmask)
        if NEED_C:
            base = pid.to(tl.int64) * K * F
            tl.store(DC_PART + base + offs_k[:, None] * F + offs_f[None, :], dc_acc, mask=ckmask)
        if NEED_V:
            tl.store(DV_PART + pid.to(tl.int64) * F + offs_f, dv_acc, mask=fmask)
        tl.debug_barrier()  # the next slice reads DGS / DW / DR values other threads stored


BWD2 = TunedKernel(_fused_message_bwd2_kernel, _bwd2_configs(), key=["F", "K"], interpret=interpret_config,
                   reset_to_zero=["DY"])
OUTPUTS = ("gm", "gs", "P", "Q", "R", "C", "b", "w", "v")


def fused_message_bwd2(gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, activation, gg, need,
                       src_ptr=None, src_perm=None, deterministic=False):
    """Launch the double backward: returns {name: gradient or None} for ``OUTPUTS``.

    ``gg`` = (ggP, ggQ, ggR, ggC, ggb, ggw, ggv), ``None`` where absent; ``need`` maps each name
    of ``OUTPUTS`` to whether its gradient is wanted. Other arguments as in ``fused_message_bwd``."""
    ggP, ggQ, ggR, ggC, ggb, ggw, ggv = gg
    ggw = ggw if w is not None else None
    ggv = ggv if v is not None else None
    dt = P.dtype
    cast = [t.to(dt) if t is not None else None for t in (gm, gs, ggP, ggQ, ggR, ggC, ggb, ggw, ggv)]
    gm, gs, ggP, ggQ, ggR, ggC, ggb, ggw, ggv = prepare(*cast)
    P, Q, R, C, b, w, v = prepare(P, Q, R, C, b, w, v)
    dst, src, ptr, perm = prepare(dst.long(), src.long(), ptr.long(), perm.long() if perm is not None else None)
    N, F = P.shape
    E, K = R.shape
    N_src = Q.shape[0]
    check_i32(N=N, N_src=N_src, E=E, F=F, K=K)
    cls = kernel_class(dt, K)
    need = {k: bool(need.get(k)) for k in OUTPUTS}
    need["gs"] &= v is not None
    need["v"] &= v is not None
    need["w"] &= w is not None
    acc_tl, acc_torch = acc_dtype(dt)
    dev = P.device
    mm = mm_mode(dt, P.device)

    def buf(shape, on):
        return torch.zeros(shape, dtype=acc_torch, device=dev) if on else torch.empty(0, dtype=acc_torch, device=dev)

    dP = buf((N, F), need["P"] or need["b"])
    dQ = buf((N_src, F), need["Q"])
    dgm = buf((N, F), need["gm"])
    dgs = buf((E,), need["gs"])
    dR = buf((E, K), need["R"])
    dw = buf((E,), need["w"])
    dummy = torch.empty(0, dtype=acc_torch, device=dev)
    consts = dict(MM=mm, ACC=acc_tl, BLOCK_K=cls[1])
    act = ACT_CODE[activation]

    def opt(t):  # absent inputs: any tensor of the input dtype (never read)
        return t if t is not None else b

    has_gg = (int(ggR is not None), int(ggC is not None), int(ggb is not None), int(ggw is not None),
              int(ggv is not None))
    run = E > 0 and F > 0
    atomic_dq = need["Q"] and not deterministic
    dc_part = dv_part = None
    if run and any(need[k] for k in OUTPUTS if k != "Q") or (run and atomic_dq):
        def dst_args(programs, per, dc_part, dv_part):
            args = (gm, opt(gs), P, Q, src, ptr, perm if perm is not None else ptr, R, C, b, opt(w), opt(v),
                    opt(ggP), opt(ggQ), opt(ggR), opt(ggC), opt(ggb), opt(ggw), opt(ggv),
                    dgm if need["gm"] else dummy, dgs if need["gs"] else dummy, dP if dP.numel() else dummy,
                    dQ if atomic_dq else dummy, dR if need["R"] else dummy, dw if need["w"] else dummy,
                    dc_part, dv_part, N, F, K, per,
                    int(perm is not None), int(w is not None), int(v is not None), 0, int(ggP is not None),
                    int(ggQ is not None), *has_gg, int(need["gm"]), int(need["gs"]), int(need["P"] or need["b"]),
                    int(atomic_dq), int(need["R"]), int(need["C"]), int(need["w"]), int(need["v"]), act)
            return args, consts

        dc_part, dv_part = launch_bwd(BWD2, cls, N, F, K, acc_torch, dev, dst_args, deterministic)
    if run and need["Q"] and deterministic:
        if src_ptr is None or src_perm is None:
            src_ptr, src_perm = source_plan(src, N_src)
        src_ptr, src_perm = prepare(src_ptr.long(), src_perm.long())

        def src_args(programs, per, dc_part_s, dv_part_s):  # roles of P/ggP and Q/ggQ swapped
            args = (gm, opt(gs), Q, P, dst, src_ptr, src_perm, R, C, b, opt(w), opt(v),
                    opt(ggQ), opt(ggP), opt(ggR), opt(ggC), opt(ggb), opt(ggw), opt(ggv),
                    dummy, dummy, dQ, dummy, dummy, dummy, dc_part_s, dv_part_s, N_src, F, K, per,
                    1, int(w is not None), int(v is not None), 1, int(ggQ is not None), int(ggP is not None),
                    *has_gg, 0, 0, 1, 0, 0, 0, 0, 0, act)
            return args, consts

        launch_bwd(BWD2, cls, N_src, F, K, acc_torch, dev, src_args, deterministic, partials=False)
    out = {k: None for k in OUTPUTS}
    zeros_kf = torch.zeros((K, F), dtype=acc_torch, device=dev)
    zeros_f = torch.zeros(F, dtype=acc_torch, device=dev)
    if need["gm"]:
        out["gm"] = dgm.to(dt)
    if need["gs"]:
        out["gs"] = dgs.to(dt)
    if need["P"]:
        out["P"] = dP.to(dt, copy=True)
    if need["Q"]:
        out["Q"] = dQ.to(Q.dtype)
    if need["R"]:
        out["R"] = dR.to(R.dtype)
    if need["C"]:
        out["C"] = (dc_part.sum(0) if dc_part is not None else zeros_kf).to(C.dtype)
    if need["b"]:
        out["b"] = dP.sum(0).to(b.dtype)
    if need["w"]:
        out["w"] = dw.to(w.dtype)
    if need["v"]:
        out["v"] = (dv_part.sum(0) if dv_part is not None else zeros_f).to(v.dtype)
    return out
