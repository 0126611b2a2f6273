"""Sharded parameters are marked by the parallel layers (``tp_sharded_parameters``), and the marks agree
with the shard pieces (gnnmegatron/parallel/sharding.py): a parameter is split over the TP group exactly
when its pieces do not cover the whole global tensor. Built without process groups (tp = 2, rank 1)."""

import pytest
import torch

from gnnmegatron.models import AtomisticModel, ModelConfig
from gnnmegatron.parallel import parallelize
from gnnmegatron.parallel.layout import ParallelLayout
from gnnmegatron.parallel.sharding import local_pieces
from gnnmegatron.training.distributed import is_tp_sharded, split_params


def _layout():
    return ParallelLayout(tp=2, pp=1, dp=1, rank=1, world_size=2, tp_ranks=(0, 1), pp_ranks=(1,), dp_ranks=(1,))


@pytest.mark.parametrize("overrides", [{"message": "node_split"}, {"message": "node_split", "message_groups": 4},
                                       {"message": "faithful"}], ids=["dense", "grouped", "faithful"])
def test_marks_agree_with_shard_pieces(overrides):
    with torch.device("meta"):
        model = AtomisticModel(ModelConfig(hidden=16, layers=2, num_rbf=4, **overrides))
    parallelize(model, _layout(), allow_edge_collectives=True)
    flags, pieces = is_tp_sharded(model), local_pieces(model)
    sharded = {n for n, p in model.named_parameters() if flags[id(p)]}
    split = {n for n, p in model.named_parameters() if any(pc.sizes != pc.global_shape for pc in pieces[n])}
    assert sharded == split and sharded, (sorted(sharded ^ split))
    assert any(n.endswith("edge_mlp0.bias") for n in sharded) and not any(n.endswith("node_mlp2.bias") for n in sharded)
    s, r = split_params(model)
    assert len(s) == len(sharded) and len(s) + len(r) == len(list(model.parameters()))
