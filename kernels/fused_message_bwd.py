"""Triton fused message aggregation, backward: ``_fused_message_bwd_kernel`` -> ``fused_message_bwd``.

Per edge tile (layout as in ``fused_message.py``): ``dz = (gm_i w_ij + gs_ij v) * act'(z)``;
dP_i = sum dz (owned rows); dR = dz C^T (row reductions over k, ``mul_ct``) and dw = gm_i . a
are full-F sums that the owner accumulates over its F slices (no atomics); dC and dv are summed
per program (dC += R^T dz is the one ``tl.dot``) into ``[programs, K, F]`` / ``[programs, F]``
partial buffers that torch reduces; db = sum_i dP_i. The persistent grid bounds the partial
buffers independently of N (``persistent_programs``: at most max(64 MiB, one program per SM)).

dQ_j sums dz over the edges *leaving* j, which the destination-ordered programs do not own:

* default: fp32 ``atomic_add`` into dQ (sources are scattered; the summation order depends on
  the GPU's scheduling, so the bits can differ from run to run);
* deterministic (``deterministic=True``): a second launch of the same kernel over the
  transposed (source-sorted) CSR plan, where each program owns sources: ``X = Q`` is the owned
  row, ``Y = P`` and ``gm`` are gathered through the destination of each edge (``GM_OTHER``),
  and the owned-row sum is dQ. Every output then has one writer and a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (TunedKernel, acc_dtype, act_and_grad, add_rc, check_i32, config, edge_block, mm_mode,
                      mul_ct, per_kind, persistent_programs, prepare, tile_mm)
from .codes import ACT_CODE
from ._fused_common import interpret_config, kernel_class

SCALARS = ["N", "F", "K", "PER", "HAS_PERM", "HAS_W", "HAS_V", "GM_OTHER", "NEED_X", "NEED_Y", "NEED_R", "NEED_C",
           "NEED_W", "NEED_V", "ACT"]


def _bwd_configs() -> dict:
    # Chosen from ahead-of-time compiles (``python -m gnnmegatron.kernels.aot``): each candidate
    # is free of spills on sm_80, sm_90 and gfx942; not timed on a GPU (none available). The
    # backward holds about twice the forward's live tiles (z, a, act', g, dz), the [BLOCK_E,
    # BLOCK_K] dR tile and the [BLOCK_K, BLOCK_F] dC accumulator, so 8 warps share them. At
    # BLOCK_K 64 only 16 x 32 stays spill-free on sm_80 (16 x 64 and 32 x 32 spilled 40-184 B);
    # fp64 tiles are half as wide (32 x 32 spilled 32-40 B on sm_90 at BLOCK_K 32 and 64).
    # At BLOCK_K 32, 32 x 32 took 244-255 registers on NVIDIA with triton 3.9 and spilled 104-224 B
    # on sm_80 and sm_90 with triton 3.6: NVIDIA keeps 16 x 64 alone there.
    out = {}
    for dt in ("fp16", "bf16", "fp32"):
        both = [config(BLOCK_E=16, BLOCK_F=64, num_warps=8), config(BLOCK_E=32, BLOCK_F=32, num_warps=8)]
        out[(dt, 16)] = per_kind(both)
        out[(dt, 32)] = per_kind(both[:1], both)
        out[(dt, 64)] = per_kind([config(BLOCK_E=16, BLOCK_F=32, num_warps=8)])
    out[("fp64", 16)] = per_kind([config(BLOCK_E=16, BLOCK_F=32, num_warps=8), config(BLOCK_E=16, BLOCK_F=32)])
    out[("fp64", 32)] = per_kind([config(BLOCK_E=16, BLOCK_F=32, num_warps=8), config(BLOCK_E=16, BLOCK_F=16)])
    out[("fp64", 64)] = per_kind([config(BLOCK_E=16, BLOCK_F=32, num_warps=8)])
    return out


@triton.jit(do_not_specialize=SCALARS)
def _fused_message_bwd_kernel(GM, GS, X, Y, OTHER, PTR, PERM, R, C, B, W, V,
                              DX, DY, DR, DW, DC_PART, DV_PART, N, F, K, PER,
                              HAS_PERM, HAS_W, HAS_V, GM_OTHER, NEED_X, NEED_Y, NEED_R, NEED_C, NEED_W, NEED_V, ACT,
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
        bias = tl.load(B + offs_f, mask=fmask, other=0.0).to(ACC)
        v = tl.zeros([BLOCK_F], ACC)
        if HAS_V:
            v = tl.load(V + offs_f, mask=fmask, other=0.0).to(ACC)
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
            dx_acc = tl.zeros([BLOCK_F], ACC)
            for e0 in range(start, end, BLOCK_E):
                eid, emask = edge_block(PERM, e0, end, BLOCK_E, HAS_PERM)
                j = tl.load(OTHER + eid, mask=emask, other=0)
                mask2 = emask[:, None] & fmask[None, :]
                rmask = emask[:, None] & kmask[None, :]
                y = tl.load(Y + j[:, None] * F + offs_f[None, :], mask=mask2, other=0.0).to(ACC)
                z = add_rc(x[None, :] + y + bias[None, :], R, eid, emask, C, offs_f, fmask, K, F, ACC)
                a, da = act_and_grad(z, ACT)
                a = tl.where(mask2, a, 0.0)
                if GM_OTHER:
                    gmt = tl.load(GM + j[:, None] * F + offs_f[None, :], mask=mask2, other=0.0).to(ACC)
                else:
                    gmt = tl.broadcast_to(gm_own[None, :], [BLOCK_E, BLOCK_F])
                g = gmt
                if HAS_W:
                    wv = tl.load(W + eid, mask=emask, other=0.0).to(ACC)
                    g = gmt * wv[:, None]
                gs = tl.zeros([BLOCK_E], ACC)
                if HAS_V:
                    gs = tl.load(GS + eid, mask=emask, other=0.0).to(ACC)
                    g += gs[:, None] * v[None, :]
                dz = tl.where(mask2, g * da, 0.0)
                dx_acc += tl.sum(dz, axis=0)
                if NEED_Y:
                    tl.atomic_add(DY + j[:, None] * F + offs_f[None, :], dz, mask=mask2)
                if NEED_R:
                    dr = mul_ct(dz, C, offs_f, fmask, offs_k, K, F, ACC, BLOCK_E, BLOCK_K)
                    if f0 > 0:
                        dr += tl.load(DR + eid[:, None] * K + offs_k[None, :], mask=rmask, other=0.0)
                    tl.store(DR + eid[:, None] * K + offs_k[None, :], dr, mask=rmask)
                if NEED_W:
                    dw = tl.sum(gmt * a, axis=1)
                    if f0 > 0:
                        dw += tl.load(DW + eid, mask=emask, other=0.0)
                    tl.store(DW + eid, dw, mask=emask)
                if NEED_C:
                    r = tl.load(R + eid[:, None] * K + offs_k[None, :], mask=rmask, other=0.0).to(ACC)
                    dc_acc += tile_mm(tl.trans(r), dz, MM).to(ACC)
                if NEED_V:
                    dv_acc += tl.sum(gs[:, None] * a, axis=0)
            if NEED_X:
                tl.store(DX + row + offs_f, dx_acc, mask=fmask)
        if NEED_C:
            base = pid.to(tl.int64) * K * F
            tl.store(DC_PART + base + offs_k[:, None] * F + offs_f[None, :], dc_acc,
                     mask=kmask[:, None] & fmask[None, :])
        if NEED_V:
            tl.store(DV_PART + pid.to(tl.int64) * F + offs_f, dv_acc, mask=fmask)
        tl.debug_barrier()  # the next slice reads DR / DW values other threads stored


BWD = TunedKernel(_fused_message_bwd_kernel, _bwd_configs(), key=["F", "K"], interpret=interpret_config,
                  reset_to_zero=["DY"])


def source_plan(src: torch.Tensor, num_sources: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ptr [N_src + 1], perm [E]) of the edges sorted by source (stable): the transposed CSR plan."""
    perm = torch.argsort(src, stable=True)
    ptr = torch.searchsorted(src[perm], torch.arange(num_sources + 1, device=src.device, dtype=src.dtype))
    return ptr, perm


