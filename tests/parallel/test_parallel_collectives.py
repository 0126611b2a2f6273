"""Collectives: forward values, backward and double backward vs one process; exact CommCounter volumes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_cases import (
    TOY_A_SHARD_DIM,
    TOY_B_SHARD_DIM,
    assert_close,
    toy_a,
    toy_a_weights,
    toy_b,
    toy_b_weights,
)

from gnnmegatron.parallel import (
    CommCounter,
    all_reduce_sum_scalars,
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
    shard,
)
from gnnmegatron.parallel.testing import run_distributed


def _check_forward_values() -> None:
    WORLD = dist.group.WORLD  # (None before init_process_group: read it inside the worker)
    ws, rank = dist.get_world_size(), dist.get_rank()
    x = torch.arange(2 * 4 * ws, dtype=torch.float32).reshape(2, 4 * ws) + rank  # rank-dependent
    assert torch.equal(copy_to_tp_region(x, WORLD), x)
    expected_sum = sum(x - rank + r for r in range(ws))
    assert torch.equal(reduce_from_tp_region(x, WORLD), expected_sum)
    assert torch.equal(all_reduce_sum_scalars(x[:, 0], WORLD), expected_sum[:, 0])
    part = scatter_to_tp_region(x, WORLD)
    assert torch.equal(part, x[:, 4 * rank : 4 * rank + 4]), part
    gathered = gather_from_tp_region(part, WORLD)
    assert torch.equal(gathered, torch.cat([x[:, 4 * r : 4 * r + 4] - rank + r for r in range(ws)], -1))
    # reduce must not modify its input (it may be saved by another op)
    before = x.clone()
    reduce_from_tp_region(x, WORLD)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="not divisible by the group size"):
        scatter_to_tp_region(torch.zeros(2, 4 * ws + 1), WORLD)


def _compare_toy(toy, weights, shard_dims, group, what) -> None:
    e, f, gx, grads = toy(group, weights)
    e_ref, f_ref, gx_ref, grads_ref = toy(None, weights)
    assert_close(e, e_ref, f"{what} energy")
    assert_close(f, f_ref, f"{what} forces")
    assert_close(gx, gx_ref, f"{what} dloss/dx")
    for name, dim in shard_dims.items():
        ref = grads_ref[name] if dim is None else shard(grads_ref[name], dim, group)
        assert_close(grads[name], ref, f"{what} dloss/d{name} (double backward)")


def _check_regions_vs_single() -> None:
    WORLD = dist.group.WORLD  # (None before init_process_group: read it inside the worker)
    torch.manual_seed(0)
    ws = dist.get_world_size()
    _check_forward_values()
    _compare_toy(toy_a, toy_a_weights(h=4 * ws), TOY_A_SHARD_DIM, WORLD, "copy/reduce/scalars")
    _compare_toy(toy_b, toy_b_weights(feat=2 * ws), TOY_B_SHARD_DIM, WORLD, "scatter/gather")
    # gradgradcheck (float64) of E(x) through all four regions: x replicated, so perturbing it
    # identically on every rank is a perturbation of the global function.
    x0, w1, w2, w = toy_a_weights(n=2, d=2, h=2 * ws, o=ws, dtype=torch.float64)
    w1r, w2r, wr = shard(w1, 0, WORLD), shard(w2, 1, WORLD), shard(w, 0, WORLD)

    def energy(x):
        hid = torch.tanh(torch.nn.functional.linear(copy_to_tp_region(x, WORLD), w1r))
        y = reduce_from_tp_region(hid @ w2r.T, WORLD)
        s = all_reduce_sum_scalars(hid @ wr, WORLD)
        z = gather_from_tp_region(torch.sin(scatter_to_tp_region(y, WORLD)), WORLD)
        return (torch.nn.functional.softplus(z) ** 2).sum() + torch.sin(s).sum()

    torch.manual_seed(1)  # gradgradcheck draws its grad_outputs: the same on every rank
    assert torch.autograd.gradgradcheck(energy, (x0.clone().requires_grad_(True),))


@pytest.mark.parametrize("world_size", [2, 4])
def test_regions_forward_backward_double_backward_match_single_process(world_size):
    run_distributed(_check_regions_vs_single, world_size)


def _count_toys():
    WORLD = dist.group.WORLD  # (None before init_process_group: read it inside the worker)
    ws = dist.get_world_size()
    out = {}
    with CommCounter() as cc:
        toy_a(WORLD, toy_a_weights(n=5, d=3, h=4 * ws, o=4))
    out["a"] = cc.records
    with CommCounter() as cc:
        toy_b(WORLD, toy_b_weights(n=5, feat=2 * ws, o=3))
    out["b"] = cc.records
    with CommCounter() as outer, CommCounter() as inner:  # nesting: both counters get the record
        reduce_from_tp_region(torch.zeros(3, dtype=torch.float64), WORLD, "nested")
    out["nested"] = (len(outer.records), len(inner.records), inner.total_bytes())
    return out


def _key(r):
    return (r.name, r.op, r.shape, r.bytes, r.direction)


def test_comm_counter_exact_volumes():
    ws = 2
    res = run_distributed(_count_toys, ws)
    n, d, o, fe = 5, 3, 4, 2 * ws
    # toy A. forward: reduce [N,O], edge scalars [N]. forces (first backward): copy_to's
    # all-reduce of dE/dx [N,D]. loss.backward: the forward graph's copy_to again [N,D], and
    # the backward graph's copy_to nodes (recorded by reduce_from's backward) all-reduce
    # [N,O] and [N]; the backward graph's reduce node (copy_to's backward) is an identity.
    want_a = [
        ("reduce", "all_reduce", (n, o), n * o * 4, "fwd"),
        ("edge_scalars", "all_reduce", (n,), n * 4, "fwd"),
        ("copy", "all_reduce", (n, d), n * d * 4, "bwd"),
        ("copy", "all_reduce", (n, d), n * d * 4, "bwd"),
        ("reduce", "all_reduce", (n, o), n * o * 4, "bwd"),
        ("edge_scalars", "all_reduce", (n,), n * 4, "bwd"),
    ]
    # toy B. forward: gather of [N, Fe/ws]. forces: scatter's backward gathers dE/dx shards.
    # loss.backward: scatter (forward graph) gathers again; the backward graph's scatter node
    # (gather's backward) gathers; splits communicate nothing.
    want_b = [("gather", "all_gather", (n, fe // ws), n * fe // ws * 4, "fwd")] + [
        ("scatter", "all_gather", (n, fe // ws), n * fe // ws * 4, "bwd"),
        ("scatter", "all_gather", (n, fe // ws), n * fe // ws * 4, "bwd"),
        ("gather", "all_gather", (n, fe // ws), n * fe // ws * 4, "bwd"),
    ]
    for rank_res in res:
        assert sorted(map(_key, rank_res["a"])) == sorted(want_a)
        assert sorted(map(_key, rank_res["b"])) == sorted(want_b)
        assert all(r.group_size == ws and r.dtype == torch.float32 for r in rank_res["a"] + rank_res["b"])
        assert rank_res["nested"] == (1, 1, 3 * 8)


def test_one_rank_group_returns_early_and_records_nothing():
    x = torch.randn(3, 4, requires_grad=True)
    with CommCounter() as cc:
        for fn in (
            copy_to_tp_region,
            reduce_from_tp_region,
            scatter_to_tp_region,
            gather_from_tp_region,
            all_reduce_sum_scalars,
        ):
            assert fn(x, None) is x
        toy_a(None, toy_a_weights())
    assert cc.records == []


def test_comm_counter_inactive_is_empty_and_summary():
    from gnnmegatron.parallel import comm_stats

    assert comm_stats._ACTIVE == []
    with CommCounter() as cc:
        comm_stats._record("n", "all_reduce", torch.zeros(2, 3), 2, "fwd")
        comm_stats._record("n", "all_reduce", torch.zeros(2, 3), 2, "bwd")
    comm_stats._record("n", "all_reduce", torch.zeros(2, 3), 2, "fwd")  # inactive: ignored
    assert cc.summary() == {("n", "all_reduce", "fwd"): (1, 24), ("n", "all_reduce", "bwd"): (1, 24)}
    assert cc.count(direction="bwd") == 1 and cc.total_bytes(op="all_reduce") == 48
    assert comm_stats._ACTIVE == []
