"""Metrics as JSON lines, the loss-curve PNG and the progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsWriter:
    """Appends one JSON object per line to ``<run_dir>/metrics.jsonl``.

    On resume the file is truncated to the records of steps <= the resumed step, so a
    resumed run's metrics read as if it had never stopped.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


class TensorBoardWriter:
    """The trainer's scalars as TensorBoard events in ``<run_dir>/tensorboard`` (``train.tensorboard``).

    Training records go under ``train/`` (loss and its parts, learning rate, gradient norm, atoms/s,
    memory), validation under ``val/`` and ``val/<source>/`` (multi-source runs): every numeric field
    of the record ``metrics.jsonl`` gets, so the two never disagree. On resume, events after the
    resumed step are dropped (``purge_step``), as ``MetricsWriter`` drops their lines.
    """

    SKIP = ("step", "split", "epoch", "labelled")

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        step, split = int(record["step"]), record.get("split", "train")
        for key, value in record.items():
            if key == "sources" and isinstance(value, dict):
                for name, sub in value.items():
                    for k, v in sub.items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            self.writer.add_scalar(f"{split}/{name}/{k}", v, step)
            elif key not in self.SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def memory_mb(device) -> float:
    """Peak memory of this process so far in MiB: device memory on CUDA, resident set size on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """Training loss and validation MAEs against step, written as a PNG.

    Multi-source runs (validation records with ``sources``) also get one line per source in the
    two validation panels (dotted: that source's baseline), beside the overall errors.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r.get("loss_mean", r["loss"]) for r in train], lw=1)
    axes[0].set(xlabel="step", ylabel="training loss (mean over each log interval)", yscale="log",
                title="training loss")
    for ax, key, base, unit, scale in (
        (axes[1], "energy_mae_per_atom", "baseline_energy_mae_per_atom", "meV/atom", 1000.0),
        (axes[2], "force_mae", "baseline_force_mae", "meV/Å", 1000.0),
    ):
        if val:
            steps = [r["step"] for r in val]
            ax.plot(steps, [scale * r[key] for r in val], "o-", color="black",
                    label="model, all sources" if val[-1].get("sources") else "model")
            ax.plot(steps, [scale * r[base] for r in val], "--", color="gray",
                    label="composition fit" if "energy" in key else "zero forces")
            names = list(val[-1].get("sources") or {})
            colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            for k, name in enumerate(names):
                rows = [r for r in val if name in (r.get("sources") or {})]
                counted = "energy_graphs" if "energy" in key else "force_components"
                rows = [r for r in rows if r["sources"][name].get(counted, 1)]
                if not rows:
                    continue
                color = colors[k % len(colors)]
                xs = [r["step"] for r in rows]
                ax.plot(xs, [scale * r["sources"][name][key] for r in rows], "s-", ms=3, lw=1, color=color,
                        label=name)
                ax.plot(xs, [scale * r["sources"][name][base] for r in rows], ":", lw=1, color=color,
                        label="dotted: each source's own baseline" if k == 0 else None)
            ax.legend(fontsize=8)
        ax.set(xlabel="step", ylabel=f"validation {unit}", yscale="log", title=key.replace("_", " "))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


class Progress:
    """A tqdm bar over optimizer steps showing loss, atoms/s and ETA (rank 0 only)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "pretrain"):
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        mininterval=1.0, file=sys.stderr, disable=not enabled)
        self.atoms = 0
        self.t0 = time.perf_counter()

    def update(self, atoms: int, loss: float) -> float:
        self.atoms += atoms
        rate = self.atoms / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"loss={loss:.4g} atoms/s={rate:,.0f}", refresh=False)
        self.bar.update(1)
        return rate

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
