"""Moving average of the weights (``train.ema_decay``): the average itself, resume, layouts, inference.

* the EMA equals ``decay * ema + (1 - decay) * w`` computed by hand over the recorded weights of
  every step (the first step copies them), and swapping it in for validation leaves training
  bit for bit as without EMA;
* a run interrupted and resumed has the same average, weights and validations, bit for bit;
* under tp = 2 and under pp = 2 (2 gloo processes) the average assembled from the checkpoint's
  ``ema/`` shards equals the single-device run's;
* ``load_model`` takes the average by default and the trained weights with ``weights="raw"``.
"""

from __future__ import annotations

import pytest
import torch

from gnnmegatron.parallel.testing import run_distributed
from gnnmegatron.training import sharded_checkpoint as sc
from gnnmegatron.training.config import config_from_dict
from gnnmegatron.training.logging import read_metrics

DECAY = 0.8


def _cfg(store, run_dir, *, max_steps=6, ema=DECAY, tp=1, pp=1, **train):
    return config_from_dict({
        "run_dir": str(run_dir),
        "seed": 3,
        "data": {"store": str(store), "cutoff": 4.0, "budget_atoms": 48, "splits": [0.8, 0.2, 0.0], "prefetch": 1},
        "model": {"preset": "egnn-tiny", "force_mode": "conservative", "message": "node_split"},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "train": {"max_steps": max_steps, "eval_every": 3, "checkpoint_every": 100, "log_every": 1,
                  "progress": False, "dtype": "float64", "ema_decay": ema, **train},
        "parallel": {"tp": tp, "pp": pp},
    })


def _records(run_dir, split):
    return [{k: v for k, v in r.items() if k not in ("atoms_per_s", "window_atoms_per_s", "memory_mb")}
            for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == split]


def test_ema_is_the_hand_computed_average_and_leaves_training_unchanged(emt_store, tmp_path):
    from gnnmegatron.training.trainer import Trainer

    trainer = Trainer(_cfg(emt_store, tmp_path / "manual"), resume="never")
    batches = trainer._batches()
    expected = None
    for _ in range(4):
        trainer.train_step(next(batches))
        w = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        expected = w if expected is None else {n: DECAY * expected[n] + (1 - DECAY) * w[n] for n in w}
    assert trainer.ema.updates == 4
    got = trainer.ema.tensors
    assert set(got) == set(expected)
    for name, value in expected.items():
        err = float((got[name] - value).abs().max())
        assert err < 1e-12, f"{name}: EMA differs from the hand-computed average by {err:.2e}"
    moved = max(float((got[n] - p).abs().max()) for n, p in trainer.model.named_parameters())
    assert moved > 1e-6, "the average equals the weights: nothing was averaged"

    # validation swaps the average in and the trained weights back: the same run without EMA
    # follows the same curve bit for bit, and its validation (raw weights) differs from the EMA's
    with_ema = Trainer(_cfg(emt_store, tmp_path / "ema"), resume="never")
    with_ema.fit()
    without = Trainer(_cfg(emt_store, tmp_path / "raw", ema=None), resume="never")
    without.fit()
    assert _records(tmp_path / "ema", "train") == _records(tmp_path / "raw", "train")
    for name, p in without.model.state_dict().items():
        assert torch.equal(p, with_ema.model.state_dict()[name]), name
    ema_val, raw_val = _records(tmp_path / "ema", "val"), _records(tmp_path / "raw", "val")
    assert [r["weights"] for r in ema_val] == ["ema", "ema"] and [r["weights"] for r in raw_val] == ["raw", "raw"]
    assert ema_val[-1]["force_mae"] != raw_val[-1]["force_mae"]
    with with_ema.ema.swapped(with_ema.model):
        again = with_ema.evaluate()
    assert again["force_mae"] == ema_val[-1]["force_mae"]

    # inference: the average by default, the trained weights on request
    from gnnmegatron.inference import load_model

    model, info = load_model(tmp_path / "ema", dtype=torch.float64)
    raw, raw_info = load_model(tmp_path / "ema", dtype=torch.float64, weights="raw")
    assert info.weights == "ema" and raw_info.weights == "raw"
    for name, p in with_ema.ema.tensors.items():
        assert torch.equal(model.state_dict()[name], p), name
        assert torch.equal(raw.state_dict()[name], with_ema.model.state_dict()[name]), name
    from gnnmegatron.inference.loading import ModelLoadError
    from gnnmegatron.training.export import export_checkpoint

    exported, exported_info = load_model(export_checkpoint(tmp_path / "ema", tmp_path / "model.pt"), dtype=torch.float64)
    assert exported_info.weights == "ema"  # the single file carries the average too
    for name, p in with_ema.ema.tensors.items():
        assert torch.equal(exported.state_dict()[name], p), name

    with pytest.raises(ModelLoadError, match="no moving average"):
        load_model(tmp_path / "raw", weights="ema")


