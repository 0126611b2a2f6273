"""``parallelize(model, layout)``: swap a model's EGCL blocks for their tensor-parallel twins.

Parallelism is applied to a model, not written into it (torchtitan's habit): build the
single-device ``AtomisticModel`` on every rank from the same seed (or load the same
checkpoint), then ``parallelize`` replaces each node_split ``EGCL`` in ``model.blocks`` with a
:class:`~gnnmegatron.parallel.egnn_tp.TPEGCL` holding this rank's shards of the very same
weights. The embedding, the energy / force heads, norms and buffers stay replicated.

``gather_state_dict(model)`` (collective over the TP group) returns the single-device state
dict again, so checkpoints written from a TP run load into the single-device model;
``gather_grads(model)`` does the same for gradients (tests compare them with one device).
``message="faithful"`` models are refused unless ``allow_edge_collectives=True`` (then their
blocks become :class:`~gnnmegatron.parallel.egnn_tp.TPEGCLFaithful`, which pays ``[E, H]``
all-reduces: kept to measure what node granularity saves).

The parallel model always runs the fused op (the TP block has no ``[E, H]`` tensor), so
``model.cfg`` becomes a copy with ``execution="fused"``: that makes ``AtomisticModel`` hand the
direct-force head's vector to the last block (which returns the reduced per-edge scalars)
instead of applying the head to ``[E, H]`` edge features. Outputs are unchanged (fused and
unfused executions are equal, tests/models/test_egnn_fused.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gnnmegatron.models.egnn import block_container, named_blocks

from .egnn_tp import TPEGCL, TPEGCLFaithful, _TPBlock
from .layout import ParallelLayout

__all__ = ["gather_grads", "gather_state_dict", "parallelize", "tp_blocks"]


def parallelize(model: nn.Module, layout: ParallelLayout, *, allow_edge_collectives: bool = False) -> nn.Module:
    """Replace every EGCL block of ``model`` with its tensor-parallel twin, in place.

    Args:
        model: an ``AtomisticModel`` (or anything with ``.backbone.blocks`` / ``.blocks`` of
            node_split ``EGCL``), identical on every rank of the TP group.
        layout: the parallel layout (its ``tp_group`` shards the hidden units).
        allow_edge_collectives: also accept ``message="faithful"``, swapping its blocks for
            :class:`TPEGCLFaithful`, which all-reduces an ``[E, H]`` tensor per block forward
            (for the communication comparison in docs/architecture.md; not for training at scale).

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: ``message="faithful"`` without ``allow_edge_collectives`` (no
            node-granularity TP twin: its second edge linear is followed by an activation, so
            it needs ``[E, H]`` collectives), or hidden not divisible by ``layout.tp``.
    """
    cfg = getattr(model, "cfg", None)
    allowed = ("node_split", "faithful") if allow_edge_collectives else ("node_split",)
    hint = ("use message='node_split' (the TP-native EGNN of docs/architecture.md, whose collectives are node-sized), "
            "or pass allow_edge_collectives=True for the faithful twin that all-reduces E x H per block")
    if cfg is not None and getattr(cfg, "message", "node_split") not in allowed:
        raise ValueError(f"parallelize: ModelConfig.message={cfg.message!r} has no node-granularity "
                         f"tensor-parallel twin; {hint}")
    try:
        blocks = block_container(model)
    except TypeError as exc:
        raise TypeError(f"{exc}; nothing to parallelize") from None
    named = named_blocks(model)
    for i, block in named:
        if isinstance(block, _TPBlock):
            raise TypeError(f"parallelize: block {i} is already tensor-parallel")
        if getattr(block, "message", None) not in allowed:
            raise ValueError(f"parallelize: block {i} has message={getattr(block, 'message', None)!r}; {hint}")
        layout.check_divisible(block.hidden, "hidden")
    for i, block in named:
        twin = TPEGCL if block.message == "node_split" else TPEGCLFaithful
        blocks[i] = twin.from_egcl(block, layout)
    if cfg is not None and dataclasses.is_dataclass(cfg) and getattr(cfg, "execution", "fused") != "fused":
        model.cfg = dataclasses.replace(cfg, execution="fused")
    model.tp_layout = layout
    return model


def tp_blocks(model: nn.Module) -> dict[str, _TPBlock]:
    """``{module name: TPEGCL}`` of a parallelized model."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, _TPBlock)}


def _gather(model: nn.Module, local: dict[str, torch.Tensor | None], grad: bool) -> dict[str, torch.Tensor | None]:
    blocks = tp_blocks(model)
    full = {name: (blk.full_grads() if grad else blk.to_egcl_state_dict()) for name, blk in blocks.items()}
    out: dict[str, torch.Tensor | None] = {}
    done: set[str] = set()
    for key, value in local.items():
        owner = next((name for name in blocks if key.startswith(name + ".")), None)
        if owner is None:
            out[key] = value
        elif owner not in done:
            done.add(owner)
            for k, v in full[owner].items():
                out[f"{owner}.{k}"] = v
    return out


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-device state dict of a parallelized model (collective over the TP group)."""
    return _gather(model, model.state_dict(), grad=False)


def gather_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """``{single-device parameter name: full gradient}`` (collective over the TP group)."""
    local = {n: p.grad for n, p in model.named_parameters()}
    return _gather(model, local, grad=True)
