"""What a training checkpoint holds, as DCP state dicts of shard pieces (``sharded_checkpoint``).

* ``model/<key>``: the model's parameters and persistent buffers (single-device keys);
* ``optim/<key>/exp_avg``, ``optim/<key>/exp_avg_sq`` (pieces like the parameter's) and
  ``optim/<key>/step`` (a scalar): AdamW's state of each parameter this rank's optimizer
  steps -- all of them, or under ZeRO-1 only the ones its data-parallel rank owns;
* ``meta``: step, epoch, counters, sampler position, configs, data statistics;
* ``rng/rank<r>``: each rank's RNG states.

Loading builds the same dicts around this rank's own tensors (and freshly allocated optimizer
state) and lets DCP fill them: each rank reads exactly the regions its pieces cover.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gnnmegatron.parallel.sharding import local_pieces
from gnnmegatron.training.build import local_tensors
from gnnmegatron.training.sharded_checkpoint import ShardedTensorPieces, pieces_state

__all__ = ["apply_optimizer_state", "model_state", "optimizer_state"]

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def model_state(model: nn.Module) -> dict[str, ShardedTensorPieces]:
    """``model/<key>`` entries over this rank's tensors (for saving and, in place, for loading)."""
    return pieces_state(local_tensors(model), local_pieces(model), "model/")


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the state: ZeRO-1's local AdamW, or the optimizer itself."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in _inner(optimizer).param_groups for p in group["params"]]


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, *, fresh: bool = False):
    """``optim/<key>/...`` entries of the parameters this rank's optimizer steps.

    Returns the DCP dict (saving: only parameters that have state). With ``fresh=True`` it
    returns ``(dict, pending)``: zero state allocated for every such parameter, to load into,
    and what :func:`apply_optimizer_state` installs afterwards.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    pieces = local_pieces(model)
    inner = _inner(optimizer)
    out: dict[str, Any] = {}
    pending = []
    for p in _params(optimizer):
        name = names[id(p)]
        st = inner.state.get(p) or {}
        if fresh:
            st = {"step": torch.zeros((), dtype=torch.float32), **{k: torch.zeros_like(p) for k in ADAM_KEYS}}
        elif not st:
            continue
        key = pieces[name][0].key
        for k in ADAM_KEYS:
            out.update(pieces_state({name: st[k]}, {name: pieces[name]}, "optim/", f"/{k}"))
        step = st["step"]
        out[f"optim/{key}/step"] = step if torch.is_tensor(step) else torch.tensor(float(step))
        pending.append((p, key, st))
    return (out, pending) if fresh else out


def apply_optimizer_state(optimizer: torch.optim.Optimizer, pending: list, loaded: Mapping[str, Any]) -> int:
    """Install the ``fresh`` state of :func:`optimizer_state` once DCP filled it; returns how many
    parameters got state. A parameter whose entries the checkpoint lacks (it had no state yet)
    keeps none, as in an uninterrupted run."""
    inner = _inner(optimizer)
    count = 0
    for p, key, st in pending:
        if all(f"optim/{key}/{k}" in loaded for k in (*ADAM_KEYS, "step")):
            inner.state[p] = st
            count += 1
        else:
            inner.state.pop(p, None)
    return count


@torch.no_grad()
def load_full_into(model: nn.Module, full: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy this rank's regions of a single-device state dict ``full`` into ``model`` (any layout).

    Raises ``CheckpointError`` naming missing keys or mismatched shapes (another model).
    """
    from gnnmegatron.training.checkpoint import CheckpointError

    pieces = local_pieces(model)
    tensors = local_tensors(model)
    missing = sorted({p.key for plist in pieces.values() for p in plist} - set(full))
    if missing:
        raise CheckpointError(f"{where} does not fit this model: it lacks {missing[:5]}; it was written by another model")
    for name, t in tensors.items():
        for p in pieces[name]:
            src = full[p.key]
            if tuple(src.shape) != tuple(p.global_shape):
                raise CheckpointError(f"{where}: {p.key} has shape {tuple(src.shape)} but this model's is "
                                      f"{tuple(p.global_shape)}; it was written by another model")
            region = tuple(slice(o, o + n) for o, n in zip(p.offsets, p.sizes))
            t[p.local].copy_(src[region].to(device=t.device, dtype=t.dtype))
