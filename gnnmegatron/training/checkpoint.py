"""Single-file checkpoints and the checks every checkpoint load shares.

The trainer writes sharded checkpoints (``gnnmegatron.training.sharded_checkpoint``). The
single-file format here (``format_version`` 1: one ``torch.save`` dict with the single-device
``model`` state dict, ``model_config``, ``stats``, ``config``, ``step``, counters) is what
``gnnmegatron checkpoint export`` writes and ``gnnmegatron.inference`` loads anywhere, and what
earlier releases trained into (``step_XXXXXXXX.pt`` + ``latest``; such files still load for
inference and ``train.init_from``). Files are written to a temporary name and renamed, so an
interrupted save never replaces a good file with a half-written one. ``CheckpointError``,
``check_model_compatible`` and ``load_model_state`` serve both formats.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another model."""


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` via a temporary file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Writes ``step_<step>.pt``, points ``latest`` at it, and prunes all but ``keep`` newest."""
    folder = Path(run_dir) / "checkpoints"
    path = folder / f"step_{step:08d}.pt"
    atomic_save({"format_version": FORMAT_VERSION, "step": step, **state}, path)
    latest_tmp = folder / f".latest.tmp-{os.getpid()}"
    latest_tmp.write_text(path.name + "\n")
    os.replace(latest_tmp, folder / "latest")
    mains = sorted(f for f in folder.glob("step_*.pt") if re.fullmatch(r"step_\d+\.pt", f.name))
    for old in mains[:-keep]:
        old.unlink()
    return path


def find_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` or None."""
    folder = Path(run_dir) / "checkpoints"
    latest = folder / "latest"
    if not latest.exists():
        return None
    path = folder / latest.read_text().strip()
    if not path.exists():
        raise CheckpointError(f"{latest} names {path.name}, which does not exist; delete {latest} to start over")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt or truncated file
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc}); it may be truncated — "
                              f"resume from an earlier one or start a new run") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a gnnmegatron checkpoint of format {FORMAT_VERSION}")
    return state


# How a model is executed, not what it is: a checkpoint resumes under another setting of these.
EXECUTION_FIELDS = ("execution", "ops_backend")


def check_model_compatible(path: Path, saved_model_config: dict, model_config: dict,
                           remedy: str = "use the matching config or a new run_dir") -> None:
    """Raises CheckpointError naming each differing model field (execution settings excepted).

    Fields added to ``ModelConfig`` after a checkpoint was written take their defaults, so older
    checkpoints keep loading.
    """
    import dataclasses

    from gnnmegatron.models.config import ModelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    defaults.update({f.name: f.default_factory() for f in dataclasses.fields(ModelConfig)
                     if f.default_factory is not dataclasses.MISSING})
    saved_model_config = {**defaults, **saved_model_config}
    model_config = {**defaults, **model_config}
    keys = sorted((set(saved_model_config) | set(model_config)) - set(EXECUTION_FIELDS))
    diff = [f"{k}: checkpoint={saved_model_config.get(k)!r} config={model_config.get(k)!r}"
            for k in keys if saved_model_config.get(k) != model_config.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {path} was written by another model ({'; '.join(diff)}); "
                              f"{remedy}")


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """load_state_dict with an error that names missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing={missing[:5]} unexpected={unexpected[:5]} "
            f"shape mismatches={shapes[:5]}; it was written by another model"
        )
    model.load_state_dict(state_dict)
