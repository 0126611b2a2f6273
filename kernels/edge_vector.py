"""Triton ``out[i] = sum_e vec_e g_e`` over the CSR edges of i:
``_edge_vector_aggregate_fwd_kernel`` -> ``edge_vector_aggregate_fwd``.

One program per BLOCK_N destinations; each loops over its edges BLOCK_E at a time with a
[BLOCK_E, BLOCK_D] tile (D = 3 padded to 4, masked). The backward is a gather and a
product (plain torch in ``gnnmegatron.ops.edge_vector``), differentiable again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gnnmegatron.kernels._common import INTERPRET, acc_dtype, edge_block, pow2


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 2, "BLOCK_E": 16}, num_warps=1)]
    # Not yet measured on a GPU: the tile is tiny (BLOCK_E x 4), so the candidates trade the
    # number of destinations per program (launch and tail overhead) against parallelism.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_E": be}, num_warps=nw)
            for bn in (4, 16) for be in (32, 128) for nw in (1, 4)]


@triton.jit
def _edge_vector_aggregate_fwd_kernel(VEC, G, PTR, PERM, OUT, N, D, stride_vec, stride_out,
                                      HAS_PERM: tl.constexpr, ACC: tl.constexpr,
                                      BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    for n in range(BLOCK_N):
        i = pid * BLOCK_N + n
        if i < N:
            start = tl.load(PTR + i)
            end = tl.load(PTR + i + 1)
            acc = tl.zeros([BLOCK_D], ACC)
            for e0 in range(start, end, BLOCK_E):
                eid, emask = edge_block(PERM, e0, end, BLOCK_E, HAS_PERM)
                vec = tl.load(VEC + eid[:, None] * stride_vec + offs_d[None, :],
                              mask=emask[:, None] & dmask[None, :], other=0.0).to(ACC)
                g = tl.load(G + eid, mask=emask, other=0.0).to(ACC)
                acc += tl.sum(vec * g[:, None], axis=0)
            tl.store(OUT + i.to(tl.int64) * stride_out + offs_d, acc.to(OUT.dtype.element_ty), mask=dmask)


_kernel = triton.autotune(configs=_configs(), key=["D"])(_edge_vector_aggregate_fwd_kernel)


def edge_vector_aggregate_fwd(vec: torch.Tensor, g: torch.Tensor, ptr: torch.Tensor,
                              perm: torch.Tensor | None) -> torch.Tensor:
    """vec [E, D] (contiguous), g [E], ptr [N + 1], perm [E] or None -> [N, D]."""
    E, D = vec.shape
    N = ptr.numel() - 1
    out = torch.empty((N, D), dtype=vec.dtype, device=vec.device)
    if N == 0 or D == 0:
        return out
    acc_tl, _ = acc_dtype(vec.dtype)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]),)

    _kernel[grid](vec, g, ptr, perm if perm is not None else ptr, out, N, D, vec.stride(0), out.stride(0),
                  HAS_PERM=perm is not None, ACC=acc_tl, BLOCK_D=pow2(D, lo=4))
    return out
