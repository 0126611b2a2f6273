"""ANI-1x and QM7-X HDF5 releases: layout, Hartree -> eV conversion, energy choices, missing values."""

from __future__ import annotations

import numpy as np
import pytest
from release_writers import write_ani1x, write_qm7x

pytest.importorskip("h5py")

from gnnmegatron.data.formats import InputError, RejectedRecordError  # noqa: E402
from gnnmegatron.data.import_driver import import_dataset  # noqa: E402
from gnnmegatron.data.store import GraphStore  # noqa: E402

CH4 = np.array([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
HARTREE_EV = 27.211386024367243  # CODATA 2014, the value of ase.units.Hartree


def test_hartree_constant_is_ases():
    from ase.units import Hartree
    assert Hartree == pytest.approx(HARTREE_EV, rel=1e-15)


def _ani1x(tmp_path):
    forces = np.zeros((3, 5, 3))
    forces[:, 1] = [0.01, -0.02, 0.005]
    return write_ani1x(tmp_path / "ani1x-release.h5", {
        "C1H4": {"atomic_numbers": [6, 1, 1, 1, 1], "coordinates": np.stack([CH4, CH4 * 1.01, CH4 * 0.99]),
                 "wb97x_dz.energy": [-40.5, -40.49, -40.48], "wb97x_dz.forces": forces,
                 "ccsd(t)_cbs.energy": [-40.4, np.nan, -40.38]},
        "O1": {"atomic_numbers": [8], "coordinates": [[[0.1, 0.2, 0.3]]],  # a single atom
               "wb97x_dz.energy": [-75.0], "wb97x_dz.forces": np.zeros((1, 1, 3)), "ccsd(t)_cbs.energy": [np.nan]},
    })


def test_ani1x_mapping_and_hartree_conversion(tmp_path):
    src = _ani1x(tmp_path)
    summary = import_dataset([src], tmp_path / "ani.zarr", format="ani1x", progress=False, shard_structures=2)
    assert summary["num_graphs"] == 4 and summary["shards"] == 2
    ds = GraphStore(tmp_path / "ani.zarr")
    assert ds.structure_ids(range(4)) == ["C1H4/0", "C1H4/1", "C1H4/2", "O1/0"]
    s0, s3 = ds[0], ds[3]
    assert s0["energy"] == pytest.approx(-1102.0611340, abs=1e-6)      # -40.5 Ha, by hand
    np.testing.assert_allclose(s0["forces"][1], [0.27211386, -0.54422772, 0.13605693], rtol=1e-6)  # Ha/Å -> eV/Å
    np.testing.assert_allclose(ds[1]["positions"], CH4 * 1.01, rtol=1e-6)  # float32 coordinates in the file
    assert not s0["pbc"].any() and not s0["cell"].any() and s0["stress"] is None
    assert s3["atomic_numbers"].tolist() == [8] and s3["energy"] == pytest.approx(-75.0 * HARTREE_EV)
    assert ds.provenance(0)["source_info"]["dft_level"].startswith("ωB97x/6-31G(d)")


def test_ani1x_ccsd_missing_values_are_refused_or_skipped(tmp_path):
    src = _ani1x(tmp_path)
    with pytest.raises(RejectedRecordError, match=r"group 'C1H4' conformer 1: bad record \(missing_energy\).*"
                                                  r"ccsd\(t\)_cbs.energy.*id 'C1H4/1'"):
        import_dataset([src], tmp_path / "cc.zarr", format="ani1x", energy="ccsd(t)_cbs", progress=False)
    summary = import_dataset([src], tmp_path / "cc.zarr", format="ani1x", energy="ccsd(t)_cbs", on_bad="skip",
                             progress=False)
    assert summary["num_graphs"] == 2 and summary["rejected"] == {"total": 2, "by_reason": {"missing_energy": 2}}
    ds = GraphStore(tmp_path / "cc.zarr")
    assert [ds[i]["energy"] for i in range(2)] == pytest.approx([-40.4 * HARTREE_EV, -40.38 * HARTREE_EV])
    assert ds[0]["forces"] is None  # CCSD(T) has no forces
    log = (tmp_path / "cc.zarr" / "rejections.jsonl").read_text().splitlines()
    assert [__import__("json").loads(x)["id"] for x in log] == ["C1H4/1", "O1/0"]


def test_ani1x_missing_dataset_is_an_input_error(tmp_path):
    src = _ani1x(tmp_path)
    with pytest.raises(InputError, match=r"ani1x-release.h5: group 'C1H4': has no dataset 'wb97x_tz.energy'"):
        import_dataset([src], tmp_path / "tz.zarr", format="ani1x", energy="wb97x_tz", progress=False)


def _qm7x(tmp_path):
    def conf(scale, e_tot, e_at, e_pbe0):
        return {"atNUM": [6, 1, 1, 1, 1], "atXYZ": CH4 * scale, "ePBE0+MBD": e_tot, "eAT": e_at, "ePBE0": e_pbe0,
                "totFOR": np.full((5, 3), 0.1) * scale, "pbe0FOR": np.full((5, 3), 0.2) * scale}
    return write_qm7x(tmp_path / "1000.hdf5", {
        "1": {"Geom-m1-i1-c1-opt": conf(1.0, -1100.5, -17.2, -1100.3),
              "Geom-m1-i1-c1-d1": conf(1.02, -1100.4, -17.1, -1100.2)},
        "2": {"Geom-m2-i1-c1-opt": {"atNUM": [8], "atXYZ": [[0.0, 0.0, 0.0]], "ePBE0+MBD": -2039.7, "eAT": 0.0,
                                    "ePBE0": -2039.7, "totFOR": [[0.0, 0.0, 0.0]], "pbe0FOR": [[0.0, 0.0, 0.0]]}},
    })


# HDF5 lists group members by name, so conformer d1 comes before opt (as in the release).
@pytest.mark.parametrize("energy,expected,forces", [("ePBE0+MBD", [-1100.4, -1100.5, -2039.7], 0.1),
                                                    ("eAT", [-17.1, -17.2, 0.0], 0.1),
                                                    ("ePBE0", [-1100.2, -1100.3, -2039.7], 0.2)])
def test_qm7x_energy_choices_take_their_matching_forces(tmp_path, energy, expected, forces):
    src = _qm7x(tmp_path)
    import_dataset([src], tmp_path / "q.zarr", format="qm7x", energy=energy, progress=False, shard_structures=2)
    ds = GraphStore(tmp_path / "q.zarr")
    assert ds.num_shards == 2  # molecule 1 (2 conformers) and molecule 2
    assert [ds[i]["energy"] for i in range(3)] == pytest.approx(expected)  # eV: no conversion
    np.testing.assert_allclose(ds[1]["forces"], np.full((5, 3), forces), rtol=1e-6)
    np.testing.assert_allclose(ds[0]["positions"], CH4 * 1.02)
    assert ds.structure_ids([0, 1, 2]) == ["Geom-m1-i1-c1-d1", "Geom-m1-i1-c1-opt", "Geom-m2-i1-c1-opt"]


def test_not_an_hdf5_file(tmp_path):
    bad = tmp_path / "1000.hdf5"
    bad.write_text("this is text, not HDF5\n")
    with pytest.raises(InputError, match=r"1000.hdf5: is not an HDF5 file"):
        import_dataset([bad], tmp_path / "q.zarr", format="qm7x", progress=False)


def test_qm7x_missing_dataset_names_molecule_and_conformer(tmp_path):
    src = write_qm7x(tmp_path / "2000.hdf5", {"5": {"Geom-m5-i1-c1-opt": {
        "atNUM": [8, 1], "atXYZ": [[0, 0, 0], [0.97, 0, 0]], "ePBE0+MBD": -2050.0, "totFOR": [[0, 0, 0], [0, 0, 0]]}}})
    with pytest.raises(InputError, match=r"2000.hdf5: molecule '5' conformer 'Geom-m5-i1-c1-opt': has no dataset "
                                         r"'ePBE0' \(--energy ePBE0\)"):
        import_dataset([src], tmp_path / "q.zarr", format="qm7x", energy="ePBE0", progress=False)
