"""gnnmegatron.parallel: process layouts, differentiable collectives and parallel layers.

* :mod:`.layout` -- ``ParallelLayout`` (tp/pp/dp sizes, groups, ranks; passed explicitly),
  ``init_layout`` on megatron-core's ``parallel_state``, ``single()``, ``destroy_layout``.
* :mod:`.collectives` -- ``copy_to/reduce_from/scatter_to/gather_from_tp_region`` and
  ``all_reduce_sum_scalars``: autograd Functions whose backward is the paired Function, so
  forces-by-autograd training (double backward) is exact; gloo and NCCL.
* :mod:`.comm_stats` -- ``CommCounter``: records every collective (name, op, shape, bytes,
  direction); free when inactive.
* :mod:`.linear` -- ``ColumnParallelLinear``/``RowParallelLinear`` (ours, double-backward
  correct) and wrappers of megatron-core's layers; ``from_full_weight``/``full_weight``.
* :mod:`.egnn_tp` -- ``TPEGCL`` (tensor-parallel node_split EGNN block: node-sized
  collectives only) and ``TPEGCLFaithful`` (HydraGNN's E_GCL under TP, E x H collectives).
* :mod:`.parallelize` -- ``parallelize(model, layout)``, ``gather_state_dict``, ``gather_grads``.
* :mod:`.testing` -- ``run_distributed`` for gloo tests (imported on demand).

Importing this package does not import megatron-core (a ~5 s CPU import); ``init_layout`` and
the megatron wrappers import it when used.
"""

from .collectives import (
    all_gather_along_dim,
    all_reduce_sum_scalars,
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
)
from .comm_stats import CommCounter, CommRecord
from .egnn_tp import TPEGCL, TPEGCLFaithful
from .layout import ParallelLayout, destroy_layout, init_layout, single
from .linear import (
    ColumnParallelLinear,
    MegatronColumnParallelLinear,
    MegatronRowParallelLinear,
    RowParallelLinear,
    shard,
)
from .parallelize import gather_grads, gather_state_dict, parallelize

__all__ = [
    "ColumnParallelLinear",
    "CommCounter",
    "CommRecord",
    "MegatronColumnParallelLinear",
    "MegatronRowParallelLinear",
    "ParallelLayout",
    "RowParallelLinear",
    "TPEGCL",
    "TPEGCLFaithful",
    "all_gather_along_dim",
    "all_reduce_sum_scalars",
    "copy_to_tp_region",
    "destroy_layout",
    "gather_from_tp_region",
    "gather_grads",
    "gather_state_dict",
    "init_layout",
    "parallelize",
    "reduce_from_tp_region",
    "scatter_to_tp_region",
    "shard",
    "single",
]
