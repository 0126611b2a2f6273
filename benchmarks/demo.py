"""Times the README's `make demo` end to end on a fresh clone and records its validation report.

    python benchmarks/demo.py [--machine cpu2]

Clones this repository (its committed HEAD) into a temporary folder, runs `make demo` there
(virtual environment, install, EMT dataset, import of the oxides DFT set when
``../shared/data/oxides.db`` exists beside this repository, two-source pretraining, report) and
writes results/demo-<machine>.json/.csv/.png with the wall time of each phase read from the log,
the validation errors overall and per source and their ratios to the baselines (composition-only
linear fit of that source, zero forces). ``meets_targets`` is the demo's original target (overall
ratios <= 0.5, under 15 minutes in all on a 2-core CPU); ``meets_ratio_0.5_per_source`` says the
same of each source's own ratios.

    python benchmarks/demo.py --ema 0.99 [--ema-run runs/demo-ema]

measures whether the moving average of the weights helps the demo, without a fresh clone: trains
the demo's config in this checkout with ``train.ema_decay`` (all checkpoints kept; or takes the
finished run ``--ema-run``) and evaluates every checkpoint on the validation split with the
averaged and with the trained weights (``gnnmegatron evaluate``: the same numbers the trainer
logs). EMA never feeds back into training, so the two columns come from one trajectory. Writes
results/demo_ema-<machine>.json/.csv/.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import write_results

REPO = Path(__file__).resolve().parents[1]


def _source_summary(s: dict) -> dict:
    """Per-source validation numbers of the demo's report (meV/atom, meV/Å) and their baseline ratios."""
    v = s.get("val") or {}
    return {
        "store": s["store"], "sampling_probability": s["probability"], "train_graphs": s["graphs"]["train"],
        "val_graphs": s["graphs"]["val"], "elements": s.get("elements"),
        "energy_mae_mev_per_atom": 1000 * v["energy_mae_per_atom"],
        "baseline_energy_mae_mev_per_atom": 1000 * v["baseline_energy_mae_per_atom"],
        "force_mae_mev_per_a": 1000 * v["force_mae"],
        "baseline_force_mae_mev_per_a": 1000 * v["baseline_force_mae"],
        "energy_mae_ratio_vs_composition": s.get("energy_mae_ratio_vs_composition"),
        "force_mae_ratio_vs_zero": s.get("force_mae_ratio_vs_zero"),
    }


