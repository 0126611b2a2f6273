"""Pipeline parallelism: bubble fraction, activation memory per stage, conservative-force cost.

    OMP_NUM_THREADS=1 python benchmarks/pipeline.py [--machine cpu2] [--quick]

All runs use ``gnnmegatron.parallel.pipeline.PipelineEngine`` on gloo (``run_distributed``, one
torch thread per rank, pp processes) with micro-batches of identical size (a rattled 108-atom
fcc Cu cell, cutoff 4 Å) so that every stage's work per micro-batch is the same, and a
node_split EGNN (hidden 128) with two blocks per pipeline rank.

* **Bubble fraction** (pp = 2 and 4; GPipe, 1F1B, interleaved with 2 chunks per rank; direct
  forces; m = 1, 2, 4, 8, 16 micro-batches): per rank, the busy time is the sum of its actions'
  time less the time they were blocked in a receive (``engine.trace``); the step's
  bubble is ``1 - mean busy / step wall time`` (the slowest rank's wall time), median over the
  measured steps, against the analytic ``(p-1)/(m+p-1)`` (``(p-1)/(v m + p-1)`` interleaved;
  the last stage's heads and loss make the stages a little unequal). Beside it, the *replay*
  bubble: the schedule simulated with each action's measured compute time and free
  communication (``schedules.replay``), i.e. what the schedule itself costs with these stage
  times; measured minus replay is the point-to-point and framework overhead. With pp = 4 on a
  2-core machine the four ranks share two cores: the pp = 4 rows are oversubscribed and say so.
* **Activation memory per stage** (pp = 4, m = 8): the peak bytes of tensors autograd saves for
  backward (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, parameters
  excluded) on each rank during one step, per schedule; conservative forces run their GPipe
  four-sweep schedule and keep every micro-batch's F and B1 graphs.
* **Conservative vs direct forces** (pp = 2, m = 4): step time of the conservative-force step
  (F, B1, all-reduce of the force shares, B2a, B2b) over the direct-force step (F, B) of the
  same-size model, beside the same ratio in one process (pp = 1, the micro-batches one after
  the other): the pipeline's extra cost of the second-order pass.
* **What padding would cost**: ``torch.distributed.pipelining`` fixes stage shapes from the first
  micro-batch, so it needs micro-batches padded to fixed atom and edge budgets. Over the EMT
  training batches the trainer forms (512-atom budget), the fraction of padded atoms and
  edges that the smallest fixed budget holding every batch implies.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_results

HIDDEN = 128
CUTOFF = 4.0


def make_batch(seed: int = 0, reps: int = 3):
    import numpy as np
    from ase.build import bulk

    from gnnmegatron.data.batch import collate

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (reps, reps, reps)
    rng = np.random.default_rng(seed)
    atoms.positions += 0.08 * rng.standard_normal(atoms.positions.shape)
    return collate([{"atomic_numbers": atoms.numbers, "positions": atoms.positions, "cell": atoms.cell.array,
                     "pbc": atoms.pbc}], CUTOFF)


def loss_fn(out, batch):
    loss = out["energy"].pow(2).sum() * 1e-4
    if "forces" in out:
        loss = loss + out["forces"].pow(2).mean()
    return loss, {}


def _engine(pp, layers, schedule, v, force_mode):
    from gnnmegatron.models import ModelConfig
    from gnnmegatron.parallel.layout import init_layout
    from gnnmegatron.parallel.pipeline.engine import PipelineEngine
    from gnnmegatron.training.build import build_local_model

    layout = init_layout(tp=1, pp=pp, dp=1, groups="torch") if pp > 1 else None
    cfg = ModelConfig(hidden=HIDDEN, layers=layers, num_rbf=16, cutoff=CUTOFF, message="node_split",
                      force_mode=force_mode)
    if layout is None:
        from gnnmegatron.parallel.layout import single

        return build_local_model(cfg, single(), 0), None
    model = build_local_model(cfg, layout, 0, virtual_stages=v)
    return model, PipelineEngine(model, layout, schedule)


def _step(engine, batches, forces=True):
    import torch.distributed as dist

    dist.barrier(group=engine.layout.pp_group)
    engine.trace.clear()
    t0 = time.perf_counter()
    engine.train_step(batches, loss_fn, compute_forces=forces)
    wall = time.perf_counter() - t0
    busy = sum(end - start - waited for _, _, _, start, waited, end in engine.trace)
    return wall, busy


def _bubble_worker(pp, ms, steps):
    import torch.distributed as dist

    from gnnmegatron.parallel.pipeline.schedules import replay

    torch.set_num_threads(1)
    batch = make_batch()
    out = []
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        model, engine = _engine(pp, 2 * pp, schedule, v, "direct")
        engine.profile = True
        for m in ms:
            batches = [batch] * m
            _step(engine, batches)  # warm-up
            rows = []
            for _ in range(steps):
                wall, busy = _step(engine, batches)
                t = torch.tensor([wall, busy], dtype=torch.float64)
                walls = [torch.zeros(2, dtype=torch.float64) for _ in range(pp)]
                dist.all_gather(walls, t, group=engine.layout.pp_group)
                traces = [None] * pp
                dist.all_gather_object(traces, [end - start - waited for _, _, _, start, waited, end in engine.trace],
                                       group=engine.layout.pp_group)
                ideal = replay(engine.schedule(m, False), traces)
                max_wall = max(float(w[0]) for w in walls)
                mean_busy = sum(float(w[1]) for w in walls) / pp
                rows.append((max_wall, 1 - mean_busy / max_wall, ideal["bubble"], mean_busy / m))
            out.append({"schedule": schedule, "v": v, "m": m, "step_s": statistics.median(r[0] for r in rows),
                        "bubble": statistics.median(r[1] for r in rows),
                        "replay_bubble": statistics.median(r[2] for r in rows),
                        "busy_s_per_micro_batch": statistics.median(r[3] for r in rows)})
    return out


class SavedBytes:
    """Live bytes of tensors saved for backward (each storage once; parameters excluded) and their peak."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.count: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self.params or t.device.type == "meta":
            return t
        if self.count.get(key, 0) == 0:
            self.live += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
        self.count[key] = self.count.get(key, 0) + 1
        return _Token(self, t, key)

    @staticmethod
    def unpack(obj):
        return obj.t if isinstance(obj, _Token) else obj


