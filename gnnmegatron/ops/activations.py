"""Smooth activations of the message ops, their closed-form derivatives, and kernel codes.

The derivative formulas are written with differentiable torch ops, so the double
backward of the ops (conservative-force training) can differentiate them once more.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "tanh", "softplus")
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
"""Integer code of each activation in the triton kernels (``ACT`` constexpr)."""

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
