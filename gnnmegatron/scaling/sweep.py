"""Scaling-law sweeps: one pretraining run per (model size, data fraction), resumable, as run records.

A sweep YAML names a base pretraining config and what to vary::

    base: demo.yaml                    # path (relative to this file) or an inline mapping
    overrides: {data: {budget_atoms: 384}}   # deep-merged onto the base
    grid: {preset: egnn-small, hidden: [16, 32, 64, 128], layers: [3]}   # and/or presets:, models:
    data_fractions: [0.1, 0.3, 1.0]
    budget: {rule: epochs, epochs: 4}  # or {rule: atoms, atoms: 2.0e6}
    lr_rule: {base_width: 64, width_exponent: 0.5, warmup_fraction: 0.05, min_warmup: 10}
    evals_per_run: 4
    out_dir: benchmarks/results/scaling_emt

Each run gets ``<out_dir>/runs/<model>-f<fraction>/`` holding its resolved ``config.yaml``,
the Trainer's checkpoints, metrics and report, and finally ``record.json`` (the run record of
:mod:`gnnmegatron.scaling.fit`). ``<out_dir>/runs.jsonl`` is rewritten atomically after every
run with the records of all finished runs of the sweep.

Rules, each a pure function tested on its own:

* **Compute budget** (:func:`budget_to_max_steps`). ``epochs: E`` trains ``ceil(E * S)`` steps,
  ``S`` the optimizer steps of one epoch over the run's training subset (batches formed by
  ``data.budget_atoms`` as the sampler forms them, divided by the data-parallel size); atoms seen
  then grow with the data fraction, which is what a data-scaling fit wants. ``atoms: A`` trains
  ``ceil(A / a)`` steps, ``a = train_atoms / S`` the mean atoms per step: every run sees about the
  same number of atoms (iso-data), smaller fractions being repeated more often.
* **Learning rate** (:func:`scaled_lr`): ``lr = base_lr * (base_width / hidden) ** width_exponent``.
  muP's Adam rule for hidden matrices is exponent 1 (lr ~ 1/width) but it also rescales the
  initialisation and output multipliers, which the model here does not; with standard
  parametrisation the best Adam lr falls more slowly with width, and 0.5 (lr ~ 1/sqrt(width)) is
  the documented compromise (0 disables the rule). ``base_lr`` defaults to the base config's
  ``optim.lr``, tuned at ``base_width``.
* **Warm-up** (:func:`scaled_warmup`): ``min(max(min_warmup, ceil(warmup_fraction * max_steps)),
  max_steps)``.
* **Evaluation cadence**: ``eval_every = ceil(max_steps / evals_per_run)`` and the last step
  always evaluates; ``checkpoint_every = ceil(max_steps / checkpoints_per_run)``.

Bookkeeping: a run is *done* when its ``record.json`` exists and carries the hash of the
resolved config (:func:`config_hash`; cosmetic keys such as ``train.progress`` and the run
directory itself do not count) — it is skipped. A run with a ``config.yaml`` but no record was
interrupted: the Trainer resumes it from ``checkpoints/latest`` (bit-for-bit, so the record
equals an uninterrupted run's). A run whose stored config differs from the one the sweep now
resolves is refused with the differing keys listed (delete its directory or use another
``out_dir``). Runs execute sequentially **in this process** (one Trainer at a time, freed and
garbage-collected before the next): the models of a CPU study are small and a subprocess per run
would pay the import and store-open cost each time. For big runs, or to spread a sweep over a
cluster, start one process per run with ``--only NAME`` / ``--index I`` (one job each, e.g. a
SLURM array) — a job under ``torchrun`` trains that run data-parallel (set ``parallel.dp`` in
the base config so the step budget counts global batches) — then ``--collect`` rebuilds
``runs.jsonl`` from the ``record.json`` files.

Command line (``python -m gnnmegatron.scaling.sweep`` or ``gnnmegatron scaling sweep``)::

    python -m gnnmegatron.scaling.sweep SWEEP.yaml [--dry-run] [--only NAME ...] [--index I]
                                                   [--out-dir DIR] [--collect] [--no-progress]
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gnnmegatron.training.config import (ConfigError, PretrainConfig, build_dataclass, config_from_dict,
                                         read_yaml_mapping)

BUDGET_RULES = ("epochs", "atoms")
RECORD_FILE = "record.json"
RUNS_FILE = "runs.jsonl"
# Keys of the resolved config that do not change what is trained, left out of the hash.
COSMETIC_KEYS = (("run_dir",), ("train", "progress"), ("train", "num_threads"), ("train", "log_every"),
                 ("train", "keep_checkpoints"), ("train", "exit_signal"), ("data", "prefetch"))


class SweepInterrupted(RuntimeError):
    """A run of the sweep stopped on the trainer's exit signal (checkpoint saved); ``signal`` names it."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal = signal_name


class SweepError(ConfigError):
    """A sweep config is invalid, or a run directory holds a run with a different config."""


