"""``gnnmegatron checkpoint info`` and ``gnnmegatron checkpoint export``.

``export_checkpoint(run_or_checkpoint, "model.pt")`` reads a sharded checkpoint written under any
layout into one process (each tensor assembled from the regions its files hold) and writes the
single-file, single-device checkpoint that ``gnnmegatron.inference`` loads anywhere (format 1 of
``gnnmegatron.training.checkpoint``: model state dict, model config, data statistics, step,
counters and, for a run with ``train.ema_decay``, the moving average of the parameters as ``ema``,
which inference loads by default; no optimizer state). ``checkpoint_summary`` says what a
checkpoint holds.
"""

from __future__ import annotations

from pathlib import Path

from gnnmegatron.training import sharded_checkpoint as sc
from gnnmegatron.training.checkpoint import FORMAT_VERSION, CheckpointError, atomic_save

__all__ = ["checkpoint_summary", "export_checkpoint", "resolve_sharded"]


def resolve_sharded(path: str | Path) -> Path:
    """A sharded checkpoint directory from itself, its ``checkpoints/`` folder or its run directory."""
    path = Path(path)
    if sc.is_sharded_checkpoint(path):
        return path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory or a checkpoint directory "
                              f"(run_dir/checkpoints/step_XXXXXXXX)")
    run_dir = path.parent if path.name == "checkpoints" else path
    found, note = sc.find_resume(run_dir)
    if found is None:
        raise CheckpointError(f"{path} holds no sharded checkpoint (expected {run_dir}/checkpoints/step_XXXXXXXX)")
    if note:
        print(f"note: {note}")
    return found


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write the single-device checkpoint of ``path`` (a run or checkpoint directory) to ``out``."""
    src = resolve_sharded(path)
    state = sc.load_full_state(src, weights="both")
    state["format_version"] = FORMAT_VERSION
    state["exported_from"] = str(src)
    state.pop("sampler", None)
    out = Path(out)
    atomic_save(state, out)
    return out


def checkpoint_summary(path: str | Path, tensors: bool = False) -> str:
    """Human-readable description of a sharded checkpoint (``gnnmegatron checkpoint info``)."""
    src = resolve_sharded(path)
    info = sc.checkpoint_info(src)
    mc = info.get("model_config", {})
    lay = info.get("layout", {})
    lines = [
        f"{src}",
        f"  format {info['format']} v{info.get('version')}, step {info.get('step')}, written {info.get('created')}",
        f"  model: preset {info.get('preset')}, hidden {mc.get('hidden')}, layers {mc.get('layers')}, "
        f"message {mc.get('message')}, {mc.get('force_mode')} forces"
        + (f", sources {mc['sources']} ({mc.get('heads', 'shared')} heads)" if len(mc.get("sources") or []) > 1 else ""),
        f"  written under tp={lay.get('tp')} pp={lay.get('pp')} dp={lay.get('dp')} (world size "
        f"{info.get('world_size')}), ZeRO stage {info.get('zero_stage')}; loads under any layout",
        f"  tensors: {info['tensor_counts']} (model = weights and buffers, optim = AdamW state"
        + (", ema = moving average of the weights)" if "ema" in info["tensor_counts"] else ")"),
        f"  files: {len(info['files'])} shard files, {info['bytes'] / 2**20:.2f} MiB: "
        + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in info["files"].items())
        + f"; all {info['stored_items']} stored byte ranges present",
    ]
    if tensors:
        for key, t in sorted(info["tensors"].items()):
            lines.append(f"    {key}: {t['shape']} {t['dtype']} in {t['chunks']} chunk(s)")
    return "\n".join(lines)
