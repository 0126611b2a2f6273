"""Exponential moving average (EMA) of the weights, per rank and shard: ``train.ema_decay``.

After every optimizer step that updates the weights, ``ema <- decay * ema + (1 - decay) * w``
(the first update copies ``w``), computed by torch's ``AveragedModel`` with
``get_ema_multi_avg_fn`` (one ``_foreach_lerp_`` per device and dtype). Each rank averages the
parameters it holds: a tensor-parallel shard, a pipeline stage's blocks, a data-parallel
replica's copy (identical on every replica, since the weights are). The average is elementwise,
so the shards of the averaged tensors are exactly the averaged shards: the single-device EMA
under any layout (tests/training/test_ema.py checks tp = 2 and pp = 2 against one process).

``AveragedModel`` deep-copies the module it is given. Here that module is a *holder*: a plain
``nn.Module`` whose parameters are detached clones of the model's parameters, in
``model.parameters()`` order, so the copy never touches the model's process groups, pipeline
wiring or activation-checkpointing wrappers, and the averaged tensors are plain local tensors with
the same shard pieces as the parameters (``gnnmegatron.parallel.sharding``). Checkpoints store them
as ``ema/<single-device key>`` (``state``), resharded on load like the weights. Buffers (reference
energies, normalisation) are not averaged: they are set once, not trained.

Validation, the best checkpoint and inference use the averaged weights by default: ``swapped``
copies them into the model for a block of code and restores the trained weights afterwards (a
copy, so training continues bit for bit as without the swap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gnnmegatron.parallel.sharding import local_pieces
from gnnmegatron.training.sharded_checkpoint import ShardedTensorPieces, pieces_state

__all__ = ["EMA_PREFIX", "WeightEMA"]

EMA_PREFIX = "ema/"


class _Holder(nn.Module):
    """The parameters of a model as one flat list (what ``AveragedModel`` copies and averages)."""

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        self.values = nn.ParameterList(nn.Parameter(p.detach().clone(), requires_grad=False) for p in params)


class _Parameters:
    """What ``AveragedModel.update_parameters`` reads of a model: its parameters, and no buffers to keep in
    sync (the holder has none)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params

    def parameters(self):
        return iter(self.params)

    def buffers(self):
        return iter(())


class WeightEMA:
    """The EMA of this rank's parameters of ``model``.

    Args:
        model: this rank's model (an ``AtomisticModel``, a ``PipelineStageModel``, parallelized or not).
        decay: in (0, 1): the weight of the previous average at each update.

    Attributes:
        names: local parameter names, in ``model.parameters()`` order.
        averaged: the ``AveragedModel`` (``averaged.n_averaged``: updates so far).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.averaged = AveragedModel(_Holder([p for _, p in named]), multi_avg_fn=get_ema_multi_avg_fn(self.decay),
                                      use_buffers=False)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """``{local parameter name: averaged tensor}``."""
        return dict(zip(self.names, self.averaged.module.values))

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def _check(self, model: nn.Module) -> list[torch.Tensor]:
        params = list(model.parameters())
        if len(params) != len(self.names):
            raise RuntimeError(f"the EMA holds {len(self.names)} tensors but the model has {len(params)} parameters")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the model's current parameters (the first copies them)."""
        self.averaged.update_parameters(_Parameters(self._check(model)))

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start over from the model's current parameters (no update counted yet)."""
        for avg, p in zip(self.averaged.module.values, self._check(model)):
            avg.copy_(p.detach())
        self.averaged.n_averaged.zero_()

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in ``model`` inside the block; the trained ones restored after it."""
        params = self._check(model)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], list(self.averaged.module.values))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], saved)

    def state(self, model: nn.Module) -> dict[str, ShardedTensorPieces]:
        """``ema/<single-device key>`` DCP entries over the averaged tensors (saving and, in place, loading)."""
        pieces = local_pieces(model)
        return pieces_state(self.tensors, {n: pieces[n] for n in self.names}, EMA_PREFIX)

    def meta(self) -> dict[str, float | int]:
        return {"decay": self.decay, "updates": self.updates}

    def load_meta(self, meta: dict) -> None:
        self.averaged.n_averaged.fill_(int(meta.get("updates", 0)))
