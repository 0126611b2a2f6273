"""Triton fused message aggregation: ``m_i = sum_j w_ij act(P_i + Q_j + R_ij C + b)``, ``s_ij = act(.) . v``.

Kernels -> launchers: ``_fused_message_fwd_kernel`` -> ``fused_message_fwd`` and
``_fused_message_bwd_kernel`` -> ``fused_message_bwd`` (the ops in
``gnnmegatron.ops.fused_message`` wrap them in autograd).

Layout: a program owns BLOCK_N consecutive destinations (a CSR block) and a BLOCK_F slice
of the features. It keeps C[:, slice], b and v in registers, and for each destination loops
over its edges BLOCK_E at a time (through ``perm`` when the edges are not stored in
destination order): gather Q rows, load R rows, ``tl.dot`` with C, add, activate, reduce.
No [E, F] tensor is written; backward recomputes the tile. fp32 accumulation (fp64 for fp64
inputs), int64 offsets, every load masked.

Backward per tile: ``dz = (gm_i w_ij + gs_ij v) * act'(z)``; dP_i = sum dz (owned rows, no
atomics); dQ_j += dz (fp32 ``atomic_add``: sources are scattered); dR = dz C^T and dw, s are
full-F sums (direct stores when one F block covers F, else fp32 atomics); dC and dv are
summed per program into ``[programs, K, F]`` / ``[programs, F]`` partial buffers that torch
reduces (deterministic, no hot atomics); db = sum_i dP_i.

Bytes moved by the forward (the op is memory-bound; ``fused_message_bytes`` returns it):
E (F + K) x itemsize (Q rows and R rows) + E x (8 + itemsize) (src, w) + 2 N F x itemsize
(P in, m out) + (N + 1) x 8 (ptr), + E x itemsize for s and E x 8 for perm when present.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gnnmegatron.kernels._common import INTERPRET, acc_dtype, edge_block, act_and_grad, mm_mode, pow2, tile_mm
from gnnmegatron.ops.activations import ACT_CODE

# Interpreter configuration (tests may change it to force several F blocks / the atomic paths).
INTERPRET_CONFIG = {"BLOCK_N": 2, "BLOCK_E": 16, "BLOCK_F": 16}


def _fwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": INTERPRET_CONFIG["BLOCK_N"], "BLOCK_E": INTERPRET_CONFIG["BLOCK_E"]},
                              num_warps=1)]
    # Candidates, NOT yet measured on a GPU (the development machines have none; the benchmark
    # records the winner per (F, K) on the first GPU run). Reasons: BLOCK_E 16 is tl.dot's
    # minimum and matches the 20-60 edges of an atom (few masked rows); 32/64 help hubs.
    # BLOCK_N 1 gives N x F/BLOCK_F programs (64k at N = 64k), enough to fill 132 SMs; 4 cuts
    # the per-program reload of C (K x BLOCK_F) for small graphs. num_warps 4/8 for
    # [BLOCK_E, BLOCK_F <= 256] fp32 tiles.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_E": be}, num_warps=nw, num_stages=2)
            for bn in (1, 4) for be in (16, 32, 64) for nw in (4, 8)]


def _bwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": INTERPRET_CONFIG["BLOCK_N"], "BLOCK_E": INTERPRET_CONFIG["BLOCK_E"]},
                              num_warps=1)]
    # BLOCK_N >= 16 bounds the dC partial buffer (programs x K x F fp32: 4k x 32 x 256 x 4 B =
    # 128 MiB at N = 64k, BLOCK_N = 16) and the torch reduction over it. Not yet measured.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_E": be}, num_warps=nw, num_stages=2)
            for bn in (16, 64) for be in (16, 32) for nw in (4, 8)]


@triton.jit
def _fused_message_fwd_kernel(P, Q, SRC, PTR, PERM, R, C, B, W, V, M, S, N, F, K,
                              stride_p, stride_q, stride_r, stride_c, stride_m,
                              HAS_PERM: tl.constexpr, HAS_W: tl.constexpr, HAS_V: tl.constexpr,
                              S_ATOMIC: tl.constexpr, ACT: tl.constexpr, MM: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs_f < F
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    c = tl.load(C + offs_k[:, None].to(tl.int64) * stride_c + offs_f[None, :],
                mask=kmask[:, None] & fmask[None, :], other=0.0)
    bias = tl.load(B + offs_f, mask=fmask, other=0.0).to(ACC)
    if HAS_V:
        v = tl.load(V + offs_f, mask=fmask, other=0.0).to(ACC)
    for n in range(BLOCK_N):
        i = pid_n * BLOCK_N + n
        if i < N:
            start = tl.load(PTR + i)
            end = tl.load(PTR + i + 1)
            p = tl.load(P + i.to(tl.int64) * stride_p + offs_f, mask=fmask, other=0.0).to(ACC)
            acc = tl.zeros([BLOCK_F], ACC)
            for e0 in range(start, end, BLOCK_E):
                eid, emask = edge_block(PERM, e0, end, BLOCK_E, HAS_PERM)
                j = tl.load(SRC + eid, mask=emask, other=0)
                mask2 = emask[:, None] & fmask[None, :]
                q = tl.load(Q + j[:, None] * stride_q + offs_f[None, :], mask=mask2, other=0.0).to(ACC)
                r = tl.load(R + eid[:, None] * stride_r + offs_k[None, :], mask=emask[:, None] & kmask[None, :],
                            other=0.0)
                z = p[None, :] + q + tile_mm(r, c, MM).to(ACC) + bias[None, :]
                a, _ = act_and_grad(z, ACT)
                a = tl.where(mask2, a, 0.0)
                if HAS_W:
                    wv = tl.load(W + eid, mask=emask, other=0.0).to(ACC)
                    acc += tl.sum(a * wv[:, None], axis=0)
                else:
                    acc += tl.sum(a, axis=0)
                if HAS_V:
                    s_part = tl.sum(a * v[None, :], axis=1)
                    if S_ATOMIC:
                        tl.atomic_add(S + eid, s_part, mask=emask)
                    else:
                        tl.store(S + eid, s_part, mask=emask)
            tl.store(M + i.to(tl.int64) * stride_m + offs_f, acc.to(M.dtype.element_ty), mask=fmask)


@triton.jit
def _fused_message_bwd_kernel(GM, GS, P, Q, SRC, PTR, PERM, R, C, B, W, V,
                              DP, DQ, DR, DW, DC_PART, DV_PART, N, F, K,
                              stride_p, stride_q, stride_r, stride_c, stride_gm,
                              HAS_PERM: tl.constexpr, HAS_W: tl.constexpr, HAS_V: tl.constexpr,
                              NEED_P: tl.constexpr, NEED_Q: tl.constexpr, NEED_R: tl.constexpr,
                              NEED_C: tl.constexpr, NEED_W: tl.constexpr, NEED_V: tl.constexpr,
                              EDGE_ATOMIC: tl.constexpr, ACT: tl.constexpr, MM: tl.constexpr,
                              MM_BWD: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs_f < F
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    c = tl.load(C + offs_k[:, None].to(tl.int64) * stride_c + offs_f[None, :],
                mask=kmask[:, None] & fmask[None, :], other=0.0)
    bias = tl.load(B + offs_f, mask=fmask, other=0.0).to(ACC)
    if HAS_V:
        v = tl.load(V + offs_f, mask=fmask, other=0.0).to(ACC)
    dc_acc = tl.zeros([BLOCK_K, BLOCK_F], ACC)
    dv_acc = tl.zeros([BLOCK_F], ACC)
    for n in range(BLOCK_N):
        i = pid_n * BLOCK_N + n
        if i < N:
            start = tl.load(PTR + i)
            end = tl.load(PTR + i + 1)
            p = tl.load(P + i.to(tl.int64) * stride_p + offs_f, mask=fmask, other=0.0).to(ACC)
            gm = tl.load(GM + i.to(tl.int64) * stride_gm + offs_f, mask=fmask, other=0.0).to(ACC)
            dp_acc = tl.zeros([BLOCK_F], ACC)
            for e0 in range(start, end, BLOCK_E):
                eid, emask = edge_block(PERM, e0, end, BLOCK_E, HAS_PERM)
                j = tl.load(SRC + eid, mask=emask, other=0)
                mask2 = emask[:, None] & fmask[None, :]
                q = tl.load(Q + j[:, None] * stride_q + offs_f[None, :], mask=mask2, other=0.0).to(ACC)
                r = tl.load(R + eid[:, None] * stride_r + offs_k[None, :], mask=emask[:, None] & kmask[None, :],
                            other=0.0)
                z = p[None, :] + q + tile_mm(r, c, MM).to(ACC) + bias[None, :]
                a, da = act_and_grad(z, ACT)
                a = tl.where(mask2, a, 0.0)
                if HAS_W:
                    wv = tl.load(W + eid, mask=emask, other=0.0).to(ACC)
                    g = gm[None, :] * wv[:, None]
                else:
                    g = gm[None, :] + tl.zeros([BLOCK_E, BLOCK_F], ACC)
                if HAS_V:
                    gs = tl.load(GS + eid, mask=emask, other=0.0).to(ACC)
                    g += gs[:, None] * v[None, :]
                dz = tl.where(mask2, g * da, 0.0)
                dp_acc += tl.sum(dz, axis=0)
                if NEED_Q:
                    tl.atomic_add(DQ + j[:, None] * F + offs_f[None, :], dz, mask=mask2)
                if NEED_R:
                    dr = tile_mm(dz, tl.trans(c.to(ACC)), MM_BWD).to(ACC)
                    rmask = emask[:, None] & kmask[None, :]
                    if EDGE_ATOMIC:
                        tl.atomic_add(DR + eid[:, None] * K + offs_k[None, :], dr, mask=rmask)
                    else:
                        tl.store(DR + eid[:, None] * K + offs_k[None, :], dr, mask=rmask)
                if NEED_W:
                    dw = tl.sum(gm[None, :] * a, axis=1)
                    if EDGE_ATOMIC:
                        tl.atomic_add(DW + eid, dw, mask=emask)
                    else:
                        tl.store(DW + eid, dw, mask=emask)
                if NEED_C:
                    dc_acc += tile_mm(tl.trans(r.to(ACC)), dz, MM_BWD).to(ACC)
                if NEED_V:
                    dv_acc += tl.sum(gs[:, None] * a, axis=0)
            if NEED_P:
                tl.store(DP + i.to(tl.int64) * F + offs_f, dp_acc, mask=fmask)
    if NEED_C:
        base = pid_n.to(tl.int64) * K * F
        tl.store(DC_PART + base + offs_k[:, None] * F + offs_f[None, :], dc_acc,
                 mask=kmask[:, None] & fmask[None, :])
    if NEED_V:
        tl.store(DV_PART + pid_n.to(tl.int64) * F + offs_f, dv_acc, mask=fmask)


_fwd_kernel = triton.autotune(configs=_fwd_configs(), key=["F", "K", "HAS_V"],
                              reset_to_zero=["S"])(_fused_message_fwd_kernel)
_bwd_kernel = triton.autotune(configs=_bwd_configs(), key=["F", "K", "HAS_V"],
                              reset_to_zero=["DQ", "DR", "DW", "DC_PART", "DV_PART"])(_fused_message_bwd_kernel)


def _block_f(F: int) -> int:
    # One F block up to 256 features keeps s, dR and dw free of atomics at the study's slice
    # widths (H / tp); wider slices split into 128-wide blocks.
    if INTERPRET:
        return INTERPRET_CONFIG["BLOCK_F"]
    return pow2(F) if F <= 256 else 128


def fused_message_bytes(N: int, E: int, F: int, K: int, itemsize: int, has_w=True, has_v=False,
                        has_perm=False) -> int:
    """Bytes the forward kernel must move at least once (see module docstring)."""
    total = E * (F + K) * itemsize + E * 8 + 2 * N * F * itemsize + (N + 1) * 8 + (K + 2) * F * itemsize
    total += E * itemsize if has_w else 0
    total += E * itemsize if has_v else 0
    total += E * 8 if has_perm else 0
    return total


def _contiguous(*vectors):
    return tuple(x.contiguous() if x is not None else None for x in vectors)


def fused_message_fwd(P, Q, src, ptr, perm, R, C, b, w, v, activation):
    """Launch the forward: returns (m [N, F] in P's dtype, s [E] or [0])."""
    b, w, v = _contiguous(b, w, v)  # the kernels index these 1-D vectors with unit stride
    N, F = P.shape
    E, K = R.shape
    acc_tl, acc_torch = acc_dtype(P.dtype)
    m = torch.empty((N, F), dtype=P.dtype, device=P.device)
    block_f = _block_f(F)
    n_fb = triton.cdiv(F, block_f) if F else 0
    s_atomic = n_fb > 1
    s = torch.zeros(E if v is not None else 0, dtype=acc_torch, device=P.device)
    if N == 0 or F == 0:
        return m.zero_(), s.to(P.dtype)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), n_fb)

    _fwd_kernel[grid](P, Q, src, ptr, perm if perm is not None else ptr, R, C, b,
                      w if w is not None else b, v if v is not None else b, m, s if v is not None else m,
                      N, F, K, P.stride(0), Q.stride(0), R.stride(0), C.stride(0), m.stride(0),
                      HAS_PERM=perm is not None, HAS_W=w is not None, HAS_V=v is not None, S_ATOMIC=s_atomic,
                      ACT=ACT_CODE[activation], MM=mm_mode(P.dtype, native_half=not INTERPRET), ACC=acc_tl, BLOCK_F=block_f,
                      BLOCK_K=pow2(K))
    return m, s.to(P.dtype)


