"""`gnnmegatron checkpoint info` and `checkpoint export` on a sharded checkpoint; errors without a traceback."""

import torch

from gnnmegatron.cli import main
from gnnmegatron.training.config import config_from_dict


def _run(emt_store, run_dir):
    from gnnmegatron.training.trainer import Trainer

    cfg = config_from_dict({
        "run_dir": str(run_dir), "seed": 1,
        "data": {"store": str(emt_store), "cutoff": 4.0, "budget_atoms": 48, "splits": [0.8, 0.2, 0.0]},
        "model": {"preset": "egnn-tiny"},
        "train": {"max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "progress": False},
    })
    trainer = Trainer(cfg, resume="never")
    trainer.fit()
    return trainer


def test_checkpoint_info_and_export(emt_store, tmp_path, capsys):
    trainer = _run(emt_store, tmp_path / "run")
    assert main(["checkpoint", "info", str(tmp_path / "run"), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "step 2" in text and "tp=1 pp=1 dp=1" in text and "egnn-tiny" in text
    assert "model/embedding.weight: [101, 32] float32 in 1 chunk(s)" in text
    assert "optim/backbone.blocks.0.edge_mlp.0.weight/exp_avg" in text and "__0_0.distcp" in text
    assert "stored byte ranges present" in text
    out = tmp_path / "model.pt"
    assert main(["checkpoint", "export", str(tmp_path / "run" / "checkpoints"), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=False)
    assert state["format_version"] == 1 and state["step"] == 2 and state["optimizer"] is None
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(state["model"][name], value), name


def test_checkpoint_commands_refuse_what_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["checkpoint", "info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["checkpoint", "export", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "holds no sharded checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_checkpoint_info_finds_a_truncated_or_missing_shard_file(emt_store, tmp_path, capsys):
    _run(emt_store, tmp_path / "run")
    shard = tmp_path / "run" / "checkpoints" / "step_00000002" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert main(["checkpoint", "info", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "step_00000002: shard file(s) damaged: __0_0.distcp truncated" in err and "Traceback" not in err
    shard.unlink()
    assert main(["checkpoint", "info", str(tmp_path / "run")]) == 2
    assert "__0_0.distcp missing" in capsys.readouterr().err
