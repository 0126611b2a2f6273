"""Training throughput and peak memory of EGNN blocks: faithful vs node_split, unfused vs fused.

The model is ``AtomisticModel`` (embedding, 2 EGCL blocks, energy head; the first block moves the
atoms) on one structure with 30 neighbours per atom (random positions, each atom's 30 nearest
neighbours, cutoff just above the longest of those edges, so every edge carries weight), K = 16
radial functions, float32: hidden 256 on 8000 atoms, 512 on 2000 and 1024 on 1000 (the default
``--atoms``; the wider rows use fewer atoms so that the unfused reference's conservative step fits
in the 2-core machine's 24 GB; hidden 512 has about the multiply-adds of hidden 256, 1024 twice).
Two steps:

* ``first``: forward + backward of an energy loss (``sum E^2``): a loss on the node features through
  the energy head; first-order autograd only.
* ``conservative``: the force-training step: forward, forces ``-dE/dx`` by autograd with
  ``create_graph`` (inside the forward), then the backward of ``sum E^2 + sum |F|^2`` (the double
  backward).

Variants (each in separate processes: one per timing round, one for memory):

* ``faithful-unfused``: HydraGNN's E_GCL as written (concatenate [h_i, h_j, rbf], edge MLP on E rows,
  scatter-sum), the study's model; the reference.
* ``faithful-split``: a step in between, run only here (the model has no such mode): the same block
  with its first edge linear split per node (``P = h A^T``, ``Q = h B^T`` once per node, gathered),
  everything else unfused plain autograd. It separates what the split buys from what fusion buys.
* ``faithful-fused``: ``execution: fused`` (``faithful_message_aggregate``: split + the rest of the edge
  MLP, sum and coordinate scalar chunk by chunk, recomputed in backward and double backward).
* ``node_split-unfused`` / ``node_split-fused``: the tensor-parallel-native block of
  docs/architecture.md, unfused and through ``fused_message_aggregate``.

Time: every variant of a (hidden, step) is timed once per round, each time in a fresh process (one
warm-up step, which includes torch.compile's compile of the node_split chunk bodies, then
``--repeats`` timed steps, median), ``--rounds`` rounds in alternating order; a row's timing fields
are its median round's, and every round is kept (``rounds_step_s``, ...). The speed-ups are the
median over rounds of the ratio within a round: on the shared 2-core machine the speed drifts by
tens of percent over the half hour a single pass takes, so variants timed minutes apart compare
more fairly than a pass's first and last rows. ``forward_s`` is the model call (for
``conservative`` it includes the force backward), ``backward_s`` the loss backward. atoms/s = atoms
/ step time (median round).

Peak memory: as ``benchmarks/kernels.py``, the RSS high-water mark of one step above the RSS before it
(sampled every 0.5 ms, glibc with a fixed 128 KiB mmap threshold so freed tensors leave the RSS), in
its own process. A process that would need more memory than the machine has stops at its data limit
(``RLIMIT_DATA``, ``--mem-limit-gb``) and its row records the error.

Run (2-core CPU: about 40 minutes with the defaults, three rounds of one timed step, the committed
run's setting; the machine needs ~16 GB free for the faithful unfused conservative step at hidden
256)::

    OMP_NUM_THREADS=2 python benchmarks/egnn_blocks.py

``--quick``: 1000 atoms, hidden 64, one repeat, one round (smoke test). Writes
benchmarks/results/egnn_blocks-<machine>.json/.csv/.png.

GPU (``--device cuda``): the same variants and steps on the GPU, every op on the triton backend (the
fused blocks' kernels, the unfused blocks' segment sums), 8000 atoms at every width by default (the
issue's shape; the unfused conservative step at hidden 1024 should need about 50 GB there, eight
times its 6.2 GiB on 1000 atoms on the CPU), CUDA-synchronised
timings, and peak memory as ``torch.cuda.max_memory_allocated`` over one step minus the allocation
before it, in the timing process after its timed steps (exact per process: no separate memory
process); ``--machine`` defaults to the GPU kind (``h100``, ``h200``)::

    python benchmarks/egnn_blocks.py --device cuda --variants faithful-unfused,faithful-fused --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

from common import gpu_kind, memory_phase, time_then_memory, write_results
from kernels import memory_row

VARIANTS = ("faithful-unfused", "faithful-split", "faithful-fused", "node_split-unfused", "node_split-fused")
STEPS = ("first", "conservative")
TARGETS = {"faithful_fused_speedup": 2.0, "faithful_fused_memory_ratio": 4.0, "node_split_fused_speedup": 8.0,
           "node_split_fused_memory_ratio": 5.0}


# ----------------------------------------------------------------------------- worker side
def make_batch(N: int, degree: int, seed: int = 0, device: str = "cpu"):
    """One non-periodic structure: N random atoms (density 0.05 / Å^3), each receiving edges from
    its ``degree`` nearest neighbours; returns (batch dict, cutoff just above the longest edge)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(N, 3, generator=g, dtype=torch.float64) * (N / 0.05) ** (1 / 3)
    nbr = []
    for s in range(0, N, 1024):
        d = torch.cdist(pos[s:s + 1024], pos)
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        nbr.append(d.topk(degree, largest=False).indices)
    src = torch.cat(nbr).reshape(-1)
    dst = torch.arange(N).repeat_interleave(degree)
    longest = float((pos[dst] - pos[src]).norm(dim=1).max())
    batch = dict(atomic_numbers=torch.randint(1, 90, (N,), generator=g), positions=pos.float(),
                 cell=torch.zeros(1, 3, 3), pbc=torch.zeros(1, 3, dtype=torch.bool),
                 batch=torch.zeros(N, dtype=torch.long), edge_index=torch.stack([dst, src]),
                 edge_shift=torch.zeros(dst.numel(), 3))
    return {k: v.to(device) for k, v in batch.items()}, 1.02 * longest