def fused_message_bwd(gm, gs, P, Q, src, ptr, perm, R, C, b, w, v, activation, needs):
    """Launch the backward: returns [dP, dQ, dR, dC, db, dw, dv] (empty where not needed)."""
    b, w, v = _contiguous(b, w, v)
    N, F = P.shape
    E, K = R.shape
    need_P, need_Q, need_R, need_C, need_b, need_w, need_v = needs
    need_w = need_w and w is not None
    need_v = need_v and v is not None
    acc_tl, acc_torch = acc_dtype(P.dtype)
    dev = P.device
    block_f = _block_f(F)
    n_fb = triton.cdiv(F, block_f) if F else 0
    # partial buffers sized for the smallest BLOCK_N among the configs (unused rows stay 0)
    min_block_n = min(c.kwargs["BLOCK_N"] for c in _bwd_kernel.configs)

    def buf(shape, on):
        return torch.zeros(shape, dtype=acc_torch, device=dev) if on else torch.empty(0, dtype=acc_torch, device=dev)

    dP = buf((N, F), need_P or need_b)
    dQ = buf(Q.shape, need_Q)
    dR = buf((E, K), need_R)
    dw = buf((E,), need_w)
    max_progs = triton.cdiv(N, min_block_n)
    dC_part = buf((max(max_progs, 1), K, F), need_C)
    dv_part = buf((max(max_progs, 1), F), need_v)
    if N > 0 and F > 0 and E > 0:
        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]), n_fb)

        dummy = dP if dP.numel() else P
        _bwd_kernel[grid](gm, gs if gs is not None else dummy, P, Q, src, ptr, perm if perm is not None else ptr,
                          R, C, b, w if w is not None else b, v if v is not None else b,
                          dP if dP.numel() else dummy, dQ if dQ.numel() else dummy, dR if dR.numel() else dummy,
                          dw if dw.numel() else dummy, dC_part if dC_part.numel() else dummy,
                          dv_part if dv_part.numel() else dummy, N, F, K,
                          P.stride(0), Q.stride(0), R.stride(0), C.stride(0), gm.stride(0),
                          HAS_PERM=perm is not None, HAS_W=w is not None, HAS_V=v is not None,
                          NEED_P=need_P or need_b, NEED_Q=need_Q, NEED_R=need_R, NEED_C=need_C, NEED_W=need_w,
                          NEED_V=need_v, EDGE_ATOMIC=n_fb > 1, ACT=ACT_CODE[activation],
                          MM=mm_mode(P.dtype, native_half=not INTERPRET),
                          MM_BWD=3 if P.dtype == torch.float64 else 0, ACC=acc_tl, BLOCK_F=block_f, BLOCK_K=pow2(K))
    def empty():  # a fresh tensor per output: custom-op outputs must not alias each other
        return torch.empty(0, dtype=P.dtype, device=dev)

    outs = [dP.to(P.dtype, copy=True) if need_P else empty(), dQ.to(Q.dtype) if need_Q else empty(),
            dR.to(R.dtype) if need_R else empty(), dC_part.sum(0).to(C.dtype) if need_C else empty(),
            dP.sum(0).to(b.dtype) if need_b else empty(),
            dw.to(w.dtype) if need_w else empty(), dv_part.sum(0).to(v.dtype) if need_v else empty()]
    return outs
