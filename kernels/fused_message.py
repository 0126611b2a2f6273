"""Triton fused message aggregation, forward: ``m_i = sum_j w_ij act(P_i + Q_j + R_ij C + b)``,
``s_ij = act(.) . v``: ``_fused_message_fwd_kernel`` -> ``fused_message_fwd``.

The backward (``fused_message_bwd``) and the double backward (``fused_message_bwd2``) live in
``fused_message_bwd.py`` and ``fused_message_bwd2.py``; ``gnnmegatron.ops.fused_message`` wraps
all three in autograd.

Layout (shared by the three kernels): a persistent grid; program p owns the contiguous range of
destinations ``[p * PER, (p + 1) * PER)`` (a CSR range) and every feature. It loops over F in
BLOCK_F slices, keeping the slices of b and v in registers, and for each of its destinations
over its edges BLOCK_E at a time (through ``perm`` when the edges are not stored in destination
order): gather Q rows, add R rows times C (rank-1 updates over k, see ``_common``), activate,
reduce. No [E, F] tensor is written; the backward recomputes the tile. Because a program owns
all features of its destinations, the full-F edge sums (``s`` here, dR and dw in the backward)
are accumulated over the F slices by the owner itself (store, then load-add-store), with no
atomics, so they are deterministic. The price: the per-edge data (R rows, ids, w) is read once
per F slice, ceil(F / BLOCK_F) times in all. fp32 accumulation (fp64 for fp64 inputs), int64
offsets, every load masked.

Bytes the forward must move at least once (the op is memory-bound; ``fused_message_bytes``):
E (F + K) x itemsize (Q rows and R rows) + E x (8 + itemsize) (src, w) + 2 N F x itemsize
(P in, m out) + (N + 1) x 8 (ptr), + E x itemsize for s and E x 8 for perm when present.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (DTYPE_NAMES, TunedKernel, acc_dtype, act_and_grad, add_rc, check_i32, config, edge_block,
                      per_kind, persistent_programs, prepare)
from ._fused_common import INTERPRET_CONFIG, interpret_config  # noqa: F401
from .codes import ACT_CODE

SCALARS = ["N", "F", "K", "PER", "HAS_PERM", "HAS_W", "HAS_V", "ACT"]


def _fwd_configs() -> dict:
    # Every candidate compiles without spills for sm_80, sm_90 and gfx942
    # (benchmarks/results/kernel_resources.json). GPU timing has not been measured (no GPU on
    # the development machines). BLOCK_E 16 is close to the 20-60 edges of an atom (few masked
    # rows), 32 halves the loop trips of hubs. The per-edge data (R rows, ids, w) is read once
    # per F slice, so wide slices read less: BLOCK_F 128 reads R twice at F = 256; a [16, 128]
    # fp32 tile is 16 values per thread at 4 warps. fp64 tiles are half as wide (same bytes).
    out = {}
    for dt in ("fp16", "bf16", "fp32"):
        out[(dt,)] = per_kind([config(BLOCK_E=16, BLOCK_F=128), config(BLOCK_E=32, BLOCK_F=128, num_warps=8)])
    out[("fp64",)] = per_kind([config(BLOCK_E=16, BLOCK_F=64), config(BLOCK_E=32, BLOCK_F=64, num_warps=8)])
    return out


@triton.jit(do_not_specialize=SCALARS)
def _fused_message_fwd_kernel(P, Q, SRC, PTR, PERM, R, C, B, W, V, M, S, N, F, K, PER,
                              HAS_PERM, HAS_W, HAS_V, ACT,
                              ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    pid = tl.program_id(0)
    i0 = pid * PER
    count = tl.minimum(PER, N - i0)  # the owned rows [i0, i0 + count)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < F
        bias = tl.load(B + offs_f, mask=fmask, other=0.0).to(ACC)
        v = tl.zeros([BLOCK_F], ACC)
        if HAS_V:
            v = tl.load(V + offs_f, mask=fmask, other=0.0).to(ACC)
        for n in range(0, count):
            i = i0 + n
            start = tl.load(PTR + i)
            end = tl.load(PTR + i + 1)
            row = i.to(tl.int64) * F
            p = tl.load(P + row + offs_f, mask=fmask, other=0.0).to(ACC)
            acc = tl.zeros([BLOCK_F], ACC)
            for e0 in range(start, end, BLOCK_E):
                eid, emask = edge_block(PERM, e0, end, BLOCK_E, HAS_PERM)
                j = tl.load(SRC + eid, mask=emask, other=0)
                mask2 = emask[:, None] & fmask[None, :]
                q = tl.load(Q + j[:, None] * F + offs_f[None, :], mask=mask2, other=0.0).to(ACC)
                z = add_rc(p[None, :] + q + bias[None, :], R, eid, emask, C, offs_f, fmask, K, F, ACC)
                a, _ = act_and_grad(z, ACT)
                a = tl.where(mask2, a, 0.0)
                if HAS_W:
                    wv = tl.load(W + eid, mask=emask, other=0.0).to(ACC)
                    acc += tl.sum(a * wv[:, None], axis=0)
                else:
                    acc += tl.sum(a, axis=0)
                if HAS_V:
                    s_part = tl.sum(a * v[None, :], axis=1)
                    if f0 > 0:  # the owner adds its later F slices (no atomics)
                        s_part += tl.load(S + eid, mask=emask, other=0.0)
                    tl.store(S + eid, s_part, mask=emask)
            tl.store(M + row + offs_f, acc.to(M.dtype.element_ty), mask=fmask)
        tl.debug_barrier()  # the next slice reads S values other threads stored


FWD = TunedKernel(_fused_message_fwd_kernel, _fwd_configs(), key=["F", "K"], interpret=interpret_config)


def fused_message_bytes(N: int, E: int, F: int, K: int, itemsize: int, has_w=True, has_v=False,
                        has_perm=False) -> int:
    """Bytes the forward kernel must move at least once (see module docstring)."""
    total = E * (F + K) * itemsize + E * 8 + 2 * N * F * itemsize + (N + 1) * 8 + (K + 2) * F * itemsize
    total += E * itemsize if has_w else 0
    total += E * itemsize if has_v else 0
    total += E * 8 if has_perm else 0
    return total


def fused_message_fwd(P, Q, src, ptr, perm, R, C, b, w, v, activation, deterministic=False):
    """Launch the forward: returns (m [N, F] in P's dtype, s [E] or [0]).

    Every tensor may be a strided view: it is made contiguous and aligned first."""
    P, Q, R, C, b, w, v = prepare(P, Q, R, C, b, w, v)
    src, ptr, perm = prepare(src.long(), ptr.long(), perm.long() if perm is not None else None)
    N, F = P.shape
    E, K = R.shape
    check_i32(N=N, E=E, F=F, K=K)
    cls = (DTYPE_NAMES[P.dtype],)
    acc_tl, acc_torch = acc_dtype(P.dtype)
    m = torch.empty((N, F), dtype=P.dtype, device=P.device)
    s = torch.zeros(E if v is not None else 0, dtype=acc_torch, device=P.device)
    if N == 0 or F == 0:
        return m.zero_(), s.to(P.dtype)
    programs = persistent_programs(N, P.device)
    per = triton.cdiv(N, programs)
    programs = triton.cdiv(N, per)
    args = (P, Q, src, ptr, perm if perm is not None else ptr, R, C, b, w if w is not None else b,
            v if v is not None else b, m, s, N, F, K, per, int(perm is not None), int(w is not None),
            int(v is not None), ACT_CODE[activation])
    FWD.launch(cls, (programs,), args, dict(ACC=acc_tl), deterministic)
    return m, s.to(P.dtype)


# the backward launchers, re-exported so that callers import one module
from .fused_message_bwd import fused_message_bwd  # noqa: E402,F401
from .fused_message_bwd2 import fused_message_bwd2  # noqa: E402,F401
