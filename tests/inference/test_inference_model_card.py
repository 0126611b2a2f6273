"""Model cards: written beside a checkpoint from the trainer's state, read back, pruned with the checkpoint."""

import json

import pytest

from gnnmegatron.inference import load_model, read_model_card, write_model_card
from gnnmegatron.training.model_card import card_path
from gnnmegatron.models import count_parameters


def test_model_card_written_and_read_back(tiny_run):
    trainer = tiny_run.trainer
    state = trainer._meta()  # what the trainer's save writes beside the checkpoint
    path = write_model_card(tiny_run.checkpoint, state)
    assert path == tiny_run.checkpoint.with_name("step_00000002.card.json") == card_path(tiny_run.checkpoint)
    assert path.with_name("step_00000002.card.md").read_text().startswith("# Model card: egnn-tiny")

    for where in (path, tiny_run.checkpoint, tiny_run.run_dir):
        card = read_model_card(where)
        assert card["checkpoint"] == tiny_run.checkpoint.name
    assert card["model"]["preset"] == "egnn-tiny"
    assert card["model"]["parameters"] == count_parameters(trainer.model_cfg)["total"]
    assert card["model"]["config"] == trainer.model_cfg.to_dict()
    assert card["data"]["store"] == str(trainer.cfg.data.store)
    assert card["data"]["producer"] == "gnnmegatron.data.emt" and card["data"]["sources"] == ["emt"]
    assert card["data"]["seen"]["graphs"] == trainer.seen["graphs"] > 0
    assert card["data"]["train_fraction"] == 1.0
    assert card["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}
    assert card["metrics"]["last_val"]["step"] == 2
    assert card["metrics"]["last_val"]["force_mae"] == pytest.approx(tiny_run.val["force_mae"])
    assert card["metrics"]["best_val"]["energy_mae_per_atom"] == pytest.approx(tiny_run.val["energy_mae_per_atom"])
    assert [e["Z"] for e in card["elements"]] == trainer.stats["elements"]
    assert {"Cu", "Au"} <= {e["symbol"] for e in card["elements"]}
    assert card["training"]["step"] == 2 and card["training"]["dtype"] == "float64"
    assert card["gnnmegatron_version"] and card["created"]

    _, info = load_model(tiny_run.run_dir)  # the loader picks the card up
    assert info.card["checkpoint"] == tiny_run.checkpoint.name


def test_cards_of_pruned_checkpoints_are_removed(tiny_run, tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    ckpt = folder / "step_00000009"
    ckpt.mkdir()
    stale = folder / "step_00000001.card.json"
    stale.write_text(json.dumps({"format": "gnnmegatron.model_card", "checkpoint": "step_00000001"}))
    state = {**tiny_run.trainer._meta(), "step": 9}
    write_model_card(ckpt, state, last_val={"energy_mae_per_atom": 0.1, "force_mae": 0.2, "step": 9})
    assert not stale.exists() and (folder / "step_00000009.card.json").exists()
    assert read_model_card(folder / "step_00000009.card.json")["metrics"]["last_val"]["step"] == 9


def test_read_model_card_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model card"):
        read_model_card(tmp_path / "step_00000001.pt")
    bad = tmp_path / "x.card.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a gnnmegatron model card"):
        read_model_card(bad)