def launch_bwd(kernel: TunedKernel, cls, owners: int, F: int, K: int, acc_torch, device, make_args, deterministic,
               partials: bool = True):
    """Run ``kernel`` over ``owners`` CSR rows on a persistent grid; ``make_args(programs, per,
    dc_part, dv_part)`` builds the argument tuple. Returns (dc_part, dv_part), the per-program
    partial sums of dC and dv (``partials=False``: empty), which the caller reduces."""
    row_bytes = K * F * torch.finfo(acc_torch).bits // 8 if partials else 0
    programs = persistent_programs(owners, device, partial_row_bytes=row_bytes)
    per = triton.cdiv(owners, programs) if programs else 1
    programs = triton.cdiv(owners, per) if programs else 0
    rows = max(programs, 1) if partials else 0
    dc_part = torch.zeros((rows, K, F), dtype=acc_torch, device=device)
    dv_part = torch.zeros((rows, F), dtype=acc_torch, device=device)
    if programs:
        args, kwargs = make_args(programs, per, dc_part, dv_part)
        kernel.launch(cls, (programs,), args, kwargs, deterministic)
    return dc_part, dv_part


def fused_message_bwd(gm, gs, P, Q, dst, src, ptr, perm, R, C, b, w, v, activation, needs,
                      src_ptr=None, src_perm=None, deterministic=False):
    """Launch the backward: returns [dP, dQ, dR, dC, db, dw, dv] (empty where not needed).

    ``needs``: which of (P, Q, R, C, b, w, v) want a gradient. ``dst``/``src``: [E] endpoints in
    the caller's edge order; ``ptr``/``perm``: the destination CSR plan; ``src_ptr``/``src_perm``:
    the source plan for the deterministic dQ (built here when missing). Any tensor may be a
    strided view (made contiguous and aligned here)."""
    gm, gs, P, Q, R, C, b, w, v = prepare(gm.to(P.dtype), gs.to(P.dtype) if gs is not None else None, P, Q, R, C,
                                          b, w, v)
    dst, src, ptr, perm = prepare(dst.long(), src.long(), ptr.long(), perm.long() if perm is not None else None)
    N, F = P.shape
    E, K = R.shape
    N_src = Q.shape[0]
    check_i32(N=N, N_src=N_src, E=E, F=F, K=K)
    cls = kernel_class(P.dtype, K)
    need_P, need_Q, need_R, need_C, need_b, need_w, need_v = [bool(n) for n in needs]
    need_w, need_v = need_w and w is not None, need_v and v is not None
    acc_tl, acc_torch = acc_dtype(P.dtype)
    dev = P.device
    mm = mm_mode(P.dtype, P.device)

    def buf(shape, on):
        return torch.zeros(shape, dtype=acc_torch, device=dev) if on else torch.empty(0, dtype=acc_torch, device=dev)

    dP = buf((N, F), need_P or need_b)
    dQ = buf((N_src, F), need_Q)
    dR = buf((E, K), need_R)
    dw = buf((E,), need_w)
    dummy = torch.empty(0, dtype=acc_torch, device=dev)
    gs_arg = gs if gs is not None else b
    consts = dict(MM=mm, ACC=acc_tl, BLOCK_K=cls[1])
    flags = (int(w is not None), int(v is not None))
    run = E > 0 and F > 0
    atomic_dq = need_Q and not deterministic

    def dst_args(programs, per, dc_part, dv_part):
        args = (gm, gs_arg, P, Q, src, ptr, perm if perm is not None else ptr, R, C, b, w if w is not None else b,
                v if v is not None else b, dP if dP.numel() else dummy, dQ if atomic_dq else dummy,
                dR if need_R else dummy, dw if need_w else dummy, dc_part, dv_part, N, F, K, per,
                int(perm is not None), *flags, 0, int(need_P or need_b), int(atomic_dq), int(need_R), int(need_C),
                int(need_w), int(need_v), ACT_CODE[activation])
        return args, consts

    dc_part = dv_part = None
    if run and (need_P or need_b or atomic_dq or need_R or need_C or need_w or need_v):
        dc_part, dv_part = launch_bwd(BWD, cls, N, F, K, acc_torch, dev, dst_args, deterministic)
    if run and need_Q and deterministic:
        if src_ptr is None or src_perm is None:
            src_ptr, src_perm = source_plan(src, N_src)
        src_ptr, src_perm = prepare(src_ptr.long(), src_perm.long())

        def src_args(programs, per, dc_part_s, dv_part_s):
            args = (gm, gs_arg, Q, P, dst, src_ptr, src_perm, R, C, b, w if w is not None else b,
                    v if v is not None else b, dQ, dummy, dummy, dummy, dc_part_s, dv_part_s, N_src, F, K, per,
                    1, *flags, 1, 1, 0, 0, 0, 0, 0, ACT_CODE[activation])
            return args, consts

        launch_bwd(BWD, cls, N_src, F, K, acc_torch, dev, src_args, deterministic, partials=False)

    def empty():  # a fresh tensor per output: custom-op outputs must not alias each other
        return torch.empty(0, dtype=P.dtype, device=dev)

    zeros_kf = torch.zeros((K, F), dtype=acc_torch, device=dev)
    zeros_f = torch.zeros(F, dtype=acc_torch, device=dev)
    return [dP.to(P.dtype, copy=True) if need_P else empty(), dQ.to(Q.dtype) if need_Q else empty(),
            dR.to(R.dtype) if need_R else empty(),
            (dc_part.sum(0) if dc_part is not None else zeros_kf).to(C.dtype) if need_C else empty(),
            dP.sum(0).to(b.dtype) if need_b else empty(), dw.to(w.dtype) if need_w else empty(),
            (dv_part.sum(0) if dv_part is not None else zeros_f).to(v.dtype) if need_v else empty()]
