"""Count what the collectives in :mod:`gnnmegatron.parallel.collectives` communicate.

``CommCounter`` is a context manager: every collective issued through ``collectives.py``
while one is active (forward, backward and double backward alike) appends a
:class:`CommRecord`, so tests can assert exact communicated volumes, e.g. "two all-reduces
of N x H fp32 per block forward, no E x H tensor ever". Collectives that return early
(a group of one rank) communicate nothing and record nothing; ``split`` (a local slice)
records nothing either.

Direction is set by who issues the call: a region function called by model code records
"fwd" (so does a forward recomputed by activation checkpointing during backward); the paired
Function applied inside a ``backward`` records "bwd".

Zero overhead when inactive: the collectives test ``if _ACTIVE:`` (one truthiness check of
a module-level list) before building a record.

The active counters are process-wide, not thread-local, on purpose: on CUDA the autograd
engine runs backward on its own device thread, and those collectives must be counted too.

Example::

    with CommCounter() as cc:
        loss = model(x).sum()
        loss.backward()
    assert cc.total_bytes(op="all_reduce", direction="fwd") == 2 * N * H * 4
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

import torch

__all__ = ["CommCounter", "CommRecord"]

# Counters currently active (innermost last). Mutated in place; collectives.py reads it.
_ACTIVE: list[CommCounter] = []


@dataclass(frozen=True)
class CommRecord:
    """One collective call on this rank.

    Attributes:
        name: the caller's label ("copy_to_tp_region", "edge_scalars", a layer's name, ...).
        op: "all_reduce" or "all_gather".
        shape: shape of the tensor this rank hands to the collective (all-gather: its shard).
        dtype: its dtype.
        bytes: ``numel * element_size`` of that tensor: the payload this rank contributes.
            Wire traffic depends on the algorithm (a ring all-reduce sends about
            ``2 (g-1)/g * bytes``); the payload is what a layout decides and what tests pin.
        group_size: ranks in the group.
        direction: "fwd" when issued by a forward, "bwd" when issued by a backward (first or
            higher order).
        seconds: wall time this rank spent in the call. Collectives on CPU tensors (gloo) block:
            the transfer plus waiting for the group's slower ranks. On CUDA tensors (NCCL) the call
            only enqueues the collective on the stream, so this is the launch, not the transfer.
    """

    name: str
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bytes: int
    group_size: int
    direction: str
    seconds: float = 0.0


class CommCounter:
    """Record every collective issued through ``collectives.py`` while active.

    Counters nest; each active counter gets every record.
    """

    def __init__(self) -> None:
        self.records: list[CommRecord] = []

    def __enter__(self) -> Self:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        # Remove this counter (not simply the last one: exits may interleave across threads).
        for i in range(len(_ACTIVE) - 1, -1, -1):
            if _ACTIVE[i] is self:
                del _ACTIVE[i]
                break

    def select(
        self, *, name: str | None = None, op: str | None = None, direction: str | None = None
    ) -> list[CommRecord]:
        """Records matching every given field."""
        return [
            r
            for r in self.records
            if (name is None or r.name == name)
            and (op is None or r.op == op)
            and (direction is None or r.direction == direction)
        ]

    def count(self, **fields) -> int:
        """Number of matching records (fields as in :meth:`select`)."""
        return len(self.select(**fields))

    def total_bytes(self, **fields) -> int:
        """Sum of ``bytes`` over matching records (fields as in :meth:`select`)."""
        return sum(r.bytes for r in self.select(**fields))

    def total_seconds(self, **fields) -> float:
        """Sum of ``seconds`` over matching records (fields as in :meth:`select`)."""
        return sum(r.seconds for r in self.select(**fields))

    def summary(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """``{(name, op, direction): (calls, bytes)}``."""
        out: dict[tuple[str, str, str], tuple[int, int]] = {}
        for r in self.records:
            key = (r.name, r.op, r.direction)
            calls, nbytes = out.get(key, (0, 0))
            out[key] = (calls + 1, nbytes + r.bytes)
        return out

    def clear(self) -> None:
        self.records.clear()

    def __repr__(self) -> str:
        rows: Iterable[str] = (f"{k}: {v[0]} calls, {v[1]} B" for k, v in self.summary().items())
        return "CommCounter(" + "; ".join(rows) + ")"


def _record(name: str, op: str, tensor: torch.Tensor, group_size: int, direction: str, seconds: float = 0.0) -> None:
    """Append one record to every active counter (call only when ``_ACTIVE`` is non-empty)."""
    rec = CommRecord(
        name=name,
        op=op,
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        bytes=tensor.numel() * tensor.element_size(),
        group_size=group_size,
        direction=direction,
        seconds=seconds,
    )
    for counter in _ACTIVE:
        counter.records.append(rec)
