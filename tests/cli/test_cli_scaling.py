import json

import numpy as np

from gnnmegatron.cli import main


def test_scaling_fit_and_report_from_records(tmp_path, capsys):
    rng = np.random.default_rng(1)
    runs = []
    for n in np.logspace(4, 8, 5):
        for d in np.logspace(4, 7, 4):
            loss = (0.02 + 5 * n ** -0.35 + 8 * d ** -0.28) * np.exp(rng.normal(0, 0.01))
            runs.append({"name": f"n{n:.0f}-d{d:.0f}", "preset": "p", "params": int(n), "atoms_seen": int(d),
                         "flops": 6 * n * d, "val_loss": loss, "val_energy_mae": loss, "val_force_mae": loss})
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    assert main(["scaling", "fit", str(tmp_path / "runs.json"), "--out", str(tmp_path / "fits.json"),
                 "--n-boot", "20"]) == 0
    fits = json.loads((tmp_path / "fits.json").read_text())
    alpha = fits["joint"]["params"]["alpha"]
    assert abs(alpha - 0.35) / 0.35 < 0.1, alpha
    assert main(["scaling", "report", str(tmp_path / "runs.json"), "--fits", str(tmp_path / "fits.json"),
                 "--out-dir", str(tmp_path / "rep")]) == 0
    assert "alpha" in (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "isoflop.png").stat().st_size > 1000


def test_scaling_fit_d_key_train_atoms(tmp_path):
    """--d-key train_atoms fits D = the training subset's atoms (iso-data sweeps), and the report
    says so; the compute-optimal k still counts atoms processed."""
    rng = np.random.default_rng(2)
    runs = []
    for n in np.logspace(3, 6, 4):
        for d in np.logspace(3, 5, 3):
            loss = (0.01 + 3 * n ** -0.4 + 2 * d ** -0.3) * np.exp(rng.normal(0, 0.01))
            runs.append({"name": f"n{n:.0f}-d{d:.0f}", "params": int(n), "train_atoms": int(d),
                         "atoms_seen": 100000, "flops": 6 * n * 100000, "val_loss": loss})
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    assert main(["scaling", "fit", str(tmp_path / "runs.json"), "--out", str(tmp_path / "fits.json"),
                 "--n-boot", "10", "--d-key", "train_atoms"]) == 0
    fits = json.loads((tmp_path / "fits.json").read_text())
    assert fits["config"]["d_key"] == "train_atoms"
    assert abs(fits["joint"]["params"]["beta"] - 0.3) / 0.3 < 0.15, fits["joint"]["params"]
    assert fits["compute_optimal"]["k"] == 6.0  # flops / (N * atoms_seen), not / (N * train_atoms)
    assert main(["scaling", "report", str(tmp_path / "runs.json"), "--fits", str(tmp_path / "fits.json"),
                 "--out-dir", str(tmp_path / "rep")]) == 0
    assert "atoms in the run's training subset, each counted once" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "missing.zarr")]) == 2
    assert "missing.zarr" in capsys.readouterr().err


def test_scaling_fit_names_bad_records_and_keeps_good_fits(tmp_path, capsys):
    """Odd fields drop the run with a note naming it; nothing usable is an error that leaves --out as it
    was; --out may not be the records file."""
    rng = np.random.default_rng(2)
    runs = [{"name": f"n{n:.0f}-d{d:.0f}", "params": int(n), "atoms_seen": int(d), "flops": 6 * n * d,
             "val_loss": (0.02 + 5 * n ** -0.35 + 8 * d ** -0.28) * np.exp(rng.normal(0, 0.01))}
            for n in np.logspace(4, 8, 4) for d in np.logspace(4, 7, 3)]
    runs[0]["params"] = [1000]
    runs[1]["flops"] = "1e9x"
    runs[2]["val_loss"] = {"a": 1}
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    out = tmp_path / "fits.json"
    assert main(["scaling", "fit", str(path), "--out", str(out), "--n-boot", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"note: run '{runs[0]['name']}' dropped: missing, non-numeric, non-finite or non-positive N (params=[1000])" \
        in printed
    assert f"run '{runs[1]['name']}': flops='1e9x' is not a positive number; ignored" in printed
    assert "loss (val_loss={'a': 1})" in printed
    assert json.loads(out.read_text())["n_used"] == len(runs) - 2
    before = out.read_text()
    assert main(["scaling", "fit", str(path), "--out", str(out), "--loss-key", "val_los"]) == 2
    err = capsys.readouterr().err
    assert "no usable run in" in err and "(val_los=None)" in err and "not written" in err
    assert out.read_text() == before
    assert main(["scaling", "fit", str(path), "--out", str(path)]) == 2
    assert "is the run records file itself" in capsys.readouterr().err


def test_scaling_report_names_bad_inputs(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["scaling", "report", str(tmp_path / "empty.jsonl"), "--out-dir", str(tmp_path / "r")]) == 2
    assert "holds no run records; nothing to report" in capsys.readouterr().err
    (tmp_path / "runs.jsonl").write_text(json.dumps({"name": "a", "params": 10, "atoms_seen": 100,
                                                     "val_loss": 0.5}) + "\n")
    assert main(["scaling", "report", str(tmp_path), "--out-dir", str(tmp_path / "r")]) == 2
    assert "is a folder; give its runs.jsonl" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["scaling", "report", str(tmp_path / "runs.jsonl"), "--fits", str(tmp_path / "bad.json"),
                 "--out-dir", str(tmp_path / "r")]) == 2
    assert "not a `gnnmegatron scaling fit` result" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written for bad input