# ------------------------------------------------------------------------------------ config
@dataclass
class BudgetConfig:
    """Compute budget per run, turned into ``train.max_steps`` (see :func:`budget_to_max_steps`).

    Attributes:
        rule: ``"epochs"`` (passes over the run's training subset) or ``"atoms"`` (atoms seen).
        epochs: passes over the training subset (rule ``epochs``), > 0, may be fractional.
        atoms: atoms seen in training (rule ``atoms``), > 0.
        min_steps: lower bound on the steps of any run.
    """

    rule: str = "epochs"
    epochs: float | None = None
    atoms: float | None = None
    min_steps: int = 1

    def __post_init__(self):
        _numbers(self, "budget", ("epochs", "atoms"), ("min_steps",))
        if self.rule not in BUDGET_RULES:
            raise SweepError(f"budget.rule must be one of {BUDGET_RULES}, got {self.rule!r}")
        if self.rule == "epochs" and (self.epochs is None or not self.epochs > 0):
            raise SweepError(f"budget rule 'epochs' needs budget.epochs > 0, got {self.epochs}")
        if self.rule == "atoms" and (self.atoms is None or not self.atoms > 0):
            raise SweepError(f"budget rule 'atoms' needs budget.atoms > 0, got {self.atoms}")
        if self.min_steps < 1:
            raise SweepError(f"budget.min_steps must be >= 1, got {self.min_steps}")


def _numbers(obj, where: str, reals: tuple[str, ...], integers: tuple[str, ...]) -> None:
    """SweepError naming the first field that is not a number (an integer for ``integers``; None allowed
    for ``reals``, as for optional budgets)."""
    for name in reals + integers:
        v = getattr(obj, name)
        integer = name in integers
        ok = (isinstance(v, int) if integer else (v is None or isinstance(v, (int, float)))) and not isinstance(v, bool)
        if not ok:
            raise SweepError(f"{where}.{name} must be {'an integer' if integer else 'a number'}, got {v!r}")


