"""Throughput scaling over ranks and model sizes, checked against the planner and the performance model.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py [--machine cpu2] [--quick]

Every configuration runs the real trainer in fresh processes through the harness
(``gnnmegatron.bench.harness.run_config``: gloo here, NCCL on GPUs), 2 warm-up and 5 measured steps,
on a generated EMT store (600 structures of at most 32 atoms, cutoff 5 Å), model ``tpegnn-small``
(hidden 256, 4 blocks, 8 message groups, fused execution, conservative forces):

* **strong scaling**: a fixed global batch of 512 atoms split over dp = 1, 2, 4 replicas; **weak
  scaling**: 256 atoms per replica at dp = 1, 2, 4. Efficiency = throughput(n) / (n x throughput(1)).
  dp = 4 runs 4 processes on 2 cores (oversubscribed; marked). The machine's own ceiling for two
  processes is measured by two independent single-process runs side by side: the data-parallel
  efficiency at 2 processes is reported against it.
* **model parallelism**: tp = 2, pp = 2 (4 micro-batches), tp = 2 x dp = 2.
* **width sweep**: the tpegnn family's block at hidden 128 to 2048 (4 blocks, 64 atoms per batch),
  one process: atoms/s, achieved FLOP/s and peak memory.
* **planner**: every configuration's measured peak resident memory per rank against
  ``estimate_memory`` for the measured atoms and edges per micro-batch (with the measured process
  baseline as the framework term).
* **performance model**: every configuration's measured step time against ``estimate_step`` with
  this machine's numbers: the device's sustained FLOP/s taken from the one-process run of the same
  model, and the gloo loopback link's alpha and beta from a ping-pong microbenchmark.
* **projection**: ``project`` for tpegnn-1b on 8 to 1024 H100-class GPUs (assumed 200 TFLOP/s
  sustained, NVLink 4 inside 8-GPU nodes, InfiniBand NDR between them, half of the gradient
  all-reduce hidden behind the backward), 8 micro-batches of 512 atoms per replica; weak scaling,
  and strong scaling of the global batch that 1024 GPUs process (524,288 atoms); tp = 8 and
  tp = 4 x pp = 2; assumptions in the JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import tempfile
from pathlib import Path

from common import write_results

from gnnmegatron.bench.harness import measure_link, run_config
from gnnmegatron.bench.memory import Layout, Workload, estimate_memory
from gnnmegatron.bench.perf import LINKS, Device, estimate_step, project
from gnnmegatron.models import get_preset

PRESET = "tpegnn-small"


def make_config(root: Path, store: Path, name: str, budget: int, hidden: int | None = None) -> Path:
    model = {"preset": PRESET, "execution": "fused"}
    if hidden:
        model.update({"hidden": hidden, "message_groups": 8})
    cfg = {"run_dir": str(root / f"run-{name}"), "seed": 0,
           "data": {"store": str(store), "cutoff": 5.0, "budget_atoms": budget, "splits": [0.9, 0.05, 0.05],
                    "prefetch": 2},
           "model": model,
           "train": {"max_steps": 1000, "eval_every": 100000, "checkpoint_every": 100000, "progress": False}}
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default="cpu2")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, warmup = (2, 1) if args.quick else (5, 2)
    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gnnmegatron-scaling-") as tmp:
        root = Path(tmp)
        from gnnmegatron.data.emt import EMTConfig, generate_emt_dataset

        store = root / "emt.zarr"
        generate_emt_dataset(store, EMTConfig(num_structures=600, seed=0, max_atoms=32), workers=1, progress=False)

        def run(name, world, budget, overrides=(), hidden=None, kind="", **extra):
            cfg = make_config(root, store, name, budget, hidden)
            r = run_config(cfg, world, overrides=list(overrides), steps=steps, warmup=warmup)
            row = {"kind": kind, "name": name, "world": world, "budget_atoms": budget, "hidden": hidden or 256,
                   "oversubscribed": world > cores, **extra, **r}
            rows.append(row)
            print(name, {k: v for k, v in r.items() if k in ("step_s_p50", "atoms_per_s", "data_wait_fraction")},
                  flush=True)
            return row

        single = run("dp1-512", 1, 512, kind="strong")
        for dp in (2, 4):
            run(f"dp{dp}-strong", dp, 512 // dp, kind="strong")
        weak1 = run("dp1-256", 1, 256, kind="weak")
        for dp in (2, 4):
            run(f"dp{dp}-weak", dp, 256, kind="weak")
        # the machine's ceiling for two processes: two independent one-process runs at once
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(run_config, make_config(root, store, f"pair{k}", 256), 1, steps=steps,
                                   warmup=warmup) for k in range(2)]
            pair = [f.result() for f in futures]
        ceiling = sum(p["atoms_per_s"] for p in pair)
        rows.append({"kind": "ceiling", "name": "two independent 1-process runs", "world": 2,
                     "atoms_per_s": ceiling, "members": [p["atoms_per_s"] for p in pair]})
        run("tp2", 2, 256, ["parallel.tp=2"], kind="model-parallel")
        run("pp2-m4", 2, 128, ["parallel.pp=2", "train.micro_batches=4"], kind="model-parallel")
        run("tp2-dp2", 4, 256, ["parallel.tp=2"], kind="model-parallel")
        widths = (128, 256, 512) if args.quick else (128, 256, 512, 1024, 2048)
        for h in widths:
            run(f"width-{h}", 1, 64, hidden=h, kind="width")

    # planner and performance model against the measurements
    link, link_rows = measure_link()
    base = next(r for r in rows if r["name"] == "dp1-256")
    device = Device("cpu", base["flops_per_s_per_rank"], 24e9, per_node=cores, intra=link, inter=link)
    for r in rows:
        if r["kind"] in ("ceiling",):
            continue
        lay = r["layout"]
        m = 4 if r["name"].startswith("pp2") else 1
        layout = Layout(tp=lay["tp"], pp=lay["pp"], dp=lay["dp"], micro_batches=m)
        cfg = get_preset(PRESET, execution="fused", **({"hidden": r["hidden"], "message_groups": 8} if r["kind"] == "width" else {}))
        atoms = r["atoms_per_step"] / (lay["dp"] * m)
        edges_per_atom = r.get("edges_per_atom") or 30.0
        w = Workload(int(round(atoms)), edges_per_atom, conservative=True)
        mem = estimate_memory(cfg, layout, w)
        r["planned_peak_bytes"] = mem.total
        r["planned_split_gib"] = mem.as_gib()
        measured = max(r["peak_bytes_per_rank"])
        r["planner_error"] = (mem.total - measured) / measured
        dev = device if r["kind"] != "width" else Device("cpu", r["flops_per_s_per_rank"], 24e9, per_node=cores,
                                                         intra=link, inter=link)
        est = estimate_step(cfg, layout, w, dev)
        r["modelled_step_s"] = est["step_s"]
        r["model_error"] = (est["step_s"] - r["step_s_p50"]) / r["step_s_p50"]
    for kind, ref in (("strong", single), ("weak", weak1)):
        for r in rows:
            if r["kind"] == kind:
                r["efficiency"] = r["atoms_per_s"] / (r["world"] * ref["atoms_per_s"])
    dp2 = next(r for r in rows if r["name"] == "dp2-weak")
    h100 = Device("H100 (assumed 200 TFLOP/s sustained)", 200e12, 80e9, per_node=8, intra=LINKS["nvlink4"],
                  inter=LINKS["ib-ndr"])
    big = get_preset("tpegnn-1b", execution="fused")
    gpus = [8, 16, 32, 64, 128, 256, 512, 1024]
    # strong scaling: the global batch that 1024 GPUs process at 8 micro-batches of 512 atoms each
    global_atoms = 512 * 8 * (1024 // 8)
    projection = {"tp8": project(big, Workload(512, 30.0), h100, gpus, tp=8, micro_batches=8, overlap=0.5,
                                 strong_global_atoms=global_atoms),
                  "tp4-pp2": project(big, Workload(512, 30.0), h100, gpus, tp=4, pp=2, micro_batches=8, overlap=0.5,
                                     strong_global_atoms=global_atoms)}
    checked = [r for r in rows if "planner_error" in r]
    summary = {
        "strong_efficiency_dp2": next(r["efficiency"] for r in rows if r["name"] == "dp2-strong"),
        "weak_efficiency_dp2": dp2["efficiency"],
        "dp2_throughput_over_two_core_ceiling": dp2["atoms_per_s"] / ceiling,
        "planner_max_abs_error": max(abs(r["planner_error"]) for r in checked),
        "model_max_abs_error_world_le_4": max(abs(r["model_error"]) for r in checked if r["kind"] != "width"),
        "data_wait_fraction_max": max(r["data_wait_fraction"] for r in checked),
        "gloo_alpha_s": link.alpha, "gloo_beta_bytes_per_s": link.beta,
        "projection_tpegnn_1b_weak_efficiency_1024": projection["tp8"][-1]["weak_efficiency"],
        "projection_tpegnn_1b_strong_efficiency_1024": projection["tp8"][-1]["strong_efficiency"],
    }

    def plot(plt):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
        ax = axes[0]
        for kind, color in (("strong", "C0"), ("weak", "C1")):
            sel = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["world"])
            ax.plot([r["world"] for r in sel], [r["atoms_per_s"] for r in sel], "o-", color=color, label=f"{kind} measured")
            ax.plot([r["world"] for r in sel], [r["world"] * sel[0]["atoms_per_s"] for r in sel], "--", color=color,
                    alpha=0.5, label=f"{kind} ideal")
        ax.axhline(ceiling, color="gray", ls=":", label="two independent runs (2-core ceiling)")
        ax.set(xlabel="processes (dp)", ylabel="atoms/s", title=f"{PRESET}, gloo, {cores} cores (4 = oversubscribed)")
        ax.legend(fontsize=7)
        ax = axes[1]
        sel = [r for r in rows if r["kind"] == "width"]
        ax.plot([r["hidden"] for r in sel], [max(r["peak_bytes_per_rank"]) / 2**30 for r in sel], "o-", label="measured peak")
        ax.plot([r["hidden"] for r in sel], [r["planned_peak_bytes"] / 2**30 for r in sel], "s--", label="planner")
        ax.set(xscale="log", xlabel="hidden (tpegnn family, 4 blocks)", ylabel="GiB per rank", title="memory against model size")
        ax.legend(fontsize=7)
        ax = axes[2]
        for name, color in (("tp8", "C0"), ("tp4-pp2", "C2")):
            pr = projection[name]
            ax.plot([p["gpus"] for p in pr], [p["weak_efficiency"] for p in pr], "o-", color=color, label=f"{name} weak")
            ax.plot([p["gpus"] for p in pr], [p["strong_efficiency"] for p in pr], "s--", color=color, label=f"{name} strong")
        ax.set(xscale="log", xlabel="GPUs", ylabel="efficiency vs 8 GPUs", ylim=(0, 1.05),
               title="tpegnn-1b projection (H100, NVLink + IB NDR)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    extra = {"assumptions": {"h100_sustained_flops": 200e12, "links": {k: vars(v) for k, v in LINKS.items()},
                             "overlap_of_dp_allreduce_with_backward": 0.5, "atoms_per_micro_batch": 512,
                             "micro_batches": 8, "edges_per_atom": 30.0,
                             "strong_scaling_global_atoms": 512 * 8 * 128},
             "projection": projection, "gloo_link_rows": link_rows}
    print(write_results("scaling", args.machine, rows, summary, plot, extra=extra))
    for k, v in summary.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
