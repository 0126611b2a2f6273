"""Tensor parallelism of a fixed EGNN: parameters, peak memory and step time per rank against tp,
and the bytes each rank communicates per training step, TP-native vs faithful EGNN.

    OMP_NUM_THREADS=1 python benchmarks/tensor_parallel.py [--machine cpu2] [--hidden 256]
        [--layers 3] [--repeat 4] [--steps 3] [--message-groups 16]

The TP-native EGNN is the tpegnn family's block: ``message="node_split"`` with grouped message
mixing (``message_groups``, default 16), one N x H all-reduce per block and direction. The
node_split block with the dense node MLP (two per direction) is measured beside it
(``tp_native_dense`` rows).

For tp in {1, 2, 4} (world size = tp, gloo, one torch thread per rank; launched with
``gnnmegatron.parallel.testing.run_distributed``) every rank builds the same
``AtomisticModel`` (seed 0, conservative forces) and ``parallelize``-s it, then runs training
steps on one rattled periodic fcc Cu supercell: forward with forces (-dE/dx, create_graph),
loss = MSE(energy per atom) + MSE(forces) against EMT labels, backward (a double backward).
No optimizer step (its state is replicated-or-sharded exactly like the parameters).

Measured per rank:

* parameters: count and bytes in all, TP-sharded (weights of the column/row-parallel linears
  and the column-parallel biases) and replicated (embedding, heads, row-parallel biases,
  norms, radial basis); ``sharded_param_bytes_ratio_tp{k}`` = sharded bytes at tp=k / at tp=1,
  compared with the ideal 1/k (issue target: within 10%).
* peak memory: the resident-set high-water mark of the rank's process during a step, measured
  by handing glibc's free heap back (``malloc_trim(0)``) and resetting the kernel's counter
  (``echo 5 > /proc/self/clear_refs``) before the step and reading ``VmHWM`` from
  ``/proc/self/status`` after it (the same counter as ``getrusage().ru_maxrss``, which cannot be
  reset otherwise). Reported: the absolute peak, the peak above the RSS at rank start (torch and
  the gloo group loaded, no model yet: model + batch + step working set) and the growth over
  the RSS just before the step (median over steps). Linux RSS of the whole process, not a
  per-tensor count (tracemalloc does not see torch's allocations).
* step time: median over ``--steps`` steps after one warm-up step, each step started after a
  barrier, the slowest rank reported. On a 2-core CPU with gloo this does not get faster with
  tp (tp=4 runs 4 processes on 2 cores: oversubscribed).
* communication: ``CommCounter`` payload bytes (what this rank hands to each collective) of one
  step, split by direction (fwd: issued by model code; bwd: issued inside autograd, which here
  includes the force gradient inside the forward call and the loss backward) and by phase
  (``model(batch)`` incl. forces vs ``loss.backward()``). Same for the faithful E_GCL under TP
  (``message="faithful"``, ``parallelize(..., allow_edge_collectives=True)``, i.e.
  ``TPEGCLFaithful``, whose edge MLP all-reduces an [E, H] tensor per block).
  Issue target: faithful / TP-native >= 10 at E/N = 30 (headline: conservative forces, tp=2;
  also reported: forward-only bytes, and one extra pair of rows at tp=2 with
  ``force_mode="direct"``, whose step has only a first-order backward).

The cutoff is chosen from the sorted pair distances of the rattled cell so that the directed
edge count per atom is 30 (the measured E/N is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from common import write_results

TPS = (1, 2, 4)
TARGET_EDGES_PER_ATOM = 30.0


# ----------------------------------------------------------------------------- data
def make_structure(repeat: int, seed: int = 0) -> dict:
    """Rattled periodic fcc Cu supercell (cubic cell repeated), with EMT energy and forces."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((repeat, repeat, repeat))
    atoms.rattle(stdev=0.1, seed=seed)
    atoms.calc = EMT()
    return {"atomic_numbers": atoms.numbers, "positions": atoms.positions, "cell": np.asarray(atoms.cell),
            "pbc": atoms.pbc, "energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}


def cutoff_for_edges_per_atom(structure: dict, target: float) -> float:
    """Cutoff midway between the (target*N)-th and next directed pair distance."""
    from gnnmegatron.data.batch import collate

    b = collate([structure], cutoff=6.0, dtype=torch.float64)
    src, dst = b["edge_index"][1], b["edge_index"][0]
    vec = b["positions"][src] - b["positions"][dst] + b["edge_shift"] @ b["cell"][0]
    d = torch.sort(vec.norm(dim=-1)).values
    k = round(target * b["positions"].shape[0])
    return float(0.5 * (d[k - 1] + d[k]))


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _malloc_trim() -> None:
    """Hand glibc's free heap back to the kernel, so RSS before a step is the live set."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- one rank
def _param_split(model) -> dict:
    """Per-rank parameter count/bytes: total, TP-sharded, replicated."""
    from gnnmegatron.training.distributed import is_tp_sharded

    sharded_ids = {i for i, sharded in is_tp_sharded(model).items() if sharded}
    out = {k: 0 for k in ("params", "param_bytes", "sharded_params", "sharded_param_bytes",
                          "replicated_params", "replicated_param_bytes")}
    for p in model.parameters():
        n, nb = p.numel(), p.numel() * p.element_size()
        out["params"] += n
        out["param_bytes"] += nb
        kind = "sharded" if id(p) in sharded_ids else "replicated"
        out[f"{kind}_params"] += n
        out[f"{kind}_param_bytes"] += nb
    return out


def _rank_run(tp: int, message: str, model_kw: dict, batch: dict, steps: int) -> dict:
    """One rank: build, parallelize, count one step's communication, time and measure ``steps``."""
    import torch.distributed as dist

    from gnnmegatron.models import AtomisticModel, ModelConfig
    from gnnmegatron.parallel import CommCounter, init_layout, parallelize

    torch.set_num_threads(1)
    _malloc_trim()
    rss_start = _status_kb("VmRSS")  # torch + gloo process group, before model and step
    layout = init_layout(tp=tp, groups="torch")
    torch.manual_seed(0)
    model = AtomisticModel(ModelConfig(**model_kw, message=message)).train()
    parallelize(model, layout, allow_edge_collectives=message == "faithful")
    params = _param_split(model)
    n_atoms = batch["positions"].shape[0]

    def step(counters=None):
        model.zero_grad(set_to_none=True)
        if counters is None:
            out = model(batch)
            loss = ((out["energy"] - batch["energy"]) / n_atoms).pow(2).mean() \
                + (out["forces"] - batch["forces"]).pow(2).mean()
            loss.backward()
        else:
            with counters[0]:
                out = model(batch)
                loss = ((out["energy"] - batch["energy"]) / n_atoms).pow(2).mean() \
                    + (out["forces"] - batch["forces"]).pow(2).mean()
            with counters[1]:
                loss.backward()
        return float(loss.detach())

    # warm-up step, counted
    c_model, c_back = CommCounter(), CommCounter()
    dist.barrier()
    step((c_model, c_back))
    records = c_model.records + c_back.records
    comm = {
        "comm_bytes_fwd": sum(r.bytes for r in records if r.direction == "fwd"),
        "comm_bytes_bwd": sum(r.bytes for r in records if r.direction == "bwd"),
        "comm_bytes_total": sum(r.bytes for r in records),
        "comm_bytes_model_call": sum(r.bytes for r in c_model.records),
        "comm_bytes_loss_backward": sum(r.bytes for r in c_back.records),
        "comm_calls": len(records),
        "comm_max_single_bytes": max((r.bytes for r in records), default=0),
    }
    by: dict = {}
    for r in records:
        key = f"{r.name}/{r.op}/{r.direction}"
        calls, nbytes = by.get(key, (0, 0))
        by[key] = (calls + 1, nbytes + r.bytes)
    comm["comm_by_collective"] = "; ".join(f"{k}: {c}x {b} B" for k, (c, b) in
                                           sorted(by.items(), key=lambda kv: -kv[1][1]))

    times, peaks, growth, rss_before = [], [], [], []
    hwm_ok = True
    for _ in range(steps):
        dist.barrier()
        model.zero_grad(set_to_none=True)
        _malloc_trim()
        before = _status_kb("VmRSS")
        hwm_ok = _reset_hwm() and hwm_ok
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        hwm = _status_kb("VmHWM")
        rss_before.append(before)
        peaks.append(hwm)
        growth.append(hwm - before)
    import resource
    return {
        "rank": dist.get_rank(),
        **params,
        **comm,
        "step_time_s_median": statistics.median(times),
        "step_times_s": times,
        "rss_at_start_mib": rss_start / 1024,
        "rss_before_step_mib": statistics.median(rss_before) / 1024,
        "peak_rss_step_mib": max(peaks) / 1024,
        "peak_rss_above_start_mib": (max(peaks) - rss_start) / 1024,
        "peak_rss_growth_step_mib": statistics.median(growth) / 1024,
        "hwm_reset_ok": hwm_ok,
        "ru_maxrss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default="cpu2")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=4, help="cubic fcc cells per side (4 atoms each)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--faithful-tps", default="2,4", help="tp values for the faithful EGNN (and the dense TP-native)")
    parser.add_argument("--message-groups", type=int, default=16,
                        help="message_groups of the TP-native EGNN (as in the tpegnn presets)")
    args = parser.parse_args(argv)

    from gnnmegatron.data.batch import collate
    from gnnmegatron.parallel.testing import run_distributed

    t_start = time.perf_counter()
    structure = make_structure(args.repeat)
    cutoff = cutoff_for_edges_per_atom(structure, TARGET_EDGES_PER_ATOM)
    batch = collate([structure], cutoff=cutoff, dtype=torch.float32)
    n_atoms, n_edges = batch["positions"].shape[0], batch["edge_index"].shape[1]
    edges_per_atom = n_edges / n_atoms
    model_kw = {"hidden": args.hidden, "layers": args.layers, "cutoff": cutoff, "force_mode": "conservative"}
    print(f"fcc Cu {args.repeat}^3 cubic cells: N={n_atoms}, cutoff={cutoff:.3f} A, E={n_edges}, "
          f"E/N={edges_per_atom:.2f}; model {model_kw}", flush=True)

    faithful_tps = [int(t) for t in args.faithful_tps.split(",") if t]
    G = args.message_groups
    # (row label, message, message_groups, tp, force_mode)
    configs = [("tp_native", "node_split", G, tp, "conservative") for tp in TPS]
    configs += [("tp_native_dense", "node_split", None, tp, "conservative") for tp in faithful_tps]
    configs += [("faithful", "faithful", None, tp, "conservative") for tp in faithful_tps]
    # secondary: direct forces (first-order backward only), same sizes, for the comm comparison
    configs += [("tp_native", "node_split", G, 2, "direct"), ("faithful", "faithful", None, 2, "direct")]
    rows = []
    for label, message, groups, tp, force_mode in configs:
        t0 = time.perf_counter()
        kw = {**model_kw, "force_mode": force_mode, "message_groups": groups}
        per_rank = run_distributed(_rank_run, tp, tp, message, kw, batch, args.steps, timeout=600)
        wall = time.perf_counter() - t0
        r0 = per_rank[0]
        row = {
            "model": label,
            "message": message,
            "message_groups": groups,
            "force_mode": force_mode,
            "tp": tp,
            "world_size": tp,
            "oversubscribed": tp > (os.cpu_count() or 1),
            "atoms": n_atoms,
            "edges": n_edges,
            "edges_per_atom": edges_per_atom,
            "hidden": args.hidden,
            "layers": args.layers,
        }
        for k in ("params", "param_bytes", "sharded_params", "sharded_param_bytes", "replicated_params",
                  "replicated_param_bytes", "comm_bytes_fwd", "comm_bytes_bwd", "comm_bytes_total",
                  "comm_bytes_model_call", "comm_bytes_loss_backward", "comm_calls", "comm_max_single_bytes",
                  "comm_by_collective"):
            vals = {r[k] for r in per_rank}
            row[k] = max(vals) if k != "comm_by_collective" else r0[k]
            if len(vals) > 1:
                row[k + "_differs_across_ranks"] = True
        row["step_time_s_median_max_rank"] = max(r["step_time_s_median"] for r in per_rank)
        row["step_time_s_median_rank0"] = r0["step_time_s_median"]
        row["peak_rss_step_mib_max_rank"] = max(r["peak_rss_step_mib"] for r in per_rank)
        row["peak_rss_growth_step_mib_max_rank"] = max(r["peak_rss_growth_step_mib"] for r in per_rank)
        row["rss_before_step_mib_max_rank"] = max(r["rss_before_step_mib"] for r in per_rank)
        row["rss_at_start_mib_max_rank"] = max(r["rss_at_start_mib"] for r in per_rank)
        row["peak_rss_above_start_mib_max_rank"] = max(r["peak_rss_above_start_mib"] for r in per_rank)
        row["hwm_reset_ok"] = all(r["hwm_reset_ok"] for r in per_rank)
        row["run_wall_s"] = wall
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    cons = [r for r in rows if r["force_mode"] == "conservative"]
    native = {r["tp"]: r for r in cons if r["model"] == "tp_native"}
    faithful = {r["tp"]: r for r in cons if r["model"] == "faithful"}
    dense = {r["tp"]: r for r in cons if r["model"] == "tp_native_dense"}
    direct = {r["model"]: r for r in rows if r["force_mode"] == "direct"}
    base = native[1]["sharded_param_bytes"]
    summary: dict = {
        "atoms": n_atoms,
        "edges": n_edges,
        "edges_per_atom": edges_per_atom,
        "cutoff_angstrom": cutoff,
        "hidden": args.hidden,
        "layers": args.layers,
        "message_groups": G,
        "params_total": native[1]["params"],
        "sharded_param_fraction_tp1": base / native[1]["param_bytes"],
    }
    devs = []
    for tp in TPS:
        ratio = native[tp]["sharded_param_bytes"] / base
        native[tp]["sharded_param_bytes_ratio_vs_tp1"] = ratio
        native[tp]["ideal_ratio"] = 1 / tp
        native[tp]["deviation_from_inverse_tp"] = abs(ratio * tp - 1)
        devs.append(abs(ratio * tp - 1))
        native[tp]["total_param_bytes_ratio_vs_tp1"] = native[tp]["param_bytes"] / native[1]["param_bytes"]
        if tp > 1:
            summary[f"sharded_param_bytes_ratio_tp{tp}"] = ratio
            summary[f"total_param_bytes_ratio_tp{tp}"] = native[tp]["total_param_bytes_ratio_vs_tp1"]
    summary["max_deviation_from_inverse_tp"] = max(devs)
    summary["param_target_met"] = bool(max(devs) <= 0.10)
    for tp in TPS:
        summary[f"param_bytes_per_rank_tp{tp}"] = native[tp]["param_bytes"]
        summary[f"peak_rss_step_mib_tp{tp}"] = native[tp]["peak_rss_step_mib_max_rank"]
        summary[f"peak_rss_growth_step_mib_tp{tp}"] = native[tp]["peak_rss_growth_step_mib_max_rank"]
        summary[f"peak_rss_above_start_mib_tp{tp}"] = native[tp]["peak_rss_above_start_mib_max_rank"]
        summary[f"step_time_s_tp{tp}"] = native[tp]["step_time_s_median_max_rank"]
    for tp in sorted(faithful):
        if tp in native:
            summary[f"comm_bytes_per_step_tp_native_tp{tp}"] = native[tp]["comm_bytes_total"]
            summary[f"comm_bytes_per_step_faithful_tp{tp}"] = faithful[tp]["comm_bytes_total"]
            summary[f"comm_bytes_fwd_tp_native_tp{tp}"] = native[tp]["comm_bytes_fwd"]
            summary[f"comm_bytes_fwd_faithful_tp{tp}"] = faithful[tp]["comm_bytes_fwd"]
            summary[f"comm_ratio_faithful_vs_tp_native_tp{tp}"] = (
                faithful[tp]["comm_bytes_total"] / native[tp]["comm_bytes_total"])
            summary[f"comm_ratio_fwd_only_faithful_vs_tp_native_tp{tp}"] = (
                faithful[tp]["comm_bytes_fwd"] / native[tp]["comm_bytes_fwd"])
            if tp in dense:
                summary[f"comm_bytes_per_step_tp_native_dense_tp{tp}"] = dense[tp]["comm_bytes_total"]
                summary[f"comm_ratio_faithful_vs_tp_native_dense_tp{tp}"] = (
                    faithful[tp]["comm_bytes_total"] / dense[tp]["comm_bytes_total"])
            summary[f"step_time_s_faithful_tp{tp}"] = faithful[tp]["step_time_s_median_max_rank"]
            summary[f"peak_rss_step_mib_faithful_tp{tp}"] = faithful[tp]["peak_rss_step_mib_max_rank"]
            summary[f"peak_rss_above_start_mib_faithful_tp{tp}"] = faithful[tp]["peak_rss_above_start_mib_max_rank"]
            summary[f"peak_rss_growth_step_mib_faithful_tp{tp}"] = faithful[tp]["peak_rss_growth_step_mib_max_rank"]
    if 2 in faithful:
        summary["comm_ratio_faithful_vs_tp_native"] = summary["comm_ratio_faithful_vs_tp_native_tp2"]
        summary["comm_target_met"] = bool(summary["comm_ratio_faithful_vs_tp_native"] >= 10)
    if len(direct) == 2:
        summary["comm_bytes_per_step_tp_native_direct_forces_tp2"] = direct["tp_native"]["comm_bytes_total"]
        summary["comm_bytes_per_step_faithful_direct_forces_tp2"] = direct["faithful"]["comm_bytes_total"]
        summary["comm_ratio_faithful_vs_tp_native_direct_forces_tp2"] = (
            direct["faithful"]["comm_bytes_total"] / direct["tp_native"]["comm_bytes_total"])
    summary["world_size_equals_tp"] = True
    summary["cpu_cores"] = os.cpu_count()
    summary["oversubscribed_tps"] = [tp for tp in TPS if tp > (os.cpu_count() or 1)]
    summary["notes"] = (
        "gloo on CPU, one torch thread per rank, world size = tp; tp > cores is oversubscribed, so step "
        "time does not fall with tp here. Comm bytes = CommCounter payload per rank per step (conservative "
        "forces: forward + force gradient + loss double backward). Peak memory = process RSS high-water "
        "mark (VmHWM after clear_refs=5 and malloc_trim) during a step, largest rank; 'above_start' subtracts "
        "the RSS at rank start (torch + gloo loaded, no model), 'growth' the RSS just before the step "
        "(median over steps). RSS includes the ~0.3-0.4 GiB torch runtime, so it does not scale as 1/tp.")
    summary["benchmark_wall_s"] = time.perf_counter() - t_start

    def plot(plt):
        fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
        tps = list(TPS)
        ax = axes[0]
        ax.plot(tps, [native[t]["param_bytes"] / 2**20 for t in tps], "o-", label="all parameters")
        ax.plot(tps, [native[t]["sharded_param_bytes"] / 2**20 for t in tps], "s-", label="TP-sharded")
        ax.plot(tps, [base / t / 2**20 for t in tps], "k--", label="ideal sharded: 1/tp")
        ax.plot(tps, [native[t]["replicated_param_bytes"] / 2**20 for t in tps], "^-", label="replicated")
        ax.set(xticks=tps, xlabel="tp", ylabel="parameter MiB per rank", ylim=(0, None),
               title=f"params per rank, H={args.hidden}, L={args.layers}\nsharded: max dev. from 1/tp {max(devs):.1%}")
        ax.legend(fontsize=8)
        ax = axes[1]
        ftps = sorted(t for t in faithful if t in native)
        xs = np.arange(len(ftps))
        w = 0.27
        ax.bar(xs - w, [native[t]["comm_bytes_total"] / 2**20 for t in ftps], w,
               label=f"TP-native (node_split, {G} message groups)")
        ax.bar(xs, [dense[t]["comm_bytes_total"] / 2**20 for t in ftps], w, label="node_split, dense node MLP")
        ax.bar(xs + w, [faithful[t]["comm_bytes_total"] / 2**20 for t in ftps], w, label="faithful E_GCL")
        for i, t in enumerate(ftps):
            ax.text(xs[i] + w, faithful[t]["comm_bytes_total"] / 2**20,
                    f"{faithful[t]['comm_bytes_total'] / native[t]['comm_bytes_total']:.1f}x",
                    ha="center", va="bottom", fontsize=9)
        if len(direct) == 2:
            xd = len(ftps)
            ax.bar(xd - w, direct["tp_native"]["comm_bytes_total"] / 2**20, w, color="C0", alpha=0.5)
            ax.bar(xd + w, direct["faithful"]["comm_bytes_total"] / 2**20, w, color="C2", alpha=0.5)
            ax.text(xd + w, direct["faithful"]["comm_bytes_total"] / 2**20,
                    f"{summary['comm_ratio_faithful_vs_tp_native_direct_forces_tp2']:.1f}x",
                    ha="center", va="bottom", fontsize=9)
            xs = np.append(xs, xd)
            ftps_labels = [f"tp={t}" for t in ftps] + ["tp=2\ndirect forces"]
        else:
            ftps_labels = [f"tp={t}" for t in ftps]
        ax.set(xticks=xs, xticklabels=ftps_labels, ylabel="MiB sent per rank per step",
               title=f"comm per training step, E/N={edges_per_atom:.1f}\n(conservative forces unless noted)")
        ax.legend(fontsize=8)
        ax = axes[2]
        ax.plot(tps, [native[t]["step_time_s_median_max_rank"] for t in tps], "o-", label="TP-native")
        ax.plot(ftps, [faithful[t]["step_time_s_median_max_rank"] for t in ftps], "s-", label="faithful")
        ax.axvline(os.cpu_count() or 1, color="gray", ls=":", label="cores")
        ax.set(xticks=tps, xlabel="tp (= processes)", ylabel="median step time (s)",
               title=f"median step time, gloo\n{os.cpu_count()} CPU cores (tp=4 oversubscribed)")
        ax.legend(fontsize=8)
        ax = axes[3]
        ax.plot(tps, [native[t]["peak_rss_step_mib_max_rank"] for t in tps], "o-", label="peak RSS (TP-native)")
        ax.plot(tps, [native[t]["peak_rss_above_start_mib_max_rank"] for t in tps], "s-",
                label="peak above start RSS (TP-native)")
        ax.plot(tps, [native[t]["peak_rss_growth_step_mib_max_rank"] for t in tps], "v-",
                label="growth during step (TP-native)")
        ax.plot(ftps, [faithful[t]["peak_rss_above_start_mib_max_rank"] for t in ftps], "^-",
                label="peak above start RSS (faithful)")
        top = max([native[t]["peak_rss_step_mib_max_rank"] for t in tps]
                  + [faithful[t]["peak_rss_above_start_mib_max_rank"] for t in ftps])
        ax.set(xticks=tps, xlabel="tp", ylabel="MiB per rank", ylim=(0, 1.45 * top),
               title="peak memory per rank\n(process RSS high-water mark)")
        ax.legend(fontsize=7, loc="upper center", ncol=2)
        fig.tight_layout()
        return fig

    out = write_results("tensor_parallel", args.machine, rows, summary, plot)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
