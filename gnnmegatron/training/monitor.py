"""What the trainer does with each validation: the best checkpoint, early stopping, plateau schedule.

One metric of the validation results, ``train.best_metric`` (lower is better), drives three things:

* the **best checkpoint**: a validation that improves on the best so far by more than
  ``train.early_stopping_min_delta`` saves a checkpoint (unless one is written at that step anyway)
  and points ``checkpoints/best`` at it; pruning never removes it
  (``gnnmegatron.training.sharded_checkpoint.prune``);
* **early stopping** (``train.early_stopping_patience: P > 0``): after P validations in a row
  without such an improvement the run saves a checkpoint and stops;
* **reduce on plateau** (``optim.schedule: plateau``): after ``optim.plateau_patience``
  validations without improvement the learning rate is multiplied by ``optim.plateau_factor``
  (not below ``optim.min_lr_ratio * optim.lr``), and the count starts again.

Metric names: ``loss`` (the loss weights of the ``loss`` section applied to the energy and force
MAEs), ``energy_mae_per_atom``, ``force_mae``, or ``<source>/<name>`` for one source of a
multi-source run. The state lives in the checkpoint's ``meta["monitor"]``, so a resumed run
decides exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from gnnmegatron.training.config import ConfigError

__all__ = ["ValidationMonitor", "metric_value"]

METRICS = ("loss", "energy_mae_per_atom", "force_mae", "stress_mae")


def metric_value(val: dict[str, Any], name: str) -> float:
    """The value of metric ``name`` in a validation result (``Trainer.evaluate``)."""
    source, _, key = name.rpartition("/")
    where = val
    if source:
        sources = val.get("sources") or {}
        if source not in sources:
            raise ConfigError(f"train.best_metric={name!r}: no source {source!r} in the validation results "
                              f"(sources: {sorted(sources) or 'none, a single-store run'})")
        where = sources[source]
    if key not in where or where[key] is None:
        raise ConfigError(f"train.best_metric={name!r}: validation has no {key!r} (choose one of {list(METRICS)}, "
                          f"optionally as SOURCE/NAME)")
    return float(where[key])


@dataclass
class ValidationMonitor:
    """Best value so far and the counts since it (see the module docstring).

    Attributes:
        metric: the metric name; min_delta: the improvement that counts; patience: early-stopping
            patience in validations (0: never stop); plateau_patience, plateau_factor, lr_floor_scale:
            the plateau schedule (``plateau_patience`` 0: off).
        best, best_step: the best value and the step it was seen at (None before any validation).
        since_best: validations without improvement since ``best``.
        plateau_count: validations without improvement since the last improvement or lr cut.
        lr_scale: the plateau schedule's factor on the learning rate.
        stopped_at: the step early stopping ended the run at (None while it runs).
    """

    metric: str = "loss"
    min_delta: float = 0.0
    patience: int = 0
    plateau_patience: int = 0
    plateau_factor: float = 0.5
    lr_floor_scale: float = 0.0
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0
    plateau_count: int = 0
    lr_scale: float = 1.0
    stopped_at: int | None = None

    def check_sources(self, names: list[str] | None) -> None:
        """Refuse a ``SOURCE/NAME`` metric whose source the run does not have (before training, not at the
        first validation)."""
        source = self.metric.rpartition("/")[0]
        if source and source not in (names or []):
            raise ConfigError(f"train.best_metric={self.metric!r}: the run has no source {source!r} (sources: "
                              f"{names or 'none, a single-store run'})")

    def observe(self, val: dict[str, Any], step: int) -> bool:
        """Record a validation at ``step``; returns True when it is a new best."""
        value = metric_value(val, self.metric)
        improved = math.isfinite(value) and (self.best is None or value < self.best - self.min_delta)
        if improved:
            self.best, self.best_step = value, step
            self.since_best = 0
            self.plateau_count = 0
            return True
        self.since_best += 1
        if self.plateau_patience:
            self.plateau_count += 1
            if self.plateau_count >= self.plateau_patience:
                self.lr_scale = max(self.lr_scale * self.plateau_factor, self.lr_floor_scale)
                self.plateau_count = 0
        return False

    @property
    def should_stop(self) -> bool:
        """Early stopping: ``patience`` validations in a row without improvement."""
        return self.patience > 0 and self.since_best >= self.patience

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def load(self, state: dict[str, Any] | None) -> None:
        """Counters of a checkpoint's ``meta["monitor"]`` (the settings stay those of the config)."""
        if not state:
            return
        if state.get("metric") != self.metric:  # another metric: its best says nothing about this one
            return
        for key in ("best", "best_step", "since_best", "plateau_count", "lr_scale", "stopped_at"):
            if key in state:
                setattr(self, key, state[key])
