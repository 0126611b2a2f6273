"""Pipeline parallelism == the single-device model (gloo), and the schedules' simulation.

For every schedule (gpipe, 1f1b, interleaved), pp in {2, 4} and every block kind (node_split
dense and grouped, faithful, fused and unfused; conservative forces with stress, direct forces,
energy only), a 4-block float64 model is split into stages from the same global weights and
trained one step on three or five micro-batches of different sizes (including a one-atom
micro-batch with no edges and a micro-batch with isolated atoms); the loss, every micro-batch's
energies, forces and stress and every parameter gradient equal the single-device model that
runs the same micro-batches one after the other (TOL64; seen <= 3e-15). Micro-batch counts are
not divisible by pp, and one case gives unequal layers per stage. tp=2 x pp=2 (4 processes)
puts tensor-parallel blocks inside each stage.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_egnn_tp import TOL64, check, make_model, max_err, structures

from gnnmegatron.parallel.pipeline.schedules import (
    ScheduleError,
    Schedule,
    build_schedule,
    conservative_gpipe,
    gpipe,
    interleaved,
    one_f_one_b,
    simulate,
)
from gnnmegatron.parallel.testing import run_distributed

CUTOFF = 3.0


# ---------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_schedules_never_deadlock_and_match_the_analytic_bubble(p):
    for m in range(1, 17):
        g, o = gpipe(p, m), one_f_one_b(p, m)
        analytic = (p - 1) / (m + p - 1)
        assert abs(g.bubble - analytic) < 1e-12 and abs(o.bubble - analytic) < 1e-12, (p, m, g.bubble, o.bubble)
        assert g.peak_in_flight == [m] * p
        assert o.peak_in_flight == [min(p - s, m) for s in range(p)], o.peak_in_flight  # 1F1B memory bound
        conservative_gpipe(p, m)
        for v in (2, 3):
            sched = interleaved(p, m, v)
            gpipe(p, m, v)
            conservative_gpipe(p, m, v)
            if m % p == 0:
                assert abs(sched.bubble - (p - 1) / (v * m + p - 1)) < 1e-12, (p, m, v, sched.bubble)


def test_simulation_catches_deadlock_and_misordered_channels():
    ok = one_f_one_b(2, 3)
    stuck = Schedule("bad", 2, 2, 1, [list(ok.actions[0]), list(ok.actions[1])])
    # rank 1 runs its backward of micro-batch 0 before the forward it needs
    stuck.actions[1] = [a for a in stuck.actions[1] if a.micro_batch < 2]
    stuck.actions[1] = sorted(stuck.actions[1], key=lambda a: a.sweep != "B")
    with pytest.raises(ScheduleError, match="deadlocks|channel"):
        simulate(stuck)
    swapped = gpipe(2, 2)
    swapped.actions[1][0], swapped.actions[1][1] = swapped.actions[1][1], swapped.actions[1][0]
    with pytest.raises(ScheduleError, match="channel"):
        simulate(swapped)


def test_build_schedule_names_and_errors():
    assert build_schedule("1f1b", 2, 3, conservative=True).name == "conservative-gpipe"
    with pytest.raises(ValueError, match="interleaved"):
        build_schedule("1f1b", 2, 4, v=2)
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        build_schedule("zb", 2, 4)


def test_split_layers_balances_and_validates():
    from gnnmegatron.models import ModelConfig
    from gnnmegatron.parallel.pipeline.stage import balanced_split, split_layers

    cfg = ModelConfig(hidden=64, layers=8)
    chunks = split_layers(cfg, 4)
    assert [len(c.blocks) for c in chunks] == [2, 2, 2, 2]
    assert chunks[0].first and chunks[-1].last and [c.rank for c in chunks] == [0, 1, 2, 3]
    inter = split_layers(cfg, 2, 2)
    assert [(c.rank, c.chunk) for c in inter] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [len(c.blocks) for c in split_layers(cfg, 3, pp_layers=[3, 3, 2])] == [3, 3, 2]
    # a heavy head moves blocks off the last stage
    assert balanced_split([1.0] * 7, 3, last_extra=1.5) == [3, 3, 1]  # max cost 3 (vs 3.5 for 3, 2, 2)
    assert sorted(balanced_split([1.0] * 7, 3)) == [2, 2, 3]
    with pytest.raises(ValueError, match="pp_layers"):
        split_layers(cfg, 3, pp_layers=[3, 3, 3])
    with pytest.raises(ValueError, match="at least one"):
        split_layers(ModelConfig(hidden=8, layers=2), 4)


# ---------------------------------------------------------------------------------------- equivalence
def _edge_structures():
    """A one-atom molecule (no edges) and two isolated atoms in a big box (no edges) next to a crystal."""
    one = {"atomic_numbers": np.array([29]), "positions": np.zeros((1, 3)), "cell": np.zeros((3, 3)),
           "pbc": np.array([False] * 3)}
    iso = {"atomic_numbers": np.array([11, 17]), "positions": np.array([[0.0, 0, 0], [6.0, 6, 6]]),
           "cell": 12.0 * np.eye(3), "pbc": np.array([True] * 3)}
    return one, iso


def micro_batches(dtype=torch.float64, m=3):
    from gnnmegatron.data.batch import collate

    s = structures(seeds=(0, 1, 2, 3, 4))
    one, iso = _edge_structures()
    groups = [s[0:2], [one], s[2:3] + [iso], s[3:5], [iso, s[1]]][:m]
    return [collate(g, cutoff=CUTOFF, dtype=dtype) for g in groups]


def loss_fn(out, batch):
    """Nonlinear in energies, forces and stress (exercises the second-order pass)."""
    loss = (out["energy"] ** 2).sum()
    if "forces" in out:
        loss = loss + (out["forces"] - 0.1).pow(2).sum()
    if "stress" in out:
        loss = loss + (out["stress"] * 10).pow(2).sum()
    return loss, {"total": loss.detach()}


CASES = {
    "conservative-stress": ({}, True, True),
    "conservative-grouped-fused-ln": ({"message_groups": 2, "execution": "fused", "layer_norm": True}, True, True),
    "faithful-conservative-stress": ({"message": "faithful"}, True, True),
    "faithful-fused-direct": ({"message": "faithful", "execution": "fused", "force_mode": "direct"}, True, False),
    "direct-fused": ({"force_mode": "direct", "execution": "fused"}, True, False),
    "direct-unfused-grouped": ({"force_mode": "direct", "message_groups": 2}, True, False),
    "energy-only": ({}, False, False),
}


def reference(overrides, forces, stress, m):
    model = make_model(dtype=torch.float64, layers=4, **overrides).train()
    outs, total = [], 0.0
    for b in micro_batches(m=m):
        out = model(b, compute_forces=forces, compute_stress=stress)
        loss, _ = loss_fn(out, b)
        loss.backward()
        total += float(loss.detach())
        outs.append({k: v.detach() for k, v in out.items()})
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return total, outs, grads


def _stage_worker(jobs, tp=1):
    """On each rank: for every job, split the model, run one train step and a forward."""
    import torch.distributed as dist

    from gnnmegatron.parallel import parallelize
    from gnnmegatron.parallel.layout import init_layout
    from gnnmegatron.parallel.pipeline.engine import PipelineEngine
    from gnnmegatron.parallel.pipeline.stage import PipelineStageModel, split_layers

    layout = init_layout(tp=tp, pp=dist.get_world_size() // tp, dp=1, groups="torch")
    results = []
    for name, overrides, forces, stress, schedule, v, m, pp_layers in jobs:
        model = make_model(dtype=torch.float64, layers=4, **overrides)
        chunks = split_layers(model.cfg, layout.pp, v, pp_layers)
        stage = PipelineStageModel.from_model(model, [c for c in chunks if c.rank == layout.pp_rank], len(chunks))
        if tp > 1:
            parallelize(stage, layout, allow_edge_collectives=model.cfg.message == "faithful")
        engine = PipelineEngine(stage, layout, schedule)
        res = engine.train_step(micro_batches(m=m), loss_fn, compute_forces=forces, compute_stress=stress)
        if tp > 1:
            from gnnmegatron.parallel import gather_grads

            grads = gather_grads(stage)
        else:
            grads = {n: p.grad for n, p in stage.named_parameters()}
        evaluated = engine.forward(micro_batches(m=m), compute_forces=forces, compute_stress=stress)
        results.append({"name": name, "loss": None if res.loss is None else float(res.loss),
                        "outputs": res.outputs, "eval": evaluated,
                        "grads": {k: (None if g is None else g.clone()) for k, g in grads.items()},
                        "last": any(c.last for c in stage.chunks), "tp_rank": layout.tp_rank})
    return results


def _check_against_reference(results, name, overrides, forces, stress, m):
    total, outs, grads = reference(overrides, forces, stress, m)
    mine = [r for rank in results for r in rank if r["name"] == name and r["tp_rank"] == 0]
    last = [r for r in mine if r["last"]]
    assert len(last) == 1
    errors = {"loss": (abs(last[0]["loss"] - total), abs(total))}
    seen_keys = set()
    for key in ("outputs", "eval"):
        for k, (o, ref) in enumerate(zip(last[0][key], outs)):
            for out_key, value in o.items():
                seen_keys.add(out_key)
                errors[f"{key}[{k}].{out_key}"] = (max_err(value, ref[out_key]), ref[out_key].abs().max().item())
    expected = {"energy"} | ({"forces"} if forces else set()) | ({"stress"} if stress else set())
    assert expected <= seen_keys, (expected, seen_keys)
    covered = {}
    for r in mine:
        for n, g in r["grads"].items():
            covered[n] = g
    assert set(covered) == set(grads), sorted(set(grads) ^ set(covered))
    for n, g in grads.items():
        assert covered[n] is not None, f"{n}: no gradient under the pipeline"
        if "coord_mlp" not in n or forces:
            assert g.abs().max() > 0, f"{n}: zero reference gradient (vacuous)"
        errors[f"grad.{n}"] = (max_err(covered[n], g), g.abs().max().item())
    check(errors, TOL64, name)


JOBS_PP2 = [(name, o, f, s, sched, v, m, None)
            for name, (o, f, s) in CASES.items()
            for sched, v, m in (("gpipe", 1, 3), ("1f1b", 1, 3), ("interleaved", 2, 5))]
JOBS_PP2.append(("unequal-layers", {"force_mode": "direct"}, True, False, "1f1b", 1, 3, [3, 1]))
JOBS_PP2.append(("unequal-layers-conservative", {}, True, True, "gpipe", 1, 3, [1, 3]))


@pytest.fixture(scope="module")
def pp2_results():
    return run_distributed(_stage_worker, 2, JOBS_PP2, timeout=600)


@pytest.mark.parametrize("job", JOBS_PP2, ids=[f"{j[0]}-{j[4]}-v{j[5]}" for j in JOBS_PP2])
def test_pp2_equals_single_device(pp2_results, job):
    name, overrides, forces, stress, sched, v, m, _ = job
    idx = JOBS_PP2.index(job)  # every rank returns one result per job, in job order
    _check_against_reference([[rank[idx]] for rank in pp2_results], name, overrides, forces, stress, m)


JOBS_PP4 = [("conservative-stress", {}, True, True, "gpipe", 1, 5, None),
            ("direct-fused", {"force_mode": "direct", "execution": "fused"}, True, False, "1f1b", 1, 5, None),
            ("energy-only-interleaved", {}, False, False, "interleaved", 1, 3, None)]


def test_pp4_equals_single_device():
    results = run_distributed(_stage_worker, 4, JOBS_PP4, timeout=600)
    for idx, (name, overrides, forces, stress, _, _, m, _) in enumerate(JOBS_PP4):
        _check_against_reference([[rank[idx]] for rank in results], name, overrides, forces, stress, m)


JOBS_TP2_PP2 = [("tp-conservative-stress", {}, True, True, "gpipe", 1, 3, None),
                ("tp-grouped-direct", {"force_mode": "direct", "message_groups": 2}, True, False, "1f1b", 1, 3, None)]


def test_tp2_pp2_equals_single_device():
    results = run_distributed(_stage_worker, 4, JOBS_TP2_PP2, 2, timeout=600)
    for idx, (name, overrides, forces, stress, _, _, m, _) in enumerate(JOBS_TP2_PP2):
        _check_against_reference([[rank[idx]] for rank in results], name, overrides, forces, stress, m)


def test_replay_with_the_unit_costs_reproduces_the_simulation():
    from gnnmegatron.parallel.pipeline.schedules import replay

    for sched in (gpipe(3, 5), one_f_one_b(4, 7), interleaved(2, 4, 2)):
        unit = [[1.0 if a.sweep == "F" else 2.0 for a in acts] for acts in sched.actions]
        r = replay(sched, unit)
        assert r["makespan"] == sched.makespan and abs(r["bubble"] - sched.bubble) < 1e-12
        # a slower last stage lengthens the step and the bubble
        slow = [list(d) for d in unit]
        slow[-1] = [2 * x for x in slow[-1]]
        assert replay(sched, slow)["makespan"] > sched.makespan
