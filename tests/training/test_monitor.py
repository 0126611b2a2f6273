"""What the trainer does with validations and schedules: the best checkpoint (kept through pruning,
loadable by ``load_model``, ``predict`` and ``evaluate``), early stopping, reduce-on-plateau, loss-weight
stages, and the TensorBoard events beside metrics.jsonl.

The validation metric is scripted where the test needs it to rise and fall at known steps: the
real ``Trainer.evaluate`` runs (with the moving average swapped in) and its ``loss`` is replaced by
the script's value, so selection, saving, pruning and stopping run unchanged.
"""

from __future__ import annotations

import pytest
import torch

from gnnmegatron.training import sharded_checkpoint as sc
from gnnmegatron.training.config import ConfigError, config_from_dict
from gnnmegatron.training.logging import read_metrics


def _cfg(store, run_dir, *, max_steps=6, optim=None, loss=None, **train):
    return config_from_dict({
        "run_dir": str(run_dir),
        "seed": 3,
        "data": {"store": str(store), "cutoff": 4.0, "budget_atoms": 48, "splits": [0.8, 0.2, 0.0], "prefetch": 1},
        "model": {"preset": "egnn-tiny", "force_mode": "conservative"},
        "optim": {"lr": 2e-3, "warmup_steps": 0, **(optim or {})},
        "loss": loss or {},
        "train": {"max_steps": max_steps, "eval_every": 1, "checkpoint_every": 100, "log_every": 1,
                  "progress": False, "dtype": "float64", **train},
    })


def _scripted(trainer, values, captured=None):
    """Replace the validation loss by ``values[step - 1]``; ``captured[step]``: the weights validated."""
    real = trainer.evaluate

    def evaluate():
        out = real()
        if captured is not None:
            captured[trainer.step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        return dict(out, loss=float(values[trainer.step - 1]))
    trainer.evaluate = evaluate
    return trainer


def test_best_checkpoint_survives_pruning_and_loads(emt_store, tmp_path):
    from gnnmegatron.inference import evaluate_checkpoint, load_model, predict
    from gnnmegatron.training.trainer import Trainer

    run = tmp_path / "run"
    captured = {}
    trainer = _scripted(Trainer(_cfg(emt_store, run, ema_decay=0.5, checkpoint_every=1, keep_checkpoints=1),
                                resume="never"), [5.0, 2.0, 3.0, 4.0, 2.5, 6.0], captured)
    report = trainer.fit()
    assert [s for s, _ in sc.complete_checkpoints(run)] == [2, 6]  # keep 1 (the newest) + the best
    assert (run / "checkpoints" / "best").read_text().strip() == "step_00000002"
    assert report["best_val"]["step"] == 2 and report["monitor"]["best"] == 2.0
    model, info = load_model(run, dtype=torch.float64, best=True)
    assert info.step == 2 and info.weights == "ema"
    for name, value in captured[2].items():  # the weights validated at step 2: the moving average then
        assert torch.equal(model.state_dict()[name], value), name
    latest, latest_info = load_model(run, dtype=torch.float64)
    assert latest_info.step == 6
    summary = predict(run, emt_store, tmp_path / "p.npz", best=True, indices=[0, 1], progress=False)
    assert summary["model_step"] == 2
    result = evaluate_checkpoint(run, best=True, out=None)
    assert result["step"] == 2 and result["weights"] == "ema"
    from gnnmegatron.inference import GNNMegatronCalculator

    assert GNNMegatronCalculator(run, best=True).info.step == 2
    from gnnmegatron.inference.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="one checkpoint"):
        load_model(run / "checkpoints" / "step_00000006", best=True)
    with pytest.raises(ModelLoadError, match="no best checkpoint"):
        (run / "checkpoints" / "best").unlink()
        load_model(run, best=True)


