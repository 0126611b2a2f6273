"""The pretraining loop: energy + forces under tensor, pipeline and data parallelism.

Runs as one process or under ``torchrun`` with ``parallel: {tp, pp, dp}`` (Megatron's rank
order). The tp x pp ranks of one model replica read the same micro-batches, and the dp replicas
each read their own shard of every global batch (``ChunkAwareSampler``: global batch b ->
replica ``b % dp``). Each step takes ``train.micro_batches`` sampler batches per replica; their
gradients accumulate (loss normalised as one batch holding them all) -- through the pipeline
schedule when ``pp > 1`` (``gnnmegatron.parallel.pipeline``). Gradients are then averaged over
the data-parallel group, clipped by the global norm, and AdamW (optionally ZeRO-1) steps.

The model is built on the meta device and each rank materialises only its part, with the same
global initial weights under every layout (``gnnmegatron.training.build``). Checkpoints are
sharded DCP directories that any layout can resume (``gnnmegatron.training.sharded_checkpoint``).
Progress, metrics, validation and the run's files come from the last pipeline stage's first
rank (``TrainGroups.is_logger``). With ``train.ema_decay`` every rank keeps the moving average of
its own parameters (``gnnmegatron.training.ema``), which validation and the best checkpoint use;
``gnnmegatron.training.monitor`` turns validations into the best checkpoint, early stopping and
the plateau schedule.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from gnnmegatron.training import checkpoint as ckpt
from gnnmegatron.training import sharded_checkpoint as sc
from gnnmegatron.training import resume as start
from gnnmegatron.training.baselines import composition_energy
from gnnmegatron.training.data_setup import TrainData, build_train_data, fit_references, source_report
from gnnmegatron.training.build import build_local_model, set_energy_buffers
from gnnmegatron.training.config import ConfigError, PretrainConfig
from gnnmegatron.training.distributed import GradReducer, TrainGroups, clip_grad_norm, split_params
from gnnmegatron.training.faults import Heartbeat, NonFiniteStep, RankLost, describe_failure
from gnnmegatron.training.ema import WeightEMA
from gnnmegatron.training.logging import MetricsWriter, Progress, TensorBoardWriter, memory_mb, plot_loss_curve
from gnnmegatron.training.losses import (ErrorAccumulator, active_terms, compute_loss, label_masks, loss_at,
                                         loss_denominators)
from gnnmegatron.training.monitor import ValidationMonitor
from gnnmegatron.training.optim import build_optimizer, lr_at, set_lr
from gnnmegatron.training.runtime import (  # noqa: F401 - re-exported for callers of the first releases
    checkpoint_blocks,
    ensure_source_store,
    ensure_store,
    format_report,
    init_distributed,
    nested_subset,
)
from gnnmegatron.training.train_state import model_state, optimizer_state

RESUME_MODES = ("auto", "never", "overwrite")


class ExitSignal:
    """While training: ``train.exit_signal`` sets a flag instead of ending the process, so that the
    step in progress finishes and a checkpoint is written first. Installed only from the main thread
    (Python delivers signals there); the previous handler is restored afterwards."""

    def __init__(self, name: str | None):
        self.name, self.received, self._previous = name, False, None

    def __enter__(self) -> "ExitSignal":
        import signal
        import threading

        if self.name is not None and threading.current_thread() is threading.main_thread():
            signum = getattr(signal, self.name)
            self._previous = (signum, signal.signal(signum, self._handle))
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    @staticmethod
    def exit_code(name: str) -> int:
        """The exit status of a process this signal ended (128 + its number: 143 for SIGTERM)."""
        import signal

        return 128 + int(getattr(signal, name))

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            import signal

            signal.signal(*self._previous)
            self._previous = None


class Trainer:
    """Pretraining driver for one rank.

    Args:
        cfg: the validated job config.
        resume: ``"auto"`` continues from the run's newest complete checkpoint (``latest``, or
            the newest by step when the pointer is missing or broken; a run directory holding
            checkpoint files none of which is complete is refused), ``"never"`` starts fresh
            (refusing a run directory that holds checkpoints), ``"overwrite"`` deletes the run's
            checkpoints and metrics (once this run is set up: a run that cannot start deletes nothing)
            and starts fresh, or a path to a checkpoint directory.
            Any of them may have been written under another parallel layout.
    """

    def __init__(self, cfg: PretrainConfig, resume: str = "auto"):
        run_dir = Path(cfg.run_dir)
        created = not run_dir.exists()
        try:
            self._setup(cfg, resume)
        except BaseException:
            if created:  # a run that could not start leaves no empty run directory behind
                with contextlib.suppress(OSError):  # not empty, or another rank removed it first
                    run_dir.rmdir()
            raise

    def _setup(self, cfg: PretrainConfig, resume: str) -> None:
        self.cfg = cfg
        self.rank, self.world = init_distributed(cfg.train.collective_timeout_s)
        par = cfg.parallel.resolve(self.world)
        self.model_cfg = cfg.model_config()
        self._check_layout(par)
        self.groups = TrainGroups.build(par.tp, par.dp, self.rank, pp=par.pp)
        self.tp, self.pp, self.dp = par.tp, par.pp, par.dp
        self.micro_batches = cfg.train.micro_batches
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        # bfloat16: float32 master weights and data, bf16 autocast around the model's forward.
        self.autocast_dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else None
        self.dtype = torch.float32 if self.autocast_dtype is not None else getattr(torch, cfg.train.dtype)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_path, note = start.resume_path(self, resume)

        self._build_data()

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = build_local_model(self.model_cfg, self.groups.layout, cfg.seed, dtype=self.dtype,
                                       device=self.device, virtual_stages=par.virtual_stages,
                                       pp_layers=par.pp_layers)
        reference = self._fit_references()
        self.reference = reference
        set_energy_buffers(self.model, reference, self.stats["force_rms"], 0.0)
        from gnnmegatron.models import count_parameters

        counts = count_parameters(self.model_cfg)
        self.num_params, self.num_params_non_embedding = counts["total"], counts["non_embedding"]
        self.step = 0
        self.epoch = 0
        self.seen = {"atoms": 0, "edges": 0, "graphs": 0, "flops": 0.0}
        self.best_val: dict[str, float] | None = None
        self.skipped_steps = 0
        self.stopped_by_signal: str | None = None  # the exit signal's name when fit() ended on it

        loaded = start.load_model(self, resume_path) if resume_path is not None else None
        if loaded is None and cfg.train.init_from:
            start.init_weights(self, Path(cfg.train.init_from))
        if cfg.train.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.sharded_params, self.replicated_params = split_params(self.model)
        self.ema = WeightEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.monitor = ValidationMonitor(
            cfg.train.best_metric, cfg.train.early_stopping_min_delta, cfg.train.early_stopping_patience,
            cfg.optim.plateau_patience if cfg.optim.schedule == "plateau" else 0, cfg.optim.plateau_factor,
            cfg.optim.min_lr_ratio)
        self.monitor.check_sources(self.mixture["names"] if self.mixture is not None else None)
        self.optimizer = build_optimizer(self.model, cfg.optim, dp_group=self.groups.dp_group if self.dp > 1 else None)
        # data-parallel gradient averaging in flat buckets, overlapped with the backward (training.distributed)
        self.grad_reducer = GradReducer(self.model.parameters(), self.groups) if self.dp > 1 else None
        self.engine = None
        if self.pp > 1:
            from gnnmegatron.parallel.pipeline.engine import PipelineEngine

            self.engine = PipelineEngine(self.model, self.groups.layout, par.schedule,
                                         autocast_dtype=self.autocast_dtype, dtype=self.dtype)
        if loaded is not None:
            start.load_rest(self, resume_path, loaded, note)
        if resume == "overwrite":
            start.clear_run(self)
        self.is_logger = self.groups.is_logger
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl",
                                     resume_step=self.step if resume_path is not None else None) \
            if self.is_logger else None
        if self.is_logger and self.mixture is not None:
            self._print_mixture()
        self.tensorboard = TensorBoardWriter(self.run_dir / "tensorboard",
                                             resume_step=self.step if resume_path is not None else None) \
            if self.is_logger and cfg.train.tensorboard else None
        if self.is_logger:
            # by rename: a killed write never leaves half a config
            sc._write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.heartbeat = Heartbeat()
        self.async_saver = sc.AsyncSaver() if cfg.train.async_checkpoint else None

    # ----------------------------------------------------------------------------------- setup
    def _build_data(self) -> None:
        """Stores, splits, samplers and loaders: one store, or several mixed by weight (``data.sources``)."""
        data = build_train_data(self.cfg, self.rank, self.groups.dp_rank, self.dp, self.dtype)
        for name in TrainData.__dataclass_fields__:
            setattr(self, name, getattr(data, name))
        if len(self.train_sampler) < self.micro_batches:
            raise ConfigError(f"the training split gives {len(self.train_sampler)} batches per rank and epoch but a step "
                              f"needs train.micro_batches={self.micro_batches} (train graphs="
                              f"{len(self.splits['train'])}, dp={self.dp}, budget_atoms={self.cfg.data.budget_atoms}); "
                              f"use more data or fewer ranks")

    def _fit_references(self) -> torch.Tensor:
        """Per-element reference energies on the training split(s): one table, or one per source."""
        reference, self.stats = fit_references(self, self.cfg, self.model_cfg, warn=self.groups.is_logger)
        return reference

    def _print_mixture(self) -> None:
        m = self.mixture
        rows = ", ".join(f"{n} {p:.3f} ({g} train graphs)" for n, p, g in
                         zip(m["names"], m["probabilities"], m["train_graphs"]))
        print(f"mixture of {len(m['names'])} sources ({m['sampling']} sampling, {m['epoch_graphs']} graphs per "
              f"epoch, heads: {self.model_cfg.heads}): {rows}", flush=True)

    def _check_layout(self, par) -> None:
        mc = self.model_cfg
        if par.tp > 1 and mc.message != "node_split":
            raise ConfigError(f"parallel.tp={par.tp} needs model.message='node_split' (the TP-native EGNN whose "
                              f"collectives are node-sized), got message={mc.message!r}")
        if par.tp > 1 and mc.hidden % par.tp:
            raise ConfigError(f"model hidden={mc.hidden} is not divisible by parallel.tp={par.tp}")
        if par.tp > 1 and mc.message_groups and mc.message_groups % par.tp:
            raise ConfigError(f"model message_groups={mc.message_groups} is not divisible by parallel.tp={par.tp}")
        stages = par.pp * par.virtual_stages
        if par.pp > 1 and mc.layers < stages:
            raise ConfigError(f"the model has {mc.layers} blocks but parallel.pp*virtual_stages={par.pp}*"
                              f"{par.virtual_stages}={stages} stages each need one; lower pp or virtual_stages")
        if par.pp_layers is not None and sum(par.pp_layers) != mc.layers:
            raise ConfigError(f"parallel.pp_layers={par.pp_layers} sums to {sum(par.pp_layers)} but the model has "
                              f"{mc.layers} layers")

    def _validation_weights(self):
        """The moving average in the model while validating (``train.ema_decay``), the weights otherwise."""
        return self.ema.swapped(self.model) if self.ema is not None else contextlib.nullcontext()

    def describe_layout(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}

    # ----------------------------------------------------------------------------------- checkpoints
    def _meta(self) -> dict[str, Any]:
        sampler = {k: v for k, v in self.train_loader.state_dict().items() if k != "dp_rank"}
        return {"step": self.step, "epoch": self.epoch, "seen": dict(self.seen), "best_val": self.best_val,
                "stats": self.stats, "config": self.cfg.to_dict(), "model_config": self.model_cfg.to_dict(),
                "layout": self.describe_layout(), "world_size": self.world, "sampler": sampler,
                "skipped_steps": self.skipped_steps, "mixture": self.mixture,
                "ema": self.ema.meta() if self.ema is not None else None, "monitor": self.monitor.state()}

    def save(self, best: bool = False) -> Path:
        """Writes a sharded checkpoint (collective: every rank writes its own shards) and its model card.

        With ``train.async_checkpoint`` the tensors are copied to host memory here and written by
        a background thread while training continues; the previous asynchronous save is waited
        for first. ``best``: also point ``checkpoints/best`` at it. Returns the checkpoint's path
        (committed, or being committed).
        """
        from gnnmegatron.training.model_card import write_model_card

        meta = self._meta()
        state: dict[str, Any] = {**model_state(self.model), **optimizer_state(self.optimizer, self.model)}
        if self.ema is not None:
            state.update(self.ema.state(self.model))
        state["meta"] = meta
        state[f"rng/rank{self.rank}"] = sc.rng_states()
        info = {"format": sc.SHARDED_FORMAT, "version": sc.SHARDED_VERSION, "step": self.step,
                "layout": self.describe_layout(), "world_size": self.world, "model_config": self.model_cfg.to_dict(),
                "preset": self.cfg.model.get("preset"), "zero_stage": self.cfg.optim.zero_stage,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

        def card(path: Path) -> None:
            write_model_card(path, meta)

        keep = self.cfg.train.keep_checkpoints
        if self.async_saver is not None:
            staged = {k: _staged(v) for k, v in state.items()}
            self.async_saver.submit(sc.save_sharded, self.run_dir, self.step, staged, info, keep=keep, on_commit=card,
                                    best=best)
            return sc.step_dir(self.run_dir, self.step)
        return sc.save_sharded(self.run_dir, self.step, state, info, keep=keep, on_commit=card, best=best)

    def wait_for_checkpoint(self) -> None:
        """Block until an asynchronous save has been committed (no-op otherwise)."""
        if self.async_saver is not None:
            self.async_saver.wait()

    # ----------------------------------------------------------------------------------- steps
    def _batches(self):
        """Endless iterator over this replica's steps: lists of ``train.micro_batches`` batches."""
        def single():
            while True:
                for batch in self.train_loader:
                    yield batch
                self.epoch += 1
                self.train_sampler.set_epoch(self.epoch)

        it = single()
        while True:
            yield [next(it) for _ in range(self.micro_batches)]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _to_float(self, out: dict) -> dict:
        """Model outputs in the data dtype (losses and metrics in float32 under bf16 autocast)."""
        if self.autocast_dtype is None:
            return out
        return {k: (v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}

    def _forces_needed(self) -> tuple[bool, bool]:
        terms = active_terms(self.cfg.loss, self.source_weights)
        return "forces" in terms, "stress" in terms and self.model_cfg.force_mode == "conservative"

    def _loss_now(self):
        """(loss config, per-source weights) in force at this step (``loss.stages``)."""
        cfg = loss_at(self.cfg.loss, self.step, self.cfg.train.max_steps)
        if cfg is self.cfg.loss or self.source_weights is None:
            return cfg, self.source_weights
        return cfg, self.cfg.loss_weights(cfg)

    def train_step(self, micro: list[dict]) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``micro`` (this replica's micro-batches); returns the global loss and parts."""
        self.model.train()
        set_lr(self.optimizer, lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps, self.monitor.lr_scale))
        self.optimizer.zero_grad(set_to_none=True)
        loss_cfg, source_weights = self._loss_now()
        terms = active_terms(loss_cfg, source_weights)
        forces = "forces" in terms
        stress = "stress" in terms and self.model_cfg.force_mode == "conservative"
        denominators = loss_denominators(micro)

        def loss_fn(out, batch):
            return compute_loss(self._to_float(out), batch, loss_cfg, denominators, source_weights)

        if self.engine is None:
            loss, parts = None, {}
            for i, batch in enumerate(micro):
                with self._autocast():
                    out = self.model(batch, compute_forces=forces, compute_stress=stress)
                part_loss, part = loss_fn(out, batch)
                if self.grad_reducer is not None and i == len(micro) - 1:
                    self.grad_reducer.arm()  # the last backward: all-reduce buckets as they complete
                part_loss.backward()
                loss = part_loss.detach() if loss is None else loss + part_loss.detach()
                parts = {k: parts.get(k, 0.0) + v for k, v in part.items()}
        else:
            res = self.engine.train_step(micro, loss_fn, compute_forces=forces, compute_stress=stress)
            loss, parts = res.loss, res.parts
            if loss is None:  # not the last stage: receive the values below
                keys = [k for k in terms if k != "stress" or stress]
                loss, parts = torch.zeros((), dtype=torch.float64), {k: torch.zeros((), dtype=torch.float64) for k in keys}
        values = torch.stack([torch.as_tensor(loss)] + [torch.as_tensor(v) for v in parts.values()]).to(torch.float64)
        self.groups.from_last_stage(values)
        if self.dp > 1:
            self.groups.dp_all_reduce(values).div_(self.dp)
        if self.grad_reducer is not None:
            self.grad_reducer.finish()  # averaged over dp (overlapped with the last backward at pp = 1)
        max_norm = self.cfg.optim.clip_grad_norm
        if self.tp == 1 and self.pp == 1:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                             max_norm if max_norm else float("inf")))
        else:
            grad_norm = clip_grad_norm(self.sharded_params, self.replicated_params, max_norm, self.groups)
        values = values.tolist()
        if not (np.isfinite(values[0]) and np.isfinite(grad_norm)):
            self._nonfinite(micro, values[0], grad_norm)
        else:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
        self.step += 1
        self._count(micro)
        return values[0], dict(zip(parts.keys(), values[1:])) | {"grad_norm": grad_norm}

    def _nonfinite(self, micro: list[dict], loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient: skip the update or stop, naming the step's structures."""
        local = sorted(int(i) for b in micro for i in b.get("index", torch.zeros(0)).tolist())
        indices = [local]
        if self.dp > 1:
            indices = [None] * self.dp
            dist.all_gather_object(indices, local, group=self.groups.dp_group)
        names = sorted(i for part in indices for i in part)
        if self.mixture is not None:  # joint indices -> "source:index in its store"
            names = self.store.describe(names)
        what = (f"step {self.step + 1}: loss {loss}, gradient norm {grad_norm}; the step's {len(names)} structures "
                f"(store indices) are {names[:40]}{' ...' if len(names) > 40 else ''}")
        if self.cfg.train.on_nonfinite == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            if self.is_logger:
                print(f"warning: skipped the update of {what}", flush=True)
            return
        raise NonFiniteStep(f"non-finite {what}. Nothing was updated; the last checkpoint is in {self.run_dir}/"
                            f"checkpoints. Check those structures, lower optim.lr, or set train.on_nonfinite: skip")

    def _count(self, micro: list[dict]) -> None:
        """Adds this step's global atoms, edges, graphs and analytic training FLOPs to ``seen``."""
        from gnnmegatron.models.presets import flops_per_step

        labelled = [0.0, 0.0, 0.0]
        for b in micro:
            for j, m in enumerate(label_masks(b).values()):
                labelled[j] += float(m.sum())
        local = torch.tensor([float(sum(int(b["num_atoms"].sum()) for b in micro)),
                              float(sum(int(b["edge_index"].shape[1]) for b in micro)),
                              float(sum(int(b["num_atoms"].numel()) for b in micro))] + labelled, dtype=torch.float64)
        self.groups.dp_all_reduce(local)
        atoms, edges, graphs, e_lab, f_lab, s_lab = (int(v) for v in local.tolist())
        # the structures each loss term averaged over in this step (all data-parallel ranks)
        self._last_labels = {"graphs": graphs, "energy": e_lab, "forces": f_lab, "stress": s_lab}
        self.seen["atoms"] += atoms
        self.seen["edges"] += edges
        self.seen["graphs"] += graphs
        self.seen["flops"] += flops_per_step(self.model_cfg, atoms, edges)
        self._last_atoms = atoms

    def evaluate(self) -> dict[str, float]:
        """Energy MAE per atom and force MAE on the validation split, with the two baselines (all ranks)."""
        self.model.eval()
        names = self.mixture["names"] if self.model_cfg.multi_source else None
        acc = ErrorAccumulator(len(names) if names else 1)
        conservative = self.model_cfg.force_mode == "conservative"
        # batch k is evaluated (and read at all) only by replica k % dp; its tp x pp ranks share it
        for batch in self.val_loader.iterate(keep=lambda k: k % self.dp == self.groups.dp_rank):
            batch = {key: (v.to(self.device) if torch.is_tensor(v) else v) for key, v in batch.items()}
            if self.engine is not None:
                with self._autocast():
                    out = self._to_float(self.engine.forward([batch], compute_forces=True)[0])
            else:
                # Conservative forces are -dE/dx, so evaluation needs autograd (but no second-order graph).
                with (torch.enable_grad() if conservative else torch.no_grad()), self._autocast():
                    out = self._to_float(self.model(batch, compute_forces=True))
            if self.groups.is_last_stage:
                base = composition_energy(self.reference, batch["atomic_numbers"], batch["batch"],
                                          int(batch["num_atoms"].numel()), batch.get("source"))
                acc.update(out, batch, base)
        sums = acc.state()
        self.groups.dp_all_reduce(sums)
        self.groups.from_last_stage(sums)
        acc.load(sums)
        # One number to compare runs by (scaling fits): the loss weights applied to the two MAEs.
        def with_loss(r):
            return dict(r, loss=self.cfg.loss.energy_weight * r["energy_mae_per_atom"]
                        + self.cfg.loss.force_weight * r["force_mae"])

        result = with_loss(acc.result())
        if names:
            result["sources"] = {n: with_loss(r) for n, r in zip(names, acc.per_source())}
        return result

    def fit(self, stop_at: int | None = None) -> dict[str, Any] | None:
        """Trains to ``train.max_steps``; returns the final report (every rank).

        ``stop_at`` ends the job early after that step with a checkpoint (for jobs with a wall-clock
        allotment and for testing resume); it returns None then. A collective that fails (a rank
        died or hung past ``train.collective_timeout_s``) raises ``RankLost`` naming the lost ranks.
        """
        try:
            with ExitSignal(self.cfg.train.exit_signal) as self._exit_signal:
                return self._fit(stop_at)
        except (RuntimeError, dist.DistError) as exc:
            if isinstance(exc, (RankLost, NonFiniteStep, ckpt.CheckpointError)) or not dist.is_initialized() \
                    or self.world == 1 or not _is_comm_failure(exc):
                raise
            raise RankLost(describe_failure(self.heartbeat, self.step, exc, self.cfg.train.collective_timeout_s)) from exc

    def _fit(self, stop_at: int | None) -> dict[str, Any] | None:
        cfg = self.cfg.train
        progress = Progress(cfg.max_steps, initial=self.step, enabled=cfg.progress and self.is_logger)
        batches = self._batches()
        t_start = time.perf_counter()
        window = {"loss": 0.0, "atoms": 0, "steps": 0, "t": time.perf_counter()}
        last_val = None
        if self.monitor.stopped_at is not None and self.rank == 0:
            print(f"note: this run stopped early at step {self.monitor.stopped_at} ({cfg.best_metric} last improved at "
                  f"step {self.monitor.best_step}); nothing left to train", flush=True)
        while self.step < cfg.max_steps and self.monitor.stopped_at is None:
            self.heartbeat.beat(self.step)
            micro = [{key: (v.to(self.device) if torch.is_tensor(v) else v) for key, v in b.items()}
                     for b in next(batches)]
            loss, parts = self.train_step(micro)
            rate = progress.update(self._last_atoms, loss)
            window["loss"] += loss if np.isfinite(loss) else 0.0
            window["atoms"] += self._last_atoms
            window["steps"] += 1
            if self.is_logger and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                now = time.perf_counter()
                self._log({
                    "step": self.step, "split": "train", "epoch": self.epoch, "loss": loss,
                    "loss_mean": window["loss"] / window["steps"], **{f"loss_{k}": v for k, v in parts.items()},
                    "lr": self.optimizer.param_groups[0]["lr"], "atoms_per_s": rate,
                    "window_atoms_per_s": window["atoms"] / max(now - window["t"], 1e-9),
                    "memory_mb": memory_mb(self.device),
                    "skipped_steps": self.skipped_steps, "labelled": dict(self._last_labels),
                })
                window = {"loss": 0.0, "atoms": 0, "steps": 0, "t": now}
            new_best = False
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                with self._validation_weights():
                    last_val = self.evaluate()
                new_best = self.monitor.observe(last_val, self.step) and cfg.keep_best
                if self.best_val is None or self.monitor.best_step == self.step:
                    self.best_val = dict(last_val, step=self.step)
                if self.monitor.should_stop:
                    self.monitor.stopped_at = self.step
                if self.is_logger:
                    self._log({"step": self.step, "split": "val", "weights": "ema" if self.ema else "raw", **last_val})
                    progress.write(
                        f"step {self.step}: val energy MAE {1000 * last_val['energy_mae_per_atom']:.2f} meV/atom "
                        f"(composition fit {1000 * last_val['baseline_energy_mae_per_atom']:.2f}), force MAE "
                        f"{1000 * last_val['force_mae']:.1f} meV/Å (zero forces {1000 * last_val['baseline_force_mae']:.1f})")
                    for name, v in (last_val.get("sources") or {}).items():
                        forces = (f"force MAE {1000 * v['force_mae']:.1f} meV/Å (zero forces "
                                  f"{1000 * v['baseline_force_mae']:.1f})" if v["force_components"] else "no force labels")
                        progress.write(f"    {name}: energy MAE {1000 * v['energy_mae_per_atom']:.2f} meV/atom (its "
                                       f"composition fit {1000 * v['baseline_energy_mae_per_atom']:.2f}), {forces}")
            stopping = self.monitor.stopped_at is not None
            if stopping and self.is_logger:
                progress.write(f"step {self.step}: early stopping: {cfg.best_metric} has not improved by more than "
                               f"{cfg.early_stopping_min_delta} for {self.monitor.since_best} validations (best "
                               f"{self.monitor.best} at step {self.monitor.best_step})")
            signalled = self._signalled()
            if new_best or stopping or self.step % cfg.checkpoint_every == 0 or self.step in (cfg.max_steps, stop_at) \
                    or signalled:
                self.save(best=new_best)
            if signalled and self.step < cfg.max_steps:
                progress.close()
                self.wait_for_checkpoint()
                self.stopped_by_signal = signalled
                if self.rank == 0:
                    print(f"received {signalled} during step {self.step}: saved a checkpoint of step {self.step} in "
                          f"{self.run_dir / 'checkpoints'}; rerun with --resume auto to continue", flush=True)
                return None
            if self.step == stop_at:
                progress.close()
                self.wait_for_checkpoint()
                return None
        progress.close()
        if last_val is None:
            with self._validation_weights():
                last_val = self.evaluate()
        self.wait_for_checkpoint()
        if self.tensorboard is not None:
            self.tensorboard.close()
        report = self._report(last_val, time.perf_counter() - t_start)
        if dist.is_initialized():
            dist.barrier()
        return report

    def _signalled(self) -> str | None:
        """The exit signal's name when any rank has received it (every rank agrees on the step: one
        all-reduce of a flag per step, only with several ranks and an exit signal set)."""
        sig = getattr(self, "_exit_signal", None)
        if sig is None or sig.name is None:
            return None
        flag = sig.received
        if dist.is_initialized() and self.world > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return sig.name if flag else None

    def _log(self, record: dict[str, Any]) -> None:
        """One record into metrics.jsonl and, with ``train.tensorboard``, TensorBoard (logger rank)."""
        self.metrics.write(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def _report(self, val: dict[str, float], seconds: float) -> dict[str, Any]:
        report = {
            "step": self.step,
            "train_seconds": seconds,
            "val": val,
            "best_val": self.best_val,
            "energy_mae_ratio_vs_composition": val["energy_mae_per_atom"] / max(val["baseline_energy_mae_per_atom"], 1e-12),
            "force_mae_ratio_vs_zero": val["force_mae"] / max(val["baseline_force_mae"], 1e-12),
            "parameters": self.num_params,
            "parameters_non_embedding": self.num_params_non_embedding,
            "seen": dict(self.seen),
            "train_fraction": self.cfg.data.train_fraction,
            "preset": self.cfg.model["preset"],
            "graphs": {k: int(len(v)) for k, v in self.splits.items()},
            "sources": self._source_report(val),
            "layout": self.describe_layout(),
            "skipped_steps": self.skipped_steps,
            "weights": "ema" if self.ema is not None else "raw",
            "monitor": self.monitor.state(),
        }
        if self.is_logger:
            (self.run_dir / "report.json").write_text(json.dumps(report, indent=2))
            data = self.cfg.data.store if self.mixture is None else " + ".join(self.mixture["names"])
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png",
                            title=f"{self.cfg.model['preset']} on {data}")
        return report

    def _source_report(self, val: dict[str, Any]) -> list[dict[str, Any]] | None:
        return source_report(self, self.stats, val)


def _staged(value: Any) -> Any:
    """A host copy of a checkpoint entry (asynchronous saves write these while training goes on)."""
    if isinstance(value, sc.ShardedTensorPieces):
        return sc.ShardedTensorPieces(value.global_shape, value.dtype,
                                      [(o, t.detach().to("cpu", copy=True)) for o, t in value.chunks])
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    import copy

    return copy.deepcopy(value)


def _is_comm_failure(exc: BaseException) -> bool:
    """A collective failed because of a peer (closed connection, timeout, NCCL error)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(s in text for s in ("Connection closed by peer", "Connection reset", "timed out", "Timed out",
                                   "NCCL", "gloo", "Broken pipe", "ProcessGroup"))