class _Token:
    __slots__ = ("owner", "t", "key")

    def __init__(self, owner, t, key):
        self.owner, self.t, self.key = owner, t, key

    def __del__(self):
        c = self.owner.count
        c[self.key] -= 1
        if c[self.key] == 0:
            del c[self.key]
            self.owner.live -= self.t.untyped_storage().nbytes()


def _memory_worker(pp, m):
    torch.set_num_threads(1)
    batch = make_batch()
    out = []
    for schedule, v, force_mode in (("gpipe", 1, "direct"), ("1f1b", 1, "direct"), ("interleaved", 2, "direct"),
                                    ("gpipe", 1, "conservative")):
        model, engine = _engine(pp, 2 * pp, schedule, v, force_mode)
        engine.train_step([batch], loss_fn)  # warm-up
        counter = SavedBytes(model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            engine.train_step([batch] * m, loss_fn)
        out.append({"schedule": schedule if force_mode == "direct" else "conservative-gpipe", "v": v,
                    "stage": engine.layout.pp_rank, "peak_saved_bytes": counter.peak, "m": m})
    return out


def _force_cost_worker(pp, m, steps):
    torch.set_num_threads(1)
    batch = make_batch()
    times = {}
    for force_mode in ("direct", "conservative"):
        model, engine = _engine(pp, 4, "gpipe", 1, force_mode)
        samples = []
        for k in range(steps + 1):
            if engine is None:
                t0 = time.perf_counter()
                model.train()
                for _ in range(m):
                    loss, _ = loss_fn(model(batch, compute_forces=True), batch)
                    loss.backward()
                wall = time.perf_counter() - t0
            else:
                wall, _ = _step(engine, [batch] * m)
            if k:
                samples.append(wall)
        times[force_mode] = statistics.median(samples)
    return times


def padding_overhead(num: int = 600) -> dict:
    """Padded fraction of atoms and edges if every EMT training batch were padded to the largest."""
    import tempfile

    from gnnmegatron.data.emt import EMTConfig, generate_emt_dataset
    from gnnmegatron.data.neighbors import radius_graph_pbc  # noqa: F401 - collate builds the edges
    from gnnmegatron.data.sampler import ChunkAwareSampler, GraphLoader
    from gnnmegatron.data.store import GraphStore

    with tempfile.TemporaryDirectory() as tmp:
        generate_emt_dataset(f"{tmp}/emt.zarr", EMTConfig(num_structures=num, seed=0, max_atoms=32), workers=1,
                             progress=False)
        store = GraphStore(f"{tmp}/emt.zarr")
        sampler = ChunkAwareSampler(store.atom_counts, store.graph_chunks, range(len(store)), seed=0, shuffle=True,
                                    budget_atoms=512)
        atoms, edges = [], []
        for b in GraphLoader(store, sampler, cutoff=5.0, prefetch=0):
            atoms.append(int(b["num_atoms"].sum()))
            edges.append(int(b["edge_index"].shape[1]))
    return {"batches": len(atoms), "atoms_mean": statistics.mean(atoms), "atoms_max": max(atoms),
            "edges_mean": statistics.mean(edges), "edges_max": max(edges),
            "padded_atom_fraction": 1 - statistics.mean(atoms) / max(atoms),
            "padded_edge_fraction": 1 - statistics.mean(edges) / max(edges)}


def main() -> None:
    from gnnmegatron.parallel.testing import run_distributed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default="cpu2")
    parser.add_argument("--quick", action="store_true", help="fewer micro-batch counts and steps (a smoke run)")
    args = parser.parse_args()
    ms = (1, 4) if args.quick else (1, 2, 4, 8, 16)
    steps = 1 if args.quick else 3
    rows, summary = [], {}
    cores = len(__import__("os").sched_getaffinity(0))
    for pp in (2, 4):
        res = run_distributed(_bubble_worker, pp, pp, ms, steps, timeout=3600, preload_megatron=False)[0]
        for r in res:
            v = r["v"]
            analytic = (pp - 1) / (v * r["m"] + pp - 1)
            rows.append({"kind": "bubble", "pp": pp, "oversubscribed": pp > cores, **r, "analytic_bubble": analytic})
        print(f"pp={pp} bubble done", flush=True)
    m_mem = 8
    mem = run_distributed(_memory_worker, 4, 4, m_mem, timeout=3600, preload_megatron=False)
    for rank_rows in mem:
        for r in rank_rows:
            rows.append({"kind": "activation_memory", "pp": 4, **r})
    for pp in (1, 2):
        if pp == 1:
            times = _force_cost_worker(1, 4, steps)
        else:
            times = run_distributed(_force_cost_worker, pp, pp, 4, steps, timeout=3600, preload_megatron=False)[0]
        rows.append({"kind": "force_cost", "pp": pp, "m": 4, "direct_step_s": times["direct"],
                     "conservative_step_s": times["conservative"],
                     "conservative_over_direct": times["conservative"] / times["direct"]})
    pad = padding_overhead()
    rows.append({"kind": "padding", **pad})

    def mean_abs(pp, sched):
        sel = [r for r in rows if r["kind"] == "bubble" and r["pp"] == pp and r["schedule"] == sched]
        return max(abs(r["bubble"] - r["analytic_bubble"]) for r in sel)

    for pp in (2, 4):
        for sched in ("gpipe", "1f1b", "interleaved"):
            summary[f"bubble_max_abs_error_pp{pp}_{sched}"] = mean_abs(pp, sched)
            sel = [r for r in rows if r["kind"] == "bubble" and r["pp"] == pp and r["schedule"] == sched]
            summary[f"replay_bubble_max_abs_error_pp{pp}_{sched}"] = max(abs(r["replay_bubble"] - r["analytic_bubble"])
                                                                        for r in sel)
            summary[f"overhead_fraction_m16_pp{pp}_{sched}"] = next(
                (r["bubble"] - r["replay_bubble"] for r in sel if r["m"] == max(ms)), None)
    for sched in ("gpipe", "1f1b", "interleaved", "conservative-gpipe"):
        peaks = [r["peak_saved_bytes"] for r in rows if r["kind"] == "activation_memory" and r["schedule"] == sched]
        summary[f"peak_activation_mib_stage0_{sched}"] = peaks[0] / 2**20 if peaks else None
    g0 = summary["peak_activation_mib_stage0_gpipe"]
    summary["activation_1f1b_over_gpipe_stage0"] = summary["peak_activation_mib_stage0_1f1b"] / g0
    fc = {r["pp"]: r for r in rows if r["kind"] == "force_cost"}
    summary["conservative_over_direct_pp1"] = fc[1]["conservative_over_direct"]
    summary["conservative_over_direct_pp2"] = fc[2]["conservative_over_direct"]
    summary["padded_edge_fraction"] = pad["padded_edge_fraction"]
    summary["padded_atom_fraction"] = pad["padded_atom_fraction"]

    def plot(plt):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, pp in zip(axes[:2], (2, 4)):
            for sched, color in (("gpipe", "C0"), ("1f1b", "C1"), ("interleaved", "C2")):
                sel = [r for r in rows if r["kind"] == "bubble" and r["pp"] == pp and r["schedule"] == sched]
                ax.plot([r["m"] for r in sel], [r["bubble"] for r in sel], "o-", color=color, label=f"{sched} measured")
                ax.plot([r["m"] for r in sel], [r["analytic_bubble"] for r in sel], "--", color=color, alpha=0.6,
                        label=f"{sched} (p-1)/(vm+p-1)")
                ax.plot([r["m"] for r in sel], [r["replay_bubble"] for r in sel], ":", color=color, alpha=0.8,
                        label=f"{sched} replay of measured times")
            ax.set(xscale="log", xlabel="micro-batches m", ylabel="bubble fraction",
                   title=f"pp={pp}" + (" (oversubscribed: 4 ranks, 2 cores)" if pp > cores else ""))
            ax.legend(fontsize=7)
        ax = axes[2]
        scheds = ("gpipe", "1f1b", "interleaved", "conservative-gpipe")
        for k, sched in enumerate(scheds):
            sel = sorted((r for r in rows if r["kind"] == "activation_memory" and r["schedule"] == sched),
                         key=lambda r: r["stage"])
            ax.bar([r["stage"] + 0.2 * k - 0.3 for r in sel], [r["peak_saved_bytes"] / 2**20 for r in sel], width=0.2,
                   label=sched)
        ax.set(xlabel="pipeline stage", ylabel="peak saved activations (MiB)", title=f"pp=4, m={m_mem}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    path = write_results("pipeline", args.machine, rows, summary, plot,
                         extra={"model": {"hidden": HIDDEN, "message": "node_split", "blocks_per_rank": 2,
                                          "micro_batch_atoms": int(make_batch()["num_atoms"].sum())}})
    print(path)
    for k, v in summary.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
