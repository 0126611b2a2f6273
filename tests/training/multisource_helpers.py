"""Small graph stores for multi-source tests: EMT metals, relabelled copies and exactly linear data."""
from __future__ import annotations

import numpy as np

from gnnmegatron.data.emt import EMTConfig, iter_emt_structures
from gnnmegatron.data.store import GraphStoreWriter


def emt_structures(n: int, seed: int, elements=("Cu", "Ag", "Au"), max_atoms: int = 8) -> list[dict]:
    out = []
    for s in iter_emt_structures(EMTConfig(num_structures=n, seed=seed, max_atoms=max_atoms, elements=elements),
                                 workers=1):
        s.pop("kind")
        s.pop("index")
        out.append(s)
    return out


def relabel(structures, *, scale: float = 1.0, offsets: dict[int, float] | None = None, drop_forces_every: int = 0,
            drop_energy_every: int = 0, drop_stress_every: int = 0) -> list[dict]:
    """Copies with E -> scale E + sum_i offsets[z_i], F -> scale F, stress -> scale stress; every k-th structure
    loses its forces / energy / stress label (k = 0: none)."""
    offsets = offsets or {}
    out = []
    for i, s in enumerate(structures):
        s = dict(s)
        s["energy"] = scale * float(s["energy"]) + sum(offsets.get(int(z), 0.0) for z in s["atomic_numbers"])
        s["forces"] = scale * np.asarray(s["forces"])
        s["stress"] = None if s.get("stress") is None else scale * np.asarray(s["stress"])
        if drop_forces_every and i % drop_forces_every == 1:
            s["forces"] = None
        if drop_energy_every and i % drop_energy_every == 2:
            s["energy"] = None
        if drop_stress_every and i % drop_stress_every == 0:
            s["stress"] = None
        out.append(s)
    return out


def linear_structures(n: int, seed: int, table: dict[int, float], noise: float = 1e-3) -> list[dict]:
    """Structures whose energy is exactly linear in composition, ``sum_i table[z_i]`` plus N(0, noise) per atom."""
    rng = np.random.default_rng(seed)
    zs = np.array(sorted(table))
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 7))
        z = rng.choice(zs, size=k)
        grid = np.array([[i % 2, (i // 2) % 2, i // 4] for i in range(k)], dtype=np.float64) * 2.4
        pos = grid + rng.normal(scale=0.05, size=(k, 3))
        energy = float(sum(table[int(a)] for a in z) + rng.normal(scale=noise) * k)
        out.append(dict(atomic_numbers=z, positions=pos, cell=np.eye(3) * 4.8, pbc=np.ones(3, bool), energy=energy,
                        forces=None, stress=None))
    return out


def write_store(path, structures, name: str):
    with GraphStoreWriter(path, producer="tests.multisource", sources=[name], overwrite=True) as writer:
        writer.append(structures, source=0)
    return path


def make_two_sources(root):
    """metals: EMT Cu/Ag/Au; shifted: EMT Cu/Ni/Pd on another reference (x1.5, per-element offsets), with
    some structures lacking forces, energy or stress. Returns the two store paths."""
    a = write_store(root / "metals.zarr", emt_structures(40, 0), "metals")
    shifted = relabel(emt_structures(30, 1, elements=("Cu", "Ni", "Pd")), scale=1.5,
                      offsets={29: -3.0, 28: -5.0, 46: -4.0}, drop_forces_every=3, drop_energy_every=5,
                      drop_stress_every=4)
    b = write_store(root / "shifted.zarr", shifted, "shifted")
    return a, b
