"""Building this rank's part of the model: meta device, pipeline stage, tensor-parallel shards, init.

``build_local_model`` never allocates the full model: it builds the single-device
``AtomisticModel`` on the meta device, keeps this rank's pipeline chunks
(``PipelineStageModel``), swaps the blocks for their tensor-parallel twins (``parallelize``,
still on meta), and only then gives the remaining tensors memory, filling each with its region
of the single-device initial weights (``gnnmegatron.models.init``: the same global weights for
every (tp, pp) layout and seed). Peak memory is this rank's parameters plus one 32 MiB random
block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gnnmegatron.models.config import ModelConfig
from gnnmegatron.models.init import init_specs, materialize
from gnnmegatron.parallel.layout import ParallelLayout
from gnnmegatron.parallel.sharding import local_pieces

__all__ = ["build_local_model", "set_energy_buffers", "local_tensors"]


def build_local_model(cfg: ModelConfig, layout: ParallelLayout, seed: int, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", virtual_stages: int = 1,
                      pp_layers: Sequence[int] | None = None) -> nn.Module:
    """This rank's model: an ``AtomisticModel`` (pp = 1) or ``PipelineStageModel``, tensor-parallel when tp > 1.

    Args:
        cfg: the single-device model's config.
        layout: the parallel layout (groups may be None: building needs only ranks and sizes).
        seed: initialisation seed (layout-independent).
        dtype, device: of the parameters.
        virtual_stages, pp_layers: pipeline split (``gnnmegatron.parallel.pipeline.stage.split_layers``).
    """
    from gnnmegatron.models import AtomisticModel

    with torch.device("meta"):
        model = AtomisticModel(cfg)
    specs = init_specs(model)
    if layout.pp > 1:
        from gnnmegatron.parallel.pipeline.stage import PipelineStageModel, split_layers

        chunks = split_layers(cfg, layout.pp, virtual_stages, pp_layers)
        mine = [c for c in chunks if c.rank == layout.pp_rank]
        model = PipelineStageModel.from_model(model, mine, len(chunks))
    if layout.tp > 1:
        from gnnmegatron.parallel import parallelize

        parallelize(model, layout)
    model = model.to(dtype)  # free on meta
    return materialize(model, specs, seed, device=device, pieces=local_pieces(model))


def set_energy_buffers(model: nn.Module, reference: torch.Tensor, scale: float, shift: float) -> None:
    """Per-element reference energies and the per-atom normalisation, on the rank(s) holding them.

    A pipeline stage without the heads has no such buffers and is left alone.
    """
    if hasattr(model, "reference_energies"):
        model.set_reference_energies(reference.to(model.reference_energies.dtype))
        model.set_normalization(scale, shift)


def local_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters and persistent buffers by local state-dict name."""
    out = dict(model.named_parameters())
    out.update({k: v for k, v in model.state_dict(keep_vars=True).items() if k not in out})
    return out
