"""Helpers shared by the kernels: activations, the small tile product, launch configuration.

Tile product modes (``MM`` constexpr) -- the ops multiply [BLOCK_E, BLOCK_K] x [BLOCK_K, BLOCK_F]:
    0  ``tl.dot`` on fp32 tiles, ``input_precision="ieee"`` (fp32 inputs, exact to fp32 rounding)
    1  ``tl.dot`` on fp32 tiles, ``input_precision="tf32"`` (opt-in: GNNMEGATRON_TRITON_TF32=1)
    2  ``tl.dot`` on bf16/fp16 tiles, fp32 accumulation (half inputs on GPU; the interpreter
       mis-computes ``tl.dot`` on bf16 tiles, so under TRITON_INTERPRET half tiles use mode 0)
    3  broadcast multiply + sum (float64: ``tl.dot`` has no fp64 tensor-core path; small blocks only)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def act_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)); ACT: 0 silu, 1 gelu (erf), 2 tanh, 3 softplus (torch's threshold 20)."""
    if ACT == 0:
        s = _sigmoid(z)
        a = z * s
        da = s + a * (1.0 - s)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        a = z * cdf
        da = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        a = 2.0 * _sigmoid(2.0 * z) - 1.0
        da = 1.0 - a * a
    else:
        soft = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
        a = tl.where(z > 20.0, z, soft)
        da = tl.where(z > 20.0, 1.0, _sigmoid(z))
    return a, da


@triton.jit
def edge_block(PERM, e0, end, BLOCK_E: tl.constexpr, HAS_PERM: tl.constexpr):
    """Edge ids and mask of one block ``[e0, e0 + BLOCK_E)`` of a CSR segment ending at ``end``.

    ``PERM`` maps destination-sorted positions to edge ids (unsorted inputs); without it the
    positions are the edge ids.
    """
    e = e0 + tl.arange(0, BLOCK_E)
    emask = e < end
    if HAS_PERM:
        eid = tl.load(PERM + e, mask=emask, other=0)
    else:
        eid = e
    return eid, emask


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    a, _ = act_and_grad(z, ACT)
    return a


@triton.jit
def tile_mm(a, b, MM: tl.constexpr):
    """[M, K] x [K, N] -> [M, N] in fp32 (fp64 for MM == 3)."""
    if MM == 0:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif MM == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    elif MM == 2:
        out = tl.dot(a, b)
    else:
        out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return out


def mm_mode(dtype: torch.dtype, native_half: bool = True) -> int:
    """``MM`` constexpr for inputs of ``dtype`` (see module docstring)."""
    if dtype == torch.float64:
        return 3
    if dtype in (torch.float16, torch.bfloat16) and native_half:
        return 2
    return 1 if os.environ.get("GNNMEGATRON_TRITON_TF32", "0") == "1" else 0


def acc_dtype(dtype: torch.dtype):
    """(triton accumulation dtype, torch accumulation dtype): fp64 for fp64 inputs, else fp32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    v = max(lo, triton.next_power_of_2(max(1, int(n))))
    return min(v, hi) if hi is not None else v
