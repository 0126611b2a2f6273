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
