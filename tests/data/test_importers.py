"""Tests of the ASE importers (gnnmegatron.data.importers)."""

from __future__ import annotations

import os
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator

from gnnmegatron.data.importers import PRODUCER, import_ase, iter_frames
from gnnmegatron.data.schema import StoreError, StructureError
from gnnmegatron.data.store import GraphStore


def _frames(n: int, seed: int, element: str = "Cu", stress: bool = False) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = bulk(element, "fcc", a=3.6 + 0.05 * k).repeat((2, 1, 1 + k % 2))
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        res = {"energy": float(rng.normal(-3, 1)), "forces": rng.normal(0, 0.5, (len(atoms), 3))}
        if stress:
            res["stress"] = rng.normal(0, 0.01, 6)
        atoms.calc = SinglePointCalculator(atoms, **res)
        out.append(atoms)
    return out


def _check_same(got: dict, atoms, source: int):
    np.testing.assert_array_equal(got["atomic_numbers"], atoms.numbers)
    np.testing.assert_allclose(got["positions"], atoms.positions, atol=1e-8)
    np.testing.assert_allclose(got["cell"], atoms.cell.array, atol=1e-8)
    np.testing.assert_array_equal(got["pbc"], atoms.pbc)
    assert got["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(got["forces"], atoms.get_forces(), atol=1e-6)  # float32 storage
    assert got["source"] == source


def test_extxyz_and_db_into_one_store_as_two_sources(tmp_path):
    xyz_frames = _frames(5, seed=0, stress=True)
    db_frames = _frames(4, seed=1, element="Ni")
    ase.io.write(tmp_path / "a.extxyz", xyz_frames)
    with ase.db.connect(tmp_path / "b.db") as db:
        for atoms in db_frames:
            db.write(atoms)
    out = tmp_path / "mixed.zarr"
    summary = import_ase([str(tmp_path / "a.extxyz"), str(tmp_path / "b.db")], out, progress=False)
    assert summary["num_graphs"] == 9 and summary["sources"] == ["a", "b"]
    assert summary["per_source"]["a"]["graphs"] == 5 and summary["per_source"]["b"]["graphs"] == 4
    assert summary["elements"] == [28, 29]
    store = GraphStore(out)
    assert len(store) == 9
    meta = store.metadata
    assert meta["producer"] == PRODUCER and meta["sources"] == ["a", "b"]
    assert meta["num_atoms"] == summary["num_atoms"] == sum(len(a) for a in xyz_frames + db_frames)
    for i, atoms in enumerate(xyz_frames):
        got = store[i]
        _check_same(got, atoms, source=0)
        np.testing.assert_allclose(got["stress"], atoms.get_stress(voigt=False), atol=1e-10)
    for i, atoms in enumerate(db_frames):
        _check_same(store[5 + i], atoms, source=1)


def test_index_source_names_and_energy_key(tmp_path):
    frames = _frames(6, seed=2)
    for k, atoms in enumerate(frames):
        atoms.info["REF_energy"] = 10.0 + k
    ase.io.write(tmp_path / "f.extxyz", frames)
    summary = import_ase(tmp_path / "f.extxyz", tmp_path / "s.zarr", source_names=["mine"], index="1::2",
                         energy_key="REF_energy", progress=False)
    assert summary["sources"] == ["mine"] and summary["num_graphs"] == 3
    store = GraphStore(tmp_path / "s.zarr")
    assert [store[i]["energy"] for i in range(3)] == [11.0, 13.0, 15.0]
    assert [label for label, _ in iter_frames(str(tmp_path / "f.extxyz"), "1::2")] == ["frame 1", "frame 3", "frame 5"]
    with pytest.raises(ValueError, match="2 source_names for 1 inputs"):
        import_ase(tmp_path / "f.extxyz", tmp_path / "t.zarr", source_names=["x", "y"], progress=False)


def test_nan_frame_error_names_file_and_frame(tmp_path):
    frames = _frames(4, seed=3)
    frames[2].positions[1, 0] = np.nan
    ase.io.write(tmp_path / "bad.extxyz", frames)
    out = tmp_path / "bad.zarr"
    with pytest.raises(StructureError, match=r"bad\.extxyz.*frame 2.*NaN") as err:
        import_ase(tmp_path / "bad.extxyz", out, progress=False)
    assert err.value.field == "positions" and err.value.index == 2
    with pytest.raises(StoreError):  # the aborted write left no store behind
        GraphStore(out)


def test_missing_energy_is_an_error_or_skipped(tmp_path):
    frames = _frames(3, seed=4)
    frames.insert(1, molecule("H2O", vacuum=4.0))  # no calculator: no energy
    ase.io.write(tmp_path / "m.extxyz", frames)
    with pytest.raises(StructureError, match=r"m\.extxyz.*frame 1.*no energy.*skip_missing_energy"):
        import_ase(tmp_path / "m.extxyz", tmp_path / "m.zarr", progress=False)
    summary = import_ase(tmp_path / "m.extxyz", tmp_path / "m.zarr", skip_missing_energy=True, progress=False)
    assert summary["num_graphs"] == 3 and summary["skipped_missing_energy"] == 1
    assert summary["per_source"]["m"]["skipped"] == 1
    assert len(GraphStore(tmp_path / "m.zarr")) == 3
    with pytest.raises(FileNotFoundError, match="nope.xyz"):
        import_ase(tmp_path / "nope.xyz", tmp_path / "n.zarr", progress=False)


def _oxides_db() -> Path:
    env = os.environ.get("GNNMEGATRON_SHARED_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return base / "oxides.db"


def test_real_oxides_db(tmp_path):
    path = _oxides_db()
    if not path.exists():
        pytest.skip(f"real-data file {path} is absent (set GNNMEGATRON_SHARED_DATA to its folder)")
    db = ase.db.connect(path)
    rows = list(db.select())
    summary = import_ase(str(path), tmp_path / "oxides.zarr", progress=False)
    assert summary["num_graphs"] == len(rows) == 295
    assert summary["num_atoms"] == sum(r.natoms for r in rows) == 2934
    want_z = sorted({int(z) for r in rows for z in r.numbers})
    assert summary["elements"] == want_z == [8, 22, 23, 44, 50, 77]  # O Ti V Ru Sn Ir
    store = GraphStore(tmp_path / "oxides.zarr")
    assert store.metadata["sources"] == ["oxides"] and len(store) == 295
    energies = np.array([store[i]["energy"] for i in range(len(store))])
    np.testing.assert_allclose(energies, [r.energy for r in rows], rtol=0, atol=1e-10)
    for i in (0, 150, 294):
        got = store[i]
        assert got["pbc"].all() and got["stress"] is None
        np.testing.assert_allclose(got["forces"], rows[i].forces, atol=1e-6)
        np.testing.assert_allclose(got["cell"], rows[i].cell, atol=1e-12)
