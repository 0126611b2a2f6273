"""Load a trained ``AtomisticModel`` for inference from a checkpoint file or a run directory.

``load_model(path)`` accepts:

* a checkpoint file written by the trainer (``<run_dir>/checkpoints/step_XXXXXXXX.pt``),
* a run directory (the checkpoint named by ``<run_dir>/checkpoints/latest`` is used, or with
  ``best=True`` the one ``checkpoints/best`` names: the best by validation),
* the ``checkpoints/`` folder itself,
* anything a registered checkpoint format recognises (see below).

Checkpoint formats are looked up in a small registry, in registration order. Each format
has a ``detect(path) -> bool`` and a ``read(path, trust) -> dict`` that returns the *single
device* view of the checkpoint: a dict with at least ``model`` (full state_dict) and
``model_config`` (``ModelConfig.to_dict()``), plus whatever metadata it has (``stats``,
``config``, ``step``, ``seen``, ``best_val``, ``world_size``). This release registers the
sharded checkpoint directories the trainer writes (``"sharded"``: DCP shards of any tp x pp x dp
layout, assembled into one state dict in this process) and the single-file format
(``"single-file"``, ``gnnmegatron checkpoint export`` and earlier releases); more plug in with
``register_checkpoint_format``, and every caller of ``load_model`` (the ASE calculator,
``predict``) then accepts them unchanged.

Weights: a checkpoint of a run with ``train.ema_decay`` holds the moving average of the weights
beside the trained ones; ``load_model`` takes the average by default (``weights=None`` or
``"ema"``) and the trained weights with ``weights="raw"``; ``ModelInfo.weights`` says which it got.

Checkpoints are read with ``torch.load(weights_only=True)`` and an allow-list of the numpy
types the trainer stores (RNG states), so loading a checkpoint cannot run code. A file that
needs anything else is refused unless ``trust=True`` (only for files from a trusted source).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gnnmegatron.training.checkpoint import FORMAT_VERSION, CheckpointError, load_model_state

__all__ = [
    "UnknownSourceError",
    "resolve_source",
    "CheckpointFormat",
    "ModelInfo",
    "ModelLoadError",
    "checkpoint_formats",
    "describe",
    "load_model",
    "read_checkpoint",
    "register_checkpoint_format",
    "resolve_checkpoint",
    "resolve_dtype",
]


class ModelLoadError(CheckpointError):
    """A model cannot be loaded: missing path, not a checkpoint, or a checkpoint of another model."""


class UnknownSourceError(ValueError):
    """A source name the model was not trained on, or no source for a multi-source model."""


def resolve_source(model_config, source: str | None) -> int | None:
    """The source id for ``source`` (a name of ``model_config.sources``), None for a single-source model.

    A multi-source model (two or more sources: one reference table, and possibly one head, per
    source) needs a name; a single-source model takes none (or its own source's name).

    Raises:
        UnknownSourceError: no name for a multi-source model, or a name the model does not know
            (the message lists the known sources).
    """
    names = list(getattr(model_config, "sources", []) or [])
    if not model_config.multi_source:
        if source is not None and source not in names:
            known = f"its only source is {names[0]!r}" if names else "it was trained on one store and has no named sources"
            raise UnknownSourceError(f"unknown source {source!r}: {known}; leave source out for this model")
        return None
    if source is None:
        raise UnknownSourceError(f"this model was trained on several sources with their own energy references "
                                 f"{names}; choose the one whose energies you want with source=NAME "
                                 f"(gnnmegatron predict --source NAME)")
    if not isinstance(source, str) or source not in names:
        raise UnknownSourceError(f"unknown source {source!r}; this model knows the sources {names}")
    return names.index(source)


@dataclass
class ModelInfo:
    """What ``load_model`` knows about the model it loaded.

    Attributes:
        path: the checkpoint (file, or directory for sharded formats) that was read.
        format: name of the checkpoint format (``"single-file"``).
        model_config: the ``ModelConfig`` the model was built from.
        elements: atomic numbers the model saw in training (sorted), or None when unknown.
        step: optimizer step of the checkpoint (None if not recorded).
        seen: atoms / edges / graphs / flops seen in training (empty if not recorded).
        best_val: best validation metrics recorded in the checkpoint (or None).
        config: the whole pretraining config as a dict (empty if not recorded).
        stats: training-data statistics (``elements``, ``force_rms``, ...).
        world_size: number of processes that wrote the checkpoint.
        card: the model card beside the checkpoint (``model_card.read_model_card``), or None.
        dtype, device: where the loaded model lives.
        weights: ``ema`` (the moving average of the weights) or ``raw`` (the trained weights).
    """

    path: Path
    format: str
    model_config: Any
    elements: list[int] | None = None
    step: int | None = None
    seen: dict[str, Any] = field(default_factory=dict)
    best_val: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    card: dict[str, Any] | None = None
    dtype: torch.dtype = torch.float64
    device: str = "cpu"
    weights: str = "raw"

    @property
    def sources(self) -> list[str]:
        """Names of the model's sources (empty for a model trained on one store)."""
        return list(self.model_config.sources)

    def source_elements(self, source: str | None) -> list[int] | None:
        """Atomic numbers a source's training data held (all of the model's when unknown or None)."""
        per = (self.stats.get("sources") or {}).get(source) if source is not None else None
        if per is not None and per.get("elements") is not None:
            return sorted(int(z) for z in per["elements"])
        return self.elements

    @property
    def cutoff(self) -> float:
        """Neighbour-list radius (Å) the model was trained with."""
        return float(self.model_config.cutoff)

    @property
    def element_symbols(self) -> list[str] | None:
        from ase.data import chemical_symbols

        return None if self.elements is None else [chemical_symbols[z] for z in self.elements]


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint layout: ``detect(path)`` says whether ``path`` is one, ``read(path, trust)``
    returns the single-device checkpoint dict (see the module docstring). With ``reads_weights``,
    ``read`` also takes ``weights=`` (``raw``/``ema``/``both``) and reads only what is asked;
    otherwise an ``ema`` dict in what it returns (averaged parameters) is applied by ``load_model``."""

    name: str
    detect: Callable[[Path], bool]
    read: Callable[..., dict]
    reads_weights: bool = False


_FORMATS: list[CheckpointFormat] = []


def register_checkpoint_format(fmt: CheckpointFormat, *, first: bool = False) -> None:
    """Adds a checkpoint format (replacing one of the same name); ``first`` puts it before the others."""
    _FORMATS[:] = [f for f in _FORMATS if f.name != fmt.name]
    if first:
        _FORMATS.insert(0, fmt)
    else:
        _FORMATS.append(fmt)


def checkpoint_formats() -> list[str]:
    """Names of the registered formats, in lookup order."""
    return [f.name for f in _FORMATS]


# --------------------------------------------------------------------------------------- single file
def _safe_globals() -> list:
    """The non-tensor types the trainer's checkpoints contain (numpy RNG state and metadata)."""
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("uint32", "int32", "int64", "float32", "float64", "bool")]
    return allowed


