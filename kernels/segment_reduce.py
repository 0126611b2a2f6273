"""Triton CSR segment reduction: ``_segment_reduce_fwd_kernel`` -> ``segment_reduce_fwd``.

One program owns BLOCK_N consecutive segments and one BLOCK_F slice of the features; for
each segment it loops over its rows BLOCK_E at a time (``ptr[i] .. ptr[i + 1]``), through
``perm`` when the rows are not stored in segment order. Every output has one writer (no
atomics), so the result is deterministic. fp32 accumulation (fp64 for fp64), int64 offsets,
every load masked. Max also records the first arg-max edge id per feature. The backward (a
gather, or a scatter to the arg-max rows) is plain torch in ``gnnmegatron.ops.segment_reduce``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPE_NAMES, TunedKernel, acc_dtype, check_i32, config, edge_block, per_kind, prepare
from .codes import REDUCE_CODE

SCALARS = ["N", "F", "E", "HAS_PERM"]
NARROW = 32  # widths up to this use the narrow configs (one 32-wide slice covers them)


def _configs() -> dict:
    # Audited for sm_80, sm_90, gfx942 (no spills); not timed on a GPU. Narrow rows (F <= 32:
    # scalars, 3-vectors, small heads) take many segments per program (BLOCK_N 4/16) so that a
    # program moves a useful number of bytes; wide rows take 1 or 4 segments of a 128-wide slice
    # (64 for fp64: the same bytes per tile), BLOCK_E 32 rows of 16-32 KiB per tile.
    out = {}
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        wide_f = 64 if dt == "fp64" else 128
        out[(dt, "narrow")] = per_kind([config(BLOCK_N=4, BLOCK_E=64, BLOCK_F=32, num_stages=3),
                                        config(BLOCK_N=16, BLOCK_E=32, BLOCK_F=32, num_stages=3)])
        out[(dt, "wide")] = per_kind([config(BLOCK_N=1, BLOCK_E=32, BLOCK_F=wide_f, num_stages=3),
                                      config(BLOCK_N=4, BLOCK_E=32, BLOCK_F=wide_f, num_stages=3)])
    return out


def _interpret(cls) -> dict:
    return {"BLOCK_N": 2, "BLOCK_E": 16, "BLOCK_F": 16 if cls[1] == "narrow" else 32}


@triton.jit(do_not_specialize=SCALARS)
def _segment_reduce_fwd_kernel(SRC, PTR, PERM, OUT, ARG, N, F, E, HAS_PERM,
                               REDUCE: tl.constexpr, ACC: tl.constexpr,
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
                x = tl.load(SRC + eid[:, None] * F + offs_f[None, :], mask=mask2, other=0.0).to(ACC)
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
            tl.store(OUT + i.to(tl.int64) * F + offs_f, acc.to(OUT.dtype.element_ty), mask=fmask)


KERNEL = TunedKernel(_segment_reduce_fwd_kernel, _configs(), key=["F"], interpret=_interpret)


def segment_reduce_fwd(src: torch.Tensor, ptr: torch.Tensor, perm: torch.Tensor | None,
                       reduce: str, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """src [E, F] (any strides), ptr [N + 1], perm [E] or None -> (out [N, F], arg [N, F] int64 or [0])."""
    (src,) = prepare(src)
    ptr, perm = prepare(ptr.long(), perm.long() if perm is not None else None)
    E, F = src.shape
    N = ptr.numel() - 1
    check_i32(N=N, E=E, F=F)
    out = torch.empty((N, F), dtype=src.dtype, device=src.device)
    code = REDUCE_CODE[reduce]
    arg = torch.empty((N, F) if code == 2 else (0,), dtype=torch.long, device=src.device)
    if N == 0 or F == 0:
        return out, arg
    acc_tl, _ = acc_dtype(src.dtype)
    cls = (DTYPE_NAMES[src.dtype], "narrow" if F <= NARROW else "wide")

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(F, meta["BLOCK_F"]))

    args = (src, ptr, perm if perm is not None else ptr, out, arg if code == 2 else torch.empty(0, dtype=torch.long,
                                                                                                device=src.device),
            N, F, E, int(perm is not None))
    KERNEL.launch(cls, grid, args, dict(REDUCE=code, ACC=acc_tl), deterministic)
    return out, arg