def test_ema_survives_resume_bit_for_bit(emt_store, tmp_path):
    from gnnmegatron.training.trainer import Trainer

    full = Trainer(_cfg(emt_store, tmp_path / "full"), resume="never")
    full.fit()
    part = Trainer(_cfg(emt_store, tmp_path / "part"), resume="never")
    assert part.fit(stop_at=4) is None
    resumed = Trainer(_cfg(emt_store, tmp_path / "part"), resume="auto")
    assert resumed.step == 4 and resumed.ema.updates == 4
    resumed.fit()
    assert _records(tmp_path / "full", "train") == _records(tmp_path / "part", "train")
    assert _records(tmp_path / "full", "val") == _records(tmp_path / "part", "val")
    assert full.ema.updates == resumed.ema.updates == 6
    for name, p in full.ema.tensors.items():
        assert torch.equal(p, resumed.ema.tensors[name]), name

    # a checkpoint without an average (EMA switched on later) starts one from its weights
    plain = Trainer(_cfg(emt_store, tmp_path / "plain", ema=None), resume="never")
    plain.fit(stop_at=2)
    later = Trainer(_cfg(emt_store, tmp_path / "plain"), resume="auto")
    assert later.ema.updates == 0
    for name, p in later.model.named_parameters():
        assert torch.equal(later.ema.tensors[name], p.detach()), name


def _layout_worker(store, root):
    from pathlib import Path

    from gnnmegatron.training.trainer import Trainer

    root = Path(root)
    Trainer(_cfg(store, root / "tp2", max_steps=4, tp=2), resume="never").fit()
    Trainer(_cfg(store, root / "pp2", max_steps=4, pp=2), resume="never").fit()
    return True


def test_ema_under_tp2_and_pp2_equals_one_device(emt_store, tmp_path):
    from gnnmegatron.training.trainer import Trainer

    run_distributed(_layout_worker, 2, str(emt_store), str(tmp_path), timeout=300)
    Trainer(_cfg(emt_store, tmp_path / "one", max_steps=4), resume="never").fit()
    ref = sc.load_full_state(sc.find_resume(tmp_path / "one")[0], weights="both")
    assert ref["ema"] and set(ref["ema"]) == {n for n in ref["model"] if n in ref["ema"]}
    for layout in ("tp2", "pp2"):
        state = sc.load_full_state(sc.find_resume(tmp_path / layout)[0], weights="both")
        assert set(state["ema"]) == set(ref["ema"]), layout
        for name, value in ref["ema"].items():
            err = float((state["ema"][name] - value).abs().max())
            assert err <= 1e-9 * max(1.0, float(value.abs().max())), f"{layout} {name}: EMA differs by {err:.2e}"
        moved = max(float((state["ema"][n] - state["model"][n]).abs().max()) for n in state["ema"])
        assert moved > 1e-6, f"{layout}: the saved average equals the weights"
