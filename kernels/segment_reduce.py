"""Triton CSR segment reduction: ``_segment_reduce_fwd_kernel`` -> ``segment_reduce_fwd``.

One program owns BLOCK_N consecutive segments and one BLOCK_F slice of the features; for
each segment it loops over its rows BLOCK_E at a time (``ptr[i] .. ptr[i + 1]``), through
``perm`` when the rows are not stored in segment order. fp32 accumulation (fp64 for fp64),
int64 offsets, every load masked. Max also records the first arg-max edge id per feature.
The backward (a gather, or a scatter to the arg-max rows) is plain torch in
``gnnmegatron.ops.segment_reduce``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gnnmegatron.kernels._common import INTERPRET, acc_dtype, edge_block, pow2

REDUCE_CODE = {"sum": 0, "mean": 1, "max": 2}


def _configs():
    if INTERPRET:  # the interpreter runs every candidate: one small config keeps CI fast
        return [triton.Config({"BLOCK_N": 2, "BLOCK_E": 16}, num_warps=1)]
    # Candidates, not yet measured on a GPU (the dev machines have none): BLOCK_E 32/64 rows of
    # up to 128 features keep 16-32 KiB of fp32 tile per program in registers; BLOCK_N 1 gives one
    # program per segment for the 20-60-edge atom graphs, 4 amortises launch overhead on
    # low-degree graphs; num_warps 4/8 cover BLOCK_F 64..128.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_E": be}, num_warps=nw)
            for bn in (1, 4) for be in (32, 64) for nw in (4, 8)]


@triton.jit
def _segment_reduce_fwd_kernel(SRC, PTR, PERM, OUT, ARG, N, F, E, stride_src, stride_out,
                               HAS_PERM: tl.constexpr, REDUCE: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs_f < F
    for n in range(BLOCK_N):
        i = pid_n * BLOCK_N + n
        if i < N:
            start = tl.load(PTR + i)
            end = tl.load(PTR + i + 1)
            if REDUCE == 2:
                acc = tl.full([BLOCK_F], float("-inf"), ACC)
                arg = tl.zeros([BLOCK_F], tl.int64) + E
            else:
                acc = tl.zeros([BLOCK_F], ACC)
            for e0 in range(start, end, BLOCK_E):
                eid, emask = edge_block(PERM, e0, end, BLOCK_E, HAS_PERM)
                mask2 = emask[:, None] & fmask[None, :]
                x = tl.load(SRC + eid[:, None] * stride_src + offs_f[None, :], mask=mask2, other=0.0).to(ACC)
                if REDUCE == 2:
                    x = tl.where(mask2, x, float("-inf"))
                    tile_max = tl.max(x, axis=0)
                    cand = tl.where(x == tile_max[None, :], eid[:, None], E)
                    tile_arg = tl.min(cand, axis=0)
                    better = (tile_max > acc) | ((tile_max == acc) & (tile_arg < arg))
                    acc = tl.where(better, tile_max, acc)
                    arg = tl.where(better, tile_arg, arg)
                else:
                    acc += tl.sum(x, axis=0)
            count = end - start
            if REDUCE == 1:
                acc = acc / tl.maximum(count, 1).to(ACC)
            if REDUCE == 2:
                acc = tl.where(count > 0, acc, 0.0)
                tl.store(ARG + i.to(tl.int64) * F + offs_f, arg, mask=fmask)
            tl.store(OUT + i.to(tl.int64) * stride_out + offs_f, acc.to(OUT.dtype.element_ty), mask=fmask)


_kernel = triton.autotune(configs=_configs(), key=["F", "REDUCE"])(_segment_reduce_fwd_kernel)


def segment_reduce_fwd(src: torch.Tensor, ptr: torch.Tensor, perm: torch.Tensor | None,
                       reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """src [E, F] (contiguous), ptr [N + 1], perm [E] or None -> (out [N, F], arg [N, F] int64 or [0])."""
    E, F = src.shape
    N = ptr.numel() - 1
    out = torch.empty((N, F), dtype=src.dtype, device=src.device)
    code = REDUCE_CODE[reduce]
    arg = torch.empty((N, F) if code == 2 else (0,), dtype=torch.long, device=src.device)
    if N == 0 or F == 0:
        return out, arg
    acc_tl, _ = acc_dtype(src.dtype)
    block_f = pow2(F, lo=16, hi=128)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(F, block_f))

    _kernel[grid](src, ptr, perm if perm is not None else ptr, out, arg if code == 2 else out, N, F, E,
                  src.stride(0), out.stride(0), HAS_PERM=perm is not None, REDUCE=code, ACC=acc_tl, BLOCK_F=block_f)
    return out, arg
