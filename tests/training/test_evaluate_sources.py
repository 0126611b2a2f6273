"""``evaluate`` on a multi-source run reproduces the trainer's validation per source (with the moving
average of the weights it validated), from the run's own stores or from the stores given."""

import pytest
from multisource_helpers import make_two_sources

from gnnmegatron.training.config import config_from_dict
from gnnmegatron.training.logging import read_metrics


def test_evaluate_reproduces_per_source_validation(tmp_path):
    from gnnmegatron.inference import evaluate_checkpoint
    from gnnmegatron.training.trainer import Trainer

    a, b = make_two_sources(tmp_path)
    run = tmp_path / "run"
    cfg = config_from_dict({
        "run_dir": str(run), "seed": 2,
        "data": {"sources": [{"store": str(a)}, {"store": str(b), "name": "dft", "max_val_graphs": 5}],
                 "cutoff": 4.0, "budget_atoms": 40, "splits": [0.75, 0.25, 0.0], "prefetch": 1},
        "model": {"preset": "egnn-tiny", "heads": "per_source"},
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "train": {"max_steps": 3, "eval_every": 3, "checkpoint_every": 100, "progress": False, "dtype": "float64",
                  "ema_decay": 0.5},
    })
    Trainer(cfg, resume="never").fit()
    val = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"][-1]
    assert val["weights"] == "ema"
    result = evaluate_checkpoint(run, out=tmp_path / "e.json")
    given = evaluate_checkpoint(run, [str(b)], out=None)
    assert result["weights"] == "ema" and set(result["sources"]) == {"metals", "dft"}
    assert result["sources"]["dft"]["graphs"] == 5  # the trainer's cap (max_val_graphs) applies to val
    for name, mine in result["sources"].items():
        for key in ("graphs", "energy_graphs", "force_components"):
            assert mine[key] == val["sources"][name][key], (name, key)
        for key in ("energy_mae_per_atom", "force_mae", "baseline_energy_mae_per_atom", "baseline_force_mae", "loss"):
            assert mine[key] == pytest.approx(val["sources"][name][key], rel=1e-9), (name, key)
    assert result["energy_mae_per_atom"] == pytest.approx(val["energy_mae_per_atom"], rel=1e-9)
    assert given["sources"]["dft"]["force_mae"] == pytest.approx(val["sources"]["dft"]["force_mae"], rel=1e-9)
    with pytest.raises(ValueError, match="none of this multi-source model's stores"):
        evaluate_checkpoint(run, [str(tmp_path / "other.zarr")], out=None)
