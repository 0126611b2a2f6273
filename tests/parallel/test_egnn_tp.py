"""TPEGCL (tensor-parallel node_split block) == single-device EGCL, tp in {2, 4}, gloo.

One block (node_split -> TPEGCL; faithful -> TPEGCLFaithful), float64 (tight comparison: the only differences are the summation order of the
partial GEMMs and dot products, ~1e-15 relative): outputs h, x, edge scalars, conservative
forces ``-dE/dx`` (create_graph), and after ``loss = E + sum(F^2)`` (double backward) the
gradients of the inputs h, x, edge weights and every parameter, the TP ones gathered back to
full shapes. Also the weight round trip from_egcl -> to_egcl_state_dict.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnnmegatron.data.batch import collate
from gnnmegatron.models import AtomisticModel, ModelConfig
from gnnmegatron.models.egnn import EGCL, edge_vectors
from gnnmegatron.models.radial import PolynomialEnvelope
from gnnmegatron.parallel.testing import run_distributed

DT = torch.float64
CUTOFF = 4.0
# float64, TP vs one device: partial sums added in another order; seen <= ~1e-14 relative.
TOL64 = {"atol": 1e-10, "rtol": 1e-9}


# ----------------------------------------------------------------------------- shared helpers
def structures(seeds=(0, 1)) -> list[dict]:
    """Small rattled periodic cells (ase.build.bulk): Cu fcc 2x1x1 and NaCl rocksalt."""
    from ase.build import bulk

    out = []
    for k, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True) if k % 2 == 0 else bulk("NaCl", "rocksalt", a=5.6)
        atoms.positions += 0.1 * rng.standard_normal(atoms.positions.shape)
        out.append({"atomic_numbers": atoms.numbers, "positions": atoms.positions, "cell": atoms.cell.array,
                        "pbc": atoms.pbc})
    return out


def make_batch(dtype=DT) -> dict:
    return collate(structures(), cutoff=CUTOFF, dtype=dtype)


def make_model(seed=0, dtype=DT, **overrides) -> AtomisticModel:
    """Small node_split model (hidden 8, 2 layers); coordinate weights scaled up from their
    0.001 init gain so coordinate updates move the atoms and the tests exercise them."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"hidden": 8, "layers": 2, "num_rbf": 4, "cutoff": CUTOFF, "message": "node_split", **overrides})
    model = AtomisticModel(cfg).to(dtype)
    with torch.no_grad():
        for block in model.blocks:
            if block.coord_mlp is not None:
                block.coord_mlp[-1].weight.mul_(300.0)
        # non-trivial LayerNorm / biases so their gradients are checked too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def check(errors: dict, tol=TOL64, what="") -> None:
    """``errors``: name -> (max |diff|, max |reference|)."""
    bad = {k: v for k, v in errors.items() if v[0] > tol["atol"] + tol["rtol"] * v[1]}
    assert not bad, f"{what}: TP differs from one device (max |diff|, max |ref|): {bad}"


# ----------------------------------------------------------------------------- block test
def _block_inputs(model_seed: int, **cfg_overrides):
    torch.manual_seed(model_seed)
    cfg = ModelConfig(**{"hidden": 8, "layers": 2, "num_rbf": 4, "cutoff": CUTOFF, "message": "node_split",
                                "execution": "fused", **cfg_overrides})
    block = EGCL(cfg, update_coords=True).to(DT)
    with torch.no_grad():
        block.coord_mlp[-1].weight.mul_(300.0)
    batch = make_batch()
    ei = batch["edge_index"]
    offset = AtomisticModel.edge_offsets(ei, batch["edge_shift"], batch["cell"], batch["batch"])
    h0 = torch.randn(batch["positions"].shape[0], cfg.hidden, dtype=DT)
    return block, batch["positions"], h0, ei, offset, PolynomialEnvelope(CUTOFF, 5), torch.randn(cfg.hidden, dtype=DT)