def _flat(record: dict) -> dict:
    """A validation record with its per-source metrics flattened (CSV rows)."""
    row = {k: v for k, v in record.items() if k != "sources"}
    for name, m in (record.get("sources") or {}).items():
        row.update({f"{name}_{k}": v for k, v in m.items()})
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default="cpu2")
    parser.add_argument("--keep", action="store_true", help="keep the clone")
    parser.add_argument("--ema", type=float, default=None, help="only compare averaged and trained weights (see above)")
    parser.add_argument("--ema-run", default=None, help="with --ema: a finished run to evaluate instead of training")
    parser.add_argument("--compare", action="store_true",
                        help="after make demo, also train on the oxides source alone (configs/oxides.yaml, same "
                             "validation split) in the clone, for the per-source comparison")
    args = parser.parse_args(argv)
    if args.ema is not None:
        return ema_comparison(args)

    workdir = Path(tempfile.mkdtemp(prefix="gnnmegatron-demo-"))
    clone = workdir / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    log = workdir / "demo.log"
    oxides = (REPO.parent / "shared" / "data" / "oxides.db").resolve()
    make = ["make", "demo"] + ([f"OXIDES_DB={oxides}"] if oxides.is_file() else [])
    with open(log, "w") as fh:
        proc = subprocess.run(make, cwd=clone, stdout=fh, stderr=subprocess.STDOUT)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"make demo failed ({proc.returncode}); log: {log}")
    report = json.loads((clone / "runs" / "demo" / "report.json").read_text())
    from common import RESULTS

    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(clone / "runs" / "demo" / "loss_curve.png", RESULTS / f"demo-{args.machine}-loss_curve.png")
    val = report["val"]
    summary = {
        "make_demo_seconds": round(total, 1),
        "train_seconds": round(report["train_seconds"], 1),
        "setup_and_data_seconds": round(total - report["train_seconds"], 1),
        "energy_mae_mev_per_atom": 1000 * val["energy_mae_per_atom"],
        "baseline_energy_mae_mev_per_atom": 1000 * val["baseline_energy_mae_per_atom"],
        "force_mae_mev_per_a": 1000 * val["force_mae"],
        "baseline_force_mae_mev_per_a": 1000 * val["baseline_force_mae"],
        "energy_mae_ratio_vs_composition": report["energy_mae_ratio_vs_composition"],
        "force_mae_ratio_vs_zero": report["force_mae_ratio_vs_zero"],
        "steps": report["step"],
        "parameters": report["parameters"],
        "make_command": " ".join(make),
        "sources": {s["name"]: _source_summary(s) for s in report.get("sources") or []},
        "load_average_1min_at_start": load_before,
        "meets_targets": bool(total < 900 and report["energy_mae_ratio_vs_composition"] <= 0.5
                              and report["force_mae_ratio_vs_zero"] <= 0.5),
        "meets_ratio_0.5_per_source": {
            s["name"]: {"energy": bool(s.get("energy_mae_ratio_vs_composition") is not None
                                       and s["energy_mae_ratio_vs_composition"] <= 0.5),
                        "forces": bool(s.get("force_mae_ratio_vs_zero") is not None
                                       and s["force_mae_ratio_vs_zero"] <= 0.5)}
            for s in report.get("sources") or []},
    }
    metrics = [json.loads(line) for line in (clone / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in metrics if r.get("split") == "val"]
    rows = [_flat(r) for r in vals]

    def plot(plt):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        steps = [r["step"] for r in vals]
        ax.plot(steps, [r["energy_mae_per_atom"] / r["baseline_energy_mae_per_atom"] for r in vals], "o-",
                color="black", label="all: energy MAE / composition fit")
        ax.plot(steps, [r["force_mae"] / r["baseline_force_mae"] for r in vals], "s-", color="gray",
                label="all: force MAE / zero forces")
        for name in (vals[-1].get("sources") or {}):
            per = [r["sources"][name] for r in vals]
            line, = ax.plot(steps, [p["energy_mae_per_atom"] / p["baseline_energy_mae_per_atom"] for p in per], "o--",
                            ms=3, label=f"{name}: energy / its composition fit")
            ax.plot(steps, [p["force_mae"] / max(p["baseline_force_mae"], 1e-12) for p in per], "s:", ms=3,
                    color=line.get_color(), label=f"{name}: force / zero forces")
        ax.axhline(0.5, color="gray", ls="--", lw=0.8, label="target 0.5")
        ax.set(xlabel="step", ylabel="ratio to baseline", yscale="log",
               title=f"make demo: {total / 60:.1f} min in all")
        ax.legend()
        return fig

    if args.compare and "oxides" in summary["sources"]:
        t1 = time.perf_counter()
        cmd = [str(clone / ".venv" / "bin" / "python"), "-m", "gnnmegatron.cli", "pretrain", "--config",
               "gnnmegatron/configs/oxides.yaml", "--set", "train.progress=false"]
        with open(workdir / "oxides.log", "w") as fh:
            subprocess.run(cmd, cwd=clone, stdout=fh, stderr=subprocess.STDOUT, check=True)
        alone = json.loads((clone / "runs" / "oxides" / "report.json").read_text())
        v = alone["val"]
        summary["oxides_alone"] = {
            "command": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t1, 1), "steps": alone["step"],
            "val_graphs": int(v["graphs"]), "energy_mae_mev_per_atom": 1000 * v["energy_mae_per_atom"],
            "baseline_energy_mae_mev_per_atom": 1000 * v["baseline_energy_mae_per_atom"],
            "force_mae_mev_per_a": 1000 * v["force_mae"], "baseline_force_mae_mev_per_a": 1000 * v["baseline_force_mae"],
            "energy_mae_ratio_vs_composition": alone["energy_mae_ratio_vs_composition"],
            "force_mae_ratio_vs_zero": alone["force_mae_ratio_vs_zero"],
        }
    out = write_results("demo", args.machine, rows, summary, plot)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return summary