def _torch_load(path: Path, trust: bool) -> Any:
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _detect_single_file(path: Path) -> bool:
    return path.is_file()


def _read_single_file(path: Path, trust: bool) -> dict:
    try:
        state = _torch_load(path, trust)
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text and "Unsupported global" in text:
            what = text.split("Unsupported global:", 1)[1].split("was not", 1)[0].strip()
            raise ModelLoadError(
                f"{path} holds Python objects beyond tensors and plain data ({what}); it was not written by "
                f"gnnmegatron's trainer. If you trust its source, load it with trust=True") from exc
        raise ModelLoadError(f"{path} is not a gnnmegatron checkpoint: torch.load cannot read it "
                             f"({type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}); "
                             f"pass a checkpoints/step_*.pt file or a run directory") from exc
    if not isinstance(state, dict) or "format_version" not in state:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ModelLoadError(f"{path} is not a gnnmegatron checkpoint (found {keys}, no 'format_version'); "
                             f"pass a checkpoints/step_*.pt file or a run directory")
    if state["format_version"] != FORMAT_VERSION:
        raise ModelLoadError(f"{path} is a gnnmegatron checkpoint of format {state['format_version']!r}, but this "
                             f"version reads format {FORMAT_VERSION}; use the matching gnnmegatron release")
    return state


register_checkpoint_format(CheckpointFormat("single-file", _detect_single_file, _read_single_file))


