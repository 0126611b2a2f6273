"""Pretraining configuration: YAML mapped onto validated dataclasses.

A config file has one section per dataclass below; unknown keys are errors (a typo
should never silently fall back to a default)::

    run_dir: runs/demo
    seed: 0
    data:   {store: data/emt.zarr, cutoff: 5.0, budget_atoms: 512, emt: {num_structures: 3000}}
            # or several stores mixed by sampling weight (multi-source pretraining):
            # {sources: [{store: data/mptrj.zarr}, {store: data/ani1x.zarr, train_fraction: 0.5}],
            #  sampling: temperature, temperature: 2.0, cutoff: 5.0, budget_atoms: 512}
    model:  {preset: egnn-small, force_mode: conservative}
    optim:  {lr: 2.0e-3, warmup_steps: 100}
    loss:   {energy_weight: 1.0, force_weight: 1.0, kind: mae}
    train:  {max_steps: 2000, eval_every: 250, checkpoint_every: 500}
    parallel: {tp: 1, pp: 1, dp: 1}

``gnnmegatron pretrain --config FILE --set optim.lr=1e-3 --set train.max_steps=10``
overrides single values from the command line.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


EXIT_SIGNALS = (None, "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


SAMPLING_MODES = ("proportional", "uniform", "temperature", "given")


@dataclass
class SourceConfig:
    """One source of a multi-source run: an entry of ``data.sources``.

    Attributes:
        store: path of its Zarr graph store (or sharded dataset).
        name: the source's name (model heads, reference energies, metrics and inference use it);
            default: the store's directory name without its suffix (``data/mptrj.zarr`` -> ``mptrj``).
        splits, split_seed: its own train/val/test split (default: ``data.splits`` / ``data.split_seed``).
        train_fraction: train on this fraction of its training split (nested subsets, as
            ``data.train_fraction``).
        weight: sampling weight under ``data.sampling: given`` (>= 0).
        energy_weight, force_weight, stress_weight: loss weights of its structures (default: the
            ``loss`` section's).
        max_val_graphs: validate on at most this many of its validation graphs (default:
            ``data.max_val_graphs``; 0 = all).
        emt: when the store is missing, generate the embedded EMT dataset there with these
            ``EMTConfig`` fields first.
        emt_energy_offsets: with ``emt``: eV added per atom of each element (``{symbol: eV}``) to the
            generated energies, i.e. EMT on another energy reference (a second embedded source).
        import_from: when the store is missing, import these ASE-readable files into it first
            (``gnnmegatron data import``).
    """

    store: str = ""
    name: str | None = None
    splits: tuple[float, float, float] | None = None
    split_seed: int | None = None
    train_fraction: float = 1.0
    weight: float | None = None
    energy_weight: float | None = None
    force_weight: float | None = None
    stress_weight: float | None = None
    max_val_graphs: int | None = None
    emt: dict[str, Any] | None = None
    emt_energy_offsets: dict[str, float] | None = None
    import_from: list[str] | None = None

    def __post_init__(self):
        if not self.store or not isinstance(self.store, str):
            raise ConfigError(f"data.sources: every entry needs a store path, got {self.store!r}")
        if self.name is None:
            self.name = Path(self.store.rstrip("/")).stem or self.store
        where = f"data.sources entry {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"{where}: name must be a non-empty string, got {self.name!r}")
        if self.splits is not None:
            self.splits = _check_splits(self.splits, f"{where}: splits")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"{where}: train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.weight is not None and not self.weight >= 0:
            raise ConfigError(f"{where}: weight must be >= 0, got {self.weight}")
        for key in ("energy_weight", "force_weight", "stress_weight"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {value}")
        if self.max_val_graphs is not None and self.max_val_graphs < 0:
            raise ConfigError(f"{where}: max_val_graphs must be >= 0, got {self.max_val_graphs}")
        if self.emt_energy_offsets is not None and self.emt is None:
            raise ConfigError(f"{where}: emt_energy_offsets applies to generated EMT data; give emt too")
        _check_emt(self.emt, f"{where}.emt")
        if isinstance(self.import_from, str):
            self.import_from = [self.import_from]
        if self.import_from is not None and self.emt is not None:
            raise ConfigError(f"{where}: give either emt (generate) or import_from (import files), not both")


def _check_emt(emt, where: str) -> None:
    """``emt:`` (the embedded EMT generator's settings) names only ``EMTConfig`` fields."""
    if emt is None:
        return
    import dataclasses

    from gnnmegatron.data.emt import EMTConfig

    if not isinstance(emt, dict):
        raise ConfigError(f"{where} must be a mapping of EMT generator settings, got {emt!r}")
    fields = [f.name for f in dataclasses.fields(EMTConfig)]
    unknown = sorted(set(emt) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; the EMT generator takes {fields}")


def _check_splits(splits, where: str) -> tuple[float, float, float]:
    splits = tuple(float(f) for f in splits)
    if len(splits) != 3 or any(f < 0 for f in splits) or abs(sum(splits) - 1) > 1e-6:
        raise ConfigError(f"{where} must be three non-negative fractions summing to 1, got {splits}")
    if splits[0] == 0 or splits[1] == 0:
        raise ConfigError(f"{where} needs non-empty train and val fractions, got {splits}")
    return splits


@dataclass
class DataConfig:
    """Where the training data comes from and how it is batched.

    One store (``store``), or several mixed by sampling weight (``sources``, a list of
    ``SourceConfig``; multi-source pretraining, ``gnnmegatron.data.mixture``).

    Attributes:
        store: path of the Zarr graph store (relative paths are relative to the
            working directory); default ``data/emt.zarr``. Not with ``sources``.
        sources: several stores, each with its own split and ``train_fraction`` (``SourceConfig``);
            an epoch draws ``epoch_graphs`` training graphs from them by ``sampling``.
        sampling: how the sources' sampling weights are set: ``proportional`` (to their training
            graphs), ``uniform``, ``temperature`` (proportional to graphs^(1/temperature): 1 is
            proportional, large values approach uniform) or ``given`` (each source's ``weight``).
        temperature: of ``sampling: temperature`` (> 0).
        epoch_graphs: training graphs per epoch of the mixture (0: the sum of the sources'
            training graphs).
        emt: if given and ``store`` does not exist, the embedded EMT dataset is
            generated there first with these ``EMTConfig`` fields.
        splits: train/val/test fractions of the store's graphs.
        train_fraction: train on this fraction of the training split. Subsets are nested: a
            fixed permutation of the training split (seeded by ``split_seed``) is cut at
            ``ceil(fraction * n)``, so a larger fraction contains every smaller one (scaling studies).
            With ``sources`` it multiplies every source's own ``train_fraction`` (a scaling sweep's
            data fractions then shrink all sources alike).
        split_seed: seed of the deterministic split.
        cutoff: neighbour-list radius in Å (must equal the model's cutoff).
        budget_atoms: atoms per micro-batch (batches are formed by atom budget).
        max_graphs: optional cap on graphs per micro-batch.
        val_budget_atoms: atoms per validation batch (defaults to ``budget_atoms``).
        max_val_graphs: evaluate on at most this many validation graphs (0 = all).
        stats_graphs: graphs read to fit per-element reference energies.
        prefetch: batches assembled ahead by a background thread.
    """

    store: str | None = None
    sources: list[SourceConfig] | None = None
    sampling: str = "proportional"
    temperature: float = 1.0
    epoch_graphs: int = 0
    emt: dict[str, Any] | None = None
    splits: tuple[float, float, float] = (0.9, 0.05, 0.05)
    split_seed: int = 0
    train_fraction: float = 1.0
    cutoff: float = 5.0
    budget_atoms: int = 512
    max_graphs: int | None = None
    val_budget_atoms: int | None = None
    max_val_graphs: int = 0
    stats_graphs: int = 20000
    prefetch: int = 2

    def __post_init__(self):
        self.splits = _check_splits(self.splits, "data.splits")
        if self.sources is not None:
            self._check_sources()
        elif self.store is None:
            self.store = "data/emt.zarr"
        _check_emt(self.emt, "data.emt")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"data.train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.cutoff <= 0:
            raise ConfigError(f"data.cutoff must be > 0 Å, got {self.cutoff}")
        if self.budget_atoms < 1:
            raise ConfigError(f"data.budget_atoms must be >= 1, got {self.budget_atoms}")
        if self.val_budget_atoms is None:
            self.val_budget_atoms = self.budget_atoms

    def _check_sources(self) -> None:
        if not isinstance(self.sources, list) or not self.sources:
            raise ConfigError(f"data.sources must be a non-empty list of stores ({{store: PATH, ...}}), got "
                              f"{self.sources!r}")
        if self.store is not None:
            raise ConfigError(f"data.store={self.store!r} and data.sources are exclusive; list that store as one "
                              f"of the sources")
        if self.emt is not None:
            raise ConfigError("data.emt does not apply with data.sources; give emt in the source entry that "
                              "should be generated")
        self.sources = [s if isinstance(s, SourceConfig) else build_dataclass(SourceConfig, s, f"data.sources[{i}]")
                        for i, s in enumerate(self.sources)]
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"data.sources: source name(s) {dup} appear more than once ({names}); give each "
                              f"entry its own name:")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"data.sampling must be one of {list(SAMPLING_MODES)}, got {self.sampling!r}")
        if not self.temperature > 0:
            raise ConfigError(f"data.temperature must be > 0, got {self.temperature}")
        if self.epoch_graphs < 0:
            raise ConfigError(f"data.epoch_graphs must be >= 0 (0: the sources' training graphs), got "
                              f"{self.epoch_graphs}")
        if self.sampling == "given":
            missing = [s.name for s in self.sources if s.weight is None]
            if missing:
                raise ConfigError(f"data.sampling: given needs a weight for every source; {missing} have none")
            if sum(s.weight for s in self.sources) <= 0:
                raise ConfigError(f"data.sampling: given needs a positive weight for some source, got "
                                  f"{[s.weight for s in self.sources]}")
        elif any(s.weight is not None for s in self.sources):
            named = [s.name for s in self.sources if s.weight is not None]
            raise ConfigError(f"data.sources {named} give a weight, which only data.sampling: given uses (sampling "
                              f"is {self.sampling!r}); remove it or set sampling: given")

    @property
    def multi_source(self) -> bool:
        """Training reads ``sources`` (a mixture), not one ``store``."""
        return self.sources is not None

    def source_list(self) -> list[SourceConfig]:
        """The sources with every default resolved (one entry for a single-store config)."""
        if self.sources is None:
            return [SourceConfig(store=self.store, name=Path(self.store.rstrip("/")).stem or self.store,
                                 splits=self.splits, split_seed=self.split_seed, train_fraction=self.train_fraction,
                                 max_val_graphs=self.max_val_graphs, emt=self.emt)]
        out = []
        for s in self.sources:
            out.append(dataclasses.replace(
                s, train_fraction=s.train_fraction * self.train_fraction,
                splits=s.splits if s.splits is not None else self.splits,
                split_seed=s.split_seed if s.split_seed is not None else self.split_seed,
                max_val_graphs=s.max_val_graphs if s.max_val_graphs is not None else self.max_val_graphs))
        return out


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then cosine decay to ``min_lr_ratio * lr`` (``schedule: cosine``) or a
    constant rate cut by ``plateau_factor`` after ``plateau_patience`` validations without improvement of
    ``train.best_metric``, down to ``min_lr_ratio * lr`` (``schedule: plateau``; gnnmegatron/training/monitor.py).

    ``zero_stage``: 0 keeps the full AdamW state on every data-parallel replica; 1 shards it over
    the data-parallel group (ZeRO-1: each replica holds the moments of about 1/dp of the
    parameters, steps those, and broadcasts the updated values; gradients and parameters stay
    replicated). Stages 2 and 3 are not offered (README, "Sharded optimizer state").
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    clip_grad_norm: float | None = 10.0
    zero_stage: int = 0
    schedule: str = "cosine"
    plateau_factor: float = 0.5
    plateau_patience: int = 3

    def __post_init__(self):
        if self.schedule not in ("cosine", "plateau"):
            raise ConfigError(f"optim.schedule must be cosine or plateau, got {self.schedule!r}")
        if not 0 < self.plateau_factor < 1 or self.plateau_patience < 1:
            raise ConfigError(f"optim.plateau_factor must be in (0, 1) and optim.plateau_patience >= 1, got "
                              f"{self.plateau_factor} and {self.plateau_patience}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.zero_stage not in (0, 1):
            raise ConfigError(f"optim.zero_stage must be 0 (replicated optimizer state) or 1 (sharded over the "
                              f"data-parallel group), got {self.zero_stage}; stages 2 and 3 are not offered")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"optim.clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")


@dataclass
class LossConfig:
    """Loss = energy_weight * L(energy per atom) + force_weight * L(forces) [+ stress_weight * L(stress)].

    ``kind`` picks L: ``mae``, ``mse`` or ``huber`` (with ``huber_delta`` in the target's unit).
    ``stages``: a loss-weight schedule, ``[{start: 0.8, energy_weight: 10.0}, ...]``: from step
    ``start * train.max_steps`` on, the weights a stage names replace these (as MACE's second stage
    raises the energy weight); sources with weights of their own keep them. Validation's ``loss``
    metric always uses the weights above, so it stays comparable through the run.
    """

    energy_weight: float = 1.0
    force_weight: float = 1.0
    stress_weight: float = 0.0
    kind: str = "mae"
    huber_delta: float = 0.01
    stages: list[dict[str, float]] | None = None

    def __post_init__(self):
        starts = []
        for k, stage in enumerate(self.stages or []):
            bad = sorted(set(stage) - {"start", "energy_weight", "force_weight", "stress_weight"}) \
                if isinstance(stage, dict) else None
            if bad is None or bad or "start" not in stage or not 0 <= float(stage["start"]) < 1 \
                    or any(float(v) < 0 for v in stage.values()):
                raise ConfigError(f"loss.stages[{k}] = {stage!r}: each stage needs start in [0, 1) (fraction of "
                                  f"train.max_steps) and non-negative energy_weight / force_weight / stress_weight "
                                  f"(unknown keys: {bad})")
            starts.append(float(stage["start"]))
        if starts != sorted(starts):
            raise ConfigError(f"loss.stages must be in order of start, got starts {starts}")
        if self.kind not in ("mae", "mse", "huber"):
            raise ConfigError(f"loss.kind must be one of mae, mse, huber; got {self.kind!r}")
        for name in ("energy_weight", "force_weight", "stress_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.energy_weight == 0 and self.force_weight == 0 and self.stress_weight == 0:
            raise ConfigError("loss: all weights are zero; nothing would be trained")
        if self.huber_delta <= 0:
            raise ConfigError(f"loss.huber_delta must be > 0, got {self.huber_delta}")


@dataclass
class TrainConfig:
    """Length of training, evaluation, logging and checkpoint cadence, precision and memory.

    ``dtype="bfloat16"`` keeps float32 weights, optimizer state and data (master weights) and runs
    the model's forward (and so its backward) under ``torch.autocast(dtype=torch.bfloat16)``.
    ``activation_checkpointing`` recomputes each message-passing block in the backward pass
    (``torch.utils.checkpoint``, non-reentrant) instead of keeping its activations.
    ``init_from`` (a checkpoint: sharded directory or single file) starts a new run (step 0, fresh
    optimizer) from its model weights, whatever layout wrote them.
    ``micro_batches``: sampler batches (each up to ``data.budget_atoms`` atoms) per optimizer step
    and data-parallel rank; their gradients accumulate and the loss is normalised as for one batch
    holding them all. With pipeline parallelism these are the pipeline's micro-batches.
    ``collective_timeout_s``: how long a collective may wait before the job stops with an error
    naming the ranks that stopped responding. ``on_nonfinite``: a non-finite loss or gradient
    ``stop``s the run (before the update, naming the batch's structures) or ``skip``s the step.
    ``async_checkpoint``: write checkpoints from a background thread while training continues.
    ``ema_decay``: keep an exponential moving average of the weights with this decay (e.g. 0.99;
    null: none), used for validation, the best checkpoint and, by default, inference
    (gnnmegatron/training/ema.py). ``tensorboard``: also log to ``<run_dir>/tensorboard``.
    ``exit_signal``: on this signal (default ``SIGTERM``, what a scheduler sends before it stops a job,
    and what torchrun passes on to its workers, killing them 30 s later; null: the signal's default
    action) the ranks finish the step they are in, agree on it, save a checkpoint and exit
    (``gnnmegatron pretrain`` with code 128 + the signal's number); ``--resume auto`` continues there.
    ``best_metric``: the validation metric (lower is better) that picks the best checkpoint
    (``checkpoints/best``, never pruned; ``keep_best: false`` saves none), drives early stopping (``early_stopping_patience``
    validations without an improvement larger than ``early_stopping_min_delta``; 0: off) and the
    plateau schedule (gnnmegatron/training/monitor.py).
    """

    max_steps: int = 1000
    eval_every: int = 250
    checkpoint_every: int = 500
    log_every: int = 10
    keep_checkpoints: int = 2
    num_threads: int | None = None
    dtype: str = "float32"
    progress: bool = True
    activation_checkpointing: bool = False
    init_from: str | None = None
    micro_batches: int = 1
    collective_timeout_s: float = 600.0
    on_nonfinite: str = "stop"
    async_checkpoint: bool = False
    ema_decay: float | None = None
    tensorboard: bool = False
    best_metric: str = "loss"
    keep_best: bool = True
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    exit_signal: str | None = "SIGTERM"

    def __post_init__(self):
        if self.exit_signal not in EXIT_SIGNALS:
            raise ConfigError(f"train.exit_signal must be one of {[s for s in EXIT_SIGNALS if s]} or null, got "
                              f"{self.exit_signal!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in (0, 1) (e.g. 0.99) or null, got {self.ema_decay}")
        if self.early_stopping_patience < 0 or self.early_stopping_min_delta < 0:
            raise ConfigError(f"train.early_stopping_patience and early_stopping_min_delta must be >= 0, got "
                              f"{self.early_stopping_patience} and {self.early_stopping_min_delta}")
        if not isinstance(self.best_metric, str) or self.best_metric.rpartition("/")[2] not in (
                "loss", "energy_mae_per_atom", "force_mae", "stress_mae"):
            raise ConfigError(f"train.best_metric must be loss, energy_mae_per_atom, force_mae or stress_mae, "
                              f"optionally as SOURCE/NAME, got {self.best_metric!r}")
        if self.micro_batches < 1:
            raise ConfigError(f"train.micro_batches must be >= 1, got {self.micro_batches}")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"train.collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.on_nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        for name in ("max_steps", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.dtype not in ("float32", "float64", "bfloat16"):
            raise ConfigError(f"train.dtype must be float32, float64 or bfloat16, got {self.dtype!r}")


@dataclass
class ParallelConfig:
    """Parallel layout: tensor (tp), pipeline (pp) and data (dp) parallel sizes, pipeline schedule.

    ``tp * pp * dp`` must equal the number of processes (Megatron's rank order: tp fastest, then
    dp, then pp). ``pp_schedule``: ``auto`` (1F1B, or interleaved 1F1B with ``virtual_stages > 1``),
    ``gpipe``, ``1f1b`` or ``interleaved``; conservative-force training always runs the
    conservative GPipe schedule (``gnnmegatron.parallel.pipeline``). ``virtual_stages``: model
    chunks per pipeline rank (interleaved schedules). ``pp_layers``: blocks per (virtual) stage,
    ``pp * virtual_stages`` numbers summing to the model's layers (default: balanced by FLOPs).
    """

    tp: int = 1
    pp: int = 1
    dp: int | None = None  # None: world_size // (tp * pp)
    pp_schedule: str = "auto"
    virtual_stages: int = 1
    pp_layers: list[int] | None = None

    def __post_init__(self):
        for name in ("tp", "pp", "virtual_stages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp is not None and self.dp < 1:
            raise ConfigError(f"parallel.dp must be >= 1, got {self.dp}")
        if self.pp_schedule not in ("auto", "gpipe", "1f1b", "interleaved"):
            raise ConfigError(f"parallel.pp_schedule must be auto, gpipe, 1f1b or interleaved, got {self.pp_schedule!r}")
        if self.pp_schedule == "1f1b" and self.virtual_stages > 1:
            raise ConfigError(f"parallel.pp_schedule=1f1b runs one model chunk per rank; virtual_stages="
                              f"{self.virtual_stages} needs pp_schedule: interleaved (or auto)")
        if self.pp_layers is not None:
            self.pp_layers = [int(n) for n in self.pp_layers]
            if len(self.pp_layers) != self.pp * self.virtual_stages or min(self.pp_layers) < 1:
                raise ConfigError(f"parallel.pp_layers={self.pp_layers} must list pp*virtual_stages="
                                  f"{self.pp}*{self.virtual_stages}={self.pp * self.virtual_stages} positive block counts")

    @property
    def schedule(self) -> str:
        """The schedule ``auto`` resolves to."""
        if self.pp_schedule != "auto":
            return self.pp_schedule
        return "interleaved" if self.virtual_stages > 1 else "1f1b"

    def resolve(self, world_size: int) -> "ParallelConfig":
        """Returns a copy with ``dp`` filled in, checking ``tp*pp*dp == world_size``."""
        if world_size % (self.tp * self.pp) and self.dp is None:
            raise ConfigError(f"world size {world_size} is not divisible by tp*pp={self.tp}*{self.pp}="
                              f"{self.tp * self.pp}; launch a multiple of {self.tp * self.pp} processes")
        dp = self.dp if self.dp is not None else world_size // (self.tp * self.pp)
        if self.tp * self.pp * dp != world_size:
            raise ConfigError(
                f"parallel layout tp*pp*dp={self.tp}*{self.pp}*{dp}={self.tp * self.pp * dp} "
                f"but world size is {world_size}; choose sizes whose product is the number of processes"
            )
        return dataclasses.replace(self, dp=dp)


@dataclass
class PretrainConfig:
    """The whole pretraining job. ``model`` holds a preset name plus ``ModelConfig`` overrides."""

    run_dir: str = "runs/pretrain"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "egnn-small"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if "preset" not in self.model:
            raise ConfigError("model.preset is required (see `gnnmegatron model info --list`)")

    def model_config(self):
        """Builds the validated ``ModelConfig`` (preset + overrides; cutoff taken from data, the
        source names from ``data.sources``)."""
        from gnnmegatron.models.config import ModelConfigError
        from gnnmegatron.models.presets import get_preset

        overrides = {k: v for k, v in self.model.items() if k != "preset"}
        cutoff = overrides.pop("cutoff", self.data.cutoff)
        if cutoff != self.data.cutoff:
            raise ConfigError(f"model.cutoff={cutoff} differs from data.cutoff={self.data.cutoff}; set one value")
        if self.data.multi_source:
            names = [s.name for s in self.data.sources]
            given = overrides.pop("sources", names)
            if list(given) != names:
                raise ConfigError(f"model.sources={given} differs from the names of data.sources {names}; leave "
                                  f"model.sources out (it is taken from data.sources)")
            overrides["sources"] = names
        elif overrides.get("sources"):
            raise ConfigError(f"model.sources={overrides['sources']} needs data.sources (several stores); a "
                              f"single-store run has one source")
        try:
            return get_preset(self.model["preset"], cutoff=self.data.cutoff, **overrides)
        except ModelConfigError as exc:
            raise ConfigError(f"model: {exc}") from exc

    def loss_weights(self, loss: LossConfig | None = None):
        """[S, 3] loss weights (energy, force, stress) per source, float64 (``compute_loss``); ``loss``
        replaces the ``loss`` section's weights (a stage of ``loss.stages``)."""
        import torch

        loss = loss or self.loss
        base = (loss.energy_weight, loss.force_weight, loss.stress_weight)
        rows = []
        for s in self.data.source_list():
            own = (s.energy_weight, s.force_weight, s.stress_weight)
            rows.append([b if o is None else float(o) for b, o in zip(base, own)])
        return torch.tensor(rows, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "data": DataConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
}


def _coerce(value: Any, hint: Any, where: str, error: type[Exception] = ConfigError) -> Any:
    """Converts YAML strings such as ``1e-3`` (YAML 1.1 reads them as str) to the field's number type."""
    if not isinstance(value, str):
        return value
    args = typing.get_args(hint) or (hint,)
    for number in (int, float):
        if number in args:
            try:
                return number(value)
            except ValueError:
                continue
    if int in args or float in args:
        raise error(f"{where} must be a number, got {value!r}")
    return value


def build_dataclass(cls, values: dict[str, Any], where: str, error: type[Exception] = ConfigError):
    """``cls(**values)`` refusing unknown keys and converting YAML number strings; errors name ``where``."""
    if not isinstance(values, dict):
        raise error(f"{where} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise error(f"unknown key(s) {unknown} in {where}; allowed: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"{where}.{k}", error) for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{where}: {exc}") from exc


def config_from_dict(values: dict[str, Any]) -> PretrainConfig:
    """Maps a plain dict (parsed YAML) onto ``PretrainConfig``, validating every section."""
    values = dict(values or {})
    top = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(values) - top)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: {sorted(top)}")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in values:
            kwargs[name] = build_dataclass(cls, values.pop(name) or {}, name)
    if "model" in values:
        model = values.pop("model")
        if not isinstance(model, dict):
            raise ConfigError("model must be a mapping with a 'preset' key")
        kwargs["model"] = dict(model)
    kwargs.update(values)
    return PretrainConfig(**kwargs)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` strings (values parsed as YAML) to a config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
        try:
            node[keys[-1]] = _parse_scalar(text)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or exc
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    return values


def read_yaml_mapping(path: Path, what: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The mapping a YAML file holds (``{}`` when empty); ``error`` names ``what`` and the file when it
    is not valid YAML or not a mapping. The caller checks that the file exists (its message differs)."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise error(f"{what} {path} must hold a mapping at the top level")
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """Reads a YAML config (or the defaults when ``path`` is None) and applies overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        values = read_yaml_mapping(path, "config file")
    values = apply_overrides(values, overrides or [])
    return config_from_dict(values)
