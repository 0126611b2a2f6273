"""Accuracy cost of grouped message mixing: the TP-native EGNN with and without ``message_groups``.

    python benchmarks/message_groups.py [--machine cpu2] [--steps 600] [--groups 1,8]

Trains the demo's model (``egnn-small``: hidden 64, 3 blocks, conservative forces) in its
``message="node_split"`` form on the embedded EMT dataset (the demo's store, generated on first
use), once with the dense node MLP (``groups`` 1 in the table: ``message_groups=None``) and once
per requested group count, with the demo's optimiser, loss and batch size, the same seed, data
order and number of steps. Reports parameters, validation energy MAE (meV/atom) and force MAE
(meV/Å) at the end and the wall time. Under tensor parallelism the grouped block needs one N x H
all-reduce per direction instead of the dense block's two forward plus an all-reduce and an
all-gather backward (``benchmarks/tensor_parallel.py``); this measures what it costs in accuracy at
equal steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import write_results

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default="cpu2")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--groups", default="1,8", help="comma-separated group counts (1 = dense node MLP)")
    parser.add_argument("--run-root", default=str(ROOT / "runs" / "message_groups"))
    args = parser.parse_args(argv)

    from gnnmegatron.training.config import load_config
    from gnnmegatron.training.trainer import Trainer

    rows = []
    t_start = time.perf_counter()
    for g in [int(x) for x in args.groups.split(",") if x]:
        run_dir = Path(args.run_root) / f"groups{g}"
        cfg = load_config(ROOT / "gnnmegatron" / "configs" / "demo.yaml", [
            f"run_dir={run_dir}", f"data.store={ROOT / 'data' / 'emt-demo.zarr'}", "model.message=node_split",
            f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}",
        ] + ([f"model.message_groups={g}"] if g > 1 else []))
        t0 = time.perf_counter()
        report = Trainer(cfg, resume="never").fit()
        wall = time.perf_counter() - t0
        val = report["val"]
        row = {"message_groups": g if g > 1 else None, "params": report["parameters"],
               "steps": report["step"], "val_energy_mae_mev_per_atom": 1000 * val["energy_mae_per_atom"],
               "val_force_mae_mev_per_angstrom": 1000 * val["force_mae"],
               "energy_ratio_vs_composition": report["energy_mae_ratio_vs_composition"],
               "force_ratio_vs_zero": report["force_mae_ratio_vs_zero"], "wall_s": wall}
        rows.append(row)
        print(row, flush=True)
    dense = next((r for r in rows if r["message_groups"] is None), None)
    summary = {"steps": args.steps, "base": "gnnmegatron/configs/demo.yaml with model.message=node_split",
               "wall_s": time.perf_counter() - t_start}
    if dense:
        for r in rows:
            if r["message_groups"]:
                g = r["message_groups"]
                summary[f"energy_mae_ratio_groups{g}_vs_dense"] = (r["val_energy_mae_mev_per_atom"]
                                                                   / dense["val_energy_mae_mev_per_atom"])
                summary[f"force_mae_ratio_groups{g}_vs_dense"] = (r["val_force_mae_mev_per_angstrom"]
                                                                  / dense["val_force_mae_mev_per_angstrom"])
    write_results("message_groups", args.machine, rows, summary, None)
    print(summary)
    return summary


if __name__ == "__main__":
    main()
