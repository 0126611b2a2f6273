"""Sharded (DCP) checkpoints against the gathered save of the previous release, at tp = 1, 2, 4.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint.py [--machine cpu2] [--presets tpegnn-xl tpegnn-1b]

Each configuration runs in fresh gloo processes (``run_distributed``, one per TP rank). Every rank
builds its part of the preset on the meta device and materialises it (``build_local_model``) and
gives every parameter AdamW state (``exp_avg``, ``exp_avg_sq`` and ``step``, fp32, as after a
first step), then measures, in this order:

1. **DCP save** (``Trainer.save``'s path: ``model_state`` + ``optimizer_state`` ->
   ``save_sharded``: per-rank files in a ``.partial`` directory, rename, ``latest``): seconds
   (barrier to barrier, slowest rank), bytes of each rank's file, and the peak resident memory
   above the steady state during the save.
2. **DCP load** of that checkpoint into the same tensors (what a resume does): seconds.
3. **Gathered save** (what the previous release did): every TP rank all-gathers the full weights
   (``gather_state_dict``), rank 0 writes them, and every TP rank writes its optimizer state beside
   them, each file with that release's ``atomic_save`` (temporary file, fsync, rename; DCP fsyncs
   its files too). Same measurements. Skipped where the gathered copies would not
   fit in this machine's memory (``--max-gathered-gib``); the JSON then states the bytes it would
   have gathered.

4. **DCP save** again: the save time reported is the faster of the two DCP saves (first and last),
   so that neither method is favoured by the order (file writes get faster once a process has
   written before).

Peak memory: ``ru_maxrss`` is a lifetime peak, so each phase reports ``max(0, peak after - resident
before)``, and the phases run in the order above (a later phase's peak is only seen if it
exceeds the earlier ones).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import write_results


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rank(preset: str, tp: int, root: str, gathered: bool) -> dict:
    import torch.distributed as dist

    from gnnmegatron.models import get_preset
    from gnnmegatron.parallel.layout import init_layout, single
    from gnnmegatron.training import sharded_checkpoint as sc
    from gnnmegatron.training.build import build_local_model
    from gnnmegatron.training.checkpoint import atomic_save
    from gnnmegatron.training.optim import build_optimizer
    from gnnmegatron.training.config import OptimConfig
    from gnnmegatron.training.train_state import apply_optimizer_state, model_state, optimizer_state

    torch.set_num_threads(1)
    layout = init_layout(tp=tp, groups="torch") if tp > 1 else single()
    rank = dist.get_rank() if dist.is_initialized() else 0
    cfg = get_preset(preset)
    t0 = time.perf_counter()
    model = build_local_model(cfg, layout, seed=0)
    build_s = time.perf_counter() - t0
    optimizer = build_optimizer(model, OptimConfig())
    for p in model.parameters():  # AdamW state as after a first step
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.full_like(p, 1e-3),
                              "exp_avg_sq": torch.full_like(p, 1e-6)}
    local_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    out = {"rank": rank, "build_s": build_s, "local_state_bytes": local_bytes}

    def barrier():
        if dist.is_initialized():
            dist.barrier()

    # 1. DCP save
    run = Path(root)
    state = {**model_state(model), **optimizer_state(optimizer, model), "meta": {"step": 1}}
    barrier()
    before, t0 = _rss(), time.perf_counter()
    path = sc.save_sharded(run, 1, state, {"format": sc.SHARDED_FORMAT, "step": 1})
    out["dcp_save_s"] = time.perf_counter() - t0
    out["dcp_save_peak_extra_bytes"] = max(0, _peak() - before)
    out["dcp_file_bytes"] = (path / f"__{rank}_0.distcp").stat().st_size
    del state  # it holds views of the optimizer state, which the resume below allocates afresh
    # 2. DCP load, as a resume does: into the model's tensors and freshly allocated optimizer state
    optimizer.state.clear()
    load_state = {**model_state(model)}
    opt_state, pending = optimizer_state(optimizer, model, fresh=True)
    load_state.update(opt_state)
    barrier()
    t0 = time.perf_counter()
    sc.load_sharded(path, load_state)
    out["dcp_load_s"] = time.perf_counter() - t0
    apply_optimizer_state(optimizer, pending, load_state)
    del load_state, opt_state, pending
    barrier()
    if rank == 0:
        shutil.rmtree(run / "checkpoints")
    barrier()
    # 3. gathered save (previous release)
    if gathered:
        from gnnmegatron.parallel import gather_state_dict

        barrier()
        before, t0 = _rss(), time.perf_counter()
        full = gather_state_dict(model) if tp > 1 else model.state_dict()
        folder = run / "gathered"
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0:  # the previous release's atomic_save: temporary file, fsync, rename
            atomic_save(full, folder / "model.pt")
        atomic_save(optimizer.state_dict(), folder / f"optim-tp{rank}.pt")
        barrier()
        out["gathered_save_s"] = time.perf_counter() - t0
        out["gathered_save_peak_extra_bytes"] = max(0, _peak() - before)
        out["gathered_file_bytes"] = ((folder / "model.pt").stat().st_size if rank == 0 else 0) \
            + (folder / f"optim-tp{rank}.pt").stat().st_size
        del full
        barrier()
        if rank == 0:
            shutil.rmtree(folder)
    # 4. the DCP save again, after the gathered one: writes in a process get faster once the page
    # cache is warm, so each method's time is the fastest of its runs (DCP first and last)
    state = {**model_state(model), **optimizer_state(optimizer, model), "meta": {"step": 2}}
    barrier()
    t0 = time.perf_counter()
    sc.save_sharded(run, 2, state, {"format": sc.SHARDED_FORMAT, "step": 2})
    out["dcp_save_s_runs"] = [out["dcp_save_s"], time.perf_counter() - t0]
    out["dcp_save_s"] = min(out["dcp_save_s_runs"])
    del state
    barrier()
    if rank == 0:
        shutil.rmtree(run / "checkpoints")
    return out


def main() -> None:
    from gnnmegatron.models import count_parameters
    from gnnmegatron.parallel.testing import run_distributed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default="cpu2")
    parser.add_argument("--presets", nargs="+", default=["tpegnn-xl", "tpegnn-1b"])
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--max-gathered-gib", type=float, default=14.0,
                        help="skip the gathered save where shards + gathered copies exceed this (GiB)")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        params = count_parameters(preset)["total"]
        for tp in args.tp:
            weights = 4 * params
            need = 3 * weights + tp * weights  # shards (weights + AdamW) + a full copy gathered on each rank
            gathered = need / 2**30 <= args.max_gathered_gib
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                if tp == 1:
                    res = [_rank(preset, 1, tmp, gathered)]
                else:
                    res = run_distributed(_rank, tp, preset, tp, tmp, gathered, timeout=3600, preload_megatron=False)
            row = {"preset": preset, "params": params, "tp": tp,
                   "state_bytes_per_rank": max(r["local_state_bytes"] for r in res),
                   "build_s": max(r["build_s"] for r in res),
                   "dcp_save_s": max(r["dcp_save_s"] for r in res), "dcp_load_s": max(r["dcp_load_s"] for r in res),
                   "dcp_save_s_runs": [max(r["dcp_save_s_runs"][k] for r in res) for k in range(2)],
                   "dcp_bytes_per_rank": [r["dcp_file_bytes"] for r in res],
                   "dcp_save_peak_extra_gib": max(r["dcp_save_peak_extra_bytes"] for r in res) / 2**30}
            if gathered:
                row.update({"gathered_save_s": max(r["gathered_save_s"] for r in res),
                            "gathered_bytes_per_rank": [r["gathered_file_bytes"] for r in res],
                            "gathered_save_peak_extra_gib": max(r["gathered_save_peak_extra_bytes"] for r in res) / 2**30})
            else:
                row["gathered_not_run"] = (f"would hold {need / 2**30:.1f} GiB (shards with AdamW state plus a full "
                                           f"copy of the weights gathered on each of {tp} ranks) on this machine")
            rows.append(row)
            print(row, flush=True)
    summary = {}
    for r in rows:
        key = f"{r['preset']}_tp{r['tp']}"
        summary[f"dcp_save_s_{key}"] = r["dcp_save_s"]
        summary[f"dcp_load_s_{key}"] = r["dcp_load_s"]
        summary[f"dcp_max_file_gib_{key}"] = max(r["dcp_bytes_per_rank"]) / 2**30
        if "gathered_save_s" in r:
            summary[f"gathered_over_dcp_save_time_{key}"] = r["gathered_save_s"] / r["dcp_save_s"]
            summary[f"gathered_peak_extra_gib_{key}"] = r["gathered_save_peak_extra_gib"]
        summary[f"dcp_peak_extra_gib_{key}"] = r["dcp_save_peak_extra_gib"]

    def plot(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for preset, marker in zip(args.presets, "os^"):
            sel = [r for r in rows if r["preset"] == preset]
            axes[0].plot([r["tp"] for r in sel], [r["dcp_save_s"] for r in sel], marker + "-", label=f"{preset} DCP save")
            axes[0].plot([r["tp"] for r in sel], [r["dcp_load_s"] for r in sel], marker + ":", label=f"{preset} DCP load")
            g = [r for r in sel if "gathered_save_s" in r]
            if g:
                axes[0].plot([r["tp"] for r in g], [r["gathered_save_s"] for r in g], marker + "--",
                             label=f"{preset} gathered save")
            axes[1].plot([r["tp"] for r in sel], [max(r["dcp_bytes_per_rank"]) / 2**30 for r in sel], marker + "-",
                         label=f"{preset} DCP file per rank")
            if g:
                axes[1].plot([r["tp"] for r in g], [r["gathered_save_peak_extra_gib"] for r in g], marker + "--",
                             label=f"{preset} gathered: peak extra memory")
        axes[0].set(xlabel="tp", ylabel="seconds (slowest rank)", title="save / load time")
        axes[1].set(xlabel="tp", ylabel="GiB", title="bytes per rank and peak extra memory")
        for ax in axes:
            ax.legend(fontsize=7)
            ax.set_xticks(args.tp)
        fig.tight_layout()
        return fig

    print(write_results("checkpoint", args.machine, rows, summary, plot))


if __name__ == "__main__":
    main()
