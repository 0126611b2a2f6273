"""Inference with a multi-source model: the head and energy reference are picked by source name."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

from gnnmegatron.inference import GNNMegatronCalculator, UnknownElementError, UnknownSourceError, load_model, predict

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from multisource_helpers import make_two_sources  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from gnnmegatron.training.config import config_from_dict
    from gnnmegatron.training.trainer import Trainer

    root = tmp_path_factory.mktemp("sources-run")
    a, b = make_two_sources(root)
    cfg = config_from_dict({
        "run_dir": str(root / "run"), "seed": 1,
        "data": {"sources": [{"store": str(a)}, {"store": str(b), "name": "dft"}], "cutoff": 4.0,
                 "budget_atoms": 40, "splits": [0.75, 0.25, 0.0], "prefetch": 0},
        "model": {"preset": "egnn-tiny", "heads": "per_source"},
        "train": {"max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "progress": False, "dtype": "float64"}})
    report = Trainer(cfg, resume="never").fit()
    return root / "run", b, report


def _cu():
    return bulk("Cu", "fcc", a=3.6, cubic=True)


def test_calculator_picks_the_head_by_source_name(run):
    run_dir, _, _ = run
    with pytest.raises(UnknownSourceError, match=r"several sources .*\['metals', 'dft'\].*source=NAME"):
        GNNMegatronCalculator(run_dir)
    with pytest.raises(UnknownSourceError, match=r"unknown source 'oxides'; this model knows the sources \['metals', 'dft'\]"):
        GNNMegatronCalculator(run_dir, source="oxides")
    model, _ = load_model(run_dir)
    energies = {}
    for k, name in enumerate(["metals", "dft"]):
        atoms = _cu()
        calc = GNNMegatronCalculator(run_dir, source=name)
        atoms.calc = calc
        energies[name] = atoms.get_potential_energy()
        batch = calc.graph(atoms)
        assert batch["source"].tolist() == [k]
        want = float(model(batch, compute_forces=False)["energy"][0])
        assert abs(energies[name] - want) < 1e-9 * max(1.0, abs(want))
    # Cu sits on another reference in the second source (offset -3 eV per atom there, x1.5 scale)
    assert abs(energies["metals"] - energies["dft"]) > 1.0
    ni = bulk("Ni", "fcc", a=3.5)
    ni.calc = GNNMegatronCalculator(run_dir, source="metals")
    with pytest.raises(UnknownElementError, match="Ni .*source 'metals'"):
        ni.get_potential_energy()
    ni.calc = GNNMegatronCalculator(run_dir, source="dft")
    assert np.isfinite(ni.get_potential_energy())


def test_predict_needs_a_known_source_and_matches_validation(run, tmp_path):
    run_dir, dft_store, report = run
    with pytest.raises(UnknownSourceError, match=r"\['metals', 'dft'\]"):
        predict(run_dir, dft_store, tmp_path / "p.npz", progress=False)
    summary = predict(run_dir, dft_store, tmp_path / "p.npz", split="val", source="dft", progress=False,
                      dtype=torch.float64)
    val = report["val"]["sources"]["dft"]
    assert summary["source"] == "dft" and summary["structures"] == val["graphs"]
    assert abs(summary["energy_mae_per_atom"] - val["energy_mae_per_atom"]) < 1e-9
    assert summary["with_energy"] == val["energy_graphs"], "unlabelled structures have no reference"
    proc = subprocess.run([sys.executable, "-m", "gnnmegatron.cli", "predict", str(run_dir), str(dft_store), "--out",
                           str(tmp_path / "q.npz"), "--source", "mptrj", "--no-progress"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "unknown source 'mptrj'" in proc.stderr and "['metals', 'dft']" in proc.stderr


def test_single_source_models_take_no_source_name():
    from gnnmegatron.models import AtomisticModel, get_preset

    model = AtomisticModel(get_preset("egnn-tiny"))
    GNNMegatronCalculator(model)
    with pytest.raises(UnknownSourceError, match="trained on one store and has no named sources"):
        GNNMegatronCalculator(model, source="metals")


def test_md_example_takes_a_source(run, tmp_path):
    """scripts/md_example.py on a multi-source model: --source picks the energies; without it the script
    stops with the model's sources and how to choose one."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("md_example", Path(__file__).parents[2] / "scripts" / "md_example.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run_dir, _, _ = run
    with pytest.raises(SystemExit, match=r"several sources .*\['metals', 'dft'\].*--source NAME"):
        script.main(["--model", str(run_dir), "--out", ""])
    with pytest.raises(SystemExit, match=r"unknown source 'emt'.*\['metals', 'dft'\]"):
        script.main(["--model", str(run_dir), "--source", "emt", "--out", ""])
    out = tmp_path / "md.json"
    result = script.main(["--model", str(run_dir), "--source", "metals", "--relax-steps", "2", "--md-steps", "4",
                          "--log-every", "2", "--out", str(out)])
    assert result["source"] == "metals" and json.loads(out.read_text()) == result
    assert result["md"]["steps"] == 4