def _block_energy_loss(block, x0, h0, ei, offset, envelope, sv):
    """E(h, x) through one block (also a scalar head), F = -dE/dx (create_graph), loss = E + |F|^2."""
    x = x0.clone().requires_grad_(True)
    h = h0.clone().requires_grad_(True)
    _, d0 = edge_vectors(x, ei, offset)
    w = envelope(d0)
    out = block(h, x, ei, offset, w, scalar_vector=sv)
    scalar = out.edge_scalar if out.edge_scalar is not None else out.edge_feat @ sv  # faithful: replicated a_ij
    energy = torch.nn.functional.softplus(out.h).pow(2).sum() + (out.x - x0).pow(2).sum() + torch.sin(scalar).sum()
    forces = -torch.autograd.grad(energy, x, create_graph=True)[0]
    loss = energy + forces.pow(2).sum()
    loss.backward()
    return {"h": out.h.detach(), "x": out.x.detach(), "s": scalar.detach(), "E": energy.detach(),
                "F": forces.detach(), "dh": h.grad, "dx": x.grad}


def _run_blocks(tp: int) -> dict:
    from gnnmegatron.parallel import init_layout

    torch.set_num_threads(1)
    layout = init_layout(tp=tp, groups="torch")
    return {case: _compare_block(layout, overrides) for case, overrides in BLOCK_CASES.items()}


def _compare_block(layout, overrides: dict) -> dict:
    from gnnmegatron.parallel.egnn_tp import TPEGCL, TPEGCLFaithful

    block, x0, h0, ei, offset, env, sv = _block_inputs(0, **overrides)
    tpb = (TPEGCL if block.message == "node_split" else TPEGCLFaithful).from_egcl(block, layout)
    sd = tpb.to_egcl_state_dict()
    errors = {f"state_dict.{k}": (max_err(v, block.state_dict()[k]), 1.0) for k, v in sd.items()}
    assert set(sd) == set(block.state_dict()), (sorted(sd), sorted(block.state_dict()))
    sv_p = sv.clone().requires_grad_(True)
    sv_r = sv.clone().requires_grad_(True)
    ref = _block_energy_loss(block, x0, h0, ei, offset, env, sv_r)
    par = _block_energy_loss(tpb, x0, h0, ei, offset, env, sv_p)
    for k in ref:
        errors[k] = (max_err(par[k], ref[k]), ref[k].abs().max().item())
    grads = tpb.full_grads()
    for name, p in block.named_parameters():
        assert grads[name] is not None, f"{name}: no gradient in the TP block"
        errors[f"grad.{name}"] = (max_err(grads[name], p.grad), p.grad.abs().max().item())
    errors["grad.scalar_vector"] = (max_err(sv_p.grad, sv_r.grad), sv_r.grad.abs().max().item())
    return errors


BLOCK_CASES = {
    "node_split": {},
    "node_split-ln-tanh-norm-gelu-clamp": {"layer_norm": True, "coord_tanh": True, "coords_range": 0.5,
                                              "message_normalizer": 3.0, "coord_normalizer": 2.0, "activation": "gelu",
                                              "coord_clamp": 0.05},
    "faithful-ln-softplus": {"message": "faithful", "layer_norm": True, "activation": "softplus", "message_normalizer": 2.0},
}


@pytest.mark.parametrize("tp", [2, 4])
def test_block_forward_backward_double_backward(tp):
    results = run_distributed(_run_blocks, tp, tp)
    for rank, per_case in enumerate(results):
        for case, errors in per_case.items():
            check(errors, what=f"tp={tp} rank {rank} case {case}")


def _run_bad(tp: int):
    from gnnmegatron.parallel import init_layout
    from gnnmegatron.parallel.egnn_tp import TPEGCL

    layout = init_layout(tp=tp, groups="torch")
    torch.manual_seed(0)
    msgs = []
    for cfg in (ModelConfig(hidden=6, num_rbf=4, message="node_split"), ModelConfig(hidden=8, num_rbf=4)):
        # the second: a faithful EGCL handed to the node_split twin
        try:
            TPEGCL.from_egcl(EGCL(cfg, update_coords=True), layout)
        except ValueError as exc:
            msgs.append(str(exc))
    return msgs


def test_block_rejects_bad_configs():
    msgs = run_distributed(_run_bad, 4, 4)[0]
    assert len(msgs) == 2, msgs
    assert "hidden size 6 is not divisible by tp=4" in msgs[0]
    assert "node_split" in msgs[1]
