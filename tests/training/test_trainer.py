import json
import subprocess
import sys

import pytest
import torch

from gnnmegatron.training.checkpoint import CheckpointError, load_checkpoint
from gnnmegatron.training.config import config_from_dict
from gnnmegatron.training.logging import read_metrics
from gnnmegatron.training.trainer import Trainer


def _cfg(store, run_dir, **train):
    return config_from_dict({
        "run_dir": str(run_dir),
        "seed": 3,
        "data": {"store": str(store), "cutoff": 4.0, "budget_atoms": 48, "splits": [0.8, 0.2, 0.0], "prefetch": 1},
        "model": {"preset": "egnn-tiny", "force_mode": "conservative"},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"max_steps": 6, "eval_every": 3, "checkpoint_every": 100, "log_every": 1, "progress": False,
                  **train},
    })


def _train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def test_resume_is_bit_for_bit(emt_store, tmp_path):
    full = Trainer(_cfg(emt_store, tmp_path / "full"), resume="never")
    report = full.fit()
    assert report["step"] == 6

    part = Trainer(_cfg(emt_store, tmp_path / "part"), resume="never")
    assert part.fit(stop_at=4) is None  # interrupted after step 4 (mid-epoch), checkpoint written
    resumed = Trainer(_cfg(emt_store, tmp_path / "part"), resume="auto")
    assert resumed.step == 4
    resumed.fit()

    a, b = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "part")
    assert [s for s, _ in a] == list(range(1, 7)) and [s for s, _ in b] == list(range(1, 7))
    assert a == b, f"resumed losses differ: {a} vs {b}"
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name


def test_training_lowers_loss_and_writes_outputs(emt_store, tmp_path):
    cfg = _cfg(emt_store, tmp_path / "run", max_steps=30, eval_every=15, log_every=5)
    report = Trainer(cfg, resume="never").fit()
    losses = [loss for _, loss in _train_losses(tmp_path / "run")]
    assert losses[-1] < losses[0], losses
    for name in ("report.json", "loss_curve.png", "metrics.jsonl", "config.yaml", "checkpoints/latest"):
        assert (tmp_path / "run" / name).exists(), name
    val = report["val"]
    assert val["graphs"] == 12 and val["force_mae"] > 0 and val["baseline_force_mae"] > 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["step"] == 30


def test_checkpoint_from_another_model_is_refused(emt_store, tmp_path):
    Trainer(_cfg(emt_store, tmp_path / "run", max_steps=1), resume="never").fit()
    other = _cfg(emt_store, tmp_path / "run", max_steps=2)
    other.model["hidden"] = 16
    with pytest.raises(CheckpointError, match=r"another model \(hidden: checkpoint=32 config=16"):
        Trainer(other, resume="auto")


def test_truncated_checkpoint_is_refused_and_fresh_start_does_not_overwrite(emt_store, tmp_path):
    Trainer(_cfg(emt_store, tmp_path / "run", max_steps=1), resume="never").fit()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Trainer(_cfg(emt_store, tmp_path / "run"), resume="never")
    shard = next((tmp_path / "run" / "checkpoints" / "step_00000001").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        Trainer(_cfg(emt_store, tmp_path / "run"), resume="auto")


def test_truncated_single_file_checkpoint_is_refused(tmp_path):
    from gnnmegatron.training.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path, 1, {"model": {"w": torch.zeros(1000)}})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_missing_store_error_says_how_to_create_it(tmp_path):
    cfg = _cfg(tmp_path / "nope.zarr", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="gnnmegatron data emt --out"):
        Trainer(cfg)


def test_pretrain_under_torchrun(emt_store, tmp_path):
    """The documented launch path: torchrun, world size 1, config file + overrides."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_cfg(emt_store, tmp_path / "tr", max_steps=2, eval_every=2).to_dict()))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         "-m", "gnnmegatron.cli", "pretrain", "--config", str(cfg), "--set", "train.max_steps=3"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "energy MAE (meV/atom)" in out.stdout
    assert json.loads((tmp_path / "tr" / "report.json").read_text())["step"] == 3


def test_pretrain_under_torchrun_tp2_dp2(emt_store, tmp_path):
    """torchrun with 4 processes: tp=2 x dp=2, ZeRO-1 and bf16 from --set overrides; the sharded checkpoint
    (one file per rank) loads into one process and predicts finite energies."""
    from gnnmegatron.inference import load_model

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_cfg(emt_store, tmp_path / "tr", max_steps=2, eval_every=2).to_dict()))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
         "-m", "gnnmegatron.cli", "pretrain", "--config", str(cfg), "--set", "train.max_steps=3",
         "--set", "parallel.tp=2", "--set", "model.message=node_split", "--set", "optim.zero_stage=1",
         "--set", "train.dtype=bfloat16", "--set", "train.num_threads=1"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "tr" / "report.json").read_text())
    assert report["step"] == 3
    ckpt = tmp_path / "tr" / "checkpoints" / "step_00000003"
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp", "meta.json"], files
    assert json.loads((ckpt / "meta.json").read_text())["layout"] == {"tp": 2, "pp": 1, "dp": 2}
    model, _ = load_model(tmp_path / "tr")
    from gnnmegatron.data.batch import collate

    batch = collate([{"atomic_numbers": [29, 29], "positions": [[0.0, 0, 0], [2.5, 0, 0]]}], 4.0, dtype=torch.float64)
    assert torch.isfinite(model(batch)["energy"]).all()


def test_nested_train_fractions():
    import numpy as np

    from gnnmegatron.training.trainer import nested_subset

    idx = np.arange(3, 203)
    small, large = nested_subset(idx, 0.1, 0), nested_subset(idx, 0.5, 0)
    assert len(small) == 20 and len(large) == 100
    assert set(small) <= set(large) <= set(idx)
    assert not np.array_equal(small, idx[:20])  # a permutation, not a prefix
    assert np.array_equal(nested_subset(idx, 1.0, 0), idx)


def test_report_counts_atoms_and_flops(emt_store, tmp_path):
    trainer = Trainer(_cfg(emt_store, tmp_path / "run", max_steps=2, eval_every=2), resume="never")
    report = trainer.fit()
    seen = report["seen"]
    assert seen["atoms"] > 0 and seen["edges"] > seen["atoms"] and seen["flops"] > 6 * seen["atoms"]
    assert 0 < report["parameters_non_embedding"] < report["parameters"]
    assert report["val"]["loss"] == pytest.approx(report["val"]["energy_mae_per_atom"] + report["val"]["force_mae"])


def test_checkpoint_resumes_under_fused_execution(emt_store, tmp_path):
    """Execution mode is not model identity: an unfused run continues in fused mode, same weights."""
    Trainer(_cfg(emt_store, tmp_path / "run", max_steps=2), resume="never").fit()
    fused = _cfg(emt_store, tmp_path / "run", max_steps=3)
    fused.model["execution"] = "fused"
    trainer = Trainer(fused, resume="auto")
    assert trainer.step == 2 and trainer.model_cfg.execution == "fused"
    trainer.fit()
    assert trainer.step == 3


def test_checkpoint_without_newer_model_fields_still_resumes(emt_store, tmp_path):
    """A checkpoint written before a ModelConfig field existed resumes with that field's default."""
    Trainer(_cfg(emt_store, tmp_path / "run", max_steps=1), resume="never").fit()
    meta_path = tmp_path / "run" / "checkpoints" / "step_00000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_config"]["message"]
    meta_path.write_text(json.dumps(meta))
    assert Trainer(_cfg(emt_store, tmp_path / "run", max_steps=2), resume="auto").step == 1
