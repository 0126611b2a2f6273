"""predict: same predictions as the trainer's validation path, per-structure errors, files written."""

import json

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from inference_helpers import cu_au_cell, random_model

from gnnmegatron.data.batch import collate
from gnnmegatron.data.store import GraphStore
from gnnmegatron.inference import GNNMegatronCalculator, UnknownElementError, predict
from gnnmegatron.inference.predict import format_summary


def test_predictions_equal_the_trainers_validation(tiny_run, tmp_path):
    trainer = tiny_run.trainer
    val_idx = trainer.splits["val"]
    out = tmp_path / "val.npz"
    summary = predict(tiny_run.run_dir, trainer.cfg.data.store, out, split="val", batch_atoms=40,
                      device="cpu", progress=False)  # the run's validation split, recomputed from its config
    # the same MAEs as Trainer.evaluate (other batches, same per-structure numbers)
    assert summary["structures"] == len(val_idx) == int(tiny_run.val["graphs"])
    assert summary["atoms"] == int(tiny_run.val["atoms"])
    assert summary["energy_mae_per_atom"] == pytest.approx(tiny_run.val["energy_mae_per_atom"], rel=1e-10)
    assert summary["force_mae"] == pytest.approx(tiny_run.val["force_mae"], rel=1e-10)
    assert summary["dtype"] == "float64" and summary["model_step"] == 2
    assert json.loads(out.with_suffix(".json").read_text()) == summary
    assert "energy MAE" in format_summary(summary)

    # and the same numbers as a direct call of the trainer's model on one collated batch
    p = np.load(out)
    assert np.array_equal(p["index"], val_idx)
    structures = GraphStore(trainer.cfg.data.store).get_many(val_idx)
    batch = collate(structures, 4.0, dtype=torch.float64)
    trainer.model.eval()
    ref = trainer.model(batch, compute_forces=True, compute_stress=True)
    assert np.allclose(p["energy"], ref["energy"].detach().numpy(), rtol=0, atol=1e-10)
    assert np.allclose(p["forces"], ref["forces"].detach().numpy(), rtol=0, atol=1e-10)
    assert np.allclose(p["stress"], ref["stress"].detach().numpy(), rtol=0, atol=1e-10)
    e_ref = np.array([s["energy"] for s in structures])
    assert np.allclose(p["ref_energy"], e_ref)
    assert np.allclose(p["energy_error_per_atom"], (p["energy"] - e_ref) / p["num_atoms"])
    g = 3
    lo, hi = p["atom_offsets"][g], p["atom_offsets"][g + 1]
    assert np.isclose(p["force_mae"][g], np.abs(p["forces"][lo:hi] - structures[g]["forces"]).mean())

    # the calculator agrees on a store structure
    s = structures[g]
    from ase import Atoms

    atoms = Atoms(s["atomic_numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])
    atoms.calc = GNNMegatronCalculator(tiny_run.run_dir)
    assert np.isclose(atoms.get_potential_energy(), p["energy"][g], rtol=0, atol=1e-10)
    assert np.allclose(atoms.get_forces(), p["forces"][lo:hi], rtol=0, atol=1e-10)


def _frames():
    a = cu_au_cell(seed=1)
    a.calc = EMT()
    a.get_potential_energy()
    b = cu_au_cell(seed=2)
    b.calc = EMT()
    b.get_potential_energy()
    b.calc = SinglePointCalculator(b, energy=b.calc.results["energy"])  # energy only, no forces
    c = cu_au_cell(seed=3)  # no labels at all
    return [a, b, c]


def test_predict_ase_file_with_partial_references(tiny_run, tmp_path):
    frames = _frames()
    path = tmp_path / "frames.extxyz"
    write(path, frames)
    summary = predict(tiny_run.checkpoint, path, tmp_path / "frames.npz", progress=False, dtype="float32")
    p = np.load(tmp_path / "frames.npz")
    assert summary["structures"] == 3 and summary["dtype"] == "float32"
    assert (summary["with_energy"], summary["with_forces"]) == (2, 1)
    assert np.isfinite(p["energy_error_per_atom"][:2]).all() and np.isnan(p["energy_error_per_atom"][2])
    assert np.isfinite(p["force_mae"][0]) and np.isnan(p["force_mae"][1:]).all()
    assert np.isnan(p["ref_stress"][1:]).all() and np.isfinite(p["stress"]).all()
    n = len(frames[0])
    f_err = np.abs(p["forces"][:n] - frames[0].get_forces()).mean()
    assert summary["force_mae"] == pytest.approx(f_err, rel=1e-9)
    e_err = np.abs((p["energy"][:2] - p["ref_energy"][:2]) / n)
    assert summary["energy_mae_per_atom"] == pytest.approx(e_err.mean(), rel=1e-9)
    # store graphs picked by index
    store = tiny_run.trainer.cfg.data.store
    picked = predict(tiny_run.checkpoint, store, tmp_path / "picked.npz", indices=[5, 2], progress=False)
    assert picked["structures"] == 2 and list(np.load(tmp_path / "picked.npz")["index"]) == [5, 2]
    # a list of Atoms gives the same predictions
    again = predict(tiny_run.checkpoint, frames, tmp_path / "list.npz", progress=False, dtype="float32",
                    batch_atoms=8)
    assert np.allclose(np.load(tmp_path / "list.npz")["energy"], p["energy"], rtol=1e-6)
    assert again["force_mae"] == pytest.approx(summary["force_mae"], rel=1e-5)


def test_predict_refuses_unknown_elements_and_direct_models_have_no_stress(tiny_run, tmp_path):
    bad = cu_au_cell()
    bad.numbers = [29, 79, 29, 26, 29, 79, 29, 79]
    with pytest.raises(UnknownElementError, match=r"structure 1 .*Fe \(Z=26\)"):
        predict(tiny_run.checkpoint, [cu_au_cell(), bad], tmp_path / "x.npz", progress=False)
    summary = predict(random_model(force_mode="direct"), [cu_au_cell()], tmp_path / "d.npz", progress=False)
    p = np.load(tmp_path / "d.npz")
    assert "stress" not in p and p["forces"].shape == (8, 3) and summary["stress_mae"] is None
    with pytest.raises(ValueError, match=".npz"):
        predict(tiny_run.checkpoint, [cu_au_cell()], tmp_path / "x.xyz", progress=False)


def test_predict_names_the_file_and_structure_of_broken_geometry(tmp_path):
    """NaN positions, atoms 0.02 Å apart and two atoms on one spot: errors naming the input and the
    structure's index in it, not predictions."""
    model = random_model()
    good = cu_au_cell()
    for name, edit, message in (
            ("nan", lambda p: p.__setitem__((0, 0), np.nan), "frame 2: field 'positions' has non-finite"),
            ("close", lambda p: p.__setitem__(1, p[0] + [0.02, 0, 0]), r"frame 2: atoms 0 and 1 are 0.02 Å apart"),
            ("same", lambda p: p.__setitem__(1, p[0]),
             r"frame 2: atoms (0 and 1|1 and 0) are at the same position .*broken \(duplicated atoms\?\)$")):
        broken = good.copy()
        pos = broken.positions.copy()
        edit(pos)
        broken.positions = pos
        path = tmp_path / f"{name}.extxyz"
        write(path, [good, good, broken])
        with pytest.raises(ValueError, match=rf"file {path} \(index ':'\): {message}"):
            predict(model, str(path), tmp_path / f"{name}.npz", progress=False, batch_atoms=10_000)
        assert not (tmp_path / f"{name}.npz").exists()
