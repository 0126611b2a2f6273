"""Pieces shared by the fused faithful E_GCL kernels (``faithful_message*.py``): the tile layout,
its per-program workspace, segmented sums, weight-gradient accumulation and the configs.

Layout (forward, backward, double backward): a persistent grid; program p owns the contiguous range
of receivers ``[p * PER, (p + 1) * PER)`` and walks their edges, in destination-sorted order,
``BLOCK_E`` at a time; a tile may span several receivers. Per tile, each layer of the edge MLP is
computed over the whole hidden width, slice after slice, and written to the program's own
workspace (``BLOCK_E`` rows per layer, in the accumulation dtype): the next layer's ``tl.dot``
loops read it back (L2-resident), so that no [E, H] tensor exists in global memory, only
``programs x BLOCK_E x H`` of workspace, whatever E. A ``tl.debug_barrier`` separates the phases
of a tile (the next phase reads what other threads of the program wrote).

Sums over a tile's edges into per-receiver rows (m, dP, dgm) are segmented: the edges of a tile
are sorted by receiver, so the program adds, for each receiver in the tile's range, the masked
column sums to that row (load, add, store; the program owns the receivers, so no atomics and a
fixed order). Weight gradients (dW2, dWc, dC, db2, dbc, dv) are summed over every edge of every
program: with fp32 (fp64) ``atomic_add`` into one buffer by default, or, in deterministic mode,
into per-program partial buffers that torch sums in a fixed order (the grid then shrinks to fit
``PARTIAL_BYTES``; per-program partials of an H x H weight do not scale to the study's widths,
atomics do).

Half inputs (fp16, bf16) are cast to fp32 by the launchers (node-, edge-K- and weight-sized
tensors only): the kernels are compiled for fp32 and fp64 alone, which keeps the ahead-of-time
audit to two classes per kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, PARTIAL_BYTES, num_sms, per_kind, persistent_programs, tile_mm

# Workspace budget of one launch: the grid shrinks (to no fewer than one program per SM) until
# programs x BLOCK_E x (its layers' widths) fits. 256 MiB holds 1000 programs of 32 rows at H = 1024
# (forward) -- small next to the [E, H] tensors it replaces (1 GiB per tensor at E = 256k, H = 1024).
WORKSPACE_BYTES = 256 << 20
BLOCK_KR_HOST = 64  # the radial width K <= MAX_K = 64 (dR tile columns, dC tile rows)
BLOCK_KR = tl.constexpr(BLOCK_KR_HOST)

INTERPRET_CONFIG = {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_N": 16}


def interpret_config(cls) -> dict:
    return dict(INTERPRET_CONFIG)


def kernel_class(dtype: torch.dtype) -> tuple[str]:
    return ("fp64",) if dtype == torch.float64 else ("fp32",)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the launchers hand the kernels: fp64 stays, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def faithful_configs(fp32: list, fp64: list) -> dict:
    return {("fp32",): per_kind(fp32), ("fp64",): per_kind(fp64)}


def grid(owners: int, device: torch.device, ws_row_bytes: int, ws_rows: int, partial_bytes: int,
         deterministic: bool) -> tuple[int, int]:
    """(programs, PER): a persistent grid over ``owners`` receivers whose workspace (``ws_rows`` rows of
    ``ws_row_bytes`` per program) fits ``WORKSPACE_BYTES`` and, in deterministic mode, whose
    per-program partial buffers (``partial_bytes`` each) fit ``PARTIAL_BYTES``."""
    programs = persistent_programs(owners, device)
    if programs == 0:
        return 0, 1
    if not INTERPRET and device.type == "cuda":
        floor = num_sms(device)
        programs = min(programs, max(floor, WORKSPACE_BYTES // max(1, ws_row_bytes * ws_rows)))
        if deterministic and partial_bytes:
            programs = min(programs, max(1, PARTIAL_BYTES // partial_bytes))
    per = triton.cdiv(owners, programs)
    return triton.cdiv(owners, per), per


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def tile_edges(PERM, OWN, OTH, e0, e_end, N, BLOCK_E: tl.constexpr, HAS_PERM):
    """Edge ids, receivers (``OWN``), senders (``OTH``), mask and receiver range of the tile
    ``[e0, e0 + BLOCK_E)`` of sorted positions ending at ``e_end``."""
    pos = e0 + tl.arange(0, BLOCK_E)
    emask = pos < e_end
    if HAS_PERM:
        eid = tl.load(PERM + pos, mask=emask, other=0)
    else:
        eid = pos
    own = tl.load(OWN + eid, mask=emask, other=0)
    oth = tl.load(OTH + eid, mask=emask, other=0)
    d_lo = tl.min(tl.where(emask, own, N), axis=0)
    d_hi = tl.max(tl.where(emask, own, -1), axis=0)
    return eid, emask, own, oth, d_lo, d_hi


@triton.jit
def seg_add(OUT, own, emask, d_lo, d_hi, x, offs_f, fmask, F):
    """``OUT[d, offs_f] += sum_{e : own_e = d} x[e]`` for every receiver d of the tile (owned rows:
    load, add, store)."""
    for d in range(d_lo, d_hi + 1):
        sel = emask & (own == d)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            row = tl.sum(tl.where(sel[:, None], x, 0.0), axis=0)
            ptrs = OUT + d * F + offs_f  # d is int64 (the receivers are loaded as int64)
            tl.store(ptrs, tl.load(ptrs, mask=fmask, other=0.0) + row, mask=fmask)


@triton.jit
def acc_add(PTR, offs, mask, x, DET):
    """Weight-gradient accumulation: atomics into the shared buffer, or (``DET``) a plain
    load-add-store into this program's partial buffer (``PTR`` already offset to it)."""
    if DET:
        tl.store(PTR + offs, tl.load(PTR + offs, mask=mask, other=0.0) + x, mask=mask)
    else:
        tl.atomic_add(PTR + offs, x, mask=mask)


