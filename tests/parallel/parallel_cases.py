"""Toy models, references and tolerances shared by the tensor-parallel tests.

Every toy is written once with a ``group`` argument: with ``group=None`` the collectives are
no-ops and ``shard`` returns the full tensor, so the same code is the single-device reference.

The force-training pattern (``forces_loss``): energy ``E(x)``, forces ``F = -dE/dx`` by
autograd with ``create_graph=True``, loss ``E + sum(F^2)``, ``loss.backward()`` -- parameter
gradients then go through the backward graph (double backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gnnmegatron.parallel.collectives import (
    all_reduce_sum_scalars,
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
)
from gnnmegatron.parallel.linear import shard

# fp32, parallel vs one device: the all-reduce adds tp partial products in another order
# than one GEMM does; on these sizes the largest difference seen is ~5e-7.
TOL32 = {"atol": 2e-5, "rtol": 2e-5}


def nonlinear_energy(y: torch.Tensor) -> torch.Tensor:
    """Energy with a non-zero second derivative in ``y`` (what exposes unrecorded backwards)."""
    return F.softplus(y).pow(2).sum()


def linear_energy(y: torch.Tensor) -> torch.Tensor:
    """``y.sum()``: zero second derivative (the pattern of the first megatron-core toy check)."""
    return y.sum()


ENERGIES = {"nonlinear": nonlinear_energy, "linear": linear_energy}


def forces_loss(forward, x0: torch.Tensor, energy=nonlinear_energy):
    """Run the force-training pattern; return (E, F, dloss/dx) detached. Grads land in params."""
    x = x0.detach().clone().requires_grad_(True)
    e = energy(forward(x))
    f = -torch.autograd.grad(e, x, create_graph=True)[0]
    loss = e + f.pow(2).sum()
    loss.backward()
    return e.detach(), f.detach(), x.grad.detach()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol=TOL32) -> None:
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: max |diff| {diff:.3e}\n{m}")


# ----------------------------------------------------------------------------- toy A
def toy_a_weights(n=5, d=3, h=8, o=4, seed=0, dtype=torch.float32):
    """x [N, D], W1 [H, D], W2 [O, H], w [H] (full, identical on every rank)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return mk(n, d), mk(h, d) * 0.5, mk(o, h) * 0.5, mk(h) * 0.5


def toy_a(group, weights, energy=nonlinear_energy):
    """copy_to -> column GEMM -> tanh -> row GEMM -> reduce_from, plus edge scalars.

    ``E = energy(y) + sum(sin(s))`` with ``y = reduce(tanh(x W1_r^T) W2_r^T)`` and
    ``s = all_reduce_sum_scalars(tanh(x W1_r^T) . w_r)`` (per-row partial dot products).
    Returns (E, F, x.grad, {name: local grad}).
    """
    x0, w1, w2, w = weights
    p = {
        "W1": shard(w1, 0, group).requires_grad_(True),
        "W2": shard(w2, 1, group).requires_grad_(True),
        "w": shard(w, 0, group).requires_grad_(True),
    }

    def forward(x):
        hid = torch.tanh(F.linear(copy_to_tp_region(x, group, "copy"), p["W1"]))
        y = reduce_from_tp_region(F.linear(hid, p["W2"]), group, "reduce")
        s = all_reduce_sum_scalars(hid @ p["w"], group)
        return y, s

    e, f, gx = forces_loss(forward, x0, lambda ys: energy(ys[0]) + torch.sin(ys[1]).sum())
    return e, f, gx, {k: v.grad for k, v in p.items()}


TOY_A_SHARD_DIM = {"W1": 0, "W2": 1, "w": 0}


# ----------------------------------------------------------------------------- toy B
def toy_b_weights(n=5, feat=8, o=3, seed=1, dtype=torch.float32):
    """x [N, Fe], w [Fe] (sharded), M [O, Fe] (replicated)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return mk(n, feat), mk(feat), mk(o, feat) * 0.5


def toy_b(group, weights, energy=nonlinear_energy):
    """scatter_to -> elementwise nonlinearity with a sharded weight -> gather_from -> GEMM."""
    x0, w, m = weights
    p = {"w": shard(w, 0, group).requires_grad_(True), "M": m.clone().requires_grad_(True)}

    def forward(x):
        a = scatter_to_tp_region(x, group, "scatter")
        b = torch.tanh(a * p["w"]) + 0.1 * a.pow(2)
        z = gather_from_tp_region(b, group, "gather")
        return F.linear(z, p["M"])

    e, f, gx = forces_loss(forward, x0, energy)
    return e, f, gx, {k: v.grad for k, v in p.items()}


TOY_B_SHARD_DIM = {"w": 0, "M": None}
