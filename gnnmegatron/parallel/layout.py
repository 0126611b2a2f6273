"""Process layout: tensor (tp), pipeline (pp) and data (dp) parallel sizes and their groups.

A :class:`ParallelLayout` is passed explicitly to every parallel block; nothing here adds a
global. ``init_layout`` builds the groups with megatron-core's
``parallel_state.initialize_model_parallel`` (checked on gloo/CPU with torch 2.13 and
megatron-core 0.16.1: it allocates nothing on CUDA), so megatron-core layers that look the
groups up there agree with ours. ``groups="torch"`` builds the same groups with
``torch.distributed.new_group`` instead, for installs without megatron-core.

Rank order is Megatron's default ``order="tp-cp-ep-dp-pp"`` (cp = ep = 1 here): tp varies
fastest, then dp, then pp::

    global_rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so a TP group is ``tp`` consecutive ranks (one node's GPUs, over NVLink). Example, 8 ranks,
tp=2, pp=2, dp=2: tp groups [0,1] [2,3] [4,5] [6,7]; dp groups [0,2] [1,3] [4,6] [5,7];
pp groups [0,4] [1,5] [2,6] [3,7].

``single()`` is the tp=pp=dp=1 layout; it needs no ``torch.distributed`` (its groups are
``None``, which the collectives treat as "one rank, no communication").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ParallelLayout", "destroy_layout", "init_layout", "rank_of", "single"]


def _check_sizes(tp: int, pp: int, dp: int, world_size: int) -> None:
    for name, v in (("tp", tp), ("pp", pp), ("dp", dp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if tp * pp * dp != world_size:
        raise ValueError(f"tp*pp*dp={tp}*{pp}*{dp}={tp * pp * dp} but world size is {world_size}")


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """Global rank in Megatron's default order (tp fastest, then dp, then pp)."""
    return tp_rank + tp * (dp_rank + dp * pp_rank)


@dataclass(frozen=True, eq=False)
class ParallelLayout:
    """Parallel sizes, this rank's groups and the global ranks in them.

    Attributes:
        tp, pp, dp: tensor-, pipeline- and data-parallel sizes; ``tp*pp*dp == world_size``.
        rank, world_size: this process in the default group.
        tp_group, pp_group, dp_group: ``torch.distributed`` groups containing this rank.
            ``None`` means a one-rank group (``single()``, and size-1 dims of
            ``groups="torch"`` layouts); the collectives then return early.
        tp_ranks, pp_ranks, dp_ranks: global ranks of each group, in group-rank order.
        source: "megatron" (megatron-core parallel_state), "torch" (new_group) or "single".
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    world_size: int = 1
    tp_group: Any = field(default=None, repr=False)
    pp_group: Any = field(default=None, repr=False)
    dp_group: Any = field(default=None, repr=False)
    tp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    source: str = "single"

    def __post_init__(self) -> None:
        _check_sizes(self.tp, self.pp, self.dp, self.world_size)
        for name, size, ranks in (
            ("tp", self.tp, self.tp_ranks),
            ("pp", self.pp, self.pp_ranks),
            ("dp", self.dp, self.dp_ranks),
        ):
            if len(ranks) != size or self.rank not in ranks:
                raise ValueError(f"{name}_ranks={ranks} must hold {size} ranks including rank {self.rank}")

    @property
    def tp_rank(self) -> int:
        """Rank inside the tensor-parallel group (which hidden-unit slice this rank holds)."""
        return self.tp_ranks.index(self.rank)

    @property
    def pp_rank(self) -> int:
        """Pipeline stage of this rank."""
        return self.pp_ranks.index(self.rank)

    @property
    def dp_rank(self) -> int:
        """Data-parallel replica index of this rank."""
        return self.dp_ranks.index(self.rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def check_divisible(self, size: int, what: str = "hidden") -> int:
        """Return ``size // tp``; raise ``ValueError`` naming ``what`` if tp does not divide it."""
        if size % self.tp:
            raise ValueError(
                f"{what} size {size} is not divisible by tp={self.tp} ({size} % {self.tp} = {size % self.tp})"
            )
        return size // self.tp


def single() -> ParallelLayout:
    """The tp=pp=dp=1 layout; works with or without ``torch.distributed``."""
    return ParallelLayout()


def _ensure_default_group() -> None:
    if dist.is_available() and dist.is_initialized():
        return
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # launched by torchrun
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        return
    raise RuntimeError(
        "torch.distributed is not initialised: launch with torchrun (or call "
        "torch.distributed.init_process_group) before init_layout, or use single()"
    )


