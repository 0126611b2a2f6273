"""scripts/prepare_study_data.sh: five download folders -> five datasets and one joined study dataset."""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from release_writers import (mptrj_frame, pyg_pickles, write_ani1x, write_fairchem_lmdb, write_mptrj,
                             write_oc20_extxyz, write_qm7x)

from gnnmegatron.data.store import GraphStore

pytest.importorskip("h5py")
pytest.importorskip("lmdb")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "prepare_study_data.sh"


def _downloads(d: Path) -> dict:
    (d / "mptrj").mkdir(parents=True)
    write_mptrj(d / "mptrj" / "MPtrj_2022.9_full.json", {"mp-7": {"mp-7-0-0": mptrj_frame(
        np.eye(3) * 3.0, [3, 8], [[0, 0, 0], [0.5, 0.5, 0.5]], -9.0, [[0, 0, 0.1], [0, 0, -0.1]], np.eye(3))}})
    (d / "ani1x").mkdir()
    write_ani1x(d / "ani1x" / "ani1x-release.h5", {"H2O": {
        "atomic_numbers": [8, 1, 1], "coordinates": [[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]] * 2,
        "wb97x_dz.energy": [-76.4, -76.39], "wb97x_dz.forces": np.zeros((2, 3, 3))}})
    frame = {"numbers": [29, 8], "positions": [[0, 0, 5], [1.5, 0, 6]], "cell": np.diag([8.0, 8.0, 20.0]),
             "energy": -20.0, "forces": [[0.1, 0, 0], [-0.1, 0, 0]], "system_id": "random5", "frame": 0,
             "ref_energy": -19.0}
    write_oc20_extxyz(d / "oc20", "0", [frame, dict(frame, frame=1, energy=-20.5)], compress=True)
    (d / "oc22").mkdir()
    rec = {"pos": torch.tensor([[0.0, 0, 5], [1.8, 0, 6]]), "cell": torch.diag(torch.tensor([8.0, 8, 20])).view(1, 3, 3),
           "atomic_numbers": torch.tensor([22.0, 8.0]), "natoms": 2, "y": -30.0, "oc22": 1,
           "force": torch.zeros(2, 3), "sid": 77, "fid": 3}
    write_fairchem_lmdb(d / "oc22" / "data.0000.lmdb", pyg_pickles([rec]))
    (d / "qm7x").mkdir()
    h5 = write_qm7x(d / "qm7x" / "1000.hdf5", {"1": {"Geom-m1-i1-c1-opt": {
        "atNUM": [6, 1], "atXYZ": [[0, 0, 0], [1.1, 0, 0]], "ePBE0+MBD": -1040.0, "eAT": -4.0, "ePBE0": -1039.9,
        "totFOR": [[0.1, 0, 0], [-0.1, 0, 0]], "pbe0FOR": [[0.1, 0, 0], [-0.1, 0, 0]]}}})
    (d / "qm7x" / "1000.xz").write_bytes(lzma.compress(h5.read_bytes()))  # as on Zenodo
    h5.unlink()
    return {"mptrj": 1, "ani1x": 2, "oc20": 2, "oc22": 1, "qm7x": 1}


@pytest.mark.skipif(shutil.which("xz") is None or shutil.which("bash") is None, reason="needs bash and xz")
def test_prepare_study_data_builds_one_multi_source_dataset(tmp_path):
    counts = _downloads(tmp_path / "downloads")
    env = dict(os.environ, GNNMEGATRON=f"{sys.executable} -m gnnmegatron.cli")
    run = [str(SCRIPT), str(tmp_path / "downloads"), str(tmp_path / "out"), "2"]
    proc = subprocess.run(["bash"] + run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = GraphStore(tmp_path / "out" / "study.zarr")
    assert study.metadata["sources"] == list(counts)
    assert len(study) == sum(counts.values())
    assert np.bincount(study.sources).tolist() == list(counts.values())
    energies = [study[i]["energy"] for i in range(len(study))]
    assert energies[0] == pytest.approx(-9.5)                      # MPtrj corrected total energy
    assert energies[1] == pytest.approx(-76.4 * 27.211386024367243)  # ANI-1x Hartree -> eV
    assert energies[3:5] == pytest.approx([-20.0, -20.5])          # OC20 total energy
    assert study.structure_ids([5, 6]) == ["77,frame3", "Geom-m1-i1-c1-opt"]
    again = subprocess.run(["bash"] + run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("exists, skipped") == 5
    assert len(GraphStore(tmp_path / "out" / "study.zarr")) == len(study)
