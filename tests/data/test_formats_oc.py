"""OC20/OC22 S2EF (extxyz + txt, LMDB of pickled PyG Data) and OMat24/Alexandria ASE-LMDB releases."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from release_writers import pyg_pickles, write_aselmdb, write_fairchem_lmdb, write_oc20_extxyz

from gnnmegatron.data.formats import InputError
from gnnmegatron.data.formats.pyg_pickle import loads
from gnnmegatron.data.import_driver import import_dataset
from gnnmegatron.data.store import GraphStore

pytest.importorskip("lmdb")

SLAB_CELL = [[8.0, 0.0, 0.0], [4.0, 6.92820323, 0.0], [0.0, 0.0, 25.0]]  # hexagonal slab cell (60°)


def _frames():
    out = []
    for k in range(3):
        n = 3 if k < 2 else 1  # the last frame is a single atom
        pos = np.array([[0.0, 0.0, 10.0], [2.0, 1.0, 10.5], [1.0, 3.0, 12.0]])[:n] + 0.01 * k
        out.append({"numbers": [78, 8, 1][:n], "positions": pos, "cell": SLAB_CELL, "energy": -30.0 + k,
                    "forces": (np.arange(3 * n).reshape(n, 3) - 4) * 0.01, "system_id": "random1331004",
                    "frame": 10 * k, "ref_energy": -28.5 + 0.25 * k})
    return out


@pytest.mark.parametrize("compress", [False, True])
def test_oc20_extxyz_total_and_adsorption_energies(tmp_path, compress):
    frames = _frames()
    src = write_oc20_extxyz(tmp_path / "s2ef", "0", frames, compress=compress)
    import_dataset([tmp_path / "s2ef"], tmp_path / "tot.zarr", format="oc20", progress=False)  # a release folder
    import_dataset([src], tmp_path / "ads.zarr", format="oc20", energy="adsorption", progress=False)
    tot, ads = GraphStore(tmp_path / "tot.zarr"), GraphStore(tmp_path / "ads.zarr")
    assert len(tot) == len(ads) == 3
    assert [tot[i]["energy"] for i in range(3)] == pytest.approx([-30.0, -29.0, -28.0])
    assert [ads[i]["energy"] for i in range(3)] == pytest.approx([-1.5, -0.75, 0.0])  # energy - reference_energy
    assert tot.structure_ids([0, 2]) == ["random1331004,frame0", "random1331004,frame20"]
    s = tot[1]
    np.testing.assert_allclose(s["cell"], SLAB_CELL)
    np.testing.assert_allclose(s["positions"], frames[1]["positions"])
    np.testing.assert_allclose(s["forces"], frames[1]["forces"], atol=1e-7)
    assert s["pbc"].all() and s["stress"] is None and s["atomic_numbers"].tolist() == [78, 8, 1]
    assert tot[2]["atomic_numbers"].tolist() == [78]
    assert "RPBE" in tot.provenance(0)["source_info"]["dft_level"]


def test_oc20_extxyz_split_into_shards_keeps_frame_numbers(tmp_path):
    frames = _frames() * 4
    src = write_oc20_extxyz(tmp_path, "big", frames)
    summary = import_dataset([src], tmp_path / "o.zarr", format="oc20", energy="adsorption", progress=False,
                             shard_bytes=700)
    ds = GraphStore(tmp_path / "o.zarr")
    assert summary["shards"] > 2 and len(ds) == 12
    assert [ds[i]["energy"] for i in range(12)] == pytest.approx([-1.5, -0.75, 0.0] * 4)  # txt lines stay aligned


def _lmdb_records(oc22=False):
    recs = []
    for k, f in enumerate(_frames()):
        n = len(f["numbers"])
        r = {"pos": torch.tensor(f["positions"], dtype=torch.float32),
             "cell": torch.tensor(SLAB_CELL, dtype=torch.float32).view(1, 3, 3),
             "atomic_numbers": torch.tensor(f["numbers"], dtype=torch.float32), "natoms": n,
             "tags": torch.ones(n, dtype=torch.long), "fixed": torch.zeros(n),
             "force": torch.tensor(f["forces"], dtype=torch.float32), "sid": 1331004, "fid": 10 * k}
        r["y"] = (f["energy"] if oc22 else f["energy"] - f["ref_energy"])
        if oc22:
            r["oc22"] = 1
        recs.append(r)
    return recs


@pytest.mark.parametrize("style", ["pyg1", "pyg2"])
def test_pyg_pickles_read_without_torch_geometric(style):
    assert "torch_geometric" not in sys.modules
    blob = pyg_pickles(_lmdb_records(), style)[0]
    d = loads(blob)
    assert "torch_geometric" not in sys.modules
    assert d["sid"] == 1331004 and d["y"] == pytest.approx(-1.5)
    np.testing.assert_allclose(d["pos"], _frames()[0]["positions"], rtol=1e-6)
    assert d["cell"].shape == (1, 3, 3)


def test_pickle_that_calls_code_is_refused():
    class Evil:
        def __reduce__(self):
            return (eval, ("1+1",))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global builtins.eval"):
        loads(pickle.dumps(Evil()))


def test_oc20_lmdb_adsorption_total_with_reference_and_oc22(tmp_path):
    path = write_fairchem_lmdb(tmp_path / "data.0000.lmdb", pyg_pickles(_lmdb_records(), "pyg2"))
    import_dataset([path], tmp_path / "ads.zarr", format="oc20", energy="adsorption", progress=False)
    ads = GraphStore(tmp_path / "ads.zarr")
    assert [ads[i]["energy"] for i in range(3)] == pytest.approx([-1.5, -0.75, 0.0], abs=1e-6)
    assert ads.structure_ids([1]) == ["random1331004,frame10"]
    np.testing.assert_allclose(ads[0]["forces"], _frames()[0]["forces"], atol=1e-7)
    with pytest.raises(InputError, match="hold adsorption energies.*--oc20-ref"):
        import_dataset([path], tmp_path / "tot.zarr", format="oc20", progress=False)
    ref = tmp_path / "oc20_ref.pkl"
    ref.write_bytes(pickle.dumps({"random1331004": -28.5}))
    import_dataset([path], tmp_path / "tot.zarr", format="oc20", oc20_ref=str(ref), progress=False)
    tot = GraphStore(tmp_path / "tot.zarr")
    assert [tot[i]["energy"] for i in range(3)] == pytest.approx([-30.0, -29.25, -28.5], abs=1e-6)
    p22 = write_fairchem_lmdb(tmp_path / "oc22.lmdb", pyg_pickles(_lmdb_records(oc22=True), "pyg1"), length=False)
    import_dataset([p22], tmp_path / "oc22.zarr", format="oc22", progress=False)
    oc22 = GraphStore(tmp_path / "oc22.zarr")
    assert [oc22[i]["energy"] for i in range(3)] == pytest.approx([-30.0, -29.0, -28.0], abs=1e-6)
    assert oc22.structure_ids([0]) == ["1331004,frame0"]


def test_lmdb_garbage_record_names_file_and_record(tmp_path):
    blobs = pyg_pickles(_lmdb_records(), "pyg2")
    blobs[1] = b"not a pickle"
    path = write_fairchem_lmdb(tmp_path / "bad.lmdb", blobs)
    with pytest.raises(InputError, match=r"bad.lmdb: record 1: cannot be unpickled"):
        import_dataset([path], tmp_path / "b.zarr", format="oc20", energy="adsorption", progress=False)


def _omat_atoms():
    out = []
    for k in range(3):
        if k == 2:  # single atom, no stress
            a = Atoms("Fe", positions=[[0.1, 0.2, 0.3]], cell=np.eye(3) * 2.8, pbc=True)
            a.calc = SinglePointCalculator(a, energy=-8.2, forces=[[0.0, 0.0, 0.0]])
        else:
            a = Atoms("Al2O", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.0, 0.5]],
                      cell=[[4.0, 0, 0], [1.2, 3.9, 0], [0.3, 0.4, 5.1]], pbc=True)
            a.calc = SinglePointCalculator(a, energy=-20.0 - k, forces=np.full((3, 3), 0.05 * (k + 1)),
                                           stress=np.array([1, 2, 3, 4, 5, 6]) * 1e-3)
        out.append(a)
    return out


def test_aselmdb_rows_units_voigt_stress_and_deleted_rows(tmp_path):
    atoms = _omat_atoms() + [_omat_atoms()[0]]
    write_aselmdb(tmp_path / "rattled-300.aselmdb", atoms,
                  [{"sid": "omat-1"}, {"sid": "omat-2"}, {}, {"sid": "deleted"}], delete=(4,))
    import_dataset([tmp_path], tmp_path / "omat.zarr", format="omat24", progress=False)  # the folder as input
    ds = GraphStore(tmp_path / "omat.zarr")
    assert len(ds) == 3
    assert ds.structure_ids([0, 1]) == ["omat-1", "omat-2"]
    assert ds.structure_ids([2])[0]  # falls back to the row's unique_id
    assert [ds[i]["energy"] for i in range(3)] == pytest.approx([-20.0, -21.0, -8.2])
    # Voigt (xx yy zz yz xz xy) in eV/Å^3, ASE sign, kept as released
    np.testing.assert_allclose(ds[0]["stress"], np.array([[1, 6, 5], [6, 2, 4], [5, 4, 3]]) * 1e-3)
    np.testing.assert_allclose(ds[1]["positions"], atoms[1].positions)
    np.testing.assert_allclose(ds[1]["cell"], atoms[1].cell.array)
    assert ds[2]["stress"] is None and ds[2]["atomic_numbers"].tolist() == [26]
    assert "OMat24" in ds.provenance(0)["source_info"]["dft_level"]


def test_alexandria_extxyz(tmp_path):
    import ase.io
    atoms = _omat_atoms()
    for k, a in enumerate(atoms):
        a.info["sid"] = f"agm{k:09d}"
    ase.io.write(tmp_path / "alex.extxyz", atoms)
    import_dataset([tmp_path / "alex.extxyz"], tmp_path / "alex.zarr", format="alexandria", progress=False)
    ds = GraphStore(tmp_path / "alex.zarr")
    assert ds.structure_ids([0, 2]) == ["agm000000000", "agm000000002"]
    np.testing.assert_allclose(ds[1]["stress"], np.array([[1, 6, 5], [6, 2, 4], [5, 4, 3]]) * 1e-3)
    np.testing.assert_allclose(ds[1]["forces"], np.full((3, 3), 0.1))
    assert ds[2]["stress"] is None and ds[1]["energy"] == pytest.approx(-21.0)


@pytest.mark.parametrize("tensor", [torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.arange(12).reshape(3, 4).T,
                                    torch.tensor(5), torch.tensor([True, False]), torch.zeros(0, 3),
                                    torch.arange(10, dtype=torch.float64)[2:8:2], torch.tensor([1.5], dtype=torch.float16),
                                    torch.tensor([1.0, 2.0], dtype=torch.bfloat16)])
def test_tensors_decode_to_the_same_numpy_values(tensor):
    got = np.asarray(loads(pickle.dumps({"x": tensor}))["x"])  # numpy decoder; bfloat16 via torch.load
    want = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    np.testing.assert_array_equal(got.astype(want.dtype), want)
    assert got.shape == want.shape
