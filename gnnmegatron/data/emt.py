"""The embedded default dataset: periodic metal structures labelled by ASE's EMT potential.

EMT (effective-medium theory, Jacobsen, Stoltze and Norskov, Surf. Sci. 366, 394 (1996)) is a
real many-body potential for the fcc metals Al, Cu, Ag, Au, Ni, Pd and Pt. ASE ships a pure
Python implementation (``ase.calculators.emt.EMT``) that gives energy, forces and stress, so a
few thousand labelled structures can be generated on a laptop in seconds, with no download.

Three kinds of structure are drawn:

- ``bulk``: fcc, bcc or hcp supercells of one element at its EMT equilibrium lattice constant.
- ``surface``: fcc(111), fcc(100) and fcc(110) slabs with vacuum on both sides (pbc is True in
  all three directions; the vacuum gap is ``2 * vacuum`` Å), sometimes with substitutional
  alloy atoms.
- ``alloy``: random substitutional bulk alloys of 2-3 elements, lattice constant by Vegard's law.

Every structure gets a random symmetric strain (in-plane only for slabs) and a thermal-like
rattle whose standard deviation is drawn per structure. Structure ``i`` depends only on
``(seed, i)`` (``numpy.random.default_rng([seed, i])``), so parallel generation gives the same
dataset in the same order regardless of the number of workers. Structures with atoms closer
than ``min_distance`` or with absurd energies or forces are rejected and redrawn from the same
random stream (still deterministic).

Typical use::

    from gnnmegatron.data.emt import EMTConfig, generate_emt_dataset
    summary = generate_emt_dataset("data/emt.zarr", EMTConfig(num_structures=3000, seed=0))
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc110, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from gnnmegatron.data.importers import atoms_to_structure

PRODUCER = "gnnmegatron.data.emt"
EMT_METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
KINDS = ("bulk", "surface", "alloy")

# Equilibrium lattice constants (Å) of ASE's EMT (asap_cutoff=False), found by minimising the
# energy per atom over a (hcp with ideal c/a = sqrt(8/3)); tests/data/test_emt.py checks that each
# is a minimum. EMT's fcc values sit within ~2% of experiment (e.g. Cu 3.590 vs 3.615).
LATTICE_CONSTANTS = {
    "fcc": {"Al": 3.9943, "Cu": 3.5898, "Ag": 4.0636, "Au": 4.0562, "Ni": 3.4871, "Pd": 3.8787, "Pt": 3.9218},
    "bcc": {"Al": 3.1213, "Cu": 2.8554, "Ag": 3.2294, "Au": 3.2251, "Ni": 2.7742, "Pd": 3.0891, "Pt": 3.1223},
    "hcp": {"Al": 2.7781, "Cu": 2.5381, "Ag": 2.8736, "Au": 2.8682, "Ni": 2.4656, "Pd": 2.7424, "Pt": 2.7727},
}
# Probabilities of the bulk lattices (all seven metals are fcc in EMT; bcc/hcp add variety).
_BULK_LATTICES = (("fcc", 0.6), ("bcc", 0.2), ("hcp", 0.2))
_ALLOY_LATTICES = (("fcc", 0.75), ("bcc", 0.15), ("hcp", 0.1))
_FACETS = {"fcc111": fcc111, "fcc100": fcc100, "fcc110": fcc110}


@dataclass
class EMTConfig:
    """Settings of the EMT dataset generator.

    Attributes:
        num_structures: number of structures to generate.
        seed: dataset seed; structure ``i`` is drawn from ``default_rng([seed, i])``.
        elements: metals to draw from (a subset of Al, Cu, Ag, Au, Ni, Pd, Pt).
        fractions: relative frequency of each kind ("bulk", "surface", "alloy"); normalised.
        min_atoms: smallest structure (atoms).
        max_atoms: largest structure (atoms).
        strain: maximum magnitude of each component of the random symmetric strain (0.04 = ±4%).
        rattle_std: (low, high) range (Å) of the per-structure standard deviation of the
            Gaussian displacement of every atom (a thermal rattle).
        vacuum: vacuum (Å) on each side of a slab; the gap between periodic images is twice this.
        alloy_surface_prob: probability that a surface slab is a random 2-3 element alloy.
        min_distance: reject structures with two atoms closer than this (Å, periodic images count).
        max_energy_per_atom: reject structures with |E|/n above this (eV/atom).
        max_force: reject structures with any force component magnitude above this (eV/Å).
        max_attempts: redraws allowed per structure before giving up with an error.
    """

    num_structures: int = 3000
    seed: int = 0
    elements: tuple[str, ...] = EMT_METALS
    fractions: dict[str, float] = field(default_factory=lambda: {"bulk": 0.4, "surface": 0.3, "alloy": 0.3})
    min_atoms: int = 2
    max_atoms: int = 32
    strain: float = 0.04
    rattle_std: tuple[float, float] = (0.05, 0.15)
    vacuum: float = 6.0
    alloy_surface_prob: float = 0.3
    min_distance: float = 1.5
    max_energy_per_atom: float = 5.0
    max_force: float = 50.0
    max_attempts: int = 100

    def __post_init__(self):
        self.elements = tuple(self.elements)
        self.rattle_std = tuple(float(x) for x in self.rattle_std)
        self.fractions = {str(k): float(v) for k, v in dict(self.fractions).items()}
        if self.num_structures < 0:
            raise ValueError(f"num_structures must be >= 0, got {self.num_structures}")
        if not self.elements:
            raise ValueError(f"elements is empty; choose from {EMT_METALS}")
        bad = [e for e in self.elements if e not in EMT_METALS]
        if bad:
            raise ValueError(f"elements {bad} have no EMT parameters; choose from {EMT_METALS}")
        if len(set(self.elements)) != len(self.elements):
            raise ValueError(f"elements has duplicates: {self.elements}")
        unknown = sorted(set(self.fractions) - set(KINDS))
        if unknown:
            raise ValueError(f"fractions has unknown kinds {unknown}; known kinds are {KINDS}")
        if any(v < 0 for v in self.fractions.values()) or sum(self.fractions.values()) <= 0:
            raise ValueError(f"fractions must be >= 0 with a positive sum, got {self.fractions}")
        if self.fractions.get("alloy", 0.0) > 0 and len(self.elements) < 2:
            raise ValueError(
                f"fractions['alloy']={self.fractions['alloy']} needs >= 2 elements, got {self.elements}; "
                "add elements or set the alloy fraction to 0"
            )
        if not 4 <= self.max_atoms:
            raise ValueError(f"max_atoms must be >= 4 (the smallest slab), got {self.max_atoms}")
        if not 1 <= self.min_atoms <= self.max_atoms:
            raise ValueError(f"need 1 <= min_atoms <= max_atoms, got min_atoms={self.min_atoms}, "
                             f"max_atoms={self.max_atoms}")
        if not 0 <= self.strain < 0.5:
            raise ValueError(f"strain must be in [0, 0.5), got {self.strain}")
        if len(self.rattle_std) != 2 or not 0 <= self.rattle_std[0] <= self.rattle_std[1] <= 0.5:
            raise ValueError(f"rattle_std must be (low, high) with 0 <= low <= high <= 0.5 Å, got {self.rattle_std}")
        if self.vacuum < 0:
            raise ValueError(f"vacuum must be >= 0 Å, got {self.vacuum}")
        if not 0 <= self.alloy_surface_prob <= 1:
            raise ValueError(f"alloy_surface_prob must be in [0, 1], got {self.alloy_surface_prob}")
        if self.min_distance < 0 or self.max_energy_per_atom <= 0 or self.max_force <= 0:
            raise ValueError(
                f"need min_distance >= 0, max_energy_per_atom > 0, max_force > 0; got {self.min_distance}, "
                f"{self.max_energy_per_atom}, {self.max_force}"
            )
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def kind_probabilities(self) -> np.ndarray:
        """Normalised probabilities of KINDS, shape [3]."""
        p = np.array([self.fractions.get(k, 0.0) for k in KINDS], dtype=np.float64)
        return p / p.sum()


def _choice(rng: np.random.Generator, options) -> str:
    names, probs = zip(*options)
    return names[int(rng.choice(len(names), p=np.asarray(probs) / sum(probs)))]


def _supercell(rng: np.random.Generator, prim: Atoms, cfg: EMTConfig) -> Atoms:
    """Repeat ``prim`` to a random size in [min_atoms, max_atoms] with no needle-shaped cells."""
    n0 = len(prim)
    cands = [
        r for r in itertools.product(range(1, 7), repeat=3)
        if cfg.min_atoms <= n0 * r[0] * r[1] * r[2] <= cfg.max_atoms and max(r) <= 2 * min(r)
    ]
    if not cands:  # only when min_atoms is close to max_atoms: drop the shape rule
        cands = [r for r in itertools.product(range(1, 7), repeat=3)
                 if cfg.min_atoms <= n0 * r[0] * r[1] * r[2] <= cfg.max_atoms]
    if not cands:
        return prim.copy()
    return prim.repeat(cands[int(rng.integers(len(cands)))])


def _species(rng: np.random.Generator, n: int, cfg: EMTConfig) -> list[str]:
    """Random substitutional occupation of n sites by 2-3 elements (at least two present when n >= 2)."""
    k = int(rng.integers(2, min(3, len(cfg.elements)) + 1))
    els = [str(e) for e in rng.choice(cfg.elements, size=k, replace=False)]
    x = rng.dirichlet(np.ones(k))
    for _ in range(20):
        symbols = [els[j] for j in rng.choice(k, size=n, p=x)]
        if len(set(symbols)) >= min(2, n):
            return symbols
    symbols[0], symbols[-1] = els[0], els[1]
    return symbols


def _vegard(symbols: list[str], lattice: str) -> float:
    return float(np.mean([LATTICE_CONSTANTS[lattice][s] for s in symbols]))


def _build_bulk(rng, cfg, alloy: bool) -> Atoms:
    lattice = _choice(rng, _ALLOY_LATTICES if alloy else _BULK_LATTICES)
    element = str(rng.choice(cfg.elements))
    a = LATTICE_CONSTANTS[lattice][element]
    if lattice == "hcp":
        prim = bulk(element, "hcp", a=a, c=a * np.sqrt(8.0 / 3.0))
    else:
        prim = bulk(element, lattice, a=a, cubic=bool(rng.random() < 0.5))
    atoms = _supercell(rng, prim, cfg)
    if alloy:
        symbols = _species(rng, len(atoms), cfg)
        atoms.set_chemical_symbols(symbols)
        atoms.set_cell(atoms.cell * (_vegard(symbols, lattice) / a), scale_atoms=True)
    atoms.info["lattice"] = lattice
    return atoms


def _build_surface(rng, cfg) -> Atoms:
    facet = str(rng.choice(list(_FACETS)))
    sizes = [
        (p, q, layers) for p in range(1, 5) for q in range(1, 5) for layers in range(2, 7)
        if p * q >= 2 and max(cfg.min_atoms, 4) <= p * q * layers <= cfg.max_atoms and max(p, q) <= 2 * min(p, q)
    ]
    if not sizes:
        sizes = [(1, 2, 2)]
    size = sizes[int(rng.integers(len(sizes)))]
    element = str(rng.choice(cfg.elements))
    a = LATTICE_CONSTANTS["fcc"][element]
    atoms = _FACETS[facet](element, size, a=a, vacuum=cfg.vacuum, periodic=True)
    if len(cfg.elements) >= 2 and rng.random() < cfg.alloy_surface_prob:
        symbols = _species(rng, len(atoms), cfg)
        atoms.set_chemical_symbols(symbols)
        # Scale the slab about its centre in-plane and along z, keeping the vacuum width.
        s = _vegard(symbols, "fcc") / a
        cell = atoms.cell.array.copy()
        pos = atoms.positions.copy()
        zc = pos[:, 2].mean()
        pos[:, :2] *= s
        pos[:, 2] = zc + (pos[:, 2] - zc) * s
        cell[:2] *= s
        atoms.set_cell(cell, scale_atoms=False)
        atoms.positions = pos
    atoms.info["facet"] = facet
    return atoms


def _perturb(rng, atoms: Atoms, cfg: EMTConfig, slab: bool) -> None:
    """Random symmetric strain (in-plane only for slabs) and Gaussian rattle, in place."""
    a = rng.uniform(-cfg.strain, cfg.strain, size=(3, 3))
    eps = 0.5 * (a + a.T)
    if slab:
        eps[2, :] = 0.0
        eps[:, 2] = 0.0
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    std = rng.uniform(*cfg.rattle_std)
    atoms.positions = atoms.positions + rng.normal(0.0, std, size=(len(atoms), 3))
    atoms.info["rattle_std"] = float(std)


def _label(atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
    """EMT energy (eV), forces [n,3] (eV/Å) and Voigt stress [6] (eV/Å^3)."""
    atoms.calc = EMT()
    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces())
    stress = np.array(atoms.get_stress(voigt=True))
    atoms.calc = None
    return energy, forces, stress


def shortest_distance(positions: np.ndarray, cell: np.ndarray, r: float) -> float:
    """Shortest interatomic distance in a fully periodic cell (self-images count); inf if all >= r.

    Exact for distances below ``r``: every periodic image within ``r`` is searched, since an image
    at fractional offset k along a lattice direction is at least ``|k| - 1`` cell heights away.
    (Vectorised, ~5x faster than ``ase.neighborlist.neighbor_list`` for 32 atoms.)

    Shapes:
        positions: [n, 3] (Å); cell: [3, 3] rows are lattice vectors (Å).
    """
    heights = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
    reps = np.ceil(r / heights).astype(int) + 1
    shifts = np.array(list(itertools.product(*(range(-m, m + 1) for m in reps))), dtype=np.float64) @ cell
    d = positions[None, :, None, :] - positions[:, None, None, :] + shifts[None, None]  # [n, n, S, 3]
    d2 = np.einsum("ijsk,ijsk->ijs", d, d)
    zero = int(np.flatnonzero(~shifts.any(axis=1))[0])
    d2[np.arange(len(positions)), np.arange(len(positions)), zero] = np.inf  # an atom with itself
    dmin = float(np.sqrt(d2.min()))
    return dmin if dmin < r else float("inf")


def _reject_reason(atoms: Atoms, energy, forces, cfg: EMTConfig) -> str | None:
    if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
        return "non-finite label"
    if abs(energy) / len(atoms) > cfg.max_energy_per_atom:
        return "energy per atom too large"
    if np.abs(forces).max() > cfg.max_force:
        return "force too large"
    return None


def generate_structure(i: int, cfg: EMTConfig) -> Atoms:
    """Generate EMT structure ``i`` of the dataset defined by ``cfg`` (deterministic in (seed, i)).

    Args:
        i: structure index, 0 <= i (need not be < num_structures).
        cfg: generator settings.

    Returns:
        A periodic ``ase.Atoms`` with a SinglePointCalculator holding EMT's energy (eV),
        forces (eV/Å) and Voigt stress (eV/Å^3), and ``info`` with "kind", "index", "seed",
        "attempts", "rattle_std" and "lattice" (bulk/alloy) or "facet" (surface).

    Shapes:
        n atoms with cfg.min_atoms <= n <= cfg.max_atoms; positions [n, 3]; cell [3, 3];
        forces [n, 3]; stress [6].

    Raises:
        RuntimeError: no acceptable structure within cfg.max_attempts draws (names i and the reason).
    """
    if i < 0:
        raise ValueError(f"structure index must be >= 0, got {i}")
    rng = np.random.default_rng([cfg.seed, i])
    p = cfg.kind_probabilities()
    reason = None
    for attempt in range(1, cfg.max_attempts + 1):
        kind = KINDS[int(rng.choice(len(KINDS), p=p))]
        atoms = _build_surface(rng, cfg) if kind == "surface" else _build_bulk(rng, cfg, alloy=kind == "alloy")
        _perturb(rng, atoms, cfg, slab=kind == "surface")
        atoms.pbc = True
        atoms.wrap()
        dmin = shortest_distance(atoms.positions, atoms.cell.array, cfg.min_distance)
        if dmin < cfg.min_distance:
            reason = f"atoms too close ({dmin:.3f} Å < min_distance={cfg.min_distance} Å)"
            continue
        energy, forces, stress = _label(atoms)
        reason = _reject_reason(atoms, energy, forces, cfg)
        if reason is None:
            atoms.calc = SinglePointCalculator(atoms, energy=energy, free_energy=energy, forces=forces, stress=stress)
            atoms.info.update(kind=kind, index=int(i), seed=int(cfg.seed), attempts=attempt)
            return atoms
    raise RuntimeError(
        f"EMT structure {i} (seed {cfg.seed}): no acceptable structure in {cfg.max_attempts} draws "
        f"(last rejection: {reason}); loosen min_distance/max_energy_per_atom/max_force or lower rattle_std/strain"
    )


def _worker(args: tuple[int, EMTConfig]) -> dict:
    i, cfg = args
    atoms = generate_structure(i, cfg)
    out = atoms_to_structure(atoms)
    out["kind"] = atoms.info["kind"]
    out["index"] = int(i)
    return out


def _num_workers(workers: int | None, n: int) -> int:
    return max(1, min(workers or os.cpu_count() or 1, max(n, 1)))


def _pool(workers: int):
    """A process pool (a context manager that terminates it), or a null context for one worker."""
    return contextlib.nullcontext(None) if workers == 1 else multiprocessing.get_context().Pool(workers)


def _imap(pool, cfg: EMTConfig, workers: int, chunksize: int | None) -> Iterator[dict]:
    tasks = ((i, cfg) for i in range(cfg.num_structures))
    if pool is None:
        return map(_worker, tasks)
    if chunksize is None:
        chunksize = int(np.clip(cfg.num_structures // (workers * 8), 1, 64))
    return pool.imap(_worker, tasks, chunksize=chunksize)


def iter_emt_structures(cfg: EMTConfig, workers: int | None = None, chunksize: int | None = None) -> Iterator[dict]:
    """Yield the structures of the dataset in index order, generated on ``workers`` processes.

    Each item is a structure dict (see :func:`gnnmegatron.data.importers.atoms_to_structure`)
    plus "kind" (str) and "index" (int). ``Pool.imap`` keeps the order; the result of every
    structure depends only on (seed, index), so any number of workers gives the same items.

    Args:
        cfg: generator settings.
        workers: processes (default ``os.cpu_count()``); 1 generates in this process.
        chunksize: structures per task sent to a worker (default: about 1/8 of each worker's
            share, 1..64).
    """
    workers = _num_workers(workers, cfg.num_structures)
    with _pool(workers) as pool:
        yield from _imap(pool, cfg, workers, chunksize)


def generate_emt_dataset(path, cfg: EMTConfig | None = None, workers: int | None = None, progress: bool = True,
                         overwrite: bool = False, chunksize: int | None = None) -> dict:
    """Generate the EMT dataset and write it to a Zarr graph store at ``path`` (streaming).

    Args:
        path: output store directory.
        cfg: generator settings (default ``EMTConfig()``: 3000 structures, seed 0).
        workers: generator processes (default ``os.cpu_count()``).
        progress: show a tqdm bar with structures/s and atoms/s.
        overwrite: replace an existing store at ``path``.
        chunksize: structures per worker task (see :func:`iter_emt_structures`).

    Returns:
        Summary dict: path, num_graphs, num_atoms, elements (sorted atomic numbers), kinds
        (count per kind), seconds, structures_per_s, atoms_per_s, workers, atoms_per_structure
        (min/mean/max), energy_per_atom (min/mean/max, eV), mean_abs_force (eV/Å, mean of |F| per atom),
        config (the settings as a dict).
    """
    from tqdm.auto import tqdm

    from gnnmegatron.data.store import GraphStoreWriter

    cfg = cfg or EMTConfig()
    workers = _num_workers(workers, cfg.num_structures)
    stats = {"atoms": 0, "kinds": dict.fromkeys(KINDS, 0), "z": set(), "epa": [], "fsum": 0.0, "n": []}
    bar = tqdm(total=cfg.num_structures, unit="struct", disable=not progress, desc="EMT", smoothing=0.1)
    t0 = time.perf_counter()
    last = [t0]

    def stream(pool):
        for s in _imap(pool, cfg, workers, chunksize):
            n = len(s["atomic_numbers"])
            stats["atoms"] += n
            stats["kinds"][s.pop("kind")] += 1
            s.pop("index")
            stats["z"].update(int(z) for z in np.unique(s["atomic_numbers"]))
            stats["epa"].append(s["energy"] / n)
            stats["fsum"] += float(np.linalg.norm(s["forces"], axis=1).sum())
            stats["n"].append(n)
            bar.update(1)
            now = time.perf_counter()
            if now - last[0] > 0.5:
                last[0] = now
                bar.set_postfix_str(f"{stats['atoms'] / (now - t0):,.0f} atoms/s")
            yield s

    try:
        # The pool starts (forks) before the writer opens the store and its I/O threads.
        with _pool(workers) as pool, \
                GraphStoreWriter(path, producer=PRODUCER, sources=["emt"], overwrite=overwrite) as writer:
            writer.append(stream(pool), source=0)
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    epa = np.asarray(stats["epa"]) if stats["epa"] else np.zeros(1)
    nat = np.asarray(stats["n"]) if stats["n"] else np.zeros(1)
    return {
        "path": str(path),
        "num_graphs": cfg.num_structures,
        "num_atoms": stats["atoms"],
        "elements": sorted(stats["z"]),
        "kinds": stats["kinds"],
        "seconds": dt,
        "structures_per_s": cfg.num_structures / dt,
        "atoms_per_s": stats["atoms"] / dt,
        "workers": workers,
        "atoms_per_structure": {"min": int(nat.min()), "mean": float(nat.mean()), "max": int(nat.max())},
        "energy_per_atom": {"min": float(epa.min()), "mean": float(epa.mean()), "max": float(epa.max())},
        "mean_abs_force": stats["fsum"] / max(stats["atoms"], 1),
        "config": asdict(cfg),
    }


__all__ = [
    "EMTConfig", "EMT_METALS", "KINDS", "LATTICE_CONSTANTS", "PRODUCER", "shortest_distance",
    "generate_emt_dataset", "generate_structure", "iter_emt_structures",
]
