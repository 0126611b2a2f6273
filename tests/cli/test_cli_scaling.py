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
