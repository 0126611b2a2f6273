"""Pipeline stages of an ``AtomisticModel``: the split of its blocks and one rank's part of the model.

The L EGCL blocks are cut into ``S = pp * virtual_stages`` contiguous runs, the *virtual
stages*. Virtual stage ``k`` lives on pipeline rank ``k % pp`` as that rank's chunk ``k // pp``
(Megatron's interleaved assignment; with one virtual stage per rank, stage ``k`` is rank ``k``).
The first virtual stage also embeds the atoms, the last one also holds the energy (and direct
force) heads and the energy buffers. Every stage sees the whole micro-batch (its graph comes
from the deterministic sampler on every rank), so only the node features ``h`` [N, H] and the
coordinates ``x`` [N, 3] cross a stage boundary; each stage computes the image offsets and the
input-geometry edge weights itself.

``PipelineStageModel`` holds one rank's chunks under the single-device names
(``embedding.weight``, ``backbone.blocks.7.edge_mlp.0.weight``, ``energy_head.0.bias``...; the
blocks live in a ``ModuleDict`` keyed by their global index), so its state dict is a subset of
the single-device one: checkpoints, ``parallelize`` (tensor parallelism inside a stage) and
``gnnmegatron.models.init.materialize`` work on it unchanged.

Shapes:
    N atoms, E directed edges, B graphs, H hidden.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gnnmegatron.models.config import ModelConfig
from gnnmegatron.models.potential import HEAD_MODULES, AtomisticModel, Geometry, prepare_geometry
from gnnmegatron.models.presets import forward_flops
from gnnmegatron.ops import csr_plan

__all__ = ["ChunkSpec", "PipelineStageModel", "balanced_split", "split_layers", "stage_costs"]

EDGES_PER_ATOM_ESTIMATE = 30.0
"""Edges per atom assumed by the default stage balance (dense crystals at a 5-6 Å cutoff: 20-60)."""


@dataclass(frozen=True)
class ChunkSpec:
    """One virtual stage.

    Attributes:
        index: virtual stage number ``k`` in ``0 .. S-1``.
        rank: pipeline rank holding it (``k % pp``).
        chunk: its position among that rank's chunks (``k // pp``).
        blocks: global indices of its EGCL blocks (contiguous, ascending).
        first, last: it embeds the atoms / it holds the heads.
    """

    index: int
    rank: int
    chunk: int
    blocks: tuple[int, ...]
    first: bool
    last: bool


def stage_costs(cfg: ModelConfig, edges_per_atom: float = EDGES_PER_ATOM_ESTIMATE) -> tuple[list[float], float]:
    """Per-block forward FLOPs per atom (at ``edges_per_atom``) and the heads' FLOPs per atom.

    From ``forward_flops``: a block costs its per-atom share plus ``edges_per_atom`` times its
    per-edge share; the energy head costs ``2 H^2 + 2 H`` per atom.
    """
    f = forward_flops(cfg)
    H = cfg.hidden
    head = 2 * H * H + 2 * H
    per_block = (f["per_atom"] - head + f["per_edge"] * edges_per_atom) / cfg.layers
    return [float(per_block)] * cfg.layers, float(head)


def balanced_split(costs: Sequence[float], parts: int, last_extra: float = 0.0) -> list[int]:
    """Contiguous split of ``costs`` into ``parts`` non-empty runs minimising the largest run's cost.

    ``last_extra`` is added to the last run (the heads). Among splits with the same largest
    cost the most even one (smallest sum of squared run costs) wins. Returns the run lengths.
    """
    n = len(costs)
    if parts > n:
        raise ValueError(f"cannot split {n} blocks into {parts} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    worst = (float("inf"), float("inf"))
    # best[k][i]: (largest run, sum of squared runs) of the best split of the first i blocks into k runs
    best = [[worst] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == worst:
                    continue
                run = prefix[i] - prefix[j] + (last_extra if (k == parts and i == n) else 0.0)
                value = (max(best[k - 1][j][0], run), best[k - 1][j][1] + run * run)
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def split_layers(cfg: ModelConfig, pp: int, virtual_stages: int = 1,
                 pp_layers: Sequence[int] | None = None) -> list[ChunkSpec]:
    """The virtual stages of a model: which blocks each holds and which rank holds it.

    Args:
        cfg: the model's config (``cfg.layers`` blocks).
        pp: pipeline ranks.
        virtual_stages: chunks per rank (interleaved schedules); ``S = pp * virtual_stages``.
        pp_layers: blocks per virtual stage (``S`` positive ints summing to ``cfg.layers``);
            default: balanced by ``stage_costs`` (the heads count on the last stage).

    Raises:
        ValueError: fewer blocks than virtual stages, or a ``pp_layers`` of the wrong length or sum.
    """
    S = pp * virtual_stages
    if pp < 1 or virtual_stages < 1:
        raise ValueError(f"pp and virtual_stages must be >= 1, got pp={pp}, virtual_stages={virtual_stages}")
    if cfg.layers < S:
        raise ValueError(f"the model has {cfg.layers} blocks but pp*virtual_stages={pp}*{virtual_stages}={S} stages "
                         f"each need at least one; lower pp or virtual_stages, or use more layers")
    if pp_layers is not None:
        sizes = [int(n) for n in pp_layers]
        if len(sizes) != S or any(n < 1 for n in sizes) or sum(sizes) != cfg.layers:
            raise ValueError(f"parallel.pp_layers={list(pp_layers)} must list {S} positive block counts (pp*"
                             f"virtual_stages={pp}*{virtual_stages}) summing to the model's {cfg.layers} layers")
    else:
        costs, head = stage_costs(cfg)
        sizes = balanced_split(costs, S, last_extra=head)
    out, start = [], 0
    for k, n in enumerate(sizes):
        out.append(ChunkSpec(index=k, rank=k % pp, chunk=k // pp, blocks=tuple(range(start, start + n)),
                             first=k == 0, last=k == S - 1))
        start += n
    return out


class PipelineStageModel(nn.Module):
    """One pipeline rank's chunks of an ``AtomisticModel`` (see the module docstring).

    Build it from a single-device model (usually on the meta device, see
    ``gnnmegatron.models.init``) with :meth:`from_model`; the modules are moved, not copied.

    Attributes:
        cfg: the model's config.
        chunks: this rank's ``ChunkSpec``s, in chunk order.
        num_stages: ``S``, virtual stages in the whole pipeline.
        embedding: the element embedding (first virtual stage's rank), else None.
        backbone.blocks: ``ModuleDict`` {global block index: block}.
        energy_head, energy_heads, source_embedding, force_head: the heads (last virtual stage's
            rank; ``AtomisticModel``'s, per-source ones included), else None.
        reference_energies, energy_scale, energy_shift: buffers (last virtual stage's rank only).
    """

    def __init__(self, cfg: ModelConfig, chunks: Sequence[ChunkSpec], num_stages: int):
        super().__init__()
        self.cfg = cfg
        self.chunks = list(chunks)
        self.num_stages = num_stages
        self.embedding = None
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleDict()
        for name in HEAD_MODULES:
            setattr(self, name, None)
        self.envelope = None

    @classmethod
    def from_model(cls, model: AtomisticModel, chunks: Sequence[ChunkSpec], num_stages: int) -> "PipelineStageModel":
        """This rank's part of ``model`` (``chunks``: this rank's entries of ``split_layers``)."""
        stage = cls(model.cfg, chunks, num_stages)
        stage.envelope = model.envelope
        for c in stage.chunks:
            if c.first:
                stage.embedding = model.embedding
            for i in c.blocks:
                stage.backbone.blocks[str(i)] = model.blocks[i]
            if c.last:
                for name in HEAD_MODULES:
                    setattr(stage, name, getattr(model, name))
                for name in ("reference_energies", "energy_scale", "energy_shift"):
                    stage.register_buffer(name, getattr(model, name))
        return stage

    @property
    def buffer_init(self) -> dict[str, float]:
        return {k: v for k, v in AtomisticModel.buffer_init.items() if hasattr(self, k)}

    # ------------------------------------------------------------------ per micro-batch
    def geometry(self, batch: Mapping[str, torch.Tensor], positions_grad: bool, compute_stress: bool) -> Geometry:
        """This rank's own geometry leaves, offsets and edge weights of a micro-batch (see ``prepare_geometry``)."""
        return prepare_geometry(batch, self.envelope, positions_grad, compute_stress)

    def plan(self, batch: Mapping[str, torch.Tensor]):
        """The CSR plan of the receivers shared by this rank's fused blocks (None when unfused)."""
        if any(getattr(b, "fused", False) for b in self.backbone.blocks.values()) or self.cfg.execution == "fused":
            return csr_plan(batch["edge_index"][0], batch["atomic_numbers"].shape[0])
        return None

    def chunk_forward(self, chunk: ChunkSpec, batch: Mapping[str, torch.Tensor], geom: Geometry, plan,
                      h: torch.Tensor | None, x: torch.Tensor | None, direct_forces: bool):
        """Run one virtual stage.

        Args:
            chunk: which virtual stage (one of ``self.chunks``).
            batch, geom, plan: the micro-batch, this rank's geometry of it and its CSR plan.
            h, x: the previous stage's node features [N, H] and coordinates [N, 3] (None on the
                first stage, which embeds the atoms and starts from the geometry's positions).
            direct_forces: the last stage also returns direct forces.

        Returns:
            ``(h, x)`` for every stage but the last; the last returns the output dict of
            ``AtomisticModel.head`` (energy [B], node_energy [N], forces [N, 3] when direct).
        """
        ei = batch["edge_index"]
        if chunk.first:
            h, x = self.embedding(batch["atomic_numbers"]), geom.x
        out = None
        last_block = self.cfg.layers - 1
        for i in chunk.blocks:
            sv = None
            if i == last_block and self.force_head is not None and self.cfg.message == "node_split" \
                    and self.cfg.execution == "fused":
                sv = self.force_head[-1].weight[0]
            out = self.backbone.blocks[str(i)](h, x, ei, geom.offset, geom.edge_weight, plan=plan, scalar_vector=sv)
            h, x = out.h, out.x
        if not chunk.last:
            return h, x
        return AtomisticModel.head(self, out, batch, geom, direct_forces)

    # AtomisticModel's heads and energy settings, reused unchanged on the last stage
    node_energies = AtomisticModel.node_energies
    head_energy = AtomisticModel.head_energy
    atom_sources = AtomisticModel.atom_sources
    direct_forces = AtomisticModel.direct_forces
    set_reference_energies = AtomisticModel.set_reference_energies
    set_normalization = AtomisticModel.set_normalization