def _split_edge_messages(self, h, edge_index, rbf):
    """The faithful edge MLP with its first linear split per node (the ``faithful-split`` variant)."""
    import torch.nn.functional as F
    H = self.hidden
    lin = self.edge_mlp[0]
    z = (F.linear(h, lin.weight[:, :H]).index_select(0, edge_index[0])
         + F.linear(h, lin.weight[:, H:2 * H]).index_select(0, edge_index[1])
         + F.linear(rbf, lin.weight[:, 2 * H:], lin.bias))
    return self.edge_mlp[3](self.edge_mlp[2](self.edge_mlp[1](z)))


def build_step(spec: dict):
    """``(step, model, batch)`` for a spec's variant, hidden, atoms, degree, layers, K and step kind:
    ``step()`` runs one training step (zeroed gradients, forward, loss, backward) and returns its
    (forward, total) seconds."""
    import torch

    from gnnmegatron.models import AtomisticModel, ModelConfig
    from gnnmegatron.models.egnn import EGCL

    message, mode = spec["variant"].split("-")
    if mode == "split":
        EGCL.edge_messages = _split_edge_messages
    device = spec.get("device", "cpu")
    cuda = device == "cuda"
    batch, cutoff = make_batch(spec["N"], spec["degree"], device=device)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=spec["hidden"], layers=spec["layers"], num_rbf=spec["K"], cutoff=cutoff,
                      message=message, execution="fused" if mode == "fused" else "unfused",
                      ops_backend="triton" if cuda else "torch")
    model = AtomisticModel(cfg).to(device).train()
    conservative = spec["step"] == "conservative"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        out = model(batch, compute_forces=conservative)
        loss = out["energy"].pow(2).sum()
        if conservative:
            loss = loss + out["forces"].pow(2).sum()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0

    return step, model, batch


