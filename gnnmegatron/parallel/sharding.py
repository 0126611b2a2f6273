"""Where each local tensor of a parallel model sits in the single-device model: shard pieces.

Every parameter and persistent buffer a rank holds is one or more *pieces* of a tensor of the
single-device ``AtomisticModel`` (its *global* tensor, named by its single-device state-dict
key). A piece says which region of the local tensor holds which region of the global one:

* replicated tensors (embedding, heads, norms, row-parallel biases) and everything of a
  pipeline stage: one piece covering the whole tensor, offsets 0;
* column-parallel weights and biases: one piece, offset ``tp_rank * out / tp`` in dim 0;
* row-parallel weights: one piece, offset ``tp_rank * in / tp`` in dim 1;
* the dense TP block's node MLP weight ``[W0h[:, sl] | W0m[:, sl]]``: two pieces, columns
  ``sl`` and ``H + sl`` of the global ``[H, 2H]`` weight;
* a TP block's grouped message weight ``node_mix``: offset ``tp_rank * G / tp`` in dim 0.

The same map serves three things, so that they can never disagree: layout-independent
initialisation (``gnnmegatron.models.init.materialize`` generates exactly each piece's region
of the global tensor), sharded checkpoints (each rank writes its pieces with their global
offsets, and loading reads whatever regions its own pieces cover: resharding), and export to
a single-device state dict.

A module takes part by defining ``shard_pieces() -> {local name: [Piece, ...]}`` with keys
relative to itself (the TP blocks and parallel linears do); every other parameter or buffer is
replicated under its own name. Pipeline stages keep single-device names (blocks live in a
``ModuleDict`` keyed by their global index), so their tensors are whole pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Piece", "local_pieces", "whole_piece"]


@dataclass(frozen=True)
class Piece:
    """One region of a local tensor and the region of the global tensor it holds.

    Attributes:
        key: single-device state-dict name of the global tensor.
        global_shape: shape of the global tensor.
        local: region of the local tensor (one ``slice`` per dim).
        offsets: start of the region in the global tensor, per dim; its size is the local
            region's size.
    """

    key: str
    global_shape: tuple[int, ...]
    local: tuple[slice, ...]
    offsets: tuple[int, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Size of the region per dim (local slices always have explicit bounds)."""
        return tuple(s.stop - s.start for s in self.local)

    def renamed(self, key: str) -> "Piece":
        return Piece(key, self.global_shape, self.local, self.offsets)


def whole_piece(key: str, shape: tuple[int, ...] | torch.Size) -> Piece:
    """A tensor that is its whole global tensor (replicated, or a pipeline stage's own)."""
    shape = tuple(int(n) for n in shape)
    return Piece(key, shape, tuple(slice(0, n) for n in shape), (0,) * len(shape))


def sharded_piece(key: str, local_shape, dim: int, rank: int, parts: int, global_size: int | None = None) -> Piece:
    """A tensor that is part ``rank`` of ``parts`` equal contiguous parts of the global tensor along ``dim``."""
    local_shape = tuple(int(n) for n in local_shape)
    shape = list(local_shape)
    shape[dim] = local_shape[dim] * parts if global_size is None else global_size
    offsets = [0] * len(shape)
    offsets[dim] = rank * local_shape[dim]
    return Piece(key, tuple(shape), tuple(slice(0, n) for n in local_shape), tuple(offsets))


def _persistent_buffers(module: nn.Module, prefix: str = ""):
    """(name, buffer) of the persistent buffers, as ``state_dict`` lists them."""
    for mod_name, mod in module.named_modules(prefix=prefix.rstrip(".")):
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def local_pieces(model: nn.Module) -> dict[str, list[Piece]]:
    """``{local state-dict name: [Piece, ...]}`` for every parameter and persistent buffer of ``model``.

    Modules with a ``shard_pieces()`` method map their own tensors (keys relative to the module,
    prefixed here with its name); the rest map to themselves. Every local tensor appears once.
    """
    out: dict[str, list[Piece]] = {}
    claimed: set[str] = set()
    for mod_name, mod in model.named_modules():
        fn = getattr(mod, "shard_pieces", None)
        if fn is None or any(mod_name == c or mod_name.startswith(c + ".") for c in claimed):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for local, pieces in fn().items():
            out[prefix + local] = [p.renamed(prefix + p.key) for p in pieces]
        claimed.add(mod_name)
    tensors = dict(model.named_parameters())
    tensors.update(dict(_persistent_buffers(model)))
    for name, t in tensors.items():
        if name not in out:
            if any(name.startswith(c + ".") for c in claimed if c):
                raise RuntimeError(f"{name} lies in a module with shard_pieces() that does not map it")
            out[name] = [whole_piece(name, t.shape)]
    missing = sorted(set(out) - set(tensors))
    if missing:
        raise RuntimeError(f"shard_pieces() names tensors the model does not have: {missing[:5]}")
    return out


def check_coverage(pieces_by_rank: list[dict[str, list[Piece]]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise if the pieces of all ranks do not cover each global tensor exactly (tests and export).

    Args:
        pieces_by_rank: ``local_pieces`` of every rank of one model replica.
        shapes: global shape per key (e.g. the single-device state dict's).
    """
    import numpy as np

    count = {k: np.zeros(s, dtype=np.int32) for k, s in shapes.items()}
    for pieces in pieces_by_rank:
        for plist in pieces.values():
            for p in plist:
                if p.key not in count:
                    raise ValueError(f"piece of unknown tensor {p.key}")
                region = tuple(slice(o, o + n) for o, n in zip(p.offsets, p.sizes))
                count[p.key][region] += 1
    bad = [k for k, c in count.items() if c.size and int(c.min()) < 1]
    if bad:
        raise ValueError(f"global tensors not fully covered by any rank: {bad[:5]}")
