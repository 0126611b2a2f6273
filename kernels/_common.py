"""Helpers shared by the kernels: activations, the edge block of a CSR segment, the tile product,
argument preparation, persistent grids and ``TunedKernel`` (autotuned launch with a fixed,
audited set of configs per class).

Products with the radial weight C (K x F, K <= 64) have a reduction over K (R C) or over the
feature slice (dz C^T): both run as loops of rank-1 updates over k (``add_rc``, ``mul_ct``),
with R's column and C's row reloaded from L1 each step, so only the [BLOCK_E, BLOCK_F] tiles
and a [BLOCK_E, BLOCK_K] result stay in registers. With ``tl.dot`` instead, the C operand is
hoisted out of the loops in MMA layout (twice, split in two for fp32 precision): the audit saw
the backward need 250+ registers even at 16 x 16 tiles and spill 3-8 KB of stack on sm_80.
The one remaining ``tl.dot`` is dC += R^T dz (reduction over BLOCK_E, nothing hoisted):

``MM`` constexpr of that product:
    0  ``input_precision="ieee"``: AMD (fp32 MFMA) and the interpreter
    1  ``input_precision="tf32x3"`` (NVIDIA): three TF32 tensor-core products, about fp32
       accuracy (``"ieee"`` lowers to FMA loops that hold whole operand rows per thread)
    2  native fp64 (DMMA on sm_80/sm_90)

What varies at compile time is kept small on purpose, so that ``gnnmegatron.kernels.aot`` can
compile every variant a launcher can reach: the dtype (``MM``, ``ACC``), BLOCK_K (16, 32 or 64
from K) and the config's block sizes. Presence flags (perm, w, v, ...), the activation and the
gradients wanted are runtime ``int32`` arguments (uniform branches), and every scalar argument is
``do_not_specialize`` so that triton does not fork a variant when a value is 1 or a multiple of 16.
Launchers hand every tensor contiguous and 16-byte aligned (``prepare``), so the pointer
specialisation is always the aligned one.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

# Programs of a persistent grid per SM. 8 x 4 warps = 32 of an SM's 64 warp slots (sm_80/sm_90),
# enough in-flight gathers to cover HBM latency if registers allow two programs per SM
# quadrant; not measured on a GPU yet (the development machines have none).
PROGRAMS_PER_SM = 8
# Upper bound on the per-program partial buffers (dC, dv) of a persistent backward: the grid
# shrinks (to no fewer than one program per SM) until programs x K x F x 4 B fits. 64 MiB is
# small next to the [E, K] gradient the same call writes (256 MiB at E = 2M, K = 32).
PARTIAL_BYTES = 64 << 20
# Interpreter: few programs, so that tests run the persistent loop (several owners per program).
INTERPRET_PROGRAMS = 3


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def act_and_grad(z, ACT):
    """(act(z), act'(z)); ACT (runtime): 0 silu, 1 gelu (erf), 2 tanh, 3 softplus (threshold 20)."""
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
def act_grads2(z, ACT):
    """(act(z), act'(z), act''(z)) for the double backward."""
    if ACT == 0:
        s = _sigmoid(z)
        a = z * s
        da = s + a * (1.0 - s)
        dda = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        a = z * cdf
        da = cdf + z * pdf
        dda = pdf * (2.0 - z * z)
    elif ACT == 2:
        a = 2.0 * _sigmoid(2.0 * z) - 1.0
        da = 1.0 - a * a
        dda = -2.0 * a * da
    else:
        s = _sigmoid(z)
        soft = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
        a = tl.where(z > 20.0, z, soft)
        da = tl.where(z > 20.0, 1.0, s)
        dda = tl.where(z > 20.0, 0.0, s * (1.0 - s))
    return a, da, dda


@triton.jit
def edge_block(PERM, e0, end, BLOCK_E: tl.constexpr, HAS_PERM):
    """Edge ids and mask of one block ``[e0, e0 + BLOCK_E)`` of a CSR segment ending at ``end``.

    ``PERM`` maps sorted positions to edge ids (unsorted inputs); without it (runtime
    ``HAS_PERM == 0``) the positions are the edge ids.
    """
    e = e0 + tl.arange(0, BLOCK_E)
    emask = e < end
    if HAS_PERM:
        eid = tl.load(PERM + e, mask=emask, other=0)
    else:
        eid = e
    return eid, emask


@triton.jit
def tile_mm(a, b, MM: tl.constexpr):
    """[M, K] x [K, N] -> [M, N] in fp32 (fp64 for fp64 tiles in mode 2)."""
    if MM == 0:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif MM == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def add_rc(z, R, eid, emask, C, offs_f, fmask, K, F, ACC: tl.constexpr):
    """``z + R[eid, :] @ C[:, offs_f]``: one rank-1 update per radial function k."""
    for k in range(0, K):
        r_k = tl.load(R + eid * K + k, mask=emask, other=0.0).to(ACC)
        c_k = tl.load(C + k * F + offs_f, mask=fmask, other=0.0).to(ACC)
        z += r_k[:, None] * c_k[None, :]
    return z


@triton.jit
def mul_ct(x, C, offs_f, fmask, offs_k, K, F, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """``x @ C[:, offs_f]^T`` ([BLOCK_E, BLOCK_F] -> [BLOCK_E, BLOCK_K]): a row reduction per k."""
    out = tl.zeros([BLOCK_E, BLOCK_K], ACC)
    for k in range(0, K):
        c_k = tl.load(C + k * F + offs_f, mask=fmask, other=0.0).to(ACC)
        col = tl.sum(x * c_k[None, :], axis=1)
        out = tl.where(offs_k[None, :] == k, col[:, None], out)
    return out


# ----------------------------------------------------------------------------- host side
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


# Kind of GPU the launchers compile for when their tensors are not on one: the ahead-of-time
# audit records launches with CPU tensors and sets this to "cuda" or "hip".
AOT_TARGET_KIND = "cuda"


def target_kind(device: torch.device) -> str:
    """"interpret", "cuda" (NVIDIA) or "hip" (AMD)."""
    if INTERPRET:
        return "interpret"
    if device.type == "cuda":
        return "hip" if torch.version.hip else "cuda"
    return AOT_TARGET_KIND


def mm_mode(dtype: torch.dtype, device: torch.device) -> int:
    """``MM`` of the dC tile product for ``dtype`` inputs (see the module docstring)."""
    if dtype == torch.float64:
        return 2
    return 1 if target_kind(device) == "cuda" else 0


def acc_dtype(dtype: torch.dtype):
    """(triton accumulation dtype, torch accumulation dtype): fp64 for fp64 inputs, else fp32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    v = max(lo, triton.next_power_of_2(max(1, int(n))))
    return min(v, hi) if hi is not None else v


def prepare(*tensors):
    """Each tensor contiguous and 16-byte aligned (a copy only when it is not), ``None`` kept.

    The kernels index every tensor with unit stride along its last dimension and row stride =
    its width, and are compiled for 16-byte-aligned pointers."""
    out = []
    for t in tensors:
        if t is not None:
            t = t.contiguous()
            if t.data_ptr() % 16:
                t = t.clone()
        out.append(t)
    return tuple(out)


def check_i32(**sizes):
    """The scalar arguments are int32: refuse sizes that do not fit (offsets inside are int64)."""
    for name, value in sizes.items():
        if not 0 <= int(value) < 2**31:
            raise ValueError(f"{name}={value} does not fit the kernels' int32 scalar arguments")


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def persistent_programs(owners: int, device: torch.device, partial_row_bytes: int = 0) -> int:
    """Programs of a persistent grid over ``owners`` CSR rows (each program a contiguous range).

    ``partial_row_bytes``: bytes of per-program partial sums (dC, dv); the count is capped so
    that their buffer stays under ``PARTIAL_BYTES`` (but at least one program per SM). The
    buffer is therefore bounded independently of the number of atoms."""
    if owners <= 0:
        return 0
    if INTERPRET or device.type != "cuda":
        return min(owners, INTERPRET_PROGRAMS)
    sms = num_sms(device)
    cap = PROGRAMS_PER_SM * sms
    if partial_row_bytes:
        cap = min(cap, max(sms, PARTIAL_BYTES // partial_row_bytes))
    return min(owners, cap)


def config(num_warps=4, num_stages=2, maxnreg=None, **blocks) -> triton.Config:
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


# NVIDIA configs carry maxnreg=255: without it ptxas aims for occupancy and, in several of our
# configs, spilled 8-24 B of loop-invariant scalars to the stack (at 72-128 registers); with it the
# same configs compiled to 119-188 registers and no stack (benchmarks/results/kernel_resources.json).
# AMD's backend does not take maxnreg (its launcher rejects the option).
NV_MAXNREG = 255


def per_kind(cuda: list, hip: list | None = None, maxnreg: int | None = NV_MAXNREG) -> dict:
    """Candidate configs by GPU kind: ``cuda`` ones get ``maxnreg`` (None: ptxas's default);
    ``hip`` defaults to the same block sizes without it."""
    def strip(c):
        return triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages)

    def nv(c):
        return triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=maxnreg)

    return {"cuda": [nv(c) for c in cuda], "hip": [strip(c) for c in (hip if hip is not None else cuda)]}


def first_tensor_device(args) -> torch.device:
    return next(a.device for a in args if isinstance(a, torch.Tensor))


class TunedKernel:
    """A ``@triton.jit`` kernel with a fixed list of candidate configs per class and GPU kind.

    ``configs[cls][kind]`` (``cls`` a tuple such as (dtype name, BLOCK_K), ``kind`` "cuda" or
    "hip") are the candidates that autotuning may pick for a launch of that class;
    ``gnnmegatron.kernels.aot`` compiles and audits every one of them. Deterministic launches
    skip autotuning (a different config would sum in a different order) and take the first
    config. Under TRITON_INTERPRET one small config (``interpret(cls)``) runs.

    ``TunedKernel.recorder``, when set, receives each launch instead of running it (used by the
    ahead-of-time audit to collect the variants the launchers reach).
    """

    recorder = None

    def __init__(self, fn, configs: dict, key: list[str], interpret, reset_to_zero=None):
        self.fn, self.configs, self.key = fn, configs, key
        self.interpret, self.reset_to_zero = interpret, reset_to_zero
        self._tuners = {}

    @property
    def name(self) -> str:
        return self.fn.__name__

    def candidates(self, cls, kind: str) -> list:
        return self.configs[cls][kind]

    def launch(self, cls, grid, args: tuple, kwargs: dict, deterministic: bool = False):
        if TunedKernel.recorder is not None:
            return TunedKernel.recorder(self, cls, grid, args, kwargs)
        if INTERPRET:
            return self.fn[grid](*args, **kwargs, **self.interpret(cls))
        kind = target_kind(first_tensor_device(args))
        configs = self.candidates(cls, kind)
        if deterministic or len(configs) == 1:
            return self.fn[grid](*args, **kwargs, **configs[0].all_kwargs())
        if (cls, kind) not in self._tuners:
            self._tuners[(cls, kind)] = triton.autotune(configs=configs, key=self.key,
                                                        reset_to_zero=self.reset_to_zero)(self.fn)
        return self._tuners[(cls, kind)][grid](*args, **kwargs)
