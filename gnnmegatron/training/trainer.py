"""The pretraining loop: energy + forces, AdamW with warm-up and cosine, clipping, validation,
metrics, loss-curve PNG, checkpoints with bit-for-bit resume.

Runs as one process or under ``torchrun``. Every data-parallel replica reads its own shard of
each global batch (``ChunkAwareSampler``, global batch b -> replica ``b % dp``) and gradients are
averaged over the data-parallel group. With ``parallel.tp > 1`` (message="node_split" models)
the single-device model is built from the same seed on every rank and ``parallelize``d: the
``tp`` ranks of a TP group read the same micro-batch and each holds ``H / tp`` of every block
(see :mod:`gnnmegatron.training.distributed`). Pipeline layouts (``parallel.pp > 1``) are not
supported by the trainer yet.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from gnnmegatron.training import checkpoint as ckpt
from gnnmegatron.training.baselines import composition_energy, fit_reference_energies
from gnnmegatron.training.config import ConfigError, PretrainConfig
from gnnmegatron.training.distributed import (
    TrainGroups,
    clip_grad_norm,
    dp_allreduce_grads,
    optimizer_file,
    split_params,
)
from gnnmegatron.training.logging import MetricsWriter, Progress, plot_loss_curve
from gnnmegatron.training.losses import ErrorAccumulator, compute_loss
from gnnmegatron.training.optim import build_optimizer, consolidate, lr_at, release_consolidated, set_lr


def init_distributed() -> tuple[int, int]:
    """Initialises torch.distributed when launched by torchrun; returns (rank, world_size).

    A process group initialised by the caller (e.g. ``run_distributed`` in tests) is used as is.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # one GPU per local rank, before any collective touches a device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Activation checkpointing: each message-passing block recomputes its forward in the backward.

    Wraps every block's ``forward`` (instance attribute, so module names and state-dict keys are
    unchanged) in ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (megatron-core's
    ``tensor_parallel.checkpoint`` needs CUDA). Works on single-device and ``parallelize``d models;
    the TP collectives of a block run again during recomputation, on every TP rank alike.
    Returns the number of blocks wrapped.
    """
    from torch.utils.checkpoint import checkpoint

    from gnnmegatron.models.egnn import named_blocks

    blocks = [block for _, block in named_blocks(model)]
    for block in blocks:
        if getattr(block, "_activation_checkpointed", False):
            continue
        forward = block.forward

        @functools.wraps(forward)
        def wrapped(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped
        block._activation_checkpointed = True
    return len(blocks)


def ensure_store(cfg: PretrainConfig, rank: int) -> Path:
    """Returns the store path, generating the embedded EMT dataset there first if asked and missing."""
    path = Path(cfg.data.store)
    if not path.exists():
        if cfg.data.emt is None:
            raise FileNotFoundError(
                f"data store {path} does not exist; create it with `gnnmegatron data emt --out {path}` "
                f"or `gnnmegatron data import FILES --out {path}`, or set data.emt in the config"
            )
        if rank == 0:
            from gnnmegatron.data.emt import EMTConfig, generate_emt_dataset

            print(f"generating the embedded EMT dataset at {path} ({cfg.data.emt})", flush=True)
            generate_emt_dataset(path, EMTConfig(**cfg.data.emt), progress=True)
    if dist.is_initialized():
        dist.barrier()
    return path


class Trainer:
    """Single-model pretraining driver.

    Args:
        cfg: the validated job config.
        resume: ``"auto"`` continues from ``<run_dir>/checkpoints/latest`` when present,
            ``"never"`` starts fresh (refusing to overwrite an existing run's checkpoints),
            or a path to a checkpoint file.
    """

    def __init__(self, cfg: PretrainConfig, resume: str = "auto"):
        from gnnmegatron.data.sampler import ChunkAwareSampler, GraphLoader
        from gnnmegatron.data.store import GraphStore, split_indices
        from gnnmegatron.models import AtomisticModel

        self.cfg = cfg
        self.rank, self.world = init_distributed()
        layout = cfg.parallel.resolve(self.world)
        if layout.pp != 1:
            raise ConfigError(f"pretrain supports tensor and data parallelism only in this release "
                              f"(pp={layout.pp}); set parallel.pp to 1")
        self.model_cfg = cfg.model_config()
        if layout.tp > 1 and self.model_cfg.message != "node_split":
            raise ConfigError(f"parallel.tp={layout.tp} needs model.message='node_split' (the TP-native EGNN whose "
                              f"collectives are node-sized), got message={self.model_cfg.message!r}")
        if layout.tp > 1 and self.model_cfg.hidden % layout.tp:
            raise ConfigError(f"model hidden={self.model_cfg.hidden} is not divisible by parallel.tp={layout.tp}")
        self.groups = TrainGroups.build(layout.tp, layout.dp, self.rank)
        self.dp, self.tp = layout.dp, layout.tp
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        # bfloat16: float32 master weights and data, bf16 autocast around the model's forward.
        self.autocast_dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else None
        self.dtype = torch.float32 if self.autocast_dtype is not None else getattr(torch, cfg.train.dtype)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        store_path = ensure_store(cfg, self.rank)
        self.store = GraphStore(store_path)
        splits = split_indices(len(self.store), cfg.data.splits, seed=cfg.data.split_seed)
        splits["train"] = nested_subset(splits["train"], cfg.data.train_fraction, cfg.data.split_seed)
        self.splits = splits
        val_idx = splits["val"]
        if cfg.data.max_val_graphs:
            val_idx = val_idx[: cfg.data.max_val_graphs]
        self.train_sampler = ChunkAwareSampler(
            self.store.atom_counts, self.store.graph_chunks, splits["train"], seed=cfg.seed, shuffle=True,
            budget_atoms=cfg.data.budget_atoms, max_graphs=cfg.data.max_graphs,
            dp_rank=self.groups.dp_rank, dp_size=self.dp)
        if len(self.train_sampler) == 0:
            raise ConfigError(f"the training split gives no batch per rank (train graphs={len(splits['train'])}, "
                              f"dp={self.dp}, budget_atoms={cfg.data.budget_atoms}); use more data or fewer ranks")
        self.val_sampler = ChunkAwareSampler(
            self.store.atom_counts, self.store.graph_chunks, val_idx, seed=cfg.seed, shuffle=False,
            budget_atoms=cfg.data.val_budget_atoms, max_graphs=cfg.data.max_graphs)
        self.train_loader = GraphLoader(self.store, self.train_sampler, cutoff=cfg.data.cutoff, dtype=self.dtype,
                                        prefetch=cfg.data.prefetch)
        self.val_loader = GraphLoader(self.store, self.val_sampler, cutoff=cfg.data.cutoff, dtype=self.dtype,
                                      prefetch=cfg.data.prefetch)

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = AtomisticModel(self.model_cfg).to(device=self.device, dtype=self.dtype)
        reference, self.stats = fit_reference_energies(self.store, splits["train"], self.model_cfg.max_z,
                                                       max_graphs=cfg.data.stats_graphs)
        unknown = sorted(set(self.store.metadata.get("elements", [])) - set(self.stats["elements"]))
        if unknown:
            print(f"warning: elements {unknown} occur in the store but not in the sampled training graphs")
        self.reference = reference
        self.model.set_reference_energies(reference.to(self.dtype))
        self.model.set_normalization(self.stats["force_rms"], 0.0)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.num_params_non_embedding = sum(p.numel() for n, p in self.model.named_parameters()
                                            if not n.startswith("embedding"))
        self.step = 0
        self.epoch = 0
        self.seen = {"atoms": 0, "edges": 0, "graphs": 0, "flops": 0.0}
        self.best_val: dict[str, float] | None = None

        resume_path = self._resume_path(resume)
        state = self._load_model(resume_path) if resume_path is not None else None
        if state is None and cfg.train.init_from:
            self._init_weights(Path(cfg.train.init_from))
        if self.tp > 1:
            from gnnmegatron.parallel import parallelize

            parallelize(self.model, self.groups.layout)
        if cfg.train.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.sharded_params, self.replicated_params = split_params(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim, dp_group=self.groups.dp_group if self.dp > 1 else None)
        if state is not None:
            self._load_rest(resume_path, state)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl",
                                     resume_step=self.step if resume_path is not None else None) \
            if self.rank == 0 else None
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # ----------------------------------------------------------------------------------- state
    def _resume_path(self, resume: str) -> Path | None:
        if resume == "never":
            if ckpt.find_latest(self.run_dir) is not None:
                raise ckpt.CheckpointError(f"{self.run_dir} already holds checkpoints; resume it (--resume auto) "
                                           f"or choose another run_dir")
            return None
        if resume == "auto":
            return ckpt.find_latest(self.run_dir)
        return Path(resume)

    def _state(self, model_state: dict | None = None, optimizer_state: dict | None = None) -> dict[str, Any]:
        """Checkpoint content; under TP the caller passes the gathered model state (optimizer: None)."""
        return {
            "model": self.model.state_dict() if model_state is None else model_state,
            "optimizer": self.optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "model_config": self.model_cfg.to_dict(),
            "config": self.cfg.to_dict(),
            "sampler": self.train_loader.state_dict(),
            "epoch": self.epoch,
            "seen": self.seen,
            "rng": ckpt.rng_state(),
            "best_val": self.best_val,
            "stats": self.stats,
            "world_size": self.world,
            "layout": self.groups.describe(),
        }

    def _load_model(self, path: Path) -> dict[str, Any]:
        """Reads a checkpoint, checks model and layout, loads the single-device weights (before parallelize)."""
        state = ckpt.load_checkpoint(path)
        ckpt.check_model_compatible(path, state["model_config"], self.model_cfg.to_dict())
        saved = state.get("layout") or {"tp": 1, "pp": 1, "dp": int(state.get("world_size", 1))}
        here = self.groups.describe()
        if saved != here:
            def fmt(d):
                return f"tp={d['tp']}, pp={d['pp']}, dp={d['dp']}"

            raise ckpt.CheckpointError(
                f"{path} was written under the layout {fmt(saved)} but this run has {fmt(here)}; resume with the "
                f"same layout (optimizer shards and the sampler position depend on it). Its model weights are "
                f"single-device and load under any layout: start a new run_dir with train.init_from={path} to "
                f"continue from them (weights only) under another layout")
        ckpt.load_model_state(self.model, state["model"], path)
        return state

    def _init_weights(self, path: Path) -> None:
        """``train.init_from``: model weights only (any layout wrote them), step 0, fresh optimizer."""
        state = ckpt.load_checkpoint(path)
        ckpt.check_model_compatible(path, state["model_config"], self.model_cfg.to_dict())
        ckpt.load_model_state(self.model, state["model"], path)
        if self.rank == 0:
            saved = state.get("layout") or {"tp": 1, "pp": 1, "dp": int(state.get("world_size", 1))}
            print(f"initialised the model weights from {path} (step {state.get('step')}, layout {saved}); "
                  f"optimizer, sampler and step start fresh", flush=True)

    def _load_rest(self, path: Path, state: dict[str, Any]) -> None:
        """Optimizer, sampler, counters and RNG of a checkpoint read by ``_load_model``."""
        if self.tp > 1:
            opt_path = optimizer_file(path, self.groups.tp_rank, self.tp)
            if not opt_path.exists():
                raise ckpt.CheckpointError(f"{path} lacks its optimizer file {opt_path.name} (tp rank "
                                           f"{self.groups.tp_rank}); the checkpoint is incomplete")
            self.optimizer.load_state_dict(torch.load(opt_path, map_location="cpu", weights_only=False))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.train_loader.load_state_dict(state["sampler"])
        self.epoch = state["epoch"]
        if self.train_sampler.batches_done >= len(self.train_sampler):
            # Saved right after an epoch's last batch: the uninterrupted run moves to the next epoch
            # here (the sampler alone would replay the finished epoch).
            self.epoch += 1
            self.train_sampler.set_epoch(self.epoch)
        self.step = state["step"]
        self.seen = dict(state["seen"])
        self.best_val = state.get("best_val")
        ckpt.set_rng_state(state["rng"])
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self) -> Path | None:
        """Writes a checkpoint and its model card (rank 0).

        Under TP (collective: every rank calls it) the model state is gathered to the single-device
        one and each TP rank of data-parallel replica 0 writes its optimizer state beside it first.
        Under ZeRO-1 (collective too) the shards are first consolidated on data-parallel replica 0,
        so the files hold the full optimizer state whatever dp wrote them.
        """
        consolidate(self.optimizer)  # ZeRO-1: the full optimizer state on DP rank 0 (collective)
        try:
            return self._save()
        finally:
            release_consolidated(self.optimizer)  # DP rank 0 drops its full copy again

    def _save(self) -> Path | None:
        from gnnmegatron.training.model_card import write_model_card

        if self.tp > 1:
            from gnnmegatron.parallel import gather_state_dict

            model_state = gather_state_dict(self.model)
            main = self.run_dir / "checkpoints" / f"step_{self.step:08d}.pt"
            if self.groups.dp_rank == 0:
                ckpt.atomic_save(self.optimizer.state_dict(), optimizer_file(main, self.groups.tp_rank, self.tp))
            dist.barrier()
            if self.rank != 0:
                return None
            state = self._state(model_state, optimizer_state={}) | {"optimizer": None}
        else:
            if self.rank != 0:
                return None
            state = self._state()
        path = ckpt.save_checkpoint(self.run_dir, self.step, state, keep=self.cfg.train.keep_checkpoints)
        write_model_card(path, {**state, "step": self.step})
        return path

    # ----------------------------------------------------------------------------------- steps
    def _batches(self):
        """Endless iterator over training batches, advancing the epoch at each end."""
        while True:
            for batch in self.train_loader:
                yield batch
            self.epoch += 1
            self.train_sampler.set_epoch(self.epoch)

    def _autocast(self):
        """bf16 autocast for ``train.dtype=bfloat16``; a no-op context otherwise."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _to_float(self, out: dict) -> dict:
        """Model outputs in the data dtype (losses and metrics in float32 under bf16 autocast)."""
        if self.autocast_dtype is None:
            return out
        return {k: (v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}

    def _allreduce_grads(self) -> None:
        dp_allreduce_grads(self.model.parameters(), self.groups)

    def train_step(self, batch: dict) -> tuple[float, dict[str, float]]:
        self.model.train()
        set_lr(self.optimizer, lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps))
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.model(batch, compute_forces=True,
                             compute_stress=self.cfg.loss.stress_weight > 0 and self.model_cfg.force_mode == "conservative")
        out = self._to_float(out)
        loss, parts = compute_loss(out, batch, self.cfg.loss)
        loss.backward()
        self._allreduce_grads()
        grad_norm = float("nan")
        if self.cfg.optim.clip_grad_norm:
            if self.tp == 1:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                 self.cfg.optim.clip_grad_norm))
            else:
                grad_norm = clip_grad_norm(self.sharded_params, self.replicated_params,
                                           self.cfg.optim.clip_grad_norm, self.groups)
        self.optimizer.step()
        self.step += 1
        self._count(batch)
        # Logged loss: the mean over the data-parallel replicas (the loss of the global batch).
        values = torch.stack([loss.detach()] + [v.detach() for v in parts.values()]).to(torch.float64)
        if self.dp > 1:
            self.groups.dp_all_reduce(values).div_(self.dp)
        values = values.tolist()
        return values[0], dict(zip(parts.keys(), values[1:])) | {"grad_norm": grad_norm}

    def _count(self, batch: dict) -> None:
        """Adds this step's global atoms, edges, graphs and analytic training FLOPs to ``seen``."""
        from gnnmegatron.models.presets import flops_per_step

        local = torch.tensor([float(batch["num_atoms"].sum()), float(batch["edge_index"].shape[1]),
                              float(batch["num_atoms"].numel())], dtype=torch.float64)
        self.groups.dp_all_reduce(local)
        atoms, edges, graphs = (int(v) for v in local.tolist())
        self.seen["atoms"] += atoms
        self.seen["edges"] += edges
        self.seen["graphs"] += graphs
        self.seen["flops"] += flops_per_step(self.model_cfg, atoms, edges)

    def evaluate(self) -> dict[str, float]:
        """Energy MAE per atom and force MAE on the validation split, with the two baselines."""
        self.model.eval()
        acc = ErrorAccumulator()
        for k, batch in enumerate(self.val_loader):
            if k % self.dp != self.groups.dp_rank:  # the TP ranks of a replica run the same batches
                continue
            batch = {key: (v.to(self.device) if torch.is_tensor(v) else v) for key, v in batch.items()}
            # Conservative forces are -dE/dx, so evaluation needs autograd (but no second-order graph).
            grad_mode = torch.enable_grad() if self.model_cfg.force_mode == "conservative" else torch.no_grad()
            with grad_mode, self._autocast():
                out = self._to_float(self.model(batch, compute_forces=True))
            base = composition_energy(self.reference, batch["atomic_numbers"], batch["batch"],
                                      int(batch["num_atoms"].numel()))
            acc.update(out, batch, base)
        if self.dp > 1:
            sums = acc.state()
            self.groups.dp_all_reduce(sums)
            acc.load(sums)
        result = acc.result()
        # One number to compare runs by (scaling fits): the loss weights applied to the two MAEs.
        result["loss"] = (self.cfg.loss.energy_weight * result["energy_mae_per_atom"]
                          + self.cfg.loss.force_weight * result["force_mae"])
        return result

    def fit(self, stop_at: int | None = None) -> dict[str, Any] | None:
        """Trains to ``train.max_steps``; returns the final report.

        ``stop_at`` ends the job early after that step with a checkpoint (for jobs with a wall-clock
        allotment and for testing resume); it returns None then.
        """
        cfg = self.cfg.train
        progress = Progress(cfg.max_steps, initial=self.step, enabled=cfg.progress and self.rank == 0)
        batches = self._batches()
        t_start = time.perf_counter()
        window = {"loss": 0.0, "atoms": 0, "steps": 0, "t": time.perf_counter()}
        last_val = None
        while self.step < cfg.max_steps:
            batch = next(batches)
            batch = {key: (v.to(self.device) if torch.is_tensor(v) else v) for key, v in batch.items()}
            loss, parts = self.train_step(batch)
            if not np.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {self.step}; lower optim.lr or "
                                         f"check the data (last checkpoint is kept in {self.run_dir}/checkpoints)")
            atoms = int(batch["num_atoms"].sum()) * self.dp
            rate = progress.update(atoms, loss)
            window["loss"] += loss
            window["atoms"] += atoms
            window["steps"] += 1
            if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                now = time.perf_counter()
                self.metrics.write({
                    "step": self.step, "split": "train", "epoch": self.epoch, "loss": loss,
                    "loss_mean": window["loss"] / window["steps"], **{f"loss_{k}": v for k, v in parts.items()},
                    "lr": self.optimizer.param_groups[0]["lr"], "atoms_per_s": rate,
                    "window_atoms_per_s": window["atoms"] / max(now - window["t"], 1e-9),
                })
                window = {"loss": 0.0, "atoms": 0, "steps": 0, "t": now}
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                last_val = self.evaluate()
                if self.best_val is None or last_val["energy_mae_per_atom"] < self.best_val["energy_mae_per_atom"]:
                    self.best_val = dict(last_val, step=self.step)
                if self.rank == 0:
                    self.metrics.write({"step": self.step, "split": "val", **last_val})
                    progress.write(
                        f"step {self.step}: val energy MAE {1000 * last_val['energy_mae_per_atom']:.2f} meV/atom "
                        f"(composition fit {1000 * last_val['baseline_energy_mae_per_atom']:.2f}), force MAE "
                        f"{1000 * last_val['force_mae']:.1f} meV/Å (zero forces {1000 * last_val['baseline_force_mae']:.1f})")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps or self.step == stop_at:
                self.save()
            if self.step == stop_at:
                progress.close()
                return None
        progress.close()
        if last_val is None:
            last_val = self.evaluate()
        report = self._report(last_val, time.perf_counter() - t_start)
        if dist.is_initialized():
            dist.barrier()
        return report

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
        }
        if self.rank == 0:
            (self.run_dir / "report.json").write_text(json.dumps(report, indent=2))
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png",
                            title=f"{self.cfg.model['preset']} on {self.cfg.data.store}")
        return report


