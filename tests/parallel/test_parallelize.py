"""parallelize(AtomisticModel) == the single-device model, tp in {2, 4}, gloo.

A small node_split model (hidden 8, 2 layers) on two rattled periodic cells, parallelized from
the same global weights: energy, forces (conservative: -dE/dx with create_graph; direct: the
edge-scalar head), stress (conservative) and every parameter gradient of ``loss = sum(E^2) + sum((F - 0.1)^2) (+ sum(stress^2))``
(conservative mode: a double backward), for node_split (TPEGCL) and faithful (TPEGCLFaithful,
``allow_edge_collectives=True``) models, the TP gradients gathered to full shapes. float64
with TOL64 (seen differences ~1e-15 relative), plus one float32 case with TOL32. Also the
parallelize -> gather_state_dict round trip and the error messages.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_egnn_tp import TOL64, check, make_batch, make_model, max_err

from gnnmegatron.parallel.testing import run_distributed

# float32, TP vs one device: summation order of tp partial GEMMs; seen <= ~1e-6 relative.
TOL32 = {"atol": 1e-5, "rtol": 1e-4}

CASES = {
    "conservative": {},
    "conservative-ln-gelu-norm": {"layer_norm": True, "activation": "gelu", "message_normalizer": 4.0, "coord_tanh": True,
                                      "coords_range": 0.5},
    "direct": {"force_mode": "direct", "activation": "tanh"},
    "direct-fused-3layers": {"force_mode": "direct", "execution": "fused", "layers": 3},
    # grouped message mixing (message_groups): W0h column-parallel, W0m blocks sharded by group
    "grouped-conservative": {"message_groups": 4},
    "grouped-direct-fused-ln": {"message_groups": 4, "force_mode": "direct", "execution": "fused", "layer_norm": True},
    # the faithful E_GCL through TPEGCLFaithful (allow_edge_collectives=True)
    "faithful-conservative": {"message": "faithful"},
    "faithful-direct": {"message": "faithful", "force_mode": "direct"},
}


def _loss_and_grads(model, batch):
    stress = model.cfg.force_mode == "conservative"
    out = model(batch, compute_stress=stress)
    loss = (out["energy"] ** 2).sum() + (out["forces"] - 0.1).pow(2).sum()
    if stress:
        loss = loss + out["stress"].pow(2).sum()
    model.zero_grad()
    loss.backward()
    return {k: v.detach() for k, v in out.items()}


def _compare_model(tp, layout, overrides, dtype):
    from gnnmegatron.parallel.parallelize import (
        gather_grads,
        gather_state_dict,
        parallelize,
    )

    batch = make_batch(dtype)
    ref = make_model(dtype=dtype, **overrides).train()
    par = parallelize(copy.deepcopy(ref), layout, allow_edge_collectives=ref.cfg.message == "faithful")
    errors = {}
    sd, ref_sd = gather_state_dict(par), ref.state_dict()
    assert list(sd) == list(ref_sd), (list(sd), list(ref_sd))
    errors.update({f"state_dict.{k}": (max_err(v, ref_sd[k]), 1.0) for k, v in sd.items()})
    out_ref = _loss_and_grads(ref, batch)
    out_par = _loss_and_grads(par, batch)
    for k in out_ref:
        errors[k] = (max_err(out_par[k], out_ref[k]), out_ref[k].abs().max().item())
    grads = gather_grads(par)
    assert set(grads) == {n for n, _ in ref.named_parameters()}, sorted(grads)
    for name, p in ref.named_parameters():
        assert p.grad is not None and grads[name] is not None, f"{name}: no gradient"
        assert p.grad.abs().max() > 0, f"{name}: all-zero reference gradient (test would be vacuous)"
        errors[f"grad.{name}"] = (max_err(grads[name], p.grad), p.grad.abs().max().item())
    # the round trip loads into a fresh single-device model
    fresh = make_model(seed=1, dtype=dtype, **overrides)
    fresh.load_state_dict(sd)
    return errors


def _run_models(tp: int) -> dict:
    from gnnmegatron.parallel import init_layout

    torch.set_num_threads(1)
    layout = init_layout(tp=tp, groups="torch")
    out = {}
    for case, overrides in CASES.items():
        out[case] = (_compare_model(tp, layout, overrides, torch.float64), TOL64)
    out["conservative-fp32"] = (_compare_model(tp, layout, {}, torch.float32), TOL32)
    out["graphs-without-edges"] = (_no_edges(layout), TOL64)
    return out


def _no_edges(layout) -> dict:
    """An isolated atom and a pair beyond the cutoff: E = 0, collectives of empty tensors."""
    from gnnmegatron.data.batch import collate
    from gnnmegatron.parallel.parallelize import parallelize

    batch = collate([{"atomic_numbers": [29], "positions": [[0.0, 0, 0]]},
                     {"atomic_numbers": [29, 79], "positions": [[0.0, 0, 0], [9, 0, 0]]}], 4.0, dtype=torch.float64)
    ref = make_model().train()
    par = parallelize(copy.deepcopy(ref), layout)
    o_ref, o_par = _loss_and_grads(ref, batch), _loss_and_grads(par, batch)
    return {k: (max_err(o_par[k], o_ref[k]), o_ref[k].abs().max().item()) for k in o_ref}


@pytest.mark.parametrize("tp", [2, 4])
def test_parallel_model_equals_single_device(tp):
    results = run_distributed(_run_models, tp, tp)
    for rank, per_case in enumerate(results):
        for case, (errors, tol) in per_case.items():
            check(errors, tol, what=f"tp={tp} rank {rank} case {case}")


def _run_errors(tp: int) -> list[str]:
    from gnnmegatron.parallel import init_layout
    from gnnmegatron.parallel.parallelize import parallelize

    layout = init_layout(tp=tp, groups="torch")
    msgs = []
    for overrides in ({"message": "faithful"}, {"hidden": 6}, {"message_groups": 2}):
        try:
            parallelize(make_model(**overrides), layout)
        except ValueError as exc:
            msgs.append(str(exc))
    return msgs


def test_parallelize_errors():
    msgs = run_distributed(_run_errors, 4, 4)[0]
    assert len(msgs) == 3, msgs
    assert "use message='node_split'" in msgs[0] and "allow_edge_collectives=True" in msgs[0]
    assert "hidden size 6 is not divisible by tp=4" in msgs[1]
    assert "message_groups size 2 is not divisible by tp=4" in msgs[2]


def test_tp1_single_layout_runs_without_distributed():
    """``single()`` (tp=1, no torch.distributed): the same TP code path, no communication."""
    from gnnmegatron.parallel import single
    from gnnmegatron.parallel.parallelize import gather_state_dict, parallelize

    torch.set_num_threads(1)
    errors = _compare_model(1, single(), {"force_mode": "conservative"}, torch.float64)
    check(errors, TOL64, what="tp=1")
    ref = make_model()
    par = parallelize(copy.deepcopy(ref), single())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in gather_state_dict(par).items())
    with pytest.raises(TypeError, match="already tensor-parallel"):
        parallelize(par, single())