def worker(spec: dict) -> dict:
    cuda = spec.get("device") == "cuda"
    if spec.get("mem_limit_bytes") and not cuda:
        resource.setrlimit(resource.RLIMIT_DATA, (spec["mem_limit_bytes"], spec["mem_limit_bytes"]))
    step, model, batch = build_step(spec)

    t_warm = time.perf_counter()
    step()
    warmup_s = time.perf_counter() - t_warm
    if spec["phase"] == "memory" and not cuda:
        return memory_row(step, cuda=False)
    fwd, total, cpu = [], [], []
    for _ in range(spec["repeats"]):
        c0 = time.process_time()
        f_s, t_s = step()
        cpu.append(time.process_time() - c0)
        fwd.append(f_s)
        total.append(t_s)
    step_s = statistics.median(total)
    row = memory_row(step, cuda=True) if cuda else {}
    if cuda:
        import torch
        row.update(device_name=torch.cuda.get_device_name())
    return dict(row, step_s=step_s, step_min_s=min(total), forward_s=statistics.median(fwd),
                backward_s=statistics.median(t - f for t, f in zip(total, fwd)),
                cpu_s=None if cuda else statistics.median(cpu),
                atoms_per_s=spec["N"] / step_s, warmup_s=warmup_s, E=int(batch["edge_index"].shape[1]),
                parameters=sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------- driver side
def run_group(specs: list[dict], rounds: int, timeout: float) -> list[dict]:
    """The variants of one (hidden, step): ``rounds`` timing rounds, then one memory process each.

    Round r times every variant once, each in a fresh process, in the listed order in even rounds
    and reversed in odd ones, so that a drift of the shared machine's speed within a round falls on
    both ends alike. A row keeps every round (``rounds_*``) and takes its timing fields from its
    median round; ``summarize`` takes each speed-up as the median over rounds of the ratio within a
    round (variants timed minutes apart rather than up to half an hour)."""
    per = {s["variant"]: [] for s in specs}
    loads = {s["variant"]: [] for s in specs}
    wall = {s["variant"]: 0.0 for s in specs}
    for r in range(rounds):
        for spec in (specs if r % 2 == 0 else specs[::-1]):
            start = time.time()
            loads[spec["variant"]].append(os.getloadavg()[0])
            per[spec["variant"]].append(time_then_memory(__file__, spec, timeout, memory=False))
            wall[spec["variant"]] += time.time() - start
    rows = []
    for spec in specs:
        v = spec["variant"]
        row = dict(spec, rounds=rounds, load_average_1min_before=statistics.median(loads[v]))
        done = [t for t in per[v] if "error" not in t]
        start = time.time()
        if not done:
            row.update(per[v][0])
        else:
            row.update(sorted(done, key=lambda t: t["step_s"])[(len(done) - 1) // 2])  # the median round
            for k in ("step_s", "cpu_s", "forward_s", "backward_s"):
                row[f"rounds_{k}"] = [t.get(k) for t in per[v]]
            row["rounds_load_average_1min"] = loads[v]
            if "peak_mem_bytes" not in row:  # CPU: RSS in a process of its own (GPU: measured in the timing one)
                row.update(memory_phase(__file__, spec, timeout))
        row["load_average_1min_after"] = os.getloadavg()[0]
        row["wall_s"] = round(wall[v] + time.time() - start, 1)
        rows.append(row)
    return rows


def _ratio(base: dict, row: dict, field: str, fallback: float) -> float:
    """Median over rounds of ``base[field] / row[field]`` within each round (both timed in it), or
    ``fallback`` for rows without matching rounds."""
    a, b = base.get(f"rounds_{field}"), row.get(f"rounds_{field}")
    pairs = [(x, y) for x, y in zip(a or [], b or []) if x is not None and y]
    if not pairs or len(a) != len(b):
        return fallback
    return statistics.median(x / y for x, y in pairs)


def _best(row: dict) -> float:
    """The row's fastest step over all its rounds."""
    return min([x for x in row.get("rounds_step_s") or [] if x] + [row["step_min_s"]])


def summarize(rows: list[dict]) -> dict:
    def get(variant, step, hidden):
        return next((r for r in rows if r["variant"] == variant and r["step"] == step and r["hidden"] == hidden
                     and "error" not in r and "peak_mem_bytes" in r), None)

    out = {}
    for hidden in sorted({r["hidden"] for r in rows}):
        for step in STEPS:
            base = get("faithful-unfused", step, hidden)
            key = f"h{hidden}_{step}"
            for variant in VARIANTS[1:]:
                r = get(variant, step, hidden)
                name = variant.replace("-", "_")
                if r is None:
                    continue
                out[f"{key}_{name}_atoms_per_s"] = round(r["atoms_per_s"], 1)
                out[f"{key}_{name}_peak_mem_gib"] = round(r["peak_mem_bytes"] / 2**30, 3)
                if base is not None:
                    # median over rounds of the ratio within a round (run_group); a row without rounds: its own
                    speedup = _ratio(base, r, "step_s", r["atoms_per_s"] / base["atoms_per_s"])
                    out[f"{key}_{name}_speedup"] = round(speedup, 2)
                    if r.get("cpu_s") and base.get("cpu_s"):  # CPU runs: the ratio of process CPU times too
                        cpu = _ratio(base, r, "cpu_s", base["cpu_s"] / r["cpu_s"])  # (less sensitive to other jobs)
                        out[f"{key}_{name}_cpu_time_speedup"] = round(cpu, 2)
                    out[f"{key}_{name}_best_step_speedup"] = round(_best(base) / _best(r), 2)
                    out[f"{key}_{name}_memory_ratio"] = round(base["peak_mem_bytes"] / max(1, r["peak_mem_bytes"]), 2)
            if base is not None:
                out[f"{key}_faithful_unfused_atoms_per_s"] = round(base["atoms_per_s"], 1)
                out[f"{key}_faithful_unfused_peak_mem_gib"] = round(base["peak_mem_bytes"] / 2**30, 3)
            else:
                failed = next((r for r in rows if r["variant"] == "faithful-unfused" and r["step"] == step
                               and r["hidden"] == hidden), None)
                if failed is not None:
                    out[f"{key}_faithful_unfused"] = failed.get("error") or failed.get("memory_error")
            ff, ns = out.get(f"{key}_faithful_fused_speedup"), out.get(f"{key}_node_split_fused_speedup")
            if ff is not None:
                out[f"{key}_faithful_fused_meets_targets"] = bool(
                    ff >= TARGETS["faithful_fused_speedup"]
                    and out[f"{key}_faithful_fused_memory_ratio"] >= TARGETS["faithful_fused_memory_ratio"])
            if ns is not None:
                out[f"{key}_node_split_fused_meets_targets"] = bool(
                    ns >= TARGETS["node_split_fused_speedup"]
                    and out[f"{key}_node_split_fused_memory_ratio"] >= TARGETS["node_split_fused_memory_ratio"])
    out["targets"] = TARGETS
    return out


def plot(rows, plt, degree):
    ok = [r for r in rows if "error" not in r]
    hiddens = sorted({r["hidden"] for r in rows})
    steps = [s for s in STEPS if any(r["step"] == s for r in ok)] or list(STEPS)  # a run of some steps only
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]  # a run of some variants only
    fig, axes = plt.subplots(2, len(steps), figsize=(7 * len(steps), 8), squeeze=False)
    width = 0.8 / len(variants)
    for col, step in enumerate(steps):
        for k, variant in enumerate(variants):
            xs, speed, mem = [], [], []
            for i, hidden in enumerate(hiddens):
                r = next((r for r in ok if r["variant"] == variant and r["step"] == step and r["hidden"] == hidden),
                         None)
                if r is not None:
                    xs.append(i + (k - len(variants) / 2 + 0.5) * width)
                    speed.append(r["atoms_per_s"])
                    mem.append(r.get("peak_mem_bytes", 0) / 2**30)
            color = f"C{VARIANTS.index(variant)}"  # one colour per variant in every run's plot
            axes[0][col].bar(xs, speed, width, label=variant, color=color)
            axes[1][col].bar(xs, mem, width, label=variant, color=color)
        for row, label in ((0, "atoms / s"), (1, "peak working memory (GiB)")):
            ax = axes[row][col]
            atoms = {r["hidden"]: r["N"] for r in rows}
            ax.set_xticks(range(len(hiddens)), [f"hidden {h}\n{atoms[h]} atoms" for h in hiddens])
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.set_title(f"{step} step")
        axes[0][col].legend(fontsize=8)
    fig.suptitle(f"EGNN blocks, {degree} neighbours per atom, 2 blocks (missing bars: did not fit in memory)")
    fig.tight_layout()
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--machine", default=None, help="results name suffix (default: cpu<cores> or the GPU kind)")
    ap.add_argument("--hidden", default="256,512,1024")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--atoms", default=None,
                    help="atoms per structure: one number, or HIDDEN:ATOMS pairs (256:8000,512:2000) so that the "
                         "unfused reference still fits in memory at the larger widths (default: "
                         "256:8000,512:2000,1024:1000 on the CPU, 8000 on the GPU)")
    ap.add_argument("--degree", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per process (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timing rounds: every variant of a (hidden, step) once per round, each in its own process")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="data limit per process (default: MemAvailable at start minus 1 GiB)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    ap.add_argument("--rows-cache", default=None, help="JSONL of finished rows: resumed from, appended to")
    ap.add_argument("--quick", action="store_true", help="1000 atoms, hidden 64, one repeat")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.atoms, args.hidden, args.repeats, args.rounds = "1000", "64", 1, 1
    if args.atoms is None:
        args.atoms = "8000" if args.device == "cuda" else "256:8000,512:2000,1024:1000"
    if args.machine is None:
        args.machine = f"cpu{os.cpu_count()}" if args.device == "cpu" else gpu_kind()
    hiddens = [int(h) for h in args.hidden.split(",")]
    if ":" in args.atoms:
        atoms_of = {int(h): int(n) for h, n in (pair.split(":") for pair in args.atoms.split(","))}
        missing = [h for h in hiddens if h not in atoms_of]
        if missing:
            ap.error(f"--atoms names no atom count for hidden {missing}: give HIDDEN:ATOMS for every --hidden")
    else:
        atoms_of = {h: int(args.atoms) for h in hiddens}
    if args.device == "cuda":
        limit = None  # no RLIMIT_DATA on a GPU process (the CUDA runtime maps large host ranges)
    elif args.mem_limit_gb is None:
        avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        limit = avail - (1 << 30)
    else:
        limit = int(args.mem_limit_gb * 2**30)
    done = []
    if args.rows_cache and os.path.exists(args.rows_cache):
        done = [json.loads(line) for line in open(args.rows_cache) if line.strip()]
    rows = []
    for hidden in hiddens:
        for step in args.steps.split(","):
            specs = [dict(variant=variant, step=step, hidden=hidden, N=atoms_of[hidden], degree=args.degree, layers=2,
                          K=16, repeats=args.repeats, dtype="float32", mem_limit_bytes=limit, device=args.device)
                     for variant in args.variants.split(",")]
            keys = ("variant", "step", "hidden", "N", "degree", "repeats", "device")
            # a row that timed out is measured again (e.g. a first GPU process that spent its time compiling)
            cached = [next((r for r in reversed(done) if all(r.get(k, "cpu" if k == "device" else None) == spec[k]
                                                             for k in keys)
                            and r.get("rounds") == args.rounds and not str(r.get("error", "")).startswith("timeout")),
                           None) for spec in specs]
            fresh = any(c is None for c in cached)
            group = run_group(specs, args.rounds, args.timeout) if fresh else cached
            for row in group:
                rows.append(row)
                if fresh and args.rows_cache:
                    with open(args.rows_cache, "a") as f:
                        f.write(json.dumps(row) + "\n")
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                         if k in ("variant", "step", "hidden", "step_s", "rounds_step_s", "atoms_per_s",
                                  "peak_mem_bytes", "error", "memory_error", "wall_s")}
                print(json.dumps(shown), flush=True)
    summary = summarize(rows)
    extra = {"method": {
        "model": "AtomisticModel, " + ", ".join(f"hidden {h}: {n} atoms x {args.degree} neighbours "
                                                 f"(E = {n * args.degree})" for h, n in atoms_of.items()) + "; "
                 "2 EGCL blocks (the first updates coordinates), K=16 Bessel functions, float32, ops_backend "
                 + ("triton (CUDA)" if args.device == "cuda" else "torch"),
        "first": "forward + backward of sum(E^2) (energy loss; loss on the node features through the energy head)",
        "conservative": "forward with forces = -dE/dx (autograd.grad, create_graph) + backward of "
                        "sum(E^2) + sum(|F|^2) (double backward)",
        "time": "each variant timed once per round in a fresh process (warm-up step, then the median of `repeats` "
                "steps), `rounds` rounds in alternating variant order; row = its median round (all rounds in "
                "rounds_step_s, rounds_cpu_s, ...); summary speed-ups = median over rounds of the ratio within "
                "the round. "
                "Warm-up includes torch.compile of the node_split chunk bodies; forward_s = model call "
                "(conservative: includes the force backward), backward_s = loss backward; cpu_s = process CPU time "
                "of the step (both threads); load averages: the shared machine's load around the row "
                "(other users' jobs share the 2 cores)",
        "peak_mem_bytes": ("torch.cuda.max_memory_allocated over one step (after the timed steps) minus the "
                           "allocation before it, in the timing process" if args.device == "cuda" else
                           "peak RSS during one step (after a warm-up step) minus the RSS just before it, sampled "
                           "every 0.5 ms, in a separate process per variant with MALLOC_MMAP_THRESHOLD_=131072"),
        "mem_limit_bytes": "RLIMIT_DATA of every process: a variant above it fails with an out-of-memory error "
                           "instead of swapping or taking the shared machine down",
        "faithful-split": "benchmark-only step in between: faithful block with P = h A^T, Q = h B^T per node, "
                          "gathered, the rest unfused (autograd keeps its [E, H] tensors)",
    }}
    out = write_results("egnn_blocks", args.machine, rows, summary, lambda plt: plot(rows, plt, args.degree),
                        device=args.device, extra=extra)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
