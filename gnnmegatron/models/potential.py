"""``AtomisticModel``: EGNN interatomic potential (embedding, EGCL stack, energy/force heads).

Energy::

    E_b = sum_{i in b} ( reference_energies[z_i] + energy_scale * e_i + energy_shift ),
    e_i = energy_head(h_i^L)        (MLP H -> H -> 1, the last linear has no bias)

Multi-source models (``ModelConfig.sources`` with two or more names; graph b has source
``s_b = batch["source"][b]``) keep one table of reference energies per source,
``reference_energies[s_b, z_i]``, and pick the head by ``ModelConfig.heads``: ``shared`` (one
``energy_head``), ``per_source`` (``energy_heads[s_b]``, one MLP per source on the shared
backbone) or ``embedding`` (``energy_head(h_i^L + source_embedding[s_b])``, a learned vector per
source, initialised to zero).

Forces, two modes (``ModelConfig.force_mode``):

* ``"conservative"``: ``F = -dE/dx`` by ``torch.autograd.grad`` (``create_graph`` in
  training mode, so a force loss trains the weights through a double backward). Stress
  is available: a symmetric strain ``eps`` (zeros that require grad) is applied to the
  positions and the cell, ``x' = x (I + eps)``, ``cell' = cell (I + eps)`` (rows are
  vectors), and ``stress = (1 / V) dE/deps`` in eV/Å^3 with ASE's sign convention
  (negative under compression). Non-periodic graphs (zero cell volume) get zero stress.
* ``"direct"``: an equivariant head on the last block's edge features,
  ``F_i = sum_j (r_ij / |r_ij|) * w_ij * phi_f(a_ij)`` (invariant scalars times edge unit
  vectors, envelope-weighted so forces are continuous at the cutoff). No stress. With
  ``message="node_split"`` ``phi_f`` is linear (``a_ij . v``), so the fused op computes it.

The model never calls ``torch.distributed``; it works in float32 and float64 (the batch
must have the parameters' dtype).

Shapes:
    B graphs, N atoms, E directed edges, H hidden.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Optional

import torch
from torch import nn

from gnnmegatron.models.config import ModelConfig
from gnnmegatron.models.egnn import EGCLOutput, EGNNStack, edge_vectors, make_activation, scatter_sum
from gnnmegatron.models.radial import PolynomialEnvelope
from gnnmegatron.ops import edge_vector_aggregate

REQUIRED_KEYS = ("atomic_numbers", "positions", "cell", "batch", "edge_index", "edge_shift")


class SourceEmbedding(nn.Module):
    """A learned vector per data source, added to the node features before the energy head.

    Initialised to zero (``init_spec``), so a new multi-source model starts as one shared head.

    Shapes:
        weight [S, H]; forward(source [N]) -> [N, H].
    """

    def __init__(self, num_sources: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_sources, hidden))

    def init_spec(self, name: str, tensor: torch.Tensor):
        from gnnmegatron.models.init import InitSpec

        return InitSpec("constant", 0.0) if name == "weight" else None

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.weight.index_select(0, source)  # index_add backward: deterministic on CPU threads


def _energy_mlp(cfg: ModelConfig) -> nn.Sequential:
    # No bias on the last linear: the per-atom constant lives in energy_shift and the
    # reference energies, and every parameter then gets a gradient from a force loss.
    return nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), make_activation(cfg.activation),
                         nn.Linear(cfg.hidden, 1, bias=False))


HEAD_MODULES = ("energy_head", "energy_heads", "source_embedding", "force_head")
"""Modules of the output heads (the last pipeline stage holds them, with the energy buffers)."""


class AtomisticModel(nn.Module):
    """EGNN potential on the graph batch dict of ``gnnmegatron.data.batch.collate``.

    Args:
        cfg: validated ``ModelConfig``.

    Buffers (saved in checkpoints, follow ``.to(dtype)``):
        reference_energies: [max_z + 1] eV per element, added per atom (``set_reference_energies``);
            [S, max_z + 1] (one row per source) for a multi-source model.
        energy_scale, energy_shift: scalars, ``scale * e_i + shift`` per atom (``set_normalization``).

    Shapes:
        forward(batch) -> dict(energy [B], node_energy [N], forces [N, 3] (if asked),
        stress [B, 3, 3] (if asked)).
    """

    buffer_init = {"reference_energies": 0.0, "energy_scale": 1.0, "energy_shift": 0.0}
    """Initial values of the persistent buffers (``gnnmegatron.models.init``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"AtomisticModel needs a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        H = cfg.hidden
        self.embedding = nn.Embedding(cfg.max_z + 1, H)
        self.envelope = PolynomialEnvelope(cfg.cutoff, cfg.envelope_exponent)
        self.backbone = EGNNStack(cfg)
        self.energy_head = _energy_mlp(cfg) if cfg.heads != "per_source" else None
        self.energy_heads = nn.ModuleList(_energy_mlp(cfg) for _ in cfg.sources) \
            if cfg.heads == "per_source" else None
        self.source_embedding = SourceEmbedding(len(cfg.sources), H) if cfg.heads == "embedding" else None
        if cfg.force_mode == "direct" and cfg.message == "node_split":
            # node_split: a linear scalar a_ij . v, which the fused op computes without [E, H]
            self.force_head = nn.Sequential(nn.Linear(H, 1, bias=False))
        elif cfg.force_mode == "direct":
            self.force_head = nn.Sequential(nn.Linear(H, H), make_activation(cfg.activation),
                                            nn.Linear(H, 1, bias=False))
        else:
            self.force_head = None
        ref_shape = (len(cfg.sources), cfg.max_z + 1) if cfg.multi_source else (cfg.max_z + 1,)
        self.register_buffer("reference_energies", torch.zeros(ref_shape))
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("energy_shift", torch.tensor(0.0))

    @property
    def blocks(self) -> nn.ModuleList:
        """The EGCL blocks (``self.backbone.blocks``), what ``parallelize`` swaps for twins."""
        return self.backbone.blocks

    # ------------------------------------------------------------------ settings
    @torch.no_grad()
    def set_reference_energies(self, ref) -> None:
        """Per-element reference energies (eV), added to every atom's energy.

        Args:
            ref: a [max_z + 1] tensor/sequence indexed by atomic number, or a mapping
                ``{atomic_number: energy}`` (missing elements get 0). A multi-source model takes
                [S, max_z + 1] (row s for source s), or a mapping ``{source name: row}`` naming
                every source, each row in either form.
        """
        size = self.cfg.max_z + 1
        if self.reference_energies.dim() == 2:
            names = list(self.cfg.sources)
            if isinstance(ref, Mapping):
                unknown = sorted(set(ref) - set(names))
                missing = [n for n in names if n not in ref]
                if unknown or missing:
                    raise ValueError(f"reference energies by source: unknown source(s) {unknown}, missing {missing}; "
                                     f"this model's sources are {names}")
                values = torch.stack([_reference_row(ref[n], size, self.cfg.max_z) for n in names])
            else:
                values = torch.as_tensor(ref, dtype=torch.float64).detach().cpu()
                if values.shape != (len(names), size):
                    raise ValueError(f"reference energies of a model with sources {names} must have shape "
                                     f"[S, max_z+1] = [{len(names)}, {size}], got {list(values.shape)}; or pass "
                                     f"{{source name: per-element energies}}")
        else:
            values = _reference_row(ref, size, self.cfg.max_z)
        if not torch.isfinite(values).all():
            bad = torch.nonzero(~torch.isfinite(values))[:, -1].flatten().tolist()
            raise ValueError(f"reference energies are not finite for atomic numbers {bad[:10]}")
        self.reference_energies.copy_(values.to(self.reference_energies))

    @torch.no_grad()
    def set_normalization(self, scale: float, shift: float) -> None:
        """Per-atom output normalisation: ``e_i -> scale * e_i + shift`` (eV)."""
        scale, shift = float(scale), float(shift)
        if not (scale > 0 and torch.isfinite(torch.tensor(scale))) or not torch.isfinite(torch.tensor(shift)):
            raise ValueError(f"energy normalisation needs a finite scale > 0 and a finite shift, "
                             f"got scale={scale}, shift={shift}")
        self.energy_scale.fill_(scale)
        self.energy_shift.fill_(shift)

    # ------------------------------------------------------------------ pieces
    def _check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in batch]
        if missing:
            raise KeyError(f"graph batch lacks {missing}; build it with gnnmegatron.data.batch.collate")
        dtype = self.embedding.weight.dtype
        for key in ("positions", "cell", "edge_shift"):
            if batch[key].dtype != dtype:
                raise TypeError(f"batch['{key}'] is {batch[key].dtype} but the model parameters are {dtype}; "
                                f"collate with dtype={dtype} or call model.to({dtype})")
        if self.cfg.multi_source and "source" not in batch:
            raise KeyError(f"this model was trained on several sources {list(self.cfg.sources)} and needs "
                           f"batch['source'] [B], each graph's source id (0..{len(self.cfg.sources) - 1})")
        z = batch["atomic_numbers"]
        if z.numel() and (int(z.min()) < 0 or int(z.max()) > self.cfg.max_z):
            raise ValueError(f"atomic numbers span {int(z.min())}..{int(z.max())} but the embedding covers "
                             f"0..max_z={self.cfg.max_z}; raise ModelConfig.max_z")
        ei = batch["edge_index"]
        if ei.dim() != 2 or ei.shape[0] != 2 or batch["edge_shift"].shape != (ei.shape[1], 3):
            raise ValueError(f"edge_index must be [2, E] and edge_shift [E, 3], got {list(ei.shape)} and "
                             f"{list(batch['edge_shift'].shape)}")

    @staticmethod
    def edge_offsets(edge_index: torch.Tensor, edge_shift: torch.Tensor, cell: torch.Tensor,
                     batch: torch.Tensor) -> torch.Tensor:
        """Cartesian image offsets ``edge_shift @ cell[batch[dst]]``.

        Shapes:
            edge_index [2, E], edge_shift [E, 3], cell [B, 3, 3], batch [N] -> [E, 3].
        """
        edge_cell = cell.index_select(0, batch.index_select(0, edge_index[0]))  # deterministic backward
        return torch.bmm(edge_shift.unsqueeze(1), edge_cell).squeeze(1)

    def represent(self, atomic_numbers: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor,
                  edge_offset: torch.Tensor) -> tuple[EGCLOutput, torch.Tensor]:
        """Embedding + EGCL stack.

        Returns:
            (EGCLOutput of the last block, edge_weight): ``edge_weight`` is the envelope of
            the input edge lengths, shared by all blocks (see ``gnnmegatron.models.egnn``).

        Shapes:
            atomic_numbers [N], positions [N, 3], edge_index [2, E], edge_offset [E, 3]
            -> (EGCLOutput(h [N, H], x [N, 3], edge_feat [E, H], edge_vec [E, 3]), [E]).
        """
        h = self.embedding(atomic_numbers)
        _, dist0 = edge_vectors(positions, edge_index, edge_offset)
        edge_weight = self.envelope(dist0)
        scalar_vector = None
        if self.force_head is not None and self.cfg.message == "node_split" and self.cfg.execution == "fused":
            scalar_vector = self.force_head[-1].weight[0]
        return self.backbone(h, positions, edge_index, edge_offset, edge_weight, scalar_vector), edge_weight

    def node_energies(self, atomic_numbers: torch.Tensor, h: torch.Tensor,
                      source: torch.Tensor | None = None) -> torch.Tensor:
        """``reference_energies[z_i] + energy_scale * energy_head(h_i) + energy_shift``.

        A multi-source model needs ``source`` (each atom's source id) and uses that source's
        reference row and head (see the module docstring).

        Shapes:
            atomic_numbers [N], h [N, H], source [N] -> [N] (eV).
        """
        e = self.head_energy(h, source)
        if self.reference_energies.dim() == 2:
            ref = self.reference_energies[source, atomic_numbers]
        else:
            ref = self.reference_energies[atomic_numbers]
        return ref + self.energy_scale * e + self.energy_shift

    def head_energy(self, h: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """The energy head's per-atom output ``e_i`` (before scale, shift and references).

        Shapes:
            h [N, H], source [N] (multi-source heads only) -> [N].
        """
        heads = self.cfg.heads
        if heads == "shared":
            return self.energy_head(h).squeeze(-1)
        if heads == "embedding":
            return self.energy_head(h + self.source_embedding(source)).squeeze(-1)
        # per_source: every head runs on its own atoms (an empty selection still gives its weights
        # a zero gradient, so every rank of a data-parallel group reduces the same tensors)
        out = h.new_zeros(h.shape[0])
        for k, head in enumerate(self.energy_heads):
            idx = torch.nonzero(source == k).squeeze(1)
            out = out.index_copy(0, idx, head(h.index_select(0, idx)).squeeze(-1))
        return out

    def atom_sources(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Each atom's source id from ``batch["source"]`` [B] (None for a single-source model).

        Raises:
            KeyError/ValueError: the batch names no source, or an id outside the model's sources.
        """
        if not self.cfg.multi_source:
            return None
        names = list(self.cfg.sources)
        if "source" not in batch:
            raise KeyError(f"this model was trained on several sources {names} and needs batch['source'] [B], "
                           f"each graph's source id (0..{len(names) - 1})")
        src = batch["source"]
        if src.numel() and (int(src.min()) < 0 or int(src.max()) >= len(names)):
            raise ValueError(f"batch['source'] holds ids {sorted(set(src.tolist()))[:8]} but the model's sources are "
                             f"{dict(enumerate(names))}")
        return src.index_select(0, batch["batch"])

    def direct_forces(self, out: EGCLOutput, edge_weight: torch.Tensor, edge_index: torch.Tensor,
                      num_atoms: int) -> torch.Tensor:
        """``F_i = energy_scale * sum_j (r_ij / |r_ij|) * w_ij * phi_f(a_ij)`` (direct mode).

        Uses the last block's edge features and edge vectors; ``energy_scale`` makes the
        force head share the energy normalisation.

        Shapes:
            out.edge_feat [E, H], out.edge_vec [E, 3], edge_weight [E], edge_index [2, E]
            -> [N, 3] (eV/Å).
        """
        vec = out.edge_vec
        dist = torch.linalg.vector_norm(vec, dim=-1)
        phi = out.edge_scalar if out.edge_scalar is not None else self.force_head(out.edge_feat).squeeze(-1)
        weight = edge_weight * phi * self.energy_scale
        if self.cfg.execution == "fused":
            return edge_vector_aggregate(vec, weight / dist, edge_index, num_atoms, backend=self.cfg.ops_backend)
        return scatter_sum(vec * (weight / dist).unsqueeze(-1), edge_index[0], num_atoms)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, torch.Tensor], compute_forces: bool = True,
                compute_stress: bool | None = None) -> dict[str, torch.Tensor]:
        """Energies (and forces, stress) of a graph batch.

        Args:
            batch: graph batch dict (see the interface contract / ``data.batch.collate``).
            compute_forces: return ``forces`` [N, 3] (eV/Å).
            compute_stress: return ``stress`` [B, 3, 3] (eV/Å^3, ASE sign); ``None`` takes
                ``cfg.compute_stress``. Conservative mode only.

        Returns:
            dict(energy [B] eV, node_energy [N] eV, forces [N, 3], stress [B, 3, 3]).
            Under ``torch.no_grad()`` conservative forces are still computed (grad is
            enabled inside) and every output is returned detached.
        """
        compute_stress = resolve_stress(self.cfg, compute_stress)
        self._check_batch(batch)
        need_grad = self.cfg.force_mode == "conservative" and (compute_forces or compute_stress)
        grad_enabled = torch.is_grad_enabled()
        with torch.set_grad_enabled(need_grad or grad_enabled):
            geom = prepare_geometry(batch, self.envelope, need_grad and compute_forces, compute_stress)
            z, edge_index = batch["atomic_numbers"], batch["edge_index"]
            scalar_vector = None
            if self.force_head is not None and self.cfg.message == "node_split" and self.cfg.execution == "fused":
                scalar_vector = self.force_head[-1].weight[0]
            out = self.backbone(self.embedding(z), geom.x, edge_index, geom.offset, geom.edge_weight, scalar_vector)
            result = self.head(out, batch, geom, compute_forces and not need_grad)
            if need_grad:
                result.update(conservative_outputs(result["energy"].sum(), geom, batch, compute_forces,
                                                   compute_stress, create_graph=self.training))
        if not grad_enabled:  # called under torch.no_grad() (e.g. MD): keep no graph alive
            result = {k: v.detach() for k, v in result.items()}
        return result

    def head(self, out: EGCLOutput, batch: Mapping[str, torch.Tensor], geom: "Geometry",
             direct_forces: bool) -> dict[str, torch.Tensor]:
        """Energies from the last block's output (and direct forces when asked).

        Shapes:
            out.h [N, H] -> dict(energy [B], node_energy [N], forces [N, 3] if ``direct_forces``).
        """
        z, graph = batch["atomic_numbers"], batch["batch"]
        node_energy = self.node_energies(z, out.h, self.atom_sources(batch))
        result = {"energy": scatter_sum(node_energy, graph, batch["cell"].shape[0]), "node_energy": node_energy}
        if direct_forces:
            result["forces"] = self.direct_forces(out, geom.edge_weight, batch["edge_index"], z.shape[0])
        return result


def _reference_row(ref, size: int, max_z: int) -> torch.Tensor:
    """One table of per-element reference energies, [size] float64, from a sequence or {Z: eV}."""
    if isinstance(ref, Mapping):
        values = torch.zeros(size, dtype=torch.float64)
        for z, e in ref.items():
            if not 0 <= int(z) <= max_z:
                raise ValueError(f"reference energy for atomic number {z} is outside 0..max_z={max_z}")
            values[int(z)] = float(e)
        return values
    values = torch.as_tensor(ref, dtype=torch.float64).detach().cpu()
    if values.shape != (size,):
        raise ValueError(f"reference energies must have shape [max_z+1] = [{size}], "
                         f"got {list(values.shape)}; pass a dict {{z: energy}} for a few elements")
    return values


class Geometry(NamedTuple):
    """The input geometry of a batch as every block (and every pipeline stage) sees it.

    Attributes:
        inputs: autograd leaves that conservative forces and stress differentiate against:
            ``[positions]`` and/or ``[displacement]`` (in that order; empty for direct forces).
        positions: the positions leaf (or the batch's positions).
        displacement: [B, 3, 3] the strain leaf (stress), or None.
        x: [N, 3] (strained) positions, the first block's coordinates.
        offset: [E, 3] Cartesian image shifts of the (strained) cell.
        edge_weight: [E] envelope of the input edge lengths, shared by all blocks.
    """

    inputs: list
    positions: torch.Tensor
    displacement: Optional[torch.Tensor]
    x: torch.Tensor
    offset: torch.Tensor
    edge_weight: torch.Tensor


def resolve_stress(cfg: ModelConfig, compute_stress: bool | None) -> bool:
    """``compute_stress`` or the config's default; refuses stress for direct forces."""
    if compute_stress is None:
        compute_stress = cfg.compute_stress
    if compute_stress and cfg.force_mode != "conservative":
        raise ValueError("stress needs force_mode='conservative' (stress = dE/dstrain / V); this model uses "
                         "force_mode='direct', which has no stress — call forward(compute_stress=False)")
    return compute_stress


def prepare_geometry(batch: Mapping[str, torch.Tensor], envelope: nn.Module, positions_grad: bool,
                     compute_stress: bool) -> Geometry:
    """Leaves, strained positions, image offsets and envelope weights of a batch.

    Stress: a symmetric strain ``eps`` (zeros that require grad) is applied to the positions and
    the cell, ``x' = x (I + eps)``, ``cell' = cell (I + eps)`` (rows are vectors). Every pipeline
    stage calls this on the same batch, so each holds its own leaves of the same values.

    Shapes:
        -> Geometry(x [N, 3], offset [E, 3], edge_weight [E], displacement [B, 3, 3]).
    """
    cell, graph, edge_index = batch["cell"], batch["batch"], batch["edge_index"]
    positions = batch["positions"]
    inputs = []
    if positions_grad:
        positions = positions.detach().requires_grad_(True)
        inputs.append(positions)
    x, cell_used, displacement = positions, cell, None
    if compute_stress:
        displacement = torch.zeros((cell.shape[0], 3, 3), dtype=cell.dtype, device=cell.device, requires_grad=True)
        inputs.append(displacement)
        strain = 0.5 * (displacement + displacement.transpose(1, 2))
        x = x + torch.bmm(x.unsqueeze(1), strain.index_select(0, graph)).squeeze(1)
        cell_used = cell + torch.bmm(cell, strain)
    offset = AtomisticModel.edge_offsets(edge_index, batch["edge_shift"], cell_used, graph)
    _, dist0 = edge_vectors(x, edge_index, offset)
    return Geometry(inputs, positions, displacement, x, offset, envelope(dist0))


def conservative_outputs(energy: torch.Tensor, geom: Geometry, batch: Mapping[str, torch.Tensor],
                         compute_forces: bool, compute_stress: bool, create_graph: bool) -> dict[str, torch.Tensor]:
    """``forces = -dE/dx`` and ``stress = (1/V) dE/deps`` from the geometry leaves.

    Shapes:
        energy: [] (summed over graphs) -> dict(forces [N, 3], stress [B, 3, 3]).
    """
    grads = _grad(energy, geom.inputs, create_graph=create_graph)
    return stress_and_forces(grads, batch, compute_forces, compute_stress)


def stress_and_forces(grads: list[torch.Tensor], batch: Mapping[str, torch.Tensor], compute_forces: bool,
                      compute_stress: bool) -> dict[str, torch.Tensor]:
    """Forces and stress from ``[dE/dpositions][, dE/ddisplacement]`` (the order of ``Geometry.inputs``).

    Also used by the pipeline, where the gradients are sums of the stages' shares.
    """
    result = {}
    if compute_forces:
        result["forces"] = -grads[0]
    if compute_stress:
        cell = batch["cell"]
        volume = torch.linalg.det(cell).abs()
        periodic = volume > 0
        safe = torch.where(periodic, volume, torch.ones_like(volume))
        result["stress"] = grads[-1] / safe[:, None, None] * periodic[:, None, None]
    return result


def _grad(output: torch.Tensor, inputs: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
    """``d output / d inputs``; inputs the output does not depend on (no edges) get zeros."""
    if not output.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(output, inputs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