def init_layout(
    tp: int = 1, pp: int = 1, dp: int | None = None, *, groups: str = "megatron", **megatron_kwargs
) -> ParallelLayout:
    """Create the tp/pp/dp groups on every rank (collective: all ranks must call it).

    Args:
        tp: tensor-parallel size (ranks sharing one block's hidden units).
        pp: pipeline-parallel size (stages).
        dp: data-parallel size; default ``world_size // (tp * pp)``.
        groups: "megatron" (``parallel_state.initialize_model_parallel``; needed by
            megatron-core's layers) or "torch" (``torch.distributed.new_group``, same order).
        **megatron_kwargs: passed to ``initialize_model_parallel`` (e.g.
            ``create_gloo_process_groups=True`` for megatron's distributed optimizer on
            NCCL; off by default: the extra gloo groups cost start-up time and nothing here
            uses them).

    Raises:
        ValueError: sizes that do not multiply to the world size, e.g.
            "tp*pp*dp=2*1*3=6 but world size is 4".
        RuntimeError: ``torch.distributed`` not initialised (and not under torchrun), or
            megatron's parallel_state already initialised.

    With tp=pp=dp=1 and no ``torch.distributed``, returns :func:`single`.
    """
    no_dist = not (dist.is_available() and dist.is_initialized()) and "WORLD_SIZE" not in os.environ
    if no_dist and tp == pp == (dp or 1) == 1:
        return single()
    _ensure_default_group()
    world = dist.get_world_size()
    rank = dist.get_rank()
    if dp is None:
        _check_sizes(tp, pp, 1, tp * pp)
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not divisible by tp*pp={tp}*{pp}={tp * pp}")
        dp = world // (tp * pp)
    _check_sizes(tp, pp, dp, world)

    if groups == "megatron":
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            raise RuntimeError("megatron-core parallel_state is already initialised; call destroy_layout() first")
        megatron_kwargs.setdefault("create_gloo_process_groups", False)
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            order="tp-cp-ep-dp-pp",
            **megatron_kwargs,
        )
        tp_group = ps.get_tensor_model_parallel_group()
        pp_group = ps.get_pipeline_model_parallel_group()
        dp_group = ps.get_data_parallel_group()
        ranks = [tuple(dist.get_process_group_ranks(g)) for g in (tp_group, pp_group, dp_group)]
        layout = ParallelLayout(tp, pp, dp, rank, world, tp_group, pp_group, dp_group, *ranks, source="megatron")
        expected = _expected_ranks(rank, tp, pp, dp)
        if (layout.tp_ranks, layout.pp_ranks, layout.dp_ranks) != expected:  # pragma: no cover
            raise RuntimeError(f"megatron's groups {ranks} differ from the documented order {expected}")
        return layout
    if groups == "torch":
        if megatron_kwargs:
            raise TypeError(f"megatron keyword arguments {sorted(megatron_kwargs)} need groups='megatron'")
        return _torch_layout(tp, pp, dp, rank, world)
    raise ValueError(f"groups must be 'megatron' or 'torch', got {groups!r}")


def _expected_ranks(rank: int, tp: int, pp: int, dp: int) -> tuple[tuple[int, ...], ...]:
    t, d, p = rank % tp, (rank // tp) % dp, rank // (tp * dp)
    return (
        tuple(rank_of(i, d, p, tp, dp) for i in range(tp)),
        tuple(rank_of(t, d, i, tp, dp) for i in range(pp)),
        tuple(rank_of(t, i, p, tp, dp) for i in range(dp)),
    )


def _torch_layout(tp: int, pp: int, dp: int, rank: int, world: int) -> ParallelLayout:
    """Same groups as megatron's, from new_group. Size-1 groups are None (no communicator)."""
    mine: dict[str, Any] = {"tp": None, "pp": None, "dp": None}
    # new_group is collective over the world: every rank creates every group, same order.
    for kind, size in (("tp", tp), ("dp", dp), ("pp", pp)):
        if size == 1:
            continue
        seen: set[tuple[int, ...]] = set()
        for r in range(world):
            members = dict(zip(("tp", "pp", "dp"), _expected_ranks(r, tp, pp, dp)))[kind]
            if members in seen:
                continue
            seen.add(members)
            group = dist.new_group(list(members))
            if rank in members:
                mine[kind] = group
    tp_r, pp_r, dp_r = _expected_ranks(rank, tp, pp, dp)
    return ParallelLayout(tp, pp, dp, rank, world, mine["tp"], mine["pp"], mine["dp"], tp_r, pp_r, dp_r, source="torch")


def destroy_layout(layout: ParallelLayout | None = None) -> None:
    """Release a layout's groups (megatron's parallel_state, or our new_groups).

    The default process group is left alone: whoever initialised it destroys it. With no
    argument, resets megatron-core's parallel_state if it is initialised.
    """
    if layout is None or layout.source == "megatron":
        import sys

        ps = sys.modules.get("megatron.core.parallel_state")
        if ps is not None and ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        return
    if layout.source == "torch":
        for g in (layout.tp_group, layout.pp_group, layout.dp_group):
            if g is not None:
                dist.destroy_process_group(g)
