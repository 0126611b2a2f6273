"""Column- and row-parallel linear layers, ours and megatron-core's, with full-weight helpers.

Two implementations with one interface (``weight``/``bias`` are this rank's shards,
``forward`` returns a tensor, ``from_full_weight``/``full_weight``/``full_bias``):

* :class:`ColumnParallelLinear`, :class:`RowParallelLinear` -- ours: ``F.linear`` between
  the autograd Functions of :mod:`.collectives`. Device-agnostic (gloo/CPU, NCCL/CUDA) and
  correct under double backward (forces by autograd, then a loss on forces). **Use these in
  the TP blocks.**
* :class:`MegatronColumnParallelLinear`, :class:`MegatronRowParallelLinear` -- thin wrappers
  of megatron-core 0.16.1's layers (``use_cpu_initialization=True``, ``gather_output=False``,
  ``input_is_parallel=True``; ``forward`` drops the ``(output, bias)`` tuple's bias). Their
  first-order gradients match ours, but their second-order gradients are wrong whenever the
  energy is a nonlinear function of the row-parallel output: ``_ReduceFromModelParallelRegion``
  has an identity backward that is not recorded in the graph, so double backward misses the
  all-reduce that sums the ranks' contributions to d(loss)/d(grad_output). A toy whose energy
  is ``y.sum()`` (zero second derivative) hides it. Evidence: ``tests/parallel/test_parallel_linear.py``.
  Kept for comparison and for megatron-core interop.

Sharding (``nn.Linear`` convention, weight ``[out, in]``):

* column: weight rows (output units) split, ``[out / tp, in]``; bias split ``[out / tp]``.
  Input replicated ``[..., in]``, output sharded ``[..., out / tp]`` (or gathered).
* row: weight columns (input units) split, ``[out, in / tp]``; bias replicated ``[out]``,
  added once after the all-reduce. Input sharded ``[..., in / tp]``, output replicated.

Initialisation follows megatron's ``use_cpu_initialization``: every rank draws the full
``nn.Linear(in, out)`` weight from the default generator and keeps its slice, so ranks seeded
alike hold consistent shards of the very matrix ``nn.Linear`` would draw after the same
``torch.manual_seed`` (costs one full weight of memory per rank, once, at construction).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .collectives import (
    all_gather_along_dim,
    copy_to_tp_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    scatter_to_tp_region,
)
from .layout import ParallelLayout

__all__ = [
    "ColumnParallelLinear",
    "MegatronColumnParallelLinear",
    "MegatronRowParallelLinear",
    "RowParallelLinear",
    "shard",
]


def shard(full: torch.Tensor, dim: int, group, *, rank: int | None = None, size: int | None = None) -> torch.Tensor:
    """This rank's contiguous slice of ``full`` along ``dim`` (a copy; group order).

    ``rank``/``size`` (the layout's ``tp_rank``/``tp``) replace the group's, so that a layout
    without process groups (building one rank's shards on the meta device) shards the same way.
    """
    size = group_size(group) if size is None else size
    rank = group_rank(group) if rank is None else rank
    if full.shape[dim] % size:
        raise ValueError(f"dim {dim} of a {tuple(full.shape)} tensor is not divisible by the group size {size}")
    return full.chunk(size, dim)[rank].clone()


class _ShardedLinear(nn.Module):
    """Shared helpers. Subclasses set ``_weight_dim`` (0 column, 1 row), ``_bias_sharded`` and
    ``tp_sharded_parameters``: the names of their parameters that are split over the TP group (the
    public mark that gradient clipping reads, gnnmegatron/training/distributed.py)."""

    _weight_dim: int
    _bias_sharded: bool
    tp_sharded_parameters: tuple[str, ...]
    _param_prefix = ""  # where weight/bias live in this module's state dict ("layer." for megatron's)
    tp_group = None
    tp = 1
    tp_rank = 0
    in_features: int
    out_features: int

    def _set_layout(self, layout: ParallelLayout) -> None:
        self.tp_group = layout.tp_group
        self.tp = layout.tp
        self.tp_rank = layout.tp_rank

    def shard_pieces(self) -> dict:
        """Where this rank's weight and bias sit in the full ``[out, in]`` / ``[out]`` tensors
        (``gnnmegatron.parallel.sharding``)."""
        from .sharding import sharded_piece, whole_piece

        pre = self._param_prefix
        out = {pre + "weight": [sharded_piece("weight", self.weight.shape, self._weight_dim, self.tp_rank, self.tp)]}
        if self.bias is not None:
            out[pre + "bias"] = [sharded_piece("bias", self.bias.shape, 0, self.tp_rank, self.tp)
                                 if self._bias_sharded else whole_piece("bias", self.bias.shape)]
        return out

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy this rank's shard of a full ``[out, in]`` weight (and ``[out]`` bias) in place."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"full weight has shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}"
            )
        self.weight.copy_(shard(weight, self._weight_dim, self.tp_group, rank=self.tp_rank, size=self.tp))
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias given: {bias is not None}, layer has bias: {self.bias is not None}")
        if bias is not None:
            self.bias.copy_(shard(bias, 0, self.tp_group, rank=self.tp_rank, size=self.tp) if self._bias_sharded else bias)

    def full_weight(self) -> torch.Tensor:
        """The full ``[out, in]`` weight, gathered from the TP group (no autograd)."""
        return all_gather_along_dim(self.weight.detach(), self._weight_dim, self.tp_group, name="full_weight")

    def full_bias(self) -> torch.Tensor | None:
        """The full ``[out]`` bias (gathered for column layers), or None."""
        if self.bias is None:
            return None
        if not self._bias_sharded:
            return self.bias.detach()
        return all_gather_along_dim(self.bias.detach(), 0, self.tp_group, name="full_weight")

    def full_weight_grad(self) -> torch.Tensor | None:
        """The full ``[out, in]`` gradient of the weight (tests compare it to nn.Linear's)."""
        if self.weight.grad is None:
            return None
        return all_gather_along_dim(self.weight.grad, self._weight_dim, self.tp_group, name="full_weight")

    def full_bias_grad(self) -> torch.Tensor | None:
        """The full ``[out]`` gradient of the bias, or None."""
        if self.bias is None or self.bias.grad is None:
            return None
        if not self._bias_sharded:
            return self.bias.grad
        return all_gather_along_dim(self.bias.grad, 0, self.tp_group, name="full_weight")

    @classmethod
    def from_full_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, layout: ParallelLayout, **kwargs):
        """Build the layer holding this rank's shard of a single-device ``[out, in]`` weight."""
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, layout, bias=bias is not None, dtype=weight.dtype, device=weight.device, **kwargs
        )
        layer.load_full_weight(weight, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: ParallelLayout, **kwargs):
        """``from_full_weight(linear.weight, linear.bias, layout)``."""
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_full_weight(linear.weight.detach(), bias, layout, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp}, bias={self.bias is not None}"


def _init_from_nn_linear(layer: _ShardedLinear, bias: bool, device, dtype) -> None:
    full = nn.Linear(layer.in_features, layer.out_features, bias=bias, device=device, dtype=dtype)
    layer.load_full_weight(full.weight.detach(), None if full.bias is None else full.bias.detach())


class ColumnParallelLinear(_ShardedLinear):
    """``y = x A^T + b`` with A's output rows split over the TP group.

    Communication: fwd none (``copy_to_tp_region``: identity; ``gather_output``: an
    all-gather of ``[..., out]``), bwd one all-reduce of dX ``[..., in]``.

    Args:
        in_features, out_features: full sizes; ``out_features`` divisible by ``layout.tp``.
        layout: the parallel layout (its ``tp_group`` is used).
        bias: learn a bias (sharded like the output).
        gather_output: all-gather the output to ``[..., out]`` (default: keep it sharded).
        name: label for CommCounter records.

    Shapes:
        x: ``[N, in]`` (replicated) -> ``[N, out / tp]`` (or ``[N, out]`` if gathered).
    """

    _weight_dim = 0
    _bias_sharded = True
    tp_sharded_parameters = ("weight", "bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        layout: ParallelLayout,
        bias: bool = True,
        *,
        gather_output: bool = False,
        name: str = "column_linear",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._set_layout(layout)
        self.gather_output = gather_output
        self.name = name
        local = layout.check_divisible(out_features, "out_features")
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(local, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(local, **kw)) if bias else None
        _init_from_nn_linear(self, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp_region(x, self.tp_group, self.name)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_tp_region(y, self.tp_group, self.name)
        return y


class RowParallelLinear(_ShardedLinear):
    """``y = x A^T + b`` with A's input columns split over the TP group; output summed.

    Communication: fwd one all-reduce of ``[..., out]`` (``reduce_from_tp_region``), bwd none
    (with ``input_is_parallel=False`` the bwd also all-gathers dX).

    Args:
        in_features, out_features: full sizes; ``in_features`` divisible by ``layout.tp``.
        layout: the parallel layout.
        bias: learn a bias (replicated, added after the all-reduce).
        input_is_parallel: the input is already sharded ``[..., in / tp]`` (default);
            otherwise it is split here.
        name: label for CommCounter records.

    Shapes:
        x: ``[N, in / tp]`` -> ``[N, out]`` (replicated).
    """

    _weight_dim = 1
    _bias_sharded = False
    tp_sharded_parameters = ("weight",)  # the bias is replicated, added after the all-reduce

    def __init__(
        self,
        in_features: int,
        out_features: int,
        layout: ParallelLayout,
        bias: bool = True,
        *,
        input_is_parallel: bool = True,
        name: str = "row_linear",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._set_layout(layout)
        self.input_is_parallel = input_is_parallel
        self.name = name
        local = layout.check_divisible(in_features, "in_features")
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, local, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        _init_from_nn_linear(self, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group, self.name)
        y = reduce_from_tp_region(F.linear(x, self.weight), self.tp_group, self.name)
        return y if self.bias is None else y + self.bias


# ----------------------------------------------------------------------------- megatron-core
def _megatron_config(layout: ParallelLayout, dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=layout.tp,
        use_cpu_initialization=True,  # megatron's GPU init path allocates on CUDA
        perform_initialization=True,
        params_dtype=dtype or torch.get_default_dtype(),
    )


def _nn_linear_init(weight: torch.Tensor) -> None:
    # nn.Linear's weight init (kaiming-uniform, a = sqrt(5)); megatron zeroes the bias.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class _MegatronLinear(_ShardedLinear):
    """Holds a megatron-core layer as ``self.layer``; ``weight``/``bias`` are its parameters.

    Subclasses name the megatron-core class (``_mcore_name``), the dimension split over tp
    (``_sharded_features``) and the extra constructor arguments (``_mcore_kwargs``).
    """

    layer: nn.Module
    _param_prefix = "layer."
    _mcore_name: str
    _sharded_features: str
    _mcore_kwargs: dict

    def __init__(
        self,
        in_features: int,
        out_features: int,
        layout: ParallelLayout,
        bias: bool = True,
        *,
        init_method: Callable | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        from megatron.core import tensor_parallel

        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("the megatron wrappers build on CPU (use_cpu_initialization); move the module afterwards")
        self.in_features, self.out_features = in_features, out_features
        self._set_layout(layout)
        layout.check_divisible(getattr(self, self._sharded_features), self._sharded_features)
        self.layer = getattr(tensor_parallel, self._mcore_name)(
            in_features,
            out_features,
            config=_megatron_config(layout, dtype),
            init_method=init_method or _nn_linear_init,
            bias=bias,
            tp_group=layout.tp_group,
            **self._mcore_kwargs,
        )

    @property
    def weight(self) -> nn.Parameter:
        return self.layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.layer(x)
        return out


class MegatronColumnParallelLinear(_MegatronLinear):
    """megatron-core ``ColumnParallelLinear`` (``gather_output=False``), forward returns a tensor.

    Not differentiable twice correctly in general (see the module docstring). Needs
    megatron-core; ``layout.tp_group`` is passed explicitly.
    """

    _weight_dim = 0
    _bias_sharded = True
    tp_sharded_parameters = ("weight", "bias")
    _mcore_name = "ColumnParallelLinear"
    _sharded_features = "out_features"
    _mcore_kwargs = {"gather_output": False}


class MegatronRowParallelLinear(_MegatronLinear):
    """megatron-core ``RowParallelLinear`` (``input_is_parallel=True``), forward returns a tensor.

    Not differentiable twice correctly in general (see the module docstring).
    """

    _weight_dim = 1
    _bias_sharded = False
    tp_sharded_parameters = ("weight",)
    _mcore_name = "RowParallelLinear"
    _sharded_features = "in_features"
    _mcore_kwargs = {"input_is_parallel": True, "skip_bias_add": False}

