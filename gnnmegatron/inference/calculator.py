"""ASE calculator for gnnmegatron models (energy, forces, stress) with a Verlet-skin neighbour list.

Typical use::

    from ase.build import bulk
    from gnnmegatron.inference import GNNMegatronCalculator

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    atoms.calc = GNNMegatronCalculator("runs/demo", device="cpu")   # run dir or checkpoint file
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()

Neighbour list: a candidate list is built with ``radius_graph_pbc`` at ``cutoff + skin`` and
reused while every atom stays within ``skin / 2`` of where it was at the build (then no pair can
have come from beyond ``cutoff + skin`` to inside ``cutoff``: the usual Verlet argument). Each
call keeps the candidates with ``0 < |r_ij| < cutoff`` computed from the current positions, so the
model sees exactly the edge set (and order) that ``data.batch.collate`` would build, and results
equal a fresh calculator's. A change of cell, pbc, atomic numbers or atom count, or wrapping
atoms back into the cell (a jump of a lattice vector), triggers a rebuild;
``neighbor_list_builds`` counts builds.

What the model does with edges beyond the cutoff: every edge term is multiplied by the
envelope ``u(|r_ij|)`` of the input geometry, which is exactly zero (value and gradient, a
``torch.where``) for ``|r_ij| >= cutoff``, in messages, coordinate updates and the direct force
head. Extra edges would therefore not change the result; filtering keeps the work (and the
edge set) equal to the training batches'.

A model trained on several sources (multi-source pretraining) is used through one of them:
``GNNMegatronCalculator("runs/multi", source="oxides")`` takes that source's energy reference and
head; without ``source=`` (or with an unknown name) it raises ``UnknownSourceError`` naming the
sources the model knows.

Stress (Voigt ``[xx, yy, zz, yz, xz, xy]`` in eV/Å^3, ASE's sign: negative under compression)
exists for ``force_mode="conservative"`` models on cells periodic along all three axes; a
direct-force model, or a molecule/slab, raises ``PropertyNotImplementedError`` for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import atomic_numbers as _SYMBOL_TO_Z
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from gnnmegatron.data.neighbors import radius_graph_pbc

__all__ = ["GNNMegatronCalculator", "UnknownElementError"]


class UnknownElementError(ValueError):
    """The structure contains elements the model never saw in training."""


def _as_z(element) -> int:
    if isinstance(element, str):
        if element not in _SYMBOL_TO_Z:
            raise ValueError(f"unknown chemical symbol {element!r}")
        return int(_SYMBOL_TO_Z[element])
    return int(element)


def format_elements(zs: Iterable[int]) -> str:
    return ", ".join(f"{chemical_symbols[z] if 0 <= z < len(chemical_symbols) else '?'} (Z={z})" for z in zs)


class GNNMegatronCalculator(Calculator):
    """ASE calculator for any gnnmegatron checkpoint or ``AtomisticModel``.

    Args:
        model: a checkpoint file, a run directory (latest checkpoint), or an ``AtomisticModel`` (moved
            to ``device``/``dtype`` in place and put in eval mode).
        device: ``"cpu"``, ``"cuda"``, ... (the model and the neighbour search run there).
        dtype: model dtype; float64 by default (finite differences and NVE energy conservation
            want it), ``torch.float32`` for speed on GPUs, None for the checkpoint's training dtype.
        skin: Verlet skin in Å; the neighbour list is rebuilt once an atom has moved more than
            ``skin / 2`` since the last build. 0 rebuilds at every call.
        elements: elements the model may be used on (symbols or Z). By default those of the
            checkpoint's training data (``stats["elements"]`` / model card); for a model object,
            no check beyond the embedding size.
        trust: see ``load_model`` (only for checkpoints from a trusted source).
        source: for a model trained on several sources (``ModelConfig.sources``), the name of the
            source whose energy reference and head to use (required there; an unknown name raises
            ``UnknownSourceError`` listing the known ones). The element check then uses that
            source's training elements.
        weights: ``None`` (the moving average of the weights when the checkpoint has one, else the
            trained weights), ``"ema"`` or ``"raw"`` (``load_model``).
        best: for a run directory, its best checkpoint by validation instead of the latest.
        **kwargs: passed to ``ase.calculators.calculator.Calculator`` (e.g. ``label``).

    Attributes:
        model, info: the ``AtomisticModel`` and ``ModelInfo`` (None for a model object).
        neighbor_list_builds: number of neighbour-list builds so far.
        num_edges: edges the model saw in the last call (within the cutoff).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float64,
                 skin: float = 1.0, elements: Iterable[int | str] | None = None, trust: bool = False,
                 source: str | None = None, weights: str | None = None, best: bool = False, **kwargs):
        if not (isinstance(skin, (int, float)) and skin >= 0):
            raise ValueError(f"skin must be a number >= 0 Å, got {skin!r}")
        super().__init__(**kwargs)
        from gnnmegatron.inference.loading import check_device, load_model, resolve_dtype, resolve_source
        from gnnmegatron.models import AtomisticModel

        self.device = check_device(device)
        if isinstance(model, (str, Path)):
            self.model, self.info = load_model(model, device=self.device, dtype=dtype, trust=trust, weights=weights,
                                               best=best)
            self.source_id = resolve_source(self.model.cfg, source)
            known = self.info.source_elements(source if self.source_id is not None else None)
            self._elements_from = (f"training data of source {source!r} of {self.info.path}" if self.source_id is not None
                                   else f"training data of {self.info.path}")
        elif isinstance(model, AtomisticModel):
            self.model = model.to(device=self.device, dtype=resolve_dtype(dtype or "float64")).eval()
            self.source_id = resolve_source(self.model.cfg, source)
            self.info = None
            known = None
            self._elements_from = "elements= argument"
        else:
            raise TypeError(f"model must be a checkpoint path, a run directory or an AtomisticModel, "
                            f"got {type(model).__name__}")
        self.source = source if self.source_id is not None else None
        self.dtype = self.model.embedding.weight.dtype
        if elements is not None:
            known = [_as_z(e) for e in elements]
            self._elements_from = "elements= argument"
        self.known_elements = None if known is None else sorted({int(z) for z in known})
        self.skin = float(skin)
        self.cutoff = float(self.model.cfg.cutoff)
        self.conservative = self.model.cfg.force_mode == "conservative"
        self.neighbor_list_builds = 0
        self.num_edges = 0
        self._nl = None

    # ------------------------------------------------------------------ checks
    def check_elements(self, numbers: np.ndarray) -> None:
        """Raises ``UnknownElementError`` naming every element the model has not seen."""
        present = sorted({int(z) for z in np.unique(numbers)})
        max_z = self.model.cfg.max_z
        beyond = [z for z in present if z < 1 or z > max_z]
        if beyond:
            raise UnknownElementError(f"the structure contains {format_elements(beyond)}, outside the model's "
                                      f"embedding (atomic numbers 1..{max_z})")
        if self.known_elements is None:
            return
        unknown = [z for z in present if z not in self.known_elements]
        if unknown:
            raise UnknownElementError(
                f"the model has never seen {format_elements(unknown)}: it knows only "
                f"{', '.join(chemical_symbols[z] for z in self.known_elements)} ({self._elements_from}); "
                f"its predictions for other elements would be meaningless")

    # ------------------------------------------------------------------ neighbour list
    def _needs_build(self, positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> bool:
        nl = self._nl
        if nl is None or nl["numbers"].shape != numbers.shape or not np.array_equal(nl["numbers"], numbers):
            return True
        if not np.array_equal(nl["cell"], cell) or not np.array_equal(nl["pbc"], pbc):
            return True
        if len(positions) == 0:
            return False
        moved = np.sqrt(((positions - nl["positions"]) ** 2).sum(axis=1).max())
        return bool(moved > 0.5 * self.skin)

    def _build(self, positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
        dev = self.device
        pos64 = torch.as_tensor(positions, dtype=torch.float64, device=dev)
        cell64 = torch.as_tensor(cell, dtype=torch.float64, device=dev)
        pbc_t = torch.as_tensor(pbc, dtype=torch.bool, device=dev)
        batch = torch.zeros(len(positions), dtype=torch.long, device=dev)
        edge_index, edge_shift = radius_graph_pbc(pos64, cell64[None], pbc_t[None], batch, self.cutoff + self.skin)
        self._nl = {
            "positions": positions.copy(), "numbers": numbers.copy(), "cell": cell.copy(), "pbc": pbc.copy(),
            "edge_index": edge_index, "edge_shift": edge_shift,  # float64 integer multiples
            "offset": edge_shift @ cell64,  # [E, 3] Cartesian image offsets (Å), fixed while the cell is
        }
        self.neighbor_list_builds += 1

    def _edges(self, pos64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates with 0 < |r_ij| < cutoff at the current positions (float64, as collate does).

        Raises ValueError for two atoms (or an atom and a periodic image) closer than
        ``MIN_DISTANCE``, which the stores refuse too: the model has no meaningful energy there."""
        from gnnmegatron.data.schema import MIN_DISTANCE

        nl = self._nl
        ei = nl["edge_index"]
        vec = pos64[ei[1]] - pos64[ei[0]] + nl["offset"]
        d2 = vec.square().sum(dim=1)
        self_pair = (ei[0] == ei[1]) & (nl["edge_shift"] == 0).all(dim=1)
        close = (d2 < MIN_DISTANCE * MIN_DISTANCE) & ~self_pair
        if bool(close.any()):
            k = int(torch.nonzero(close)[0, 0])
            i, j = int(ei[0, k]), int(ei[1, k])
            image = "" if i != j else " (its own periodic image)"
            raise ValueError(f"atoms {i} and {j}{image} are {float(d2[k].sqrt()):.3g} Å apart, closer than "
                             f"{MIN_DISTANCE} Å: the structure is broken (a diverged simulation or duplicated atoms)")
        keep = (d2 < self.cutoff * self.cutoff) & ~self_pair
        return ei[:, keep], nl["edge_shift"][keep]

    def graph(self, atoms) -> dict[str, torch.Tensor]:
        """The model's batch dict for ``atoms`` (one graph), reusing the neighbour list when allowed.

        Shapes:
            atomic_numbers [N], positions [N, 3], cell [1, 3, 3], pbc [1, 3], batch [N], ptr [2],
            num_atoms [1], edge_index [2, E], edge_shift [E, 3], source [1] (see ``gnnmegatron.data.batch``).
        """
        positions = np.asarray(atoms.positions, dtype=np.float64)
        numbers = np.asarray(atoms.numbers, dtype=np.int64)
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        pbc = np.asarray(atoms.pbc, dtype=bool).reshape(3)
        bad = ~np.isfinite(positions).all(axis=1)
        if bad.any():  # checked on every call: a reused neighbour list would not see it
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"positions of atom {i} are not finite ({positions[i].tolist()}; {int(bad.sum())} "
                             f"atom(s) in all): the structure is broken (a diverged simulation?)")
        if not np.isfinite(cell[pbc]).all():
            raise ValueError(f"the cell is not finite along a periodic axis: {cell.tolist()}")
        self.check_elements(numbers)
        if self._needs_build(positions, numbers, cell, pbc):
            self._build(positions, numbers, cell, pbc)
        dev, n = self.device, len(numbers)
        pos64 = torch.as_tensor(positions, dtype=torch.float64, device=dev)
        edge_index, edge_shift = self._edges(pos64)
        self.num_edges = int(edge_index.shape[1])
        return {
            "atomic_numbers": torch.as_tensor(numbers, device=dev),
            "positions": pos64.to(self.dtype),
            "cell": torch.as_tensor(cell, dtype=self.dtype, device=dev)[None],
            "pbc": torch.as_tensor(pbc, device=dev)[None],
            "batch": torch.zeros(n, dtype=torch.long, device=dev),
            "ptr": torch.tensor([0, n], dtype=torch.long, device=dev),
            "num_atoms": torch.tensor([n], dtype=torch.long, device=dev),
            "edge_index": edge_index,
            "edge_shift": edge_shift.to(self.dtype),
            "source": torch.tensor([self.source_id or 0], dtype=torch.long, device=dev),
        }

    def reset_neighbor_list(self) -> None:
        """Forgets the cached neighbour list (the next call rebuilds)."""
        self._nl = None

    # ------------------------------------------------------------------ ASE entry point
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        # Stress is one more gradient of the same backward pass, so it is computed whenever it
        # exists: optimizers with a cell filter ask for forces and stress in separate calls.
        has_stress = self.conservative and bool(np.asarray(atoms.pbc).all())
        if "stress" in properties and not has_stress:
            if not self.conservative:
                raise PropertyNotImplementedError(
                    "stress needs a conservative model (force_mode='conservative'); this one predicts forces "
                    "directly and has no energy-strain derivative")
            raise PropertyNotImplementedError(
                f"stress is defined for cells periodic along all three axes; these atoms have "
                f"pbc={np.asarray(atoms.pbc).tolist()}")
        batch = self.graph(atoms)
        with torch.no_grad():  # conservative forces still use autograd inside; outputs come back detached
            out = self.model(batch, compute_forces=True, compute_stress=has_stress)
        energy = float(out["energy"][0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["node_energy"].double().cpu().numpy(),
            "forces": out["forces"].double().cpu().numpy(),
        }
        if has_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"][0].double().cpu().numpy())
