"""scripts/md_example.py (the README example) runs end to end on a tiny trained model."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "md_example.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("md_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_md_example_relaxes_and_runs_nve(tiny_run, tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "md.json"
    result = script.main(["--model", str(tiny_run.run_dir), "--relax-steps", "5", "--md-steps", "20",
                          "--log-every", "5", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["structure"] == {"formula": "Au16Cu16", "atoms": 32, "lattice_A": 3.7, "seed": 0}
    assert result["relax"]["steps"] <= 5 and result["relax"]["relax_cell"]
    assert result["relax"]["energy_end_eV"] <= result["relax"]["energy_start_eV"]
    md = result["md"]
    assert md["steps"] == 20 and md["duration_ps"] == pytest.approx(0.02)
    assert abs(md["drift_eV_per_atom"]) < 1e-4  # a conservative model in float64 (bound: see the NVE test)
    printed = capsys.readouterr().out
    assert "total-energy drift" in printed and "BFGS (positions + cell)" in printed


def test_md_example_says_how_to_get_a_model(tmp_path):
    script = _load_script()
    with pytest.raises(SystemExit, match="make demo"):
        script.main(["--model", str(tmp_path / "runs" / "demo"), "--out", ""])
