"""Where a run starts: its checkpoint to resume (any layout wrote it), the weights to initialise from, and
everything else a checkpoint restores (optimizer state, sampler position, counters, RNG, the moving
average of the weights, the validation monitor). Functions of the ``Trainer`` (gnnmegatron/training/trainer.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from gnnmegatron.training import checkpoint as ckpt
from gnnmegatron.training import sharded_checkpoint as sc
from gnnmegatron.training.ema import EMA_PREFIX
from gnnmegatron.training.train_state import apply_optimizer_state, load_full_into, model_state, optimizer_state

__all__ = ["init_weights", "load_ema", "load_model", "load_rest", "resume_path"]


def resume_path(trainer, resume: str) -> tuple[Path | None, str]:
    folder = trainer.run_dir / "checkpoints"
    if resume == "overwrite":  # deleted by clear_run once the new run is set up (a failed setup keeps them)
        return None, ""
    if resume == "never":
        if folder.is_dir() and any(folder.iterdir()):
            raise ckpt.CheckpointError(f"{trainer.run_dir} already holds checkpoints; resume it (--resume auto), "
                                       f"start over there (--resume overwrite) or choose another run_dir")
        return None, ""
    if resume == "auto":
        return sc.find_resume(trainer.run_dir)
    path = Path(resume)
    if not sc.is_sharded_checkpoint(path):
        raise ckpt.CheckpointError(f"--resume {path}: not a complete checkpoint directory (expected "
                                   f"{trainer.run_dir}/checkpoints/step_XXXXXXXX with .metadata and meta.json)")
    return path, ""


def clear_run(trainer) -> None:
    """``--resume overwrite``: deletes the run's checkpoints and metrics. The trainer calls it at the end
    of its setup, so a run that cannot start (a missing store, a config error, another model's
    ``init_from``) leaves the previous run as it was."""
    if dist.is_initialized():  # every rank has set up (one that failed never arrives): only then delete
        dist.barrier()
    if trainer.rank == 0:
        shutil.rmtree(trainer.run_dir / "checkpoints", ignore_errors=True)
        (trainer.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()


def load_model(trainer, path: Path) -> dict[str, Any]:
    """Checks the checkpoint's model and loads this rank's weights from it (any layout wrote it)."""
    info = sc.read_meta(path)
    ckpt.check_model_compatible(path, info["model_config"], trainer.model_cfg.to_dict())
    state = model_state(trainer.model)
    state["meta"] = None
    state[f"rng/rank{trainer.rank}"] = None
    sc.load_sharded(path, state, missing_ok=("rng/",))
    return state


_INIT_REMEDY = ("train.init_from takes the weights of a checkpoint of the same model; point it at one, or make "
                "the model section match it")


def init_weights(trainer, path: Path) -> None:
    """``train.init_from``: model weights only, step 0, fresh optimizer (a sharded directory, a run
    directory, or a single-file checkpoint of an earlier release)."""
    if path.is_dir() and not sc.is_sharded_checkpoint(path):
        path = sc.find_resume(path)[0] or path
    if sc.is_sharded_checkpoint(path):
        info = sc.read_meta(path)
        ckpt.check_model_compatible(path, info["model_config"], trainer.model_cfg.to_dict(), _INIT_REMEDY)
        sc.load_sharded(path, model_state(trainer.model))
        step, layout = info.get("step"), info.get("layout")
    else:
        state = ckpt.load_checkpoint(path)
        ckpt.check_model_compatible(path, state["model_config"], trainer.model_cfg.to_dict(), _INIT_REMEDY)
        load_full_into(trainer.model, state["model"], str(path))
        step, layout = state.get("step"), state.get("layout")
    if trainer.rank == 0:
        print(f"initialised the model weights from {path} (step {step}, layout {layout}); optimizer, sampler "
              f"and step start fresh", flush=True)


def load_rest(trainer, path: Path, loaded: dict[str, Any], note: str) -> None:
    """Optimizer state, sampler position, counters and RNG of the checkpoint ``load_model`` read."""
    meta = loaded["meta"]
    opt_state, pending = optimizer_state(trainer.optimizer, trainer.model, fresh=True)
    sc.load_sharded(path, opt_state, missing_ok=("optim/",))
    apply_optimizer_state(trainer.optimizer, pending, opt_state)
    saved = dict(meta["sampler"])
    here = trainer.describe_layout()
    moved = saved["dp_size"] != trainer.dp
    if moved:  # the global batch sequence does not depend on dp: continue at the same global position
        done = saved["batches_done"] * saved["dp_size"]
        saved["batches_done"] = min(done // trainer.dp, len(trainer.train_sampler))
        if done % trainer.dp and trainer.rank == 0:
            print(f"note: {done % trainer.dp} global batch(es) of epoch {saved['epoch']} are repeated: "
                  f"{done} done is not a multiple of the new dp={trainer.dp}", flush=True)
        saved["dp_size"] = trainer.dp
    saved["dp_rank"] = trainer.groups.dp_rank
    trainer.train_loader.load_state_dict(saved)
    trainer.epoch = meta["epoch"]
    if trainer.train_sampler.batches_done >= len(trainer.train_sampler):
        # Saved right after an epoch's last batch: the uninterrupted run moves to the next epoch here.
        trainer.epoch += 1
        trainer.train_sampler.set_epoch(trainer.epoch)
    trainer.step = meta["step"]
    trainer.seen = dict(meta["seen"])
    trainer.best_val = meta.get("best_val")
    trainer.skipped_steps = meta.get("skipped_steps", 0)
    trainer.monitor.load(meta.get("monitor"))
    if trainer.ema is not None:
        load_ema(trainer, path, meta)
    rng = loaded.get(f"rng/rank{trainer.rank}")
    if rng is not None:
        sc.set_rng_states(rng)
    if trainer.rank == 0:
        if note:
            print(f"note: {note}", flush=True)
        layout = meta.get("layout", {})
        how = "" if layout == here else f" (written under {layout}, resharded to {here})"
        print(f"resumed from {path} at step {trainer.step}{how}", flush=True)


def load_ema(trainer, path: Path, meta: dict[str, Any]) -> None:
    """The moving average of a checkpoint; one without (EMA newly switched on) starts it from the weights."""
    state = trainer.ema.state(trainer.model)
    expected = len(state)
    sc.load_sharded(path, state, missing_ok=(EMA_PREFIX,))
    if len(state) < expected or not meta.get("ema"):
        trainer.ema.reset(trainer.model)
        if trainer.rank == 0:
            print(f"note: {path} holds no moving average of the weights; train.ema_decay="
                  f"{trainer.cfg.train.ema_decay} starts one from its weights", flush=True)
        return
    trainer.ema.load_meta(meta["ema"])
    if meta["ema"].get("decay") != trainer.ema.decay and trainer.rank == 0:
        print(f"note: the checkpoint's average used decay {meta['ema'].get('decay')}; it continues with "
              f"train.ema_decay={trainer.ema.decay}", flush=True)
