"""``gnnmegatron evaluate``: a checkpoint on a store reproduces the trainer's validation numbers, with
the baselines, as JSON and a parity plot; bad input gets a clear error."""

import json

import pytest

from gnnmegatron.cli import main


def test_evaluate_reproduces_the_trainers_validation(tiny_run, emt_store, tmp_path, capsys):
    out = tmp_path / "eval" / "val.json"
    assert main(["evaluate", str(tiny_run.run_dir), str(emt_store), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    val = tiny_run.val
    assert result["step"] == tiny_run.trainer.step and result["split"] == "val" and result["weights"] == "raw"
    for key in ("graphs", "atoms", "energy_graphs", "force_components"):
        assert result[key] == val[key], key
    for key in ("energy_mae_per_atom", "force_mae", "energy_rmse_per_atom", "force_rmse",
                "baseline_energy_mae_per_atom", "baseline_force_mae", "loss"):
        assert result[key] == pytest.approx(val[key], rel=1e-9), key
    assert result["energy_mae_ratio_vs_composition"] == pytest.approx(
        val["energy_mae_per_atom"] / val["baseline_energy_mae_per_atom"], rel=1e-9)
    assert result["stress_mae"] is not None and result["stress_mae"] > 0  # EMT cells carry stress labels
    assert (tmp_path / "eval" / "val.png").stat().st_size > 10_000
    assert f"{1000 * val['force_mae']:.1f}" in printed

    every = main(["evaluate", str(tiny_run.run_dir), str(emt_store), "--split", "all", "--out", str(tmp_path / "a.json")])
    assert every == 0 and json.loads((tmp_path / "a.json").read_text())["graphs"] == 60


def test_evaluate_errors_name_the_problem(tiny_run, emt_store, tmp_path, capsys):
    assert main(["evaluate", str(tiny_run.run_dir), str(emt_store), str(emt_store), "--out", str(tmp_path / "x.json")]) == 2
    assert "one store at a time" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_run.run_dir), "--weights", "ema", "--out", str(tmp_path / "x.json")]) == 2
    assert "no moving average" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nowhere"), str(emt_store)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_refuses_elements_the_model_never_saw(tiny_run, tmp_path, capsys):
    """An oxide store for a model of EMT metals: an error naming the graph, the store and the elements,
    not errors that say nothing about the model."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    from gnnmegatron.data.importers import import_ase

    frames = []
    for k in range(4):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        if k >= 2:
            atoms.numbers = [29, 29, 8, 29]  # O in the last two structures
        atoms.calc = SinglePointCalculator(atoms, energy=-3.0 * len(atoms), forces=[[0.0, 0.0, 0.0]] * len(atoms))
        frames.append(atoms)
    ase.io.write(tmp_path / "oxide.extxyz", frames)
    store = tmp_path / "oxide.zarr"
    import_ase(str(tmp_path / "oxide.extxyz"), store, progress=False)
    out = tmp_path / "x.json"
    assert main(["evaluate", str(tiny_run.run_dir), str(store), "--split", "all", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"graph 2 of {store} contains O (Z=8), which the model has never seen" in err
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_evaluate_accepts_elements_of_its_own_store_that_the_reference_sample_missed(emt_store, tmp_path, capsys):
    """data.stats_graphs = 1: the reference fit sees one graph's elements, the trainer trains on all of
    the store; evaluating on that store is not refused for the elements the sample missed."""
    from gnnmegatron.data.store import GraphStore
    from gnnmegatron.inference.loading import load_model
    from gnnmegatron.training.config import config_from_dict
    from gnnmegatron.training.trainer import Trainer

    run = tmp_path / "run"
    cfg = config_from_dict({
        "run_dir": str(run), "seed": 2,
        "data": {"store": str(emt_store), "cutoff": 4.0, "budget_atoms": 48, "splits": [0.8, 0.2, 0.0],
                 "prefetch": 0, "stats_graphs": 1},
        "model": {"preset": "egnn-tiny"},
        "train": {"max_steps": 1, "eval_every": 1, "checkpoint_every": 1, "progress": False}})
    Trainer(cfg, resume="never").fit()
    capsys.readouterr()
    _, info = load_model(run)
    assert set(info.elements) < set(GraphStore(emt_store).metadata["elements"])  # the sample missed some
    assert main(["evaluate", str(run), str(emt_store), "--out", str(tmp_path / "e.json")]) == 0