@triton.jit
def ws_load(WS, offs_e, offs_f, fmask, F):
    """A [BLOCK_E, BLOCK_F] tile of a workspace layer (rows of width F)."""
    return tl.load(WS + offs_e[:, None] * F + offs_f[None, :], mask=fmask[None, :], other=0.0)


@triton.jit
def ws_store(WS, offs_e, offs_f, fmask, F, x):
    tl.store(WS + offs_e[:, None] * F + offs_f[None, :], x, mask=fmask[None, :])


@triton.jit
def ws_matmul(WS, WMAT, offs_e, offs_n, nmask, F_IN, STRIDE_N, STRIDE_K, ACC: tl.constexpr, MM: tl.constexpr,
              BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr):
    """``WS[:, :F_IN] @ M[:, offs_n]`` where ``M[k, n] = WMAT[n * STRIDE_N + k * STRIDE_K]``: a
    [BLOCK_E, BLOCK_N] tile of a workspace layer times a weight (``W^T`` with STRIDE_N = F_IN,
    STRIDE_K = 1; ``W`` itself with STRIDE_N = 1, STRIDE_K = its row width)."""
    acc = tl.zeros([BLOCK_E, BLOCK_N], ACC)
    for k0 in range(0, F_IN, BLOCK_F):
        offs_k = k0 + tl.arange(0, BLOCK_F)
        kmask = offs_k < F_IN
        a = ws_load(WS, offs_e, offs_k, kmask, F_IN)
        wt = tl.load(WMAT + offs_n[None, :] * STRIDE_N + offs_k[:, None] * STRIDE_K,
                     mask=kmask[:, None] & nmask[None, :], other=0.0).to(ACC)
        acc += tile_mm(a, wt, MM).to(ACC)
    return acc


@triton.jit
def ws_outer(WS_A, WS_B, DEST, offs_e, FA, FB, DET, ACC: tl.constexpr, MM: tl.constexpr,
             BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr):
    """``DEST[FA, FB] += WS_A[:, :FA]^T WS_B[:, :FB]`` (a weight gradient summed over the tile's
    rows; masked rows of the workspace hold zeros)."""
    for n0 in range(0, FA, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < FA
        a = ws_load(WS_A, offs_e, offs_n, nmask, FA)
        for k0 in range(0, FB, BLOCK_F):
            offs_k = k0 + tl.arange(0, BLOCK_F)
            kmask = offs_k < FB
            b = ws_load(WS_B, offs_e, offs_k, kmask, FB)
            part = tile_mm(tl.trans(a), b, MM).to(ACC)
            acc_add(DEST, offs_n[:, None] * FB + offs_k[None, :], nmask[:, None] & kmask[None, :], part, DET)