def ema_comparison(args) -> dict:
    """The demo's validation errors with the averaged and the trained weights at every checkpoint."""
    import sys

    from gnnmegatron.inference import evaluate_checkpoint
    from gnnmegatron.training import sharded_checkpoint as sc

    config = "gnnmegatron/configs/demo_sources.yaml" if (REPO.parent / "shared" / "data" / "oxides.db").is_file() \
        else "gnnmegatron/configs/demo_sources_embedded.yaml"
    run = Path(args.ema_run).resolve() if args.ema_run else REPO / "runs" / "demo-ema"
    os.chdir(REPO)  # the config's store paths are relative to the repository
    cmd = [sys.executable, "-m", "gnnmegatron.cli", "pretrain", "--config", config, "--set", f"run_dir={run}",
           "--set", f"train.ema_decay={args.ema}", "--set", "train.keep_checkpoints=100", "--set",
           "train.progress=false", "--resume", "overwrite"]
    if not args.ema_run:
        subprocess.run(cmd, cwd=REPO, check=True)
    rows = []
    for step, path in sc.complete_checkpoints(run):
        for weights in ("ema", "raw"):
            r = evaluate_checkpoint(path, weights=weights, out=None)
            row = {"step": step, "weights": weights, "energy_mae_mev_per_atom": 1000 * r["energy_mae_per_atom"],
                   "force_mae_mev_per_a": 1000 * r["force_mae"]}
            for name, m in (r.get("sources") or {}).items():
                row[f"{name}_energy_mae_mev_per_atom"] = 1000 * m["energy_mae_per_atom"]
                row[f"{name}_force_mae_mev_per_a"] = 1000 * m["force_mae"]
            rows.append(row)
    last = max(r["step"] for r in rows)
    final = {w: next(r for r in rows if r["step"] == last and r["weights"] == w) for w in ("ema", "raw")}
    keys = [k for k in final["ema"] if k.endswith(("mev_per_atom", "mev_per_a"))]
    trained = " ".join(cmd[1:]) if not args.ema_run else (
        f"not trained here (--ema-run): {run / 'config.yaml'} holds the run's settings")
    summary = {"ema_decay": args.ema, "config": config, "run": str(run), "train_command": trained,
               "final_step": last, "final_ema": {k: final["ema"][k] for k in keys},
               "final_raw": {k: final["raw"][k] for k in keys},
               "final_ema_over_raw": {k: final["ema"][k] / final["raw"][k] for k in keys},
               "ema_better_at_the_end": {k: bool(final["ema"][k] < final["raw"][k]) for k in keys}}

    def plot(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, unit in ((axes[0], "mev_per_atom"), (axes[1], "mev_per_a")):
            for k in [k for k in keys if k.endswith(unit)]:
                for w, style in (("ema", "o-"), ("raw", "s--")):
                    pts = [(r["step"], r[k]) for r in rows if r["weights"] == w]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=f"{k} ({w})")
            ax.set(xlabel="step", ylabel="validation MAE (meV/atom)" if unit == "mev_per_atom" else
                   "validation MAE (meV/Å)", yscale="log")
            ax.legend(fontsize=6)
        fig.suptitle(f"demo: averaged (EMA {args.ema}) vs trained weights, same run")
        fig.tight_layout()
        return fig

    out = write_results("demo_ema", args.machine, rows, summary, plot)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