@dataclass
class LRRule:
    """Width scaling of the peak learning rate and the warm-up length (module docstring).

    Attributes:
        base_lr: lr at ``base_width``; None takes the base config's ``optim.lr``.
        base_width: hidden width the base lr was tuned at.
        width_exponent: ``lr = base_lr * (base_width / hidden) ** width_exponent`` (0: constant).
        warmup_fraction: warm-up steps as a fraction of ``max_steps``.
        min_warmup: at least this many warm-up steps (capped at ``max_steps``).
    """

    base_lr: float | None = None
    base_width: int = 64
    width_exponent: float = 0.5
    warmup_fraction: float = 0.05
    min_warmup: int = 10

    def __post_init__(self):
        _numbers(self, "lr_rule", ("base_lr", "width_exponent", "warmup_fraction"), ("base_width", "min_warmup"))
        if self.base_lr is not None and not self.base_lr > 0:
            raise SweepError(f"lr_rule.base_lr must be > 0 or null, got {self.base_lr}")
        if self.base_width < 1:
            raise SweepError(f"lr_rule.base_width must be >= 1, got {self.base_width}")
        if not 0 <= self.width_exponent <= 2:
            raise SweepError(f"lr_rule.width_exponent must be in [0, 2], got {self.width_exponent}")
        if not 0 <= self.warmup_fraction < 1:
            raise SweepError(f"lr_rule.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.min_warmup < 0:
            raise SweepError(f"lr_rule.min_warmup must be >= 0, got {self.min_warmup}")


@dataclass
class SweepConfig:
    """A scaling sweep: models x data fractions on one base pretraining config.

    Attributes:
        base: the base pretraining config, a YAML path or an inline mapping (``PretrainConfig`` keys).
        overrides: nested mapping deep-merged onto ``base`` (e.g. ``{data: {budget_atoms: 256}}``).
        presets: model preset names, each one model of the sweep.
        grid: ``{preset, hidden: [...], layers: [...], name: "h{hidden}-l{layers}"}``: the width x
            depth product, each a ``preset`` with ``hidden``/``layers`` overridden.
        models: explicit models, ``{name, preset, **ModelConfig overrides}`` each.
        data_fractions: nested training subsets (``data.train_fraction``), each in (0, 1].
        budget: the compute-budget rule (:class:`BudgetConfig`).
        lr_rule: learning-rate and warm-up rules (:class:`LRRule`).
        evals_per_run: validation passes per run (evenly spaced; the last step always evaluates).
        checkpoints_per_run: checkpoints per run (the last step always saves).
        out_dir: where ``runs/``, ``runs.jsonl`` (and the fit/report, by the study script) go.
        d_key: the run-record field that is D when the study is fitted (:attr:`fit_d_key`): None
            picks ``atoms_seen`` under the epochs rule (more data = more atoms processed) and
            ``train_atoms`` under the atoms rule (iso-data: every run processes the same atoms, D is
            the size of its training subset).
        base_dir: directory a relative ``base`` path is read from (the sweep file's directory).

    The base config's ``model`` keys other than ``preset`` (e.g. ``force_mode``) apply to every
    model; a model's own keys win. ``run_dir``, ``data.train_fraction``, ``train.max_steps``,
    ``train.eval_every``, ``train.checkpoint_every``, ``optim.lr`` and ``optim.warmup_steps`` are
    set per run by the sweep.
    """

    base: str | dict[str, Any] = "demo.yaml"
    overrides: dict[str, Any] = field(default_factory=dict)
    presets: list[str] = field(default_factory=list)
    grid: dict[str, Any] | None = None
    models: list[dict[str, Any]] = field(default_factory=list)
    data_fractions: list[float] = field(default_factory=lambda: [1.0])
    budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(rule="epochs", epochs=1.0))
    lr_rule: LRRule = field(default_factory=LRRule)
    evals_per_run: int = 4
    checkpoints_per_run: int = 4
    out_dir: str = "runs/sweep"
    d_key: str | None = None
    base_dir: str = "."

    @property
    def fit_d_key(self) -> str:
        """D of this study's fits: ``d_key`` or the budget rule's natural choice."""
        if self.d_key is not None:
            return self.d_key
        return "train_atoms" if self.budget.rule == "atoms" else "atoms_seen"

    def __post_init__(self):
        if isinstance(self.budget, dict):
            self.budget = _build(BudgetConfig, self.budget, "budget")
        if isinstance(self.lr_rule, dict):
            self.lr_rule = _build(LRRule, self.lr_rule, "lr_rule")
        if not isinstance(self.base, (str, dict)):
            raise SweepError(f"base must be a config path or a mapping, got {type(self.base).__name__}")
        if not isinstance(self.overrides, dict):
            raise SweepError(f"overrides must be a mapping of config sections (e.g. {{data: {{budget_atoms: 256}}}}), "
                             f"got {self.overrides!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise SweepError(f"out_dir must be a folder path, got {self.out_dir!r}")
        for key in ("presets", "models", "data_fractions"):
            if not isinstance(getattr(self, key), list):
                raise SweepError(f"{key} must be a list (e.g. {key}: [...]), got {getattr(self, key)!r}")
        if self.grid is not None and not isinstance(self.grid, dict):
            raise SweepError(f"grid must be a mapping {{preset, hidden: [...], layers: [...], name}}, got "
                             f"{self.grid!r}")
        try:
            self.data_fractions = [float(f) for f in self.data_fractions]
        except (TypeError, ValueError):
            raise SweepError(f"data_fractions must be numbers in (0, 1], got {self.data_fractions!r}") from None
        if not self.data_fractions:
            raise SweepError("data_fractions is empty; give at least one fraction in (0, 1]")
        bad = [f for f in self.data_fractions if not 0 < f <= 1]
        if bad:
            raise SweepError(f"data_fractions must lie in (0, 1], got {bad}")
        if len(set(self.data_fractions)) != len(self.data_fractions):
            raise SweepError(f"data_fractions has repeats: {self.data_fractions}")
        if self.d_key not in (None, "atoms_seen", "train_atoms"):
            raise SweepError(f"d_key must be atoms_seen, train_atoms or null, got {self.d_key!r}")
        _numbers(self, "sweep config", (), ("evals_per_run", "checkpoints_per_run"))
        if self.evals_per_run < 1 or self.checkpoints_per_run < 1:
            raise SweepError(f"evals_per_run and checkpoints_per_run must be >= 1, got "
                             f"{self.evals_per_run} and {self.checkpoints_per_run}")
        specs = self.model_specs()
        if not specs:
            raise SweepError("the sweep has no models; give presets:, grid: or models:")
        names = [s["name"] for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SweepError(f"model names repeat: {dup}; give each model a distinct name")

    def model_specs(self) -> list[dict[str, Any]]:
        """``[{"name", "model": {preset, **overrides}}]`` from presets, grid and models, in that order."""
        specs = [{"name": p, "model": {"preset": p}} for p in self.presets]
        if self.grid is not None:
            g = dict(self.grid)
            unknown = sorted(set(g) - {"preset", "hidden", "layers", "name"})
            if unknown:
                raise SweepError(f"unknown key(s) {unknown} in grid; allowed: name, preset, hidden, layers")
            if "preset" not in g:
                raise SweepError("grid needs a base 'preset' (e.g. egnn-small) whose hidden/layers it overrides")
            hidden = g.get("hidden") or [None]
            layers = g.get("layers") or [None]
            for key, values in (("hidden", hidden), ("layers", layers)):
                if not isinstance(values, list) or not all(v is None or (isinstance(v, int) and not isinstance(v, bool)
                                                                         and v > 0) for v in values):
                    raise SweepError(f"grid.{key} must be a list of positive integers, got {values!r}")
            fmt = g.get("name", "h{hidden}-l{layers}")
            for h in hidden:
                for n_layers in layers:
                    model = {"preset": g["preset"]}
                    if h is not None:
                        model["hidden"] = int(h)
                    if n_layers is not None:
                        model["layers"] = int(n_layers)
                    try:
                        name = str(fmt).format(hidden=h, layers=n_layers, preset=g["preset"])
                    except (KeyError, IndexError, ValueError) as exc:
                        raise SweepError(f"grid.name {fmt!r} cannot be filled in ({type(exc).__name__}: {exc}); it "
                                         f"may use {{hidden}}, {{layers}} and {{preset}}") from None
                    specs.append({"name": name, "model": model})
        for m in self.models:
            if not isinstance(m, dict) or "preset" not in m:
                raise SweepError(f"each entry of models needs a 'preset' key, got {m!r}")
            m = dict(m)
            name = m.pop("name", None) or m["preset"]
            specs.append({"name": str(name), "model": m})
        return specs

    def base_dict(self) -> dict[str, Any]:
        """The base pretraining config as a dict (file read, overrides merged), not yet validated."""
        if isinstance(self.base, dict):
            values = copy.deepcopy(self.base)
        else:
            path = Path(self.base)
            if not path.is_absolute() and (Path(self.base_dir) / path).exists():
                path = Path(self.base_dir) / path  # next to the sweep file first, then the working directory
            if not path.exists():
                raise SweepError(f"base config {self.base!r} not found (looked in {self.base_dir} and the "
                                 f"working directory)")
            values = read_yaml_mapping(path, "base config", SweepError)
        return _deep_merge(values, self.overrides)


def _build(cls, values: Any, where: str):
    return build_dataclass(cls, values, where, error=SweepError)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def sweep_config_from_dict(values: dict[str, Any], base_dir: str | Path = ".") -> SweepConfig:
    """Maps parsed YAML onto :class:`SweepConfig` (unknown keys are errors)."""
    values = dict(values or {})
    values.setdefault("base_dir", str(base_dir))
    return _build(SweepConfig, values, "sweep config")


def load_sweep_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Reads a sweep YAML; a relative ``base`` path is looked up next to it."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep config {path} {'is a folder' if path.is_dir() else 'does not exist'}; give the "
                         f"sweep YAML file")
    values = read_yaml_mapping(path, "sweep config", SweepError)
    return sweep_config_from_dict(_deep_merge(values, overrides or {}), base_dir=path.parent)


# ------------------------------------------------------------------------------------ rules
def budget_to_max_steps(budget: BudgetConfig, *, train_atoms: int, budget_atoms: int,
                        batches_per_epoch: int | None = None, dp: int = 1) -> int:
    """``train.max_steps`` for a compute budget.

    Args:
        budget: the rule.
        train_atoms: atoms in the run's training subset.
        budget_atoms: ``data.budget_atoms`` (atoms per micro-batch).
        batches_per_epoch: global batches of one epoch as the sampler forms them; None estimates
            ``ceil(train_atoms / budget_atoms)`` (every batch full, a lower bound).
        dp: data-parallel size; one optimizer step consumes ``dp`` batches.

    ``S = max(batches_per_epoch // dp, 1)`` steps per epoch; rule ``epochs``: ``ceil(E * S)``;
    rule ``atoms``: ``ceil(A * S / train_atoms)``; never below ``budget.min_steps``.
    """
    if train_atoms < 1 or budget_atoms < 1 or dp < 1:
        raise SweepError(f"need train_atoms, budget_atoms, dp >= 1; got {train_atoms}, {budget_atoms}, {dp}")
    if batches_per_epoch is None:
        batches_per_epoch = math.ceil(train_atoms / budget_atoms)
    steps_per_epoch = max(batches_per_epoch // dp, 1)
    if budget.rule == "epochs":
        steps = math.ceil(budget.epochs * steps_per_epoch - 1e-9)
    else:
        steps = math.ceil(budget.atoms * steps_per_epoch / train_atoms - 1e-9)
    return max(int(steps), budget.min_steps)


def scaled_lr(rule: LRRule, hidden: int, base_lr: float) -> float:
    """``rule.base_lr or base_lr`` times ``(base_width / hidden) ** width_exponent``."""
    lr0 = rule.base_lr if rule.base_lr is not None else base_lr
    return float(lr0 * (rule.base_width / hidden) ** rule.width_exponent)


def scaled_warmup(rule: LRRule, max_steps: int) -> int:
    """``min(max(min_warmup, ceil(warmup_fraction * max_steps)), max_steps)``."""
    return int(min(max(rule.min_warmup, math.ceil(rule.warmup_fraction * max_steps - 1e-9)), max_steps))


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _strip_cosmetic(d: dict) -> dict:
    d = _jsonable(d)
    for path in COSMETIC_KEYS:
        node = d
        for k in path[:-1]:
            node = node.get(k, {})
        node.pop(path[-1], None)
    return d


def config_hash(cfg: PretrainConfig | dict) -> str:
    """sha256 (16 hex) of the resolved config without ``COSMETIC_KEYS``."""
    d = cfg.to_dict() if isinstance(cfg, PretrainConfig) else cfg
    text = json.dumps(_strip_cosmetic(d), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every differing non-cosmetic key."""
    a, b = _flatten(_strip_cosmetic(old)), _flatten(_strip_cosmetic(new))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


# ------------------------------------------------------------------------------------ plan
@dataclass
class PlannedRun:
    """One run of a sweep: its name, resolved config and derived numbers."""

    name: str
    model_name: str
    data_fraction: float
    config: PretrainConfig
    run_dir: Path
    hidden: int
    layers: int
    train_graphs: int
    train_atoms: int
    steps_per_epoch: int
    max_steps: int
    lr: float
    warmup_steps: int
    hash: str

    def status(self) -> str:
        """``done`` (record with this hash), ``partial`` (started, same config) or ``new``.

        Raises SweepError if the directory holds a run of another config.
        """
        rec_path = self.run_dir / RECORD_FILE
        cfg_path = self.run_dir / "config.yaml"
        if rec_path.exists():
            rec = self._read(rec_path, json.loads)
            if rec.get("config_hash") == self.hash:
                return "done"
            old = rec.get("config") or (self._read(cfg_path, yaml.safe_load) if cfg_path.exists() else {})
            self._refuse(old, f"its record has config hash {rec.get('config_hash')}")
        if cfg_path.exists():
            old = self._read(cfg_path, yaml.safe_load) or {}
            if config_hash(old) != self.hash:
                self._refuse(old, f"config hash {config_hash(old)}")
            return "partial"
        return "new"

    def _read(self, path: Path, parse):
        try:
            value = parse(path.read_text())
        except (ValueError, yaml.YAMLError) as exc:
            raise SweepError(f"run {self.name!r}: {path} cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0]}); delete {self.run_dir} to rerun that run") from None
        if value is not None and not isinstance(value, dict):
            raise SweepError(f"run {self.name!r}: {path} does not hold a mapping; delete {self.run_dir} to rerun "
                             f"that run")
        return value

    def _refuse(self, old: dict, what: str) -> None:
        diff = config_diff(old, self.config.to_dict())
        shown = "; ".join(diff[:8]) + (f"; ... {len(diff) - 8} more" if len(diff) > 8 else "")
        raise SweepError(f"run {self.name!r} in {self.run_dir} was made with another config ({what}, this "
                         f"sweep resolves {self.hash}); changed: {shown or 'n/a'}. Delete {self.run_dir} to "
                         f"rerun it, or give the sweep another out_dir")

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_name, "hidden": self.hidden, "layers": self.layers,
                "data_fraction": self.data_fraction, "train_graphs": self.train_graphs,
                "train_atoms": self.train_atoms, "steps_per_epoch": self.steps_per_epoch,
                "max_steps": self.max_steps, "lr": self.lr, "warmup_steps": self.warmup_steps,
                "config_hash": self.hash, "run_dir": str(self.run_dir)}


def run_name(model_name: str, fraction: float) -> str:
    return f"{model_name}-f{fraction:g}"


def _training_subsets(base: PretrainConfig, fractions: list[float], *, make_store: bool):
    """``{fraction: (train_graphs, train_atoms, global batches of epoch 0)}`` from the store."""
    from gnnmegatron.data.sampler import ChunkAwareSampler
    from gnnmegatron.data.store import GraphStore, split_indices
    from gnnmegatron.training.runtime import ensure_store, nested_subset

    if base.data.multi_source:
        return _mixture_subsets(base, fractions, make_store=make_store)
    path = Path(base.data.store)
    if not path.exists():
        if not make_store:
            raise SweepError(f"data store {path} does not exist; the step budgets (and so the run configs) "
                             f"depend on it — run the sweep (or a --dry-run) once to generate it")
        ensure_store(base, 0)
    store = GraphStore(path)
    counts = store.atom_counts
    splits = split_indices(len(store), base.data.splits, seed=base.data.split_seed)
    out = {}
    for f in fractions:
        idx = nested_subset(splits["train"], f, base.data.split_seed)
        sampler = ChunkAwareSampler(counts, store.graph_chunks, idx, seed=base.seed, shuffle=True,
                                    budget_atoms=base.data.budget_atoms, max_graphs=base.data.max_graphs)
        out[f] = (len(idx), int(counts[idx].sum()), len(sampler.global_batches(0)))
    return out


def _mixture_subsets(base: PretrainConfig, fractions: list[float], *, make_store: bool):
    """``_training_subsets`` of a multi-source base config: ``data.train_fraction = f`` scales every
    source's training subset; the batches are those of the mixture's epoch 0."""
    import dataclasses

    from gnnmegatron.data.mixture import MixtureSampler, MixtureStore, mixture_weights
    from gnnmegatron.data.store import GraphStore, split_indices
    from gnnmegatron.training.runtime import ensure_source_store, nested_subset

    stores = []
    for i, src in enumerate(base.data.source_list()):
        if not Path(src.store).exists() and not make_store:
            raise SweepError(f"data.sources[{i}] ({src.name!r}): store {src.store} does not exist; the step budgets "
                             f"depend on it — run the sweep (or a --dry-run) once to create it")
        stores.append(GraphStore(ensure_source_store(src, 0, i)))
    out = {}
    for f in fractions:
        data = dataclasses.replace(base.data, train_fraction=f)
        srcs = data.source_list()
        mix = MixtureStore(stores, [s.name for s in srcs])
        train = []
        for k, (src, store) in enumerate(zip(srcs, stores)):
            sp = split_indices(len(store), src.splits, seed=src.split_seed)
            train.append(mix.to_global(k, nested_subset(sp["train"], src.train_fraction, src.split_seed)))
        probs = mixture_weights([len(t) for t in train], data.sampling, temperature=data.temperature,
                                weights=[s.weight for s in srcs] if data.sampling == "given" else None)
        sampler = MixtureSampler(mix.atom_counts, mix.graph_chunks, train, probs, seed=base.seed,
                                 epoch_graphs=data.epoch_graphs or None, budget_atoms=data.budget_atoms,
                                 max_graphs=data.max_graphs)
        idx = np.concatenate(train)
        out[f] = (len(idx), int(mix.atom_counts[idx].sum()), len(sampler.global_batches(0)))
    return out


def plan_sweep(sweep: SweepConfig, *, progress: bool = True, make_store: bool = True) -> list[PlannedRun]:
    """Resolves every run's config (models x fractions, model-major).

    The step budget depends on the training subsets, so the store is opened (and the EMT store
    generated first if the base config asks for one and it is missing; with ``make_store=False``
    a missing store raises SweepError).
    """
    base_values = sweep.base_dict()
    base = config_from_dict(copy.deepcopy(base_values))
    subsets = _training_subsets(base, sweep.data_fractions, make_store=make_store)
    dp = base.parallel.dp or 1
    out_dir = Path(sweep.out_dir)
    plans = []
    for spec in sweep.model_specs():
        shared = {k: v for k, v in base_values.get("model", {}).items() if k != "preset"}
        model = {**shared, **spec["model"]}
        for f in sweep.data_fractions:
            graphs, atoms, batches = subsets[f]
            name = run_name(spec["name"], f)
            values = copy.deepcopy(base_values)
            values["model"] = dict(model)
            values["run_dir"] = str(out_dir / "runs" / name)
            values.setdefault("data", {})["train_fraction"] = f
            cfg = config_from_dict(copy.deepcopy(values))
            mcfg = cfg.model_config()
            steps = budget_to_max_steps(sweep.budget, train_atoms=atoms, budget_atoms=base.data.budget_atoms,
                                        batches_per_epoch=batches, dp=dp)
            spe = max(batches // dp, 1)
            lr = scaled_lr(sweep.lr_rule, mcfg.hidden, cfg.optim.lr)
            warmup = scaled_warmup(sweep.lr_rule, steps)
            values.setdefault("optim", {}).update(lr=lr, warmup_steps=warmup)
            values.setdefault("train", {}).update(
                max_steps=steps, eval_every=math.ceil(steps / sweep.evals_per_run),
                checkpoint_every=math.ceil(steps / sweep.checkpoints_per_run), progress=bool(progress))
            cfg = config_from_dict(values)
            plans.append(PlannedRun(name=name, model_name=spec["name"], data_fraction=f, config=cfg,
                                    run_dir=Path(cfg.run_dir), hidden=mcfg.hidden, layers=mcfg.layers,
                                    train_graphs=graphs, train_atoms=atoms, steps_per_epoch=spe, max_steps=steps,
                                    lr=lr, warmup_steps=warmup, hash=config_hash(cfg)))
    return plans


def select(plans: list[PlannedRun], only=None) -> list[PlannedRun]:
    """Runs whose name matches any of ``only`` (names or fnmatch patterns; ints index the plan)."""
    if only is None:
        return plans
    only = [only] if isinstance(only, (str, int)) else list(only)

    def hits(o):
        return [p for i, p in enumerate(plans) if (o == i if isinstance(o, int) else fnmatch.fnmatchcase(p.name, o))]

    missing = [o for o in only if not hits(o)]
    if missing:
        indices = [o for o in missing if isinstance(o, int)]
        names = [o for o in missing if not isinstance(o, int)]
        parts = [f"--only {names} matches no run"] if names else []
        if indices:
            parts.append(f"--index {indices} is past the plan's last run (0..{len(plans) - 1})")
        what = "; ".join(parts)
        raise SweepError(f"{what} of the sweep ({len(plans)} runs: "
                         f"{[p.name for p in plans][:6]}{' ...' if len(plans) > 6 else ''})")
    chosen = {p.name for o in only for p in hits(o)}
    return [p for p in plans if p.name in chosen]


# ------------------------------------------------------------------------------------ records
def _write_json_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` by rename (JSON records and YAML configs alike)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_record(plan: PlannedRun, report: dict[str, Any], wall_s: float, segments: list) -> dict[str, Any]:
    """The run record (keys of :mod:`gnnmegatron.scaling.fit`, plus provenance).

    ``val_*`` are the final validation numbers; ``best_val_loss`` is the lowest validation
    ``loss`` of any evaluation of the run (from ``metrics.jsonl``), ``best_val_energy_mae`` and
    ``best_val_force_mae`` the MAEs of that evaluation.
    """
    from gnnmegatron.training.logging import read_metrics

    val = report["val"]
    metrics_path = plan.run_dir / "metrics.jsonl"
    evals = [m for m in read_metrics(metrics_path) if m.get("split") == "val"] if metrics_path.exists() else []
    best = min(evals + [dict(val, step=report["step"])], key=lambda m: m["loss"])
    seen = report["seen"]
    return {
        "name": plan.name, "preset": plan.model_name, "base_preset": plan.config.model["preset"],
        "hidden": plan.hidden, "layers": plan.layers,
        "params": int(report["parameters_non_embedding"]), "params_total": int(report["parameters"]),
        "data_fraction": plan.data_fraction, "train_graphs": int(report["graphs"]["train"]),
        "train_atoms": plan.train_atoms, "atoms_seen": int(seen["atoms"]), "edges_seen": int(seen["edges"]),
        "graphs_seen": int(seen["graphs"]), "epochs": seen["atoms"] / plan.train_atoms if plan.train_atoms else None,
        "flops": float(seen["flops"]), "steps": int(report["step"]), "lr": plan.lr, "warmup_steps": plan.warmup_steps,
        "val_energy_mae": float(val["energy_mae_per_atom"]), "val_force_mae": float(val["force_mae"]),
        "val_loss": float(val["loss"]), "best_val_loss": float(best["loss"]),
        "best_val_energy_mae": float(best["energy_mae_per_atom"]), "best_val_force_mae": float(best["force_mae"]),
        "best_step": int(best["step"]),
        "baseline_energy_mae": float(val.get("baseline_energy_mae_per_atom", float("nan"))),
        "baseline_force_mae": float(val.get("baseline_force_mae", float("nan"))),
        "val_sources": _source_records(val, best) if val.get("sources") else None,
        "wall_time_s": float(wall_s), "segments": segments, "config_hash": plan.hash,
        "run_dir": str(plan.run_dir), "config": _jsonable(plan.config.to_dict()),
    }


def _source_records(val: dict[str, Any], best: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per source of a multi-source run: final validation loss and MAEs, and the loss of the best
    evaluation (by overall loss), for ``gnnmegatron scaling fit --per-source``."""
    best_sources = best.get("sources") or {}
    return {name: {"loss": float(v["loss"]), "energy_mae": float(v["energy_mae_per_atom"]),
                   "force_mae": float(v["force_mae"]),
                   "best_loss": float(best_sources.get(name, v)["loss"])}
            for name, v in val["sources"].items()}


def collect_records(plans: list[PlannedRun]) -> list[dict[str, Any]]:
    """Records of every finished run of the plan (record.json with the plan's hash), plan order."""
    out = []
    for p in plans:
        path = p.run_dir / RECORD_FILE
        if path.exists():
            rec = json.loads(path.read_text())
            if rec.get("config_hash") == p.hash:
                out.append(rec)
    return out


def write_runs_jsonl(out_dir: Path, records: list[dict[str, Any]]) -> Path:
    """Rewrites ``out_dir/runs.jsonl`` atomically (one record per line, without the config copy)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUNS_FILE
    lines = [json.dumps({k: v for k, v in r.items() if k != "config"}) for r in records]
    _write_json_atomic(path, "".join(line + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------ running
def _train(plan: PlannedRun) -> dict[str, Any]:
    """Trains (or resumes) one run in this process and returns the Trainer's report."""
    from gnnmegatron.training.trainer import Trainer

    trainer = Trainer(plan.config, resume="auto")
    try:
        report = trainer.fit()
        if trainer.stopped_by_signal:
            raise SweepInterrupted(trainer.stopped_by_signal, f"received {trainer.stopped_by_signal} in run "
                                   f"{plan.name!r} at step {trainer.step}; its checkpoint is saved, run the sweep "
                                   f"again to continue")
        return report
    finally:
        del trainer
        gc.collect()


def run_one(plan: PlannedRun, *, log=print) -> dict[str, Any]:
    """Runs one planned run to completion (resuming if it was interrupted); writes record.json."""
    status = plan.status()
    if status == "done":
        return json.loads((plan.run_dir / RECORD_FILE).read_text())
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    cfg_text = yaml.safe_dump(plan.config.to_dict(), sort_keys=False)
    _write_json_atomic(plan.run_dir / "config.yaml", cfg_text)  # a killed write leaves the old file or the new
    seg_path = plan.run_dir / "segments.json"
    segments = json.loads(seg_path.read_text()) if seg_path.exists() else []
    log(f"[sweep] {plan.name}: {'resuming' if status == 'partial' else 'starting'} — hidden {plan.hidden}, "
        f"layers {plan.layers}, fraction {plan.data_fraction:g} ({plan.train_graphs} graphs), "
        f"{plan.max_steps} steps, lr {plan.lr:.3g}, warm-up {plan.warmup_steps}")
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S")
    report = None
    try:
        report = _train(plan)
    finally:
        segments.append({"started": started, "seconds": time.perf_counter() - t0, "finished": report is not None})
        _write_json_atomic(seg_path, json.dumps(segments, indent=1))
    record = make_record(plan, report, sum(s["seconds"] for s in segments), segments)
    _write_json_atomic(plan.run_dir / RECORD_FILE, json.dumps(record, indent=1))
    log(f"[sweep] {plan.name}: done in {record['wall_time_s']:.0f} s — val loss {record['val_loss']:.4g} "
        f"(energy {1000 * record['val_energy_mae']:.2f} meV/atom, force {1000 * record['val_force_mae']:.1f} meV/Å)")
    return record


def run_sweep(sweep_cfg: SweepConfig | str | Path, *, only=None, dry_run: bool = False,
              progress: bool = True) -> list[dict[str, Any]]:
    """Runs the sweep's runs in order, skipping finished ones and resuming interrupted ones.

    Args:
        sweep_cfg: a :class:`SweepConfig` or the path of a sweep YAML.
        only: run names / fnmatch patterns / plan indices to run (None: all).
        dry_run: plan only: returns each selected run's :meth:`PlannedRun.summary` with its
            ``status`` and trains nothing (a missing EMT store is still generated: budgets need it).
        progress: show the Trainer's progress bar and the sweep's log lines.

    Returns:
        The records of the selected runs (plan order). ``out_dir/runs.jsonl`` holds the records
        of every finished run of the sweep (selected or not) after each run.

    Raises:
        SweepError: invalid config, unknown ``only`` name, or a run directory made with another config.
    """
    if not isinstance(sweep_cfg, SweepConfig):
        sweep_cfg = load_sweep_config(sweep_cfg)
    log = print if progress else (lambda *a, **k: None)
    plans = plan_sweep(sweep_cfg, progress=progress)
    chosen = select(plans, only)
    statuses = {p.name: p.status() for p in chosen}  # refuses conflicting dirs before any training
    if dry_run:
        return [dict(p.summary(), status=statuses[p.name]) for p in chosen]
    out_dir = Path(sweep_cfg.out_dir)
    records = []
    for k, plan in enumerate(chosen):
        if statuses[plan.name] == "done":
            log(f"[sweep] {plan.name}: finished earlier, skipped ({k + 1}/{len(chosen)})")
            records.append(json.loads((plan.run_dir / RECORD_FILE).read_text()))
            continue
        records.append(run_one(plan, log=log))
        write_runs_jsonl(out_dir, collect_records(plans))
    write_runs_jsonl(out_dir, collect_records(plans))
    return records


# ------------------------------------------------------------------------------------ summary
def study_summary(records: list[dict], fits: dict, *, command: str, wall_s: float | None,
                  machine: str | None = None) -> dict[str, Any]:
    """The benchmark-format JSON of a study (docs/architecture.md, "Benchmarks")."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("torch", "triton", "megatron-core", "numpy", "scipy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if machine is None:
        cpu = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        machine = f"{cpu}, {os.cpu_count()} cores"

    def exp(fit, key):
        if not fit:
            return {"value": None, "ci": None}
        return {"value": fit["params"].get(key), "ci": fit.get("ci", {}).get(key)}

    joint = fits.get("joint")
    l_n = (fits.get("L_N") or {}).get("fit")
    l_d = (fits.get("L_D") or {}).get("fit")
    co = fits.get("compute_optimal") or {}
    rows = [{k: r.get(k) for k in ("name", "preset", "hidden", "layers", "params", "params_total", "data_fraction",
                                   "train_graphs", "train_atoms", "atoms_seen", "steps", "flops", "lr",
                                   "val_energy_mae", "val_force_mae", "val_loss", "best_val_loss", "wall_time_s")}
            for r in records]
    summary = {
        "runs": len(records),
        "alpha": exp(joint, "alpha")["value"], "alpha_ci": exp(joint, "alpha")["ci"],
        "beta": exp(joint, "beta")["value"], "beta_ci": exp(joint, "beta")["ci"],
        "E": exp(joint, "E")["value"], "joint_rmse_log": joint.get("rmse_log") if joint else None,
        "alpha_L_N": exp(l_n, "alpha")["value"], "alpha_L_N_ci": exp(l_n, "alpha")["ci"],
        "alpha_L_D": exp(l_d, "alpha")["value"], "alpha_L_D_ci": exp(l_d, "alpha")["ci"],
        "compute_optimal_a": co.get("a"), "compute_optimal_b": co.get("b"),
        "n_key": fits.get("config", {}).get("n_key"), "d_key": fits.get("config", {}).get("d_key"),
        "study_wall_s": wall_s, "train_wall_s": sum(r.get("wall_time_s", 0.0) for r in records),
        "total_flops": sum(r.get("flops", 0.0) for r in records),
    }
    return {"benchmark": "scaling_emt", "machine": machine, "command": command, "versions": versions,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows, "summary": summary,
            "fit_warnings": fits.get("warnings", [])}


# ------------------------------------------------------------------------------------ CLI
def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``gnnmegatron scaling sweep`` (call with the subparser; pair with :func:`cmd_sweep`)."""
    parser.add_argument("config", help="sweep YAML (see gnnmegatron/configs/scaling_emt.yaml)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="run only this run (name or glob; repeatable)")
    parser.add_argument("--index", type=int, action="append", default=None, metavar="I",
                        help="run only the I-th run of the plan (0-based; e.g. $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--out-dir", default=None, help="override the sweep's out_dir")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (steps, lr, status) and exit")
    parser.add_argument("--collect", action="store_true",
                        help="only rebuild runs.jsonl from the runs' record.json files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    return parser


def cmd_sweep(args: argparse.Namespace) -> int:
    """Entry point behind :func:`add_sweep_arguments`."""
    cfg = load_sweep_config(args.config, {"out_dir": args.out_dir} if args.out_dir else None)
    only = (args.only or []) + (args.index or []) or None
    if args.collect:
        plans = plan_sweep(cfg, progress=False, make_store=False)
        recs = collect_records(plans)
        path = write_runs_jsonl(Path(cfg.out_dir), recs)
        print(f"wrote {path} ({len(recs)} of {len(plans)} runs finished)")
        return 0
    try:
        result = run_sweep(cfg, only=only, dry_run=args.dry_run, progress=not args.no_progress)
    except SweepInterrupted as exc:  # finished runs and the interrupted run's checkpoint are kept
        from gnnmegatron.training.trainer import ExitSignal

        print(f"sweep stopped: {exc}", file=sys.stderr, flush=True)
        return ExitSignal.exit_code(exc.signal)
    if args.dry_run:
        cols = ("name", "hidden", "layers", "data_fraction", "train_graphs", "max_steps", "lr", "warmup_steps",
                "status")
        print("  ".join(cols))
        for r in result:
            print("  ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
        print(f"{len(result)} runs, {sum(r['max_steps'] for r in result)} steps in all")
    else:
        print(f"{len(result)} runs finished; records in {Path(cfg.out_dir) / RUNS_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_sweep_arguments(argparse.ArgumentParser(prog="python -m gnnmegatron.scaling.sweep",
                                                         description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    from gnnmegatron.training.errors import user_errors

    try:
        return cmd_sweep(args)
    except user_errors() as exc:  # bad input: one line (GNNMEGATRON_DEBUG=1 for the traceback)
        if os.environ.get("GNNMEGATRON_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
