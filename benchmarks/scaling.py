"""Throughput scaling over ranks and model sizes, checked against the planner and the performance model.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py [--machine cpu2] [--quick]

Every configuration runs the real trainer in fresh processes through the harness
(``gnnmegatron.bench.harness.run_config``: gloo here, NCCL on GPUs), 2 warm-up and 8 measured steps,
on a generated EMT store (600 structures of at most 32 atoms, cutoff 5 Å), model ``tpegnn-small``
(hidden 256, 4 blocks, 8 message groups, fused execution, conservative forces):

* **strong scaling**: a fixed global batch of 512 atoms split over dp = 1, 2, 4 replicas; **weak
  scaling**: 256 atoms per replica at dp = 1, 2, 4. Efficiency = throughput(n) / (n x throughput(1)).
  dp = 4 runs 4 processes on 2 cores (oversubscribed; marked).
* **model parallelism**: tp = 2, pp = 2 (4 micro-batches), tp = 2 x dp = 2.
* these nine layouts run in three rounds, one after the other in each (the shared machine's load
  drifts); each row is its round with the median step time, every round's time is kept. The
  machine's own ceiling for two processes is measured in every round right after the dp = 2 weak
  run, by two independent single-process runs side by side (measured steps starting together):
  the data-parallel throughput at 2 processes is reported against it as the median of the rounds'
  ratios.
* **width sweep**: the tpegnn family's block at hidden 128 to 2048 (4 blocks, 64 atoms per batch),
  one process: atoms/s, achieved FLOP/s and peak memory.
* **planner**: every configuration's measured peak memory per rank against ``estimate_memory``
  for the measured atoms and edges per micro-batch. The planner counts live tensors; the
  resident set of a CPU process also holds what glibc keeps after ``free`` (more with many
  micro-batches alive), so every configuration is rerun (same batches) with the allocator
  returning freed blocks at once (``run_config(..., memory="live")``: the high-water mark of the
  live tensors, as ``max_memory_allocated`` on a GPU) and the planner is checked against that
  peak; the default run's resident peak and the allocator's share of it are reported beside.
  The framework term (the process: interpreter, libraries, compiled code, store and loader) is
  measured once, on dp1-256, as the rank's resident set after its warm-up steps less the training
  state it then holds (parameters, gradients, AdamW moments), and used for every row; the CPU
  workspace term (the fused ops' ``[chunk, F]`` tiles) is fitted to dp1-256 rerun with 2^16 and
  2^22 elements per chunk (``chunk-*`` rows) besides the default 2^20; the other rows are
  predictions.
* **performance model**: every layout's measured step time against ``estimate_step`` with this
  machine's numbers: the FLOP rate and the fixed cost per micro-batch pass fitted by least squares
  to the three one-process runs of the model (64, 256 and 512 atoms per step: width-256, dp1-256,
  dp1-512; ``t = t_0 + FLOPs / rate``; those three are in-sample, the other layouts are
  predictions), ranks beyond the core count sharing the cores (each gets
  ``cores / world`` of one), the gloo links measured on this machine (collectives: a link fitted to
  two-rank all-reduce times, ``measure_allreduce_link``; the pipeline's messages: a ping-pong,
  ``measure_link``; a gloo all-reduce costs several one-way latencies), and the part of the compute
  tensor parallelism does not divide from timing tp rank 0's shard of the model against the whole
  model in one process (``measure_tp_shard`` on batches of the store of 64, 256 and 512 atoms: the
  shard's time per atom over the whole model's). The rest of the width sweep is not modelled (other
  GEMM sizes, another FLOP rate).
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

import numpy as np
from common import write_results

from gnnmegatron.bench.harness import affine_fit, measure_allreduce_link, measure_link, measure_tp_shard, run_config
from gnnmegatron.bench.memory import Layout, Workload, cpu_tile_elements, estimate_memory
from gnnmegatron.bench.perf import LINKS, Device, estimate_step, project
from gnnmegatron.models import get_preset
from gnnmegatron.ops.dispatch import settings

PRESET = "tpegnn-small"
OVERRIDES = {"tp2": ["parallel.tp=2"], "pp2-m4": ["parallel.pp=2", "train.micro_batches=4"],
             "tp2-dp2": ["parallel.tp=2"]}


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


def plot_scaling(plt, rows, ceiling, projection, cores):
    """Throughput against processes (measured, ideal, modelled), memory against width (measured,
    planner), and the tpegnn-1b projection."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    ax = axes[0]
    for kind, color in (("strong", "C0"), ("weak", "C1")):
        sel = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["world"])
        worlds = [r["world"] for r in sel]
        ax.plot(worlds, [r["atoms_per_s"] for r in sel], "o-", color=color, label=f"{kind} measured")
        ax.plot(worlds, [r["world"] * sel[0]["atoms_per_s"] for r in sel], "--", color=color, alpha=0.5,
                label=f"{kind} ideal")
        modelled = [(r["world"], r["atoms_per_step"] / r["modelled_step_s"]) for r in sel if r.get("modelled_step_s")]
        ax.plot([m[0] for m in modelled], [m[1] for m in modelled], "x", color=color, ms=9, label=f"{kind} modelled")
    ax.axhline(ceiling, color="gray", ls=":", label="two independent runs (2-core ceiling, median of rounds)")
    ax.set(xlabel="processes (dp)", ylabel="atoms/s", xticks=[1, 2, 4],
           title=f"{PRESET}, gloo, {cores} cores (4 = oversubscribed)")
    ax.legend(fontsize=7)
    ax = axes[1]
    sel = [r for r in rows if r["kind"] == "width"]
    widths = [r["hidden"] for r in sel]
    ax.plot(widths, [max(r["live_peak_bytes_per_rank"]) / 2**30 for r in sel], "o-", label="measured peak (live)")
    ax.plot(widths, [max(r["peak_bytes_per_rank"]) / 2**30 for r in sel], "^:", alpha=0.6,
            label="measured peak (resident, glibc's retained heap included)")
    ax.plot(widths, [r["planned_peak_bytes"] / 2**30 for r in sel], "s--", label="planner")
    ax.set(xscale="log", xlabel="hidden (tpegnn family, 4 blocks)", ylabel="GiB per rank",
           title="memory against model size")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    ax = axes[2]
    for name, color in (("tp8", "C0"), ("tp4-pp2", "C2")):
        pr = projection[name]
        ax.plot([p["gpus"] for p in pr], [p["weak_efficiency"] for p in pr], "o-", color=color, label=f"{name} weak")
        ax.plot([p["gpus"] for p in pr], [p["strong_efficiency"] for p in pr], "s--", color=color,
                label=f"{name} strong")
    ax.set(xscale="log", xlabel="GPUs", ylabel="efficiency vs 8 GPUs", ylim=(0, 1.05),
           title="tpegnn-1b projection (H100, NVLink + IB NDR)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def replot(machine: str) -> None:
    """Redraw the PNG from the JSON of an earlier run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import RESULTS

    doc = json.loads((RESULTS / f"scaling-{machine}.json").read_text())
    rows = doc["rows"]
    ceiling = float(np.median([r["atoms_per_s"] for r in rows if r["kind"] == "ceiling"]))
    cores = max(r["world"] for r in rows if not r.get("oversubscribed") and r["kind"] != "ceiling")
    fig = plot_scaling(plt, rows, ceiling, doc["projection"], cores)
    fig.savefig(RESULTS / f"scaling-{machine}.png", dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default="cpu2")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON of an earlier run")
    args = parser.parse_args()
    if args.replot:
        replot(args.machine)
        return
    steps, warmup = (2, 1) if args.quick else (8, 2)
    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gnnmegatron-scaling-") as tmp:
        root = Path(tmp)
        from gnnmegatron.data.emt import EMTConfig, generate_emt_dataset

        store = root / "emt.zarr"
        generate_emt_dataset(store, EMTConfig(num_structures=600, seed=0, max_atoms=32), workers=1, progress=False)

        def measure(name, world, budget, overrides=(), hidden=None, env=None, memory="resident"):
            cfg = make_config(root, store, name, budget, hidden)
            return run_config(cfg, world, overrides=list(overrides), steps=steps, warmup=warmup, env=env,
                              memory=memory)

        def add(name, world, budget, r, hidden=None, kind="", **extra):
            row = {"kind": kind, "name": name, "world": world, "budget_atoms": budget, "hidden": hidden or 256,
                   "oversubscribed": world > cores, **extra, **r}
            rows.append(row)
            print(name, {k: v for k, v in r.items() if k in ("step_s_p50", "atoms_per_s", "data_wait_fraction")},
                  flush=True)
            return row

        def run(name, world, budget, overrides=(), hidden=None, kind="", env=None, **extra):
            return add(name, world, budget, measure(name, world, budget, overrides, hidden, env), hidden, kind, **extra)

        # the timed layouts, in rounds (the shared machine's load drifts: each row is the round with the
        # median step time, every round's is kept); each round also measures the machine's ceiling for two
        # processes right after its dp = 2 weak run: two independent one-process runs at once, their
        # measured steps starting together after both have warmed up
        timed = [("dp1-512", 1, 512, "strong"), ("dp2-strong", 2, 256, "strong"), ("dp4-strong", 4, 128, "strong"),
                 ("dp1-256", 1, 256, "weak"), ("dp2-weak", 2, 256, "weak"), ("dp4-weak", 4, 256, "weak"),
                 ("tp2", 2, 256, "model-parallel"), ("pp2-m4", 2, 128, "model-parallel"),
                 ("tp2-dp2", 4, 256, "model-parallel")]
        results = {name: [] for name, *_ in timed}
        ratios, ceilings = [], []
        for k in range(1 if args.quick else 3):
            for name, world, budget, kind in timed:
                results[name].append(measure(name, world, budget, OVERRIDES.get(name, ())))
                print(f"round {k}", name, results[name][-1]["step_s_p50"], flush=True)
                if name != "dp2-weak":
                    continue
                together = root / f"together{k}"
                together.mkdir()
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    futures = [pool.submit(run_config, make_config(root, store, f"pair{k}-{i}", 256), 1, steps=steps,
                                           warmup=warmup, start_together=(str(together), 2)) for i in range(2)]
                    pair = [f.result() for f in futures]
                both = sum(p["atoms_per_s"] for p in pair)
                paired = results[name][-1]["atoms_per_s"]
                rows.append({"kind": "ceiling", "name": f"two independent 1-process runs (round {k})", "world": 2,
                             "atoms_per_s": both, "members": [p["atoms_per_s"] for p in pair],
                             "dp2_weak_atoms_per_s": paired})
                ceilings.append(both)
                ratios.append(paired / both)
        ceiling = float(np.median(ceilings))
        for name, world, budget, kind in timed:
            ordered = sorted(results[name], key=lambda r: r["step_s_p50"])
            add(name, world, budget, ordered[len(ordered) // 2], kind=kind, rounds=len(ordered),
                step_s_p50_rounds=[r["step_s_p50"] for r in results[name]],
                atoms_per_s_rounds=[r["atoms_per_s"] for r in results[name]])
        single = next(r for r in rows if r["name"] == "dp1-512")
        weak1 = next(r for r in rows if r["name"] == "dp1-256")
        widths = (128, 256, 512) if args.quick else (128, 256, 512, 1024, 2048)
        for h in widths:
            run(f"width-{h}", 1, 64, hidden=h, kind="width")
        # the CPU fused ops' workspace: dp1-256 again with smaller and larger chunks of edges
        for ce in (1 << 16, 1 << 22):
            run(f"chunk-{ce}", 1, 256, kind="workspace", chunk_elements=ce,
                env={"GNNMEGATRON_OPS_CHUNK_ELEMENTS": str(ce)})
        # the planner's check: each configuration again, its allocator returning freed blocks at once
        for r in rows:
            if r["kind"] == "ceiling":
                continue
            env = {"GNNMEGATRON_OPS_CHUNK_ELEMENTS": str(r["chunk_elements"])} if r.get("chunk_elements") else None
            live = measure(r["name"] + "-live", r["world"], r["budget_atoms"], OVERRIDES.get(r["name"], ()),
                           r["hidden"] if r["kind"] == "width" else None, env, memory="live")
            r["live_peak_bytes_per_rank"] = live["peak_bytes_per_rank"]
            r["live_rss_warm_bytes_per_rank"] = live["rss_warm_bytes_per_rank"]
            r["allocator_retained_fraction"] = max(r["peak_bytes_per_rank"]) / max(live["peak_bytes_per_rank"]) - 1
            print(r["name"], "live peak", live["peak_bytes_per_rank"], flush=True)
        # the compute tensor parallelism does not divide: tp rank 0's shard against the whole model
        from gnnmegatron.data.batch import collate
        from gnnmegatron.data.store import GraphStore

        source, batches, start = GraphStore(store), [], 0
        for target in (64, 256, 512):  # the sizes of the device fit's runs
            graphs, atoms = [], 0
            while atoms < target - 16:
                graphs.append(source[start + len(graphs)])
                atoms += len(graphs[-1]["atomic_numbers"])
            start += len(graphs)
            batches.append(collate(graphs, 5.0))
        shard = measure_tp_shard(get_preset(PRESET, execution="fused"), 2, batches, reps=3 if args.quick else 8)

    # planner and performance model against the measurements
    link, link_rows = measure_link()
    collective, collective_rows = measure_allreduce_link()
    # this machine's device, from the single-process runs of the model at 64, 256 and 512 atoms per
    # step: t = t_0 + FLOPs / rate by least squares
    fit_rows = [next(r for r in rows if r["name"] == n) for n in ("width-256", "dp1-256", "dp1-512")]
    flops = np.array([r["flops_per_s_per_rank"] * r["step_s_p50"] for r in fit_rows])
    times = np.array([r["step_s_p50"] for r in fit_rows])
    overhead, inv_rate = affine_fit(flops, times)
    if inv_rate <= 0 or overhead < 0:  # noisy runs: no fixed cost, the largest run's rate
        inv_rate, overhead = 1.0 / fit_rows[-1]["flops_per_s_per_rank"], 0.0
    rate, overhead = 1.0 / float(inv_rate), float(overhead)
    # cores one process keeps busy (its compute thread and the loader's prefetch thread): with world
    # processes on the machine's cores each gets cores / (world x busy) of what it had alone
    busy = float(np.median([r["cpu_utilisation"] for r in fit_rows]))
    # the part of the size-proportional compute each tp rank repeats: the shard's time per atom against
    # the whole model's (the fixed cost per pass is t_0, not divided by tp in the model either)
    serial = shard["serial_fraction"]
    calibration = {"from": [r["name"] for r in fit_rows], "flops_per_s": rate, "overhead_s_per_micro_batch": overhead,
                   "cores_busy_per_process": busy, "tp_shard": shard, "tp_serial_fraction": serial}
    # the planner's framework term on this machine, measured once (dp1-256) and used for every row:
    # the rank's resident set after its warm-up steps less the training state it then holds
    # (parameters, gradients, AdamW moments): interpreter, libraries, compiled code, store, loader
    calib = next(r for r in rows if r["name"] == "dp1-256")
    state = estimate_memory(get_preset(PRESET, execution="fused"), Layout(), Workload(256, 30.0, conservative=True))
    framework = max(calib["live_rss_warm_bytes_per_rank"]) - (state.parameters + state.gradients + state.optimizer)
    # the fused ops' tiles: the step's memory above the resident set after warm-up against the elements
    # of one [chunk, F] tile, over the chunk sweep (dp1-256 at 2^16, 2^20 (default), 2^22 elements)
    sweep = [r for r in rows if r["kind"] == "workspace"] + [calib]
    tiles = np.array([cpu_tile_elements(256, r["atoms_per_step"] * r["edges_per_atom"],
                                        r.get("chunk_elements", settings.chunk_elements)) for r in sweep], float)
    added = np.array([max(r["live_peak_bytes_per_rank"]) - max(r["live_rss_warm_bytes_per_rank"]) for r in sweep],
                     float)
    per_element = max(0.0, affine_fit(tiles, added)[1])
    workspace_fit = {"from": [r["name"] for r in sweep], "tile_elements": tiles.tolist(),
                     "step_bytes_above_warm": added.tolist(), "bytes_per_tile_element": per_element}
    for r in rows:
        if r["kind"] in ("ceiling", "workspace"):
            continue
        lay = r["layout"]
        m = 4 if r["name"].startswith("pp2") else 1
        layout = Layout(tp=lay["tp"], pp=lay["pp"], dp=lay["dp"], micro_batches=m)
        cfg = get_preset(PRESET, execution="fused", **({"hidden": r["hidden"], "message_groups": 8} if r["kind"] == "width" else {}))
        atoms = r["atoms_per_step"] / (lay["dp"] * m)
        edges_per_atom = r.get("edges_per_atom") or 30.0
        w = Workload(int(round(atoms)), edges_per_atom, conservative=True)
        mem = estimate_memory(cfg, layout, w, framework_bytes=framework, workspace_bytes_per_element=per_element)
        r["planned_peak_bytes"] = mem.total
        r["planned_split_gib"] = mem.as_gib()
        measured = max(r["live_peak_bytes_per_rank"])
        r["planner_error"] = (mem.total - measured) / measured
        r["planner_error_resident"] = (mem.total - max(r["peak_bytes_per_rank"])) / max(r["peak_bytes_per_rank"])
        r["planner_in_sample"] = r["name"] == "dp1-256"
        if r["kind"] == "width" and r["hidden"] != 256:  # other GEMM sizes: the hidden-256 rate does not apply
            continue
        # ranks share the cores: each gets cores / (world x busy) of what one process had alone
        share = min(1.0, cores / (r["world"] * max(1.0, busy)))
        dev = Device("cpu", rate * share, 24e9, per_node=cores, intra=collective, inter=collective, p2p=link,
                     overhead_s=overhead / share, tp_serial_fraction=serial)
        est = estimate_step(cfg, layout, w, dev)
        r["modelled_step_s"] = est["step_s"]
        r["modelled_parts"] = {k: est[k] for k in ("compute_s", "bubble", "tp_s", "pp_s", "dp_s")}
        r["model_error"] = (est["step_s"] - r["step_s_p50"]) / r["step_s_p50"]
        r["model_in_sample"] = r["name"] in calibration["from"]
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
        "dp2_throughput_over_two_core_ceiling": float(np.median(ratios)),
        "dp2_over_ceiling_per_round": ratios,
        "planner_max_abs_error": max(abs(r["planner_error"]) for r in checked if not r["planner_in_sample"]),
        "planner_framework_bytes": framework,
        "planner_workspace_fit": workspace_fit,
        "model_max_abs_error_world_le_4": max(abs(r["model_error"]) for r in rows
                                              if "model_error" in r and not r["model_in_sample"]),
        "model_calibration": calibration,
        "model_errors": {r["name"]: r["model_error"] for r in rows if "model_error" in r},
        "planner_errors": {r["name"]: r["planner_error"] for r in checked},
        "planner_errors_against_resident_peak": {r["name"]: r["planner_error_resident"] for r in checked},
        "allocator_retained_fraction": {r["name"]: r["allocator_retained_fraction"] for r in checked},
        "data_wait_fraction_max": max(r["data_wait_fraction"] for r in checked),
        "gloo_alpha_s": link.alpha, "gloo_beta_bytes_per_s": link.beta,
        "gloo_allreduce_alpha_s": collective.alpha, "gloo_allreduce_beta_bytes_per_s": collective.beta,
        "tp_collective_s_measured_vs_modelled": {r["name"]: [r.get("tp_collective_s"), r["modelled_parts"]["tp_s"]]
                                                 for r in rows if r.get("modelled_parts", {}).get("tp_s")},
        "projection_tpegnn_1b_weak_efficiency_1024": projection["tp8"][-1]["weak_efficiency"],
        "projection_tpegnn_1b_strong_efficiency_1024": projection["tp8"][-1]["strong_efficiency"],
    }

    def plot(plt):
        return plot_scaling(plt, rows, ceiling, projection, cores)

    extra = {"assumptions": {"h100_sustained_flops": 200e12, "links": {k: vars(v) for k, v in LINKS.items()},
                             "overlap_of_dp_allreduce_with_backward": 0.5, "atoms_per_micro_batch": 512,
                             "micro_batches": 8, "edges_per_atom": 30.0,
                             "strong_scaling_global_atoms": 512 * 8 * 128},
             "projection": projection, "gloo_link_rows": link_rows, "gloo_allreduce_rows": collective_rows}
    print(write_results("scaling", args.machine, rows, summary, plot, extra=extra))
    for k, v in summary.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
