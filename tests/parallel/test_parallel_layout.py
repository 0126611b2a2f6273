"""ParallelLayout: sizes, errors, Megatron's rank order, megatron vs torch groups, tp=1."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gnnmegatron.parallel import CommCounter, ParallelLayout, destroy_layout, init_layout, single
from gnnmegatron.parallel.collectives import copy_to_tp_region, reduce_from_tp_region
from gnnmegatron.parallel.layout import rank_of
from gnnmegatron.parallel.testing import run_distributed


def test_single_layout_without_distributed():
    lay = single()
    assert (lay.tp, lay.pp, lay.dp, lay.rank, lay.world_size) == (1, 1, 1, 0, 1)
    assert lay.tp_group is None and lay.tp_rank == 0 and lay.is_first_stage and lay.is_last_stage
    assert lay.check_divisible(12, "hidden") == 12
    assert not dist.is_initialized()
    assert init_layout(1).tp == 1  # no torch.distributed, all sizes 1: single()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        init_layout(2)


def test_layout_validation_messages():
    with pytest.raises(ValueError, match=r"tp\*pp\*dp=2\*1\*3=6 but world size is 4"):
        ParallelLayout(tp=2, pp=1, dp=3, world_size=4)
    with pytest.raises(ValueError, match="tp must be a positive int, got 0"):
        ParallelLayout(tp=0)
    lay = ParallelLayout(tp=4, world_size=4, tp_ranks=(0, 1, 2, 3))
    assert lay.check_divisible(16, "hidden") == 4
    with pytest.raises(ValueError, match=r"hidden size 10 is not divisible by tp=4 \(10 % 4 = 2\)"):
        lay.check_divisible(10, "hidden")
    with pytest.raises(ValueError, match="tp_ranks=.* must hold 4 ranks including rank 0"):
        ParallelLayout(tp=4, world_size=4, tp_ranks=(1, 2, 3, 4))


def test_rank_order_formula():
    # Megatron's default order tp-cp-ep-dp-pp: 8 ranks, tp=2, dp=2, pp=2
    assert [rank_of(t, d, p, 2, 2) for p in range(2) for d in range(2) for t in range(2)] == list(range(8))
    assert rank_of(1, 0, 1, tp=2, dp=2) == 5


def _layouts_on_four_ranks():
    out = {}
    with pytest.raises(ValueError, match=r"tp\*pp\*dp=2\*1\*3=6 but world size is 4"):
        init_layout(tp=2, pp=1, dp=3)
    with pytest.raises(ValueError, match=r"world size 4 is not divisible by tp\*pp=3\*1=3"):
        init_layout(tp=3)
    for groups in ("megatron", "torch"):
        for tp, pp in ((2, 1), (2, 2), (1, 2), (4, 1)):
            lay = init_layout(tp, pp, groups=groups)
            out[(groups, tp, pp)] = (
                lay.tp_ranks,
                lay.dp_ranks,
                lay.pp_ranks,
                lay.tp_rank,
                lay.dp_rank,
                lay.pp_rank,
                lay.dp,
            )
            # the groups really are those ranks: all-reduce each rank's global rank
            for group, ranks in ((lay.tp_group, lay.tp_ranks), (lay.dp_group, lay.dp_ranks)):
                t = reduce_from_tp_region(torch.tensor([float(lay.rank)]), group)
                assert t.item() == sum(ranks), (groups, tp, pp, ranks, t)
            if groups == "megatron":
                with pytest.raises(RuntimeError, match="already initialised"):
                    init_layout(tp, pp)
            destroy_layout(lay)
    # tp=1 on 4 ranks (dp=4): the TP collectives return early and record nothing
    lay = init_layout(tp=1)
    x = torch.ones(3, requires_grad=True)
    with CommCounter() as cc:
        y = reduce_from_tp_region(copy_to_tp_region(x, lay.tp_group), lay.tp_group)
        y.sum().backward()
    out["tp1"] = (lay.dp, len(cc.records), y is x)
    destroy_layout(lay)
    return out


def test_init_layout_four_ranks_megatron_and_torch_groups_agree():
    results = run_distributed(_layouts_on_four_ranks, 4)
    for rank, res in enumerate(results):
        pair = (2 * (rank // 2), 2 * (rank // 2) + 1)  # consecutive ranks: tp fastest-varying
        stride = (rank % 2, rank % 2 + 2)
        assert res[("megatron", 2, 1)][:3] == (pair, stride, (rank,))  # tp, dp, pp ranks
        assert res[("megatron", 2, 2)][:3] == (pair, (rank,), stride)
        assert res[("megatron", 1, 2)][:3] == ((rank,), pair, stride)
        assert res[("megatron", 4, 1)][:3] == ((0, 1, 2, 3), (rank,), (rank,))
        assert res[("megatron", 2, 1)][3:] == (rank % 2, rank // 2, 0, 2)  # tp_rank, dp_rank, pp_rank, dp
        for key, value in res.items():
            if key[0] == "torch":
                assert value == res[("megatron",) + key[1:]], key
        assert res["tp1"] == (4, 0, True)
