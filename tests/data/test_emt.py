"""Tests of the EMT dataset generator (gnnmegatron.data.emt)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.data import atomic_numbers
from ase.neighborlist import neighbor_list

from gnnmegatron.data.emt import (
    EMT_METALS,
    KINDS,
    LATTICE_CONSTANTS,
    PRODUCER,
    EMTConfig,
    generate_emt_dataset,
    generate_structure,
    iter_emt_structures,
    shortest_distance,
)

ARRAY_KEYS = ("atomic_numbers", "positions", "cell", "pbc", "forces", "stress")


def assert_same_structure(a: dict, b: dict, msg: str = ""):
    for k in ARRAY_KEYS:
        assert np.array_equal(a[k], b[k]), f"{msg} key {k} differs"
    assert a["energy"] == b["energy"], f"{msg} energy {a['energy']} != {b['energy']}"


@pytest.fixture(scope="module")
def sample():
    """80 structures of the default config (seed 0), generated in this process."""
    return list(iter_emt_structures(EMTConfig(num_structures=80, seed=0), workers=1))


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="Fe"):
        EMTConfig(elements=("Cu", "Fe"))
    with pytest.raises(ValueError, match="needs >= 2 elements"):
        EMTConfig(elements=("Cu",))
    EMTConfig(elements=("Cu",), fractions={"bulk": 1.0, "surface": 1.0})  # fine without alloys
    with pytest.raises(ValueError, match="min_atoms=40"):
        EMTConfig(min_atoms=40, max_atoms=32)
    with pytest.raises(ValueError, match="unknown kinds"):
        EMTConfig(fractions={"bulk": 1.0, "liquid": 1.0})
    with pytest.raises(ValueError, match="rattle_std"):
        EMTConfig(rattle_std=(0.2, 0.1))


def test_lattice_constants_are_emt_minima():
    for lattice, table in LATTICE_CONSTANTS.items():
        for el, a in table.items():
            def energy(x):
                kw = {"c": x * np.sqrt(8 / 3)} if lattice == "hcp" else {}
                atoms = bulk(el, lattice, a=x, **kw)
                atoms.calc = EMT()
                return atoms.get_potential_energy() / len(atoms)

            e0, lo, hi = energy(a), energy(a * 0.995), energy(a * 1.005)
            assert e0 < lo and e0 < hi, f"{lattice} {el} a={a}: E={e0} not below E(-0.5%)={lo}, E(+0.5%)={hi}"


def test_structure_is_deterministic_and_seed_dependent():
    cfg = EMTConfig(num_structures=10, seed=3)
    a, b = generate_structure(7, cfg), generate_structure(7, cfg)
    assert np.array_equal(a.positions, b.positions) and np.array_equal(a.numbers, b.numbers)
    assert a.get_potential_energy() == b.get_potential_energy()
    c = generate_structure(7, EMTConfig(num_structures=10, seed=4))
    assert len(c) != len(a) or not np.allclose(c.positions, a.positions)


def test_workers_1_and_2_give_identical_datasets():
    cfg = EMTConfig(num_structures=24, seed=11)
    serial = list(iter_emt_structures(cfg, workers=1))
    parallel = list(iter_emt_structures(cfg, workers=2, chunksize=3))
    assert [s["index"] for s in parallel] == list(range(24))
    for i, (a, b) in enumerate(zip(serial, parallel)):
        assert_same_structure(a, b, f"structure {i}:")
    # Order independence: structure i alone equals item i of the stream.
    alone = generate_structure(17, cfg)
    assert np.array_equal(alone.positions, serial[17]["positions"])


def test_sample_covers_elements_kinds_and_bounds(sample):
    cfg = EMTConfig()
    zs = set(np.concatenate([s["atomic_numbers"] for s in sample]).tolist())
    assert zs == {atomic_numbers[e] for e in EMT_METALS}
    kinds = {s["kind"] for s in sample}
    assert kinds == set(KINDS)
    for s in sample:
        n = len(s["atomic_numbers"])
        assert cfg.min_atoms <= n <= cfg.max_atoms, n
        assert s["pbc"].all(), f"structure {s['index']} not periodic"
        assert abs(np.linalg.det(s["cell"])) > 1.0
        assert s["forces"].shape == (n, 3) and s["stress"].shape == (3, 3)
        assert np.allclose(s["stress"], s["stress"].T)
        if s["kind"] == "alloy":
            assert len(set(s["atomic_numbers"].tolist())) >= 2
    # Rattled: forces are not all zero, and typical EMT energies are small per atom.
    fmean = np.mean(np.concatenate([np.linalg.norm(s["forces"], axis=1) for s in sample]))
    assert 0.2 < fmean < 5.0, fmean
    epa = np.array([s["energy"] / len(s["atomic_numbers"]) for s in sample])
    assert np.all(np.abs(epa) < cfg.max_energy_per_atom) and epa.std() > 0.01


def test_surfaces_have_vacuum_and_min_distance_holds():
    cfg = EMTConfig(num_structures=12, fractions={"surface": 1.0}, seed=5)
    for i in range(cfg.num_structures):
        atoms = generate_structure(i, cfg)
        assert atoms.info["kind"] == "surface" and atoms.pbc.all()
        z = np.sort(atoms.positions[:, 2] % atoms.cell[2, 2])
        gaps = np.diff(np.concatenate([z, [z[0] + atoms.cell[2, 2]]]))
        assert gaps.max() > 1.5 * cfg.vacuum, f"structure {i}: largest z gap {gaps.max():.2f} Å"
        assert len(neighbor_list("i", atoms, cfg.min_distance)) == 0


def test_shortest_distance_matches_ase_neighbor_list(sample):
    for s in sample[:30]:
        atoms = Atoms(numbers=s["atomic_numbers"], positions=s["positions"], cell=s["cell"], pbc=True)
        want = neighbor_list("d", atoms, 4.0).min()
        got = shortest_distance(s["positions"], s["cell"], 4.0)
        assert np.isclose(got, want, rtol=0, atol=1e-9), f"structure {s['index']}: {got} vs {want}"
        assert shortest_distance(s["positions"], s["cell"], want - 1e-6) == np.inf
    # A one-atom cell: the distance is the shortest lattice vector (a self-image).
    cell = np.array([[2.0, 0, 0], [1.9, 0.4, 0], [0, 0, 9.0]])
    want = np.linalg.norm(cell[1] - cell[0])
    assert np.isclose(shortest_distance(np.zeros((1, 3)), cell, 3.0), want)


def test_labels_are_emt():
    cfg = EMTConfig(num_structures=5, seed=1)
    for i in (0, 3):
        atoms = generate_structure(i, cfg)
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        fresh = atoms.copy()
        fresh.calc = EMT()
        assert np.isclose(fresh.get_potential_energy(), e, rtol=0, atol=1e-10)
        np.testing.assert_allclose(fresh.get_forces(), f, atol=1e-10)
        np.testing.assert_allclose(fresh.get_stress(), s, atol=1e-12)
        # Sanity: the stored forces are -dE/dx (central difference on one coordinate).
        h = 1e-4
        for sign in (1, -1):
            fresh.positions[0, 1] += sign * h
            fresh.calc = EMT()
            if sign == 1:
                ep = fresh.get_potential_energy()
            else:
                em = fresh.get_potential_energy()
            fresh.positions[0, 1] -= sign * h
        assert np.isclose(-(ep - em) / (2 * h), f[0, 1], atol=1e-4)


def test_impossible_constraints_raise_naming_the_structure():
    cfg = EMTConfig(num_structures=1, min_distance=6.0, max_attempts=2)
    with pytest.raises(RuntimeError, match=r"structure 0 .*atoms too close"):
        generate_structure(0, cfg)


def test_structures_pass_store_validation(sample):
    from gnnmegatron.data.schema import validate_structure

    for s in sample[:20]:
        clean = {k: v for k, v in s.items() if k not in ("kind",)}
        out = validate_structure(s["index"], clean)
        assert out["energy"] == s["energy"]


def test_store_round_trip(tmp_path):
    from gnnmegatron.data.store import GraphStore

    cfg = EMTConfig(num_structures=40, seed=2)
    summary = generate_emt_dataset(tmp_path / "emt.zarr", cfg, workers=2, progress=False)
    ref = list(iter_emt_structures(cfg, workers=1))
    assert summary["num_graphs"] == 40
    assert summary["num_atoms"] == sum(len(s["atomic_numbers"]) for s in ref)
    assert sum(summary["kinds"].values()) == 40
    store = GraphStore(tmp_path / "emt.zarr")
    assert len(store) == 40
    meta = store.metadata
    assert meta["producer"] == PRODUCER and meta["num_atoms"] == summary["num_atoms"]
    assert list(meta["elements"]) == summary["elements"]
    np.testing.assert_array_equal(store.atom_counts, [len(s["atomic_numbers"]) for s in ref])
    for i in (0, 13, 39):
        got, want = store[i], ref[i]
        np.testing.assert_array_equal(got["atomic_numbers"], want["atomic_numbers"])
        np.testing.assert_allclose(got["positions"], want["positions"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(got["cell"], want["cell"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(got["forces"], want["forces"], rtol=1e-6, atol=1e-6)  # stored as float32
        np.testing.assert_allclose(got["stress"], want["stress"], rtol=0, atol=1e-12)
        assert got["energy"] == pytest.approx(want["energy"], abs=1e-12)
        assert got["source"] == 0
