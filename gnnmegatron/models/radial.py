"""Radial basis functions and the smooth cutoff envelope.

Shapes:
    E: number of edges, K: number of basis functions.

All modules are parameter-free (their constants are non-persistent buffers), so they
add nothing to parameter counts or checkpoints and follow ``model.to(dtype/device)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """DimeNet's spherical Bessel (order 0) basis ``sqrt(2/c) * sin(n pi r / c) / r``, n = 1..K.

    Args:
        num_rbf: K, number of basis functions.
        cutoff: c in Å.

    Shapes:
        forward: distances [E] (Å, > 0) -> [E, K].
    """

    def __init__(self, num_rbf: int, cutoff: float):
        super().__init__()
        self.num_rbf = int(num_rbf)
        self.cutoff = float(cutoff)
        self.register_buffer("frequencies", torch.empty(num_rbf), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the constants (after ``to_empty`` of a model built on the meta device)."""
        values = torch.arange(1, self.num_rbf + 1) * (math.pi / self.cutoff)  # as in the first release
        self.frequencies.copy_(values.to(self.frequencies.device))

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        d = distances.unsqueeze(-1)
        freq = self.frequencies.to(distances.dtype)
        return math.sqrt(2.0 / self.cutoff) * torch.sin(freq * d) / d

    def extra_repr(self) -> str:
        return f"num_rbf={self.num_rbf}, cutoff={self.cutoff}"


class GaussianBasis(nn.Module):
    """Gaussians ``exp(-(r - mu_k)^2 / (2 w^2))`` with K centres evenly spaced on [0, c].

    Args:
        num_rbf: K, number of basis functions.
        cutoff: c in Å.
        width: w in Å; defaults to the centre spacing ``c / (K - 1)`` (``c`` when K = 1).

    Shapes:
        forward: distances [E] (Å) -> [E, K].
    """

    def __init__(self, num_rbf: int, cutoff: float, width: float | None = None):
        super().__init__()
        self.num_rbf = int(num_rbf)
        self.cutoff = float(cutoff)
        self.width = float(width) if width is not None else (cutoff / (num_rbf - 1) if num_rbf > 1 else cutoff)
        self.register_buffer("centers", torch.empty(num_rbf), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the constants (after ``to_empty`` of a model built on the meta device)."""
        values = torch.linspace(0.0, self.cutoff, self.num_rbf)
        self.centers.copy_(values.to(self.centers.device))

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        diff = distances.unsqueeze(-1) - self.centers.to(distances.dtype)
        return torch.exp(-0.5 * (diff / self.width) ** 2)

    def extra_repr(self) -> str:
        return f"num_rbf={self.num_rbf}, cutoff={self.cutoff}, width={self.width:.4g}"


class PolynomialEnvelope(nn.Module):
    """Smooth cutoff ``u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)``, x = r/c.

    ``u(0) = 1``; ``u``, ``u'`` and ``u''`` vanish at ``x = 1``; ``u = 0`` for ``r >= c``.
    Multiplying every edge contribution by ``u`` makes energy, forces and force
    derivatives continuous when an atom crosses the cutoff (needed for energy-conserving
    MD). This is the DimeNet / NequIP polynomial cutoff without DimeNet's ``1/x`` factor.

    Args:
        cutoff: c in Å.
        p: polynomial exponent (>= 2; the models use 5, NequIP's default is 6).

    Shapes:
        forward: distances [E] (Å) -> [E].
    """

    def __init__(self, cutoff: float, p: int = 5):
        super().__init__()
        if p < 2:
            raise ValueError(f"PolynomialEnvelope needs p >= 2 for a smooth cutoff, got p={p}")
        self.cutoff = float(cutoff)
        self.p = int(p)

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = distances / self.cutoff
        xp = x.pow(p)
        u = 1.0 - 0.5 * (p + 1) * (p + 2) * xp + p * (p + 2) * xp * x - 0.5 * p * (p + 1) * xp * x * x
        return torch.where(x < 1.0, u, torch.zeros_like(u))

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, p={self.p}"


def build_radial_basis(kind: str, num_rbf: int, cutoff: float) -> nn.Module:
    """``"bessel"`` -> ``BesselBasis``, ``"gaussian"`` -> ``GaussianBasis``."""
    if kind == "bessel":
        return BesselBasis(num_rbf, cutoff)
    if kind == "gaussian":
        return GaussianBasis(num_rbf, cutoff)
    raise ValueError(f"unknown radial basis {kind!r}; use 'bessel' or 'gaussian'")
