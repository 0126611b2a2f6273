"""Triton ``out[i] = sum_e vec_e g_e`` over the CSR edges of i:
``_edge_vector_aggregate_fwd_kernel`` -> ``edge_vector_aggregate_fwd``.

One program per BLOCK_N destinations; each loops over its edges BLOCK_E at a time with a
[BLOCK_E, 4] tile, over the width D in slices of 4 (D = 3 for vectors: one masked slice).
Every output has one writer, so the result is deterministic. The backward is a gather and a
product (plain torch in ``gnnmegatron.ops.edge_vector``), differentiable again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPE_NAMES, TunedKernel, acc_dtype, check_i32, config, edge_block, per_kind, prepare

SCALARS = ["N", "D", "HAS_PERM"]
BLOCK_D = 4


def _configs() -> dict:
    # Audited (no spills); not timed on a GPU. The tile is tiny (BLOCK_E x 4), so the candidates
    # trade destinations per program (launch and tail overhead) against parallelism.
    return {(dt,): per_kind([config(BLOCK_N=4, BLOCK_E=32, num_warps=1, num_stages=3),
                             config(BLOCK_N=16, BLOCK_E=128, num_warps=4, num_stages=3)])
            for dt in ("fp16", "bf16", "fp32", "fp64")}


def _interpret(cls) -> dict:
    return {"BLOCK_N": 2, "BLOCK_E": 16}


@triton.jit(do_not_specialize=SCALARS)
def _edge_vector_aggregate_fwd_kernel(VEC, G, PTR, PERM, OUT, N, D, HAS_PERM, ACC: tl.constexpr,
                                      BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    for n in range(BLOCK_N):
        i = pid * BLOCK_N + n
        if i < N:
            start = tl.load(PTR + i)
            end = tl.load(PTR + i + 1)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                dmask = offs_d < D
                acc = tl.zeros([BLOCK_D], ACC)
                for e0 in range(start, end, BLOCK_E):
                    eid, emask = edge_block(PERM, e0, end, BLOCK_E, HAS_PERM)
                    vec = tl.load(VEC + eid[:, None] * D + offs_d[None, :],
                                  mask=emask[:, None] & dmask[None, :], other=0.0).to(ACC)
                    g = tl.load(G + eid, mask=emask, other=0.0).to(ACC)
                    acc += tl.sum(vec * g[:, None], axis=0)
                tl.store(OUT + i.to(tl.int64) * D + offs_d, acc.to(OUT.dtype.element_ty), mask=dmask)


KERNEL = TunedKernel(_edge_vector_aggregate_fwd_kernel, _configs(), key=["D"], interpret=_interpret)


def edge_vector_aggregate_fwd(vec: torch.Tensor, g: torch.Tensor, ptr: torch.Tensor,
                              perm: torch.Tensor | None, deterministic: bool = False) -> torch.Tensor:
    """vec [E, D], g [E] (any strides; g is cast to vec's dtype), ptr [N + 1], perm [E] or None -> [N, D]."""
    vec, g = prepare(vec, g.to(vec.dtype))
    ptr, perm = prepare(ptr.long(), perm.long() if perm is not None else None)
    E, D = vec.shape
    N = ptr.numel() - 1
    check_i32(N=N, E=E, D=D)
    out = torch.empty((N, D), dtype=vec.dtype, device=vec.device)
    if N == 0 or D == 0:
        return out
    acc_tl, _ = acc_dtype(vec.dtype)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]),)

    args = (vec, g, ptr, perm if perm is not None else ptr, out, N, D, int(perm is not None))
    KERNEL.launch((DTYPE_NAMES[vec.dtype],), grid, args, dict(ACC=acc_tl, BLOCK_D=BLOCK_D), deterministic)
    return out