def nested_subset(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The first ``ceil(fraction * n)`` of a fixed permutation of ``indices`` (sorted): nested in ``fraction``."""
    if fraction >= 1:
        return indices
    order = np.random.default_rng([seed, 7919]).permutation(len(indices))
    keep = order[: int(np.ceil(fraction * len(indices)))]
    return np.sort(np.asarray(indices)[keep])


def format_report(report: dict[str, Any], run_dir: str | Path) -> str:
    """The human-readable summary printed at the end of pretraining."""
    v = report["val"]
    e_ratio, f_ratio = report["energy_mae_ratio_vs_composition"], report["force_mae_ratio_vs_zero"]
    lines = [
        f"validation ({int(v['graphs'])} graphs, {int(v['atoms'])} atoms) after {report['step']} steps "
        f"({report['train_seconds'] / 60:.1f} min), {report['preset']} with {report['parameters']:,} parameters",
        f"  {'':28s}{'model':>12s}{'baseline':>12s}{'ratio':>8s}",
        f"  {'energy MAE (meV/atom)':28s}{1000 * v['energy_mae_per_atom']:12.2f}"
        f"{1000 * v['baseline_energy_mae_per_atom']:12.2f}{e_ratio:8.3f}   baseline: composition-only linear fit",
        f"  {'force MAE (meV/Å)':28s}{1000 * v['force_mae']:12.1f}{1000 * v['baseline_force_mae']:12.1f}"
        f"{f_ratio:8.3f}   baseline: zero forces",
        f"  target ratio <= 0.5: energy {'met' if e_ratio <= 0.5 else 'NOT met'}, forces {'met' if f_ratio <= 0.5 else 'NOT met'}",
        f"  wrote {Path(run_dir) / 'checkpoints'}, {Path(run_dir) / 'metrics.jsonl'}, "
        f"{Path(run_dir) / 'loss_curve.png'}, {Path(run_dir) / 'report.json'}",
    ]
    return "\n".join(lines)
