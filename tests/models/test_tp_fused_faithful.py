"""TPEGCLFaithfulFused (the tensor-parallel twin of the fused faithful E_GCL) == the single-device
block, tp in {2, 4}, gloo, float64: outputs h and x, conservative forces (create_graph), and after
``loss = E + sum(F^2)`` (double backward) the gradients of the inputs and of every parameter (TP
shards gathered back to full shapes); plus the edge-sized traffic the fused twin pays (all-reduces
of [chunk, H] partial second-layer products: E x H rows forward, again in every recompute).

(The twin lives in gnnmegatron/parallel/egnn_tp.py; this test sits with the fused faithful model tests.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))

CASES = {
    "silu": {},
    "gelu-ln-norms": {"activation": "gelu", "layer_norm": True, "message_normalizer": 3.0, "coord_normalizer": 2.0,
                      "coord_tanh": True, "coords_range": 0.5},
    "softplus-clamp": {"activation": "softplus", "coord_clamp": 0.05},
}


def _energy_loss(block, x0, h0, ei, offset, envelope):
    """E(h, x) through one block, F = -dE/dx (create_graph), loss = E + |F|^2; returns values and input grads."""
    from gnnmegatron.models.egnn import edge_vectors

    x = x0.clone().requires_grad_(True)
    h = h0.clone().requires_grad_(True)
    _, d0 = edge_vectors(x, ei, offset)
    out = block(h, x, ei, offset, envelope(d0))
    energy = torch.nn.functional.softplus(out.h).pow(2).sum() + (out.x - x0).pow(2).sum()
    forces = -torch.autograd.grad(energy, x, create_graph=True)[0]
    (energy + forces.pow(2).sum()).backward()
    return {"h": out.h.detach(), "x": out.x.detach(), "E": energy.detach(), "F": forces.detach(), "dh": h.grad,
            "dx": x.grad}


def _run(tp: int) -> dict:
    import gnnmegatron.ops.faithful_message_grad2 as grad2
    import gnnmegatron.ops.faithful_message_torch as fmt
    from gnnmegatron.ops import settings
    from gnnmegatron.parallel import init_layout
    from gnnmegatron.parallel.egnn_tp import TPEGCLFaithfulFused
    from test_egnn_tp import _block_inputs, max_err

    torch.set_num_threads(1)
    settings.chunk_edges = 13  # several chunks (and so several all-reduces) per block
    rows = []  # rows of every [rows, H] partial product the op all-reduced

    def counting(tp_id):
        reduce = fmt.tp_reducer.__wrapped__(tp_id)
        if reduce is None:
            return None

        def wrapped(x):
            rows.append(x.shape[0])
            return reduce(x)

        return wrapped

    counting.__wrapped__ = fmt.tp_reducer
    fmt.tp_reducer = grad2.tp_reducer = counting
    layout = init_layout(tp=tp, groups="torch")
    result = {}
    for case, overrides in CASES.items():
        block, x0, h0, ei, offset, env, _ = _block_inputs(0, message="faithful", **overrides)
        assert block.fused and block.message == "faithful"
        twin = TPEGCLFaithfulFused.from_egcl(block, layout)
        ref = _energy_loss(block, x0, h0, ei, offset, env)
        rows.clear()
        par = _energy_loss(twin, x0, h0, ei, offset, env)
        errors = {k: (max_err(par[k], ref[k]), ref[k].abs().max().item()) for k in ref}
        grads = twin.full_grads()
        for name, p in block.named_parameters():
            assert grads[name] is not None, f"{name}: no gradient in the TP block"
            errors[f"grad.{name}"] = (max_err(grads[name], p.grad), p.grad.abs().max().item())
        result[case] = {"errors": errors, "reduced_rows": sum(rows), "E": ei.shape[1],
                        "edge_feat_none": twin(h0, x0, ei, offset, env(torch.ones(ei.shape[1], dtype=x0.dtype)))
                        .edge_feat is None}
    return result


@pytest.mark.parametrize("tp", [2, 4])
def test_fused_faithful_twin_equals_one_device(tp):
    from gnnmegatron.parallel.testing import run_distributed
    from test_egnn_tp import check

    for rank, per_case in enumerate(run_distributed(_run, tp, tp)):
        for case, r in per_case.items():
            check(r["errors"], what=f"tp={tp} rank {rank} case {case}")
            assert r["edge_feat_none"], "the fused twin returned [E, H] edge features"
            # forward E rows, force backward's recompute E, force loss: the double backward's stacked
            # [z2; z2'] 2E and the first-order backward's recompute E
            assert r["reduced_rows"] == 5 * r["E"], (case, r["reduced_rows"], r["E"])