def _detect_sharded(path: Path) -> bool:
    from gnnmegatron.training.sharded_checkpoint import is_sharded_checkpoint

    return is_sharded_checkpoint(path)


def _read_sharded(path: Path, trust: bool, weights: str = "both") -> dict:
    """A sharded (DCP) checkpoint of any tp x pp x dp layout, assembled into the single-device view."""
    from gnnmegatron.training.sharded_checkpoint import load_full_state

    try:
        return load_full_state(path, weights=weights)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc


register_checkpoint_format(CheckpointFormat("sharded", _detect_sharded, _read_sharded, reads_weights=True), first=True)


# --------------------------------------------------------------------------------------- resolving
def resolve_checkpoint(path: str | Path, *, best: bool = False) -> tuple[Path, CheckpointFormat]:
    """The checkpoint ``path`` names (a run directory resolves to its latest checkpoint, or with ``best``
    to its best one) and its format.

    Raises:
        ModelLoadError: the path does not exist, is a directory with no checkpoint in it, or ``best``
            was asked of a single checkpoint or of a run without a best checkpoint.
    """
    from gnnmegatron.training.sharded_checkpoint import run_checkpoint

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model {path} does not exist; pass a checkpoint file (run_dir/checkpoints/step_*.pt) "
                             f"or a run directory")
    for fmt in _FORMATS:  # a registered format may claim a directory (e.g. a sharded checkpoint)
        if fmt.detect(path):
            if best:
                raise ModelLoadError(f"{path} is one checkpoint; best=True (--best) picks the best checkpoint of a "
                                     f"run directory")
            return path, fmt
    if path.is_dir():
        run_dir = path.parent if path.name == "checkpoints" else path
        try:
            latest = run_checkpoint(run_dir, best=best)
        except CheckpointError as exc:  # 'latest' names a file that is gone, or no best checkpoint
            raise ModelLoadError(str(exc)) from exc
        if latest is None:
            found = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) \
                if (run_dir / "checkpoints").is_dir() else []
            hint = f" (it has {found[:3]} but no 'latest' file)" if found else ""
            raise ModelLoadError(f"{path} is a directory without a checkpoint{hint}: expected "
                                 f"{run_dir / 'checkpoints' / 'latest'}; train first (`gnnmegatron pretrain`) "
                                 f"or pass a checkpoint file")
        return resolve_checkpoint(latest)
    raise ModelLoadError(f"{path} is not a checkpoint in any known format ({checkpoint_formats()})")


def read_checkpoint(path: str | Path, *, trust: bool = False, weights: str | None = None,
                    best: bool = False) -> tuple[dict, Path, str]:
    """Reads a checkpoint in any registered format: (single-device state dict, resolved path, format name).

    ``weights``: None (the moving average when the checkpoint has one, else the trained weights),
    ``"ema"`` (the average; an error if there is none) or ``"raw"``; the dict's ``weights`` says which
    ``model`` holds. ``best``: a run directory's best checkpoint instead of its latest.
    """
    if weights not in (None, "ema", "raw"):
        raise ValueError(f"weights must be None, 'ema' or 'raw', got {weights!r}")
    resolved, fmt = resolve_checkpoint(path, best=best)
    if fmt.reads_weights:
        state = fmt.read(resolved, trust, weights="raw" if weights == "raw" else "ema")
    else:
        state = fmt.read(resolved, trust)
        ema = state.get("ema") if isinstance(state, dict) else None
        if ema and weights != "raw" and isinstance(state.get("model"), dict):
            state = dict(state, model={**state["model"], **ema}, weights="ema")
    if isinstance(state, dict):
        state.setdefault("weights", "raw")
        if state.get("weights") != "ema" and weights == "ema":
            raise ModelLoadError(f"{resolved} holds no moving average of the weights (its run had no "
                                 f"train.ema_decay); load its trained weights with weights='raw' (--weights raw)")
    return state, resolved, fmt.name


def resolve_dtype(dtype: torch.dtype | str | None, config: dict | None = None) -> torch.dtype:
    """``torch.float32``/``float64`` or their names; None takes the training dtype from ``config``."""
    if dtype is None:
        dtype = ((config or {}).get("train") or {}).get("dtype", "float32")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (or their names), got {dtype!r}")
    return dtype