@pytest.mark.parametrize("values, patience, min_delta, stop", [
    ([5.0, 4.0, 4.5, 4.2, 3.0, 1.0, 1.0, 1.0], 2, 0.0, 4),  # no new low at steps 3 and 4
    ([5.0, 4.8, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0], 1, 0.5, 2),  # 4.8 is not 0.5 below 5
], ids=["patience", "min_delta"])
def test_early_stopping_stops_where_the_metric_stops_improving(emt_store, tmp_path, values, patience, min_delta,
                                                                stop):
    from gnnmegatron.training.trainer import Trainer

    run = tmp_path / "run"
    cfg = _cfg(emt_store, run, max_steps=8, early_stopping_patience=patience, early_stopping_min_delta=min_delta)
    report = _scripted(Trainer(cfg, resume="never"), values).fit()
    assert report["step"] == stop and report["monitor"]["stopped_at"] == stop
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"] == list(range(1, stop + 1))
    assert sc.find_resume(run)[0].name == f"step_{stop:08d}"
    again = Trainer(cfg, resume="auto")  # a stopped run is finished: resuming trains nothing
    assert again.fit()["step"] == stop


def test_plateau_schedule_cuts_the_learning_rate(emt_store, tmp_path):
    from gnnmegatron.training.trainer import Trainer

    run = tmp_path / "run"
    cfg = _cfg(emt_store, run, max_steps=5, optim={"schedule": "plateau", "plateau_patience": 1,
                                                   "plateau_factor": 0.5, "min_lr_ratio": 0.2})
    _scripted(Trainer(cfg, resume="never"), [5.0, 6.0, 7.0, 8.0, 3.0]).fit()
    lrs = [r["lr"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert lrs == pytest.approx([2e-3, 2e-3, 1e-3, 5e-4, 4e-4], rel=1e-12), lrs  # floor 0.2 * lr


def test_loss_weight_stages(emt_store, tmp_path):
    from gnnmegatron.training.trainer import Trainer

    run = tmp_path / "run"
    cfg = _cfg(emt_store, run, max_steps=4, eval_every=100,
               loss={"stages": [{"start": 0.5, "energy_weight": 5.0, "force_weight": 0.5}]})
    Trainer(cfg, resume="never").fit()
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    for r in rows:
        we, wf = (1.0, 1.0) if r["step"] <= 2 else (5.0, 0.5)
        assert r["loss"] == pytest.approx(we * r["loss_energy"] + wf * r["loss_forces"], rel=1e-10), r
    with pytest.raises(ConfigError, match=r"loss.stages\[0\]"):
        _cfg(emt_store, run, loss={"stages": [{"start": 1.5, "energy_weight": 2.0}]})
    with pytest.raises(ConfigError, match="best_metric"):
        _cfg(emt_store, run, best_metric="accuracy")
    with pytest.raises(ConfigError, match="no source 'dft'"):
        Trainer(_cfg(emt_store, tmp_path / "other", best_metric="dft/force_mae"), resume="never")


def test_tensorboard_events_hold_the_logged_scalars(emt_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gnnmegatron.training.logging import TensorBoardWriter
    from gnnmegatron.training.trainer import Trainer

    run = tmp_path / "run"
    Trainer(_cfg(emt_store, run, max_steps=3, eval_every=3, tensorboard=True), resume="never").fit()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    records = read_metrics(run / "metrics.jsonl")
    for split, keys in (("train", ("loss", "lr", "loss_grad_norm", "atoms_per_s", "memory_mb", "loss_forces")),
                        ("val", ("energy_mae_per_atom", "force_mae", "baseline_force_mae", "loss"))):
        rows = [r for r in records if r["split"] == split]
        for key in keys:
            assert f"{split}/{key}" in tags, (split, key, sorted(tags))
            logged = [(e.step, e.value) for e in events.Scalars(f"{split}/{key}")]
            assert [s for s, _ in logged] == [r["step"] for r in rows]
            assert [v for _, v in logged] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert min(e.value for e in events.Scalars("train/memory_mb")) > 0

    # multi-source records: one scalar per source and metric
    writer = TensorBoardWriter(tmp_path / "tb")
    writer.write({"step": 5, "split": "val", "force_mae": 0.2, "sources": {"emt": {"force_mae": 0.1}}})
    writer.close()
    multi = EventAccumulator(str(tmp_path / "tb"))
    multi.Reload()
    assert {"val/force_mae", "val/emt/force_mae"} <= set(multi.Tags()["scalars"])
    assert multi.Scalars("val/emt/force_mae")[0].value == pytest.approx(0.1)
