"""load_model: checkpoint files and run directories, format dispatch, and clear refusals."""

import datetime
from pathlib import Path

import pytest
import torch
from inference_helpers import random_model

from gnnmegatron.inference import CheckpointFormat, ModelLoadError, load_model, loading, register_checkpoint_format
from gnnmegatron.training.checkpoint import CheckpointError


def test_run_dir_and_checkpoint_file_load_the_trained_model(tiny_run):
    model, info = load_model(tiny_run.run_dir)
    trained = tiny_run.trainer.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert info.path == tiny_run.checkpoint and info.format == "sharded"
    assert info.step == 2 and info.cutoff == 4.0 and info.model_config.hidden == 32
    assert info.elements == tiny_run.trainer.stats["elements"]
    assert "Au" in info.element_symbols and not model.training
    assert model.embedding.weight.dtype == torch.float64
    m32, info32 = load_model(tiny_run.checkpoint, dtype="float32")
    assert m32.embedding.weight.dtype == torch.float32 and info32.path == info.path
    _, from_folder = load_model(tiny_run.run_dir / "checkpoints", dtype=None)  # None: the training dtype
    assert from_folder.dtype == torch.float64


def test_exported_single_file_loads_the_same_model(tiny_run, tmp_path):
    """`gnnmegatron checkpoint export` writes the single-device file; it loads to the same weights."""
    from gnnmegatron.cli import main

    out = tmp_path / "model.pt"
    assert main(["checkpoint", "export", str(tiny_run.run_dir), "--out", str(out)]) == 0
    model, info = load_model(out)
    trained = tiny_run.trainer.model.state_dict()
    assert info.format == "single-file" and info.step == 2
    assert info.elements == tiny_run.trainer.stats["elements"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.pt")


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(ModelLoadError, match="directory without a checkpoint"):
        load_model(tmp_path)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a gnnmegatron checkpoint"):
        load_model(text)
    other = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)  # a plain torch file of another project
    with pytest.raises(ModelLoadError, match="not a gnnmegatron checkpoint"):
        load_model(other)
    assert issubclass(ModelLoadError, CheckpointError)


def _checkpoint(path: Path, model_config: dict, weights: dict, **extra) -> Path:
    torch.save({"format_version": 1, "model": weights, "model_config": model_config, **extra}, path)
    return path


def test_checkpoint_of_another_model_family(tmp_path):
    path = _checkpoint(tmp_path / "mace.pt", {"r_max": 5.0, "num_interactions": 2, "hidden_irreps": "32x0e"},
                       {"w": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match=r"another family.*unknown ModelConfig field"):
        load_model(path)
    model = random_model()
    cfg = model.cfg.to_dict() | {"hidden": 16}  # weights of H=32 under a config of H=16
    path = _checkpoint(tmp_path / "mismatch.pt", cfg, model.state_dict())
    with pytest.raises(ModelLoadError, match="does not fit this model"):
        load_model(path)


def test_untrusted_objects_are_refused_unless_trusted(tmp_path):
    model = random_model()
    path = _checkpoint(tmp_path / "odd.pt", model.cfg.to_dict(), model.state_dict(),
                       stats={"elements": [29], "date": datetime.date(2025, 1, 1)})
    with pytest.raises(ModelLoadError, match="trust=True"):
        load_model(path)
    loaded, info = load_model(path, trust=True)
    assert info.elements == [29]
    assert torch.equal(loaded.embedding.weight, model.embedding.weight)


def test_checkpoint_formats_dispatch_through_the_registry(tmp_path):
    """A later format (e.g. sharded) registers detect/read and every loader accepts it."""
    model = random_model()
    folder = tmp_path / "toy_checkpoint"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "weights.pt")

    def read(path, trust):
        return {"model": torch.load(path / "weights.pt"), "model_config": model.cfg.to_dict(),
                "stats": {"elements": [29, 79]}, "step": 7}

    fmt = CheckpointFormat("toy-dir", lambda p: p.is_dir() and (p / "weights.pt").exists(), read)
    register_checkpoint_format(fmt, first=True)
    try:
        assert loading.checkpoint_formats()[0] == "toy-dir"
        loaded, info = load_model(folder)
        assert info.format == "toy-dir" and info.step == 7 and info.elements == [29, 79]
        assert torch.equal(loaded.embedding.weight, model.embedding.weight)
    finally:
        loading._FORMATS[:] = [f for f in loading._FORMATS if f.name != "toy-dir"]
    assert loading.checkpoint_formats() == ["sharded", "single-file"]