def _model_config(state: dict, path: Path):
    from gnnmegatron.models import ModelConfig, ModelConfigError

    cfg = state.get("model_config")
    if not isinstance(cfg, dict) or not isinstance(state.get("model"), dict):
        raise ModelLoadError(f"{path} is a checkpoint without a model (keys {sorted(state)[:10]}); "
                             f"it was not written by the gnnmegatron trainer")
    try:
        return ModelConfig.from_dict(cfg)
    except (ModelConfigError, TypeError) as exc:
        raise ModelLoadError(f"{path} holds a model of another family or version: its model_config does not "
                             f"describe a gnnmegatron AtomisticModel ({exc})") from exc


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, refusing a CUDA device this torch cannot use (a CPU build, no GPU, an
    index past the GPUs present) with a message instead of torch's assertion deep in ``.to()``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device {str(device)!r} asked for, but {why}; use device 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible")
    return dev


def load_model(path_or_run_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = torch.float64, *, trust: bool = False, weights: str | None = None,
               best: bool = False):
    """Loads the model of a checkpoint (or of a run directory's latest checkpoint) for inference.

    Args:
        path_or_run_dir: checkpoint file, run directory, or any registered checkpoint format.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        dtype: parameter dtype (``torch.float64`` by default: MD and finite differences want it;
            ``None`` takes the dtype the model was trained in).
        trust: allow arbitrary pickled objects in the file (``torch.load(weights_only=False)``);
            only for checkpoints from a trusted source.
        weights: ``None`` (default: the moving average of the weights when the checkpoint has one,
            else the trained weights), ``"ema"`` (the average; an error without one) or ``"raw"``.
        best: for a run directory, its best checkpoint by validation (``checkpoints/best``) instead
            of the latest.

    Returns:
        (model, info): an ``AtomisticModel`` in eval mode and a ``ModelInfo``.

    Raises:
        ModelLoadError: missing path, not a checkpoint, a checkpoint of another model family, or
            weights that do not fit the recorded model config.
    """
    from gnnmegatron.training.model_card import find_model_card
    from gnnmegatron.models import AtomisticModel

    device = check_device(device)
    state, resolved, fmt = read_checkpoint(path_or_run_dir, trust=trust, weights=weights, best=best)
    cfg = _model_config(state, resolved)
    dtype = resolve_dtype(dtype, state.get("config"))
    model = AtomisticModel(cfg)
    # Load in the checkpoint's own precision (copying float64 weights into the float32 model that
    # AtomisticModel builds would round them), then convert.
    saved = next((t.dtype for t in state["model"].values() if torch.is_tensor(t) and t.is_floating_point()), None)
    if saved is not None:
        model = model.to(saved)
    try:
        load_model_state(model, state["model"], resolved)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc
    model = model.to(device=device, dtype=dtype).eval()
    stats = dict(state.get("stats") or {})
    card = None
    card_path = find_model_card(resolved)
    if card_path is not None:
        from gnnmegatron.training.model_card import read_model_card

        card = read_model_card(card_path)
    elements = stats.get("elements")
    if elements is None and card is not None:
        elements = [e["Z"] for e in card.get("elements", [])] or None
    info = ModelInfo(
        path=resolved, format=fmt, model_config=cfg,
        elements=sorted(int(z) for z in elements) if elements is not None else None,
        step=state.get("step"), seen=dict(state.get("seen") or {}), best_val=state.get("best_val"),
        config=dict(state.get("config") or {}), stats=stats, world_size=int(state.get("world_size", 1) or 1),
        card=card, dtype=dtype, device=str(device), weights=state.get("weights", "raw"),
    )
    return model, info


def describe(info: ModelInfo) -> str:
    """One line naming the model (for logs and progress bars)."""
    preset = (info.config.get("model") or {}).get("preset", "model")
    cfg = info.model_config
    srcs = f", sources {list(cfg.sources)} ({cfg.heads} heads)" if cfg.multi_source else ""
    return (f"{preset} (H={cfg.hidden}, L={cfg.layers}, cutoff={cfg.cutoff} Å, {cfg.force_mode} forces{srcs}) "
            f"from {info.path} at step {info.step}, {'averaged (EMA)' if info.weights == 'ema' else 'trained'} weights")
