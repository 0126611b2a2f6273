"""``AtomisticModel``: EGNN interatomic potential (embedding, EGCL stack, energy/force heads).

Energy::

    E_b = sum_{i in b} ( reference_energies[z_i] + energy_scale * e_i + energy_shift ),
    e_i = energy_head(h_i^L)        (MLP H -> H -> 1, the last linear has no bias)

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

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Optional

import torch
from torch import nn

from gnnmegatron.models.config import ModelConfig
from gnnmegatron.models.egnn import EGCLOutput, EGNNStack, edge_vectors, make_activation, scatter_sum
from gnnmegatron.models.radial import PolynomialEnvelope
from gnnmegatron.ops import edge_vector_aggregate

REQUIRED_KEYS = ("atomic_numbers", "positions", "cell", "batch", "edge_index", "edge_shift")


class AtomisticModel(nn.Module):
    """EGNN potential on the graph batch dict of ``gnnmegatron.data.batch.collate``.

    Args:
        cfg: validated ``ModelConfig``.

    Buffers (saved in checkpoints, follow ``.to(dtype)``):
        reference_energies: [max_z + 1] eV per element, added per atom (``set_reference_energies``).
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
        # No bias on the last linear: the per-atom constant lives in energy_shift and the
        # reference energies, and every parameter then gets a gradient from a force loss.
        self.energy_head = nn.Sequential(nn.Linear(H, H), make_activation(cfg.activation),
                                         nn.Linear(H, 1, bias=False))
        if cfg.force_mode == "direct" and cfg.message == "node_split":
            # node_split: a linear scalar a_ij . v, which the fused op computes without [E, H]
            self.force_head = nn.Sequential(nn.Linear(H, 1, bias=False))
        elif cfg.force_mode == "direct":
            self.force_head = nn.Sequential(nn.Linear(H, H), make_activation(cfg.activation),
                                            nn.Linear(H, 1, bias=False))
        else:
            self.force_head = None
        self.register_buffer("reference_energies", torch.zeros(cfg.max_z + 1))
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("energy_shift", torch.tensor(0.0))

    @property
    def blocks(self) -> nn.ModuleList:
        """The EGCL blocks (``self.backbone.blocks``), what ``parallelize`` swaps for twins."""
        return self.backbone.blocks

    # ------------------------------------------------------------------ settings
    @torch.no_grad()
    def set_reference_energies(self, ref: torch.Tensor | Sequence[float] | Mapping[int, float]) -> None:
        """Per-element reference energies (eV), added to every atom's energy.

        Args:
            ref: a [max_z + 1] tensor/sequence indexed by atomic number, or a mapping
                ``{atomic_number: energy}`` (missing elements get 0).
        """
        size = self.cfg.max_z + 1
        if isinstance(ref, Mapping):
            values = torch.zeros(size, dtype=torch.float64)
            for z, e in ref.items():
                if not 0 <= int(z) <= self.cfg.max_z:
                    raise ValueError(f"reference energy for atomic number {z} is outside 0..max_z={self.cfg.max_z}")
                values[int(z)] = float(e)
        else:
            values = torch.as_tensor(ref, dtype=torch.float64).detach().cpu()
            if values.shape != (size,):
                raise ValueError(f"reference energies must have shape [max_z+1] = [{size}], "
                                 f"got {list(values.shape)}; pass a dict {{z: energy}} for a few elements")
        if not torch.isfinite(values).all():
            bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
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

    def node_energies(self, atomic_numbers: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``reference_energies[z_i] + energy_scale * energy_head(h_i) + energy_shift``.

        Shapes:
            atomic_numbers [N], h [N, H] -> [N] (eV).
        """
        e = self.energy_head(h).squeeze(-1)
        return self.reference_energies[atomic_numbers] + self.energy_scale * e + self.energy_shift

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
        node_energy = self.node_energies(z, out.h)
        result = {"energy": scatter_sum(node_energy, graph, batch["cell"].shape[0]), "node_energy": node_energy}
        if direct_forces:
            result["forces"] = self.direct_forces(out, geom.edge_weight, batch["edge_index"], z.shape[0])
        return result


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
