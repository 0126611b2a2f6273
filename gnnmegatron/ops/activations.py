"""Smooth activations of the message ops and their closed-form first and second derivatives.

The derivative formulas are written with differentiable torch ops, so the double
backward of the ops (conservative-force training) can differentiate them once more. The
integer codes the kernels use come from ``gnnmegatron.kernels.codes`` (no triton import).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gnnmegatron.kernels.codes import ACT_CODE, ACTIVATIONS  # noqa: F401  (re-exported)

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(name: str) -> str:
    if name not in ACT_CODE:
        raise ValueError(f"unknown activation {name!r}; the message ops support {list(ACTIVATIONS)}")
    return name


def act(name: str, z: torch.Tensor) -> torch.Tensor:
    """``act(z)`` (torch's own SiLU, exact GELU, tanh, softplus with beta 1)."""
    if name == "silu":
        return F.silu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "softplus":
        return F.softplus(z)
    raise ValueError(f"unknown activation {name!r}")


def act_and_grad(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(z), act'(z))``, sharing the transcendental pieces."""
    if name == "silu":
        s = torch.sigmoid(z)
        a = z * s
        return a, s + a * (1.0 - s)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT2PI
        return z * cdf, cdf + z * pdf
    if name == "tanh":
        t = torch.tanh(z)
        return t, 1.0 - t * t
    if name == "softplus":
        # torch's softplus is linear above threshold 20; match its derivative there too
        return F.softplus(z), torch.where(z > 20.0, torch.ones_like(z), torch.sigmoid(z))
    raise ValueError(f"unknown activation {name!r}")


def act_grads2(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(act(z), act'(z), act''(z))`` (the double backward's torch twin uses all three)."""
    if name == "silu":
        s = torch.sigmoid(z)
        a = z * s
        return a, s + a * (1.0 - s), s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT2PI
        return z * cdf, cdf + z * pdf, pdf * (2.0 - z * z)
    if name == "tanh":
        t = torch.tanh(z)
        d = 1.0 - t * t
        return t, d, -2.0 * t * d
    if name == "softplus":
        s = torch.sigmoid(z)
        big = z > 20.0
        return F.softplus(z), torch.where(big, torch.ones_like(z), s), torch.where(big, torch.zeros_like(z),
                                                                                    s * (1.0 - s))
    raise ValueError(f"unknown activation {name!r}")
