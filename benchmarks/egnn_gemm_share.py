"""What bounds the faithful EGNN step on a CPU: GEMM multiply-adds, GEMM share and GEMM rate.

``benchmarks/egnn_blocks.py`` times whole steps; this script says what they are made of, for the
faithful block unfused and fused (``execution: fused``) at the same shapes (2 blocks, 30 neighbours
per atom, K = 16, float32; hidden 256 on 8000 atoms, 512 on 2000, 1024 on 1000). Each (variant,
hidden, step) runs in its own process on one thread (``torch.set_num_threads(1)``, one chunk
worker), so the profiler's self CPU time is the step's time: after a warm-up step, one step under
``torch.profiler`` with input shapes recorded. Per row:

* ``gemm_gflop``: floating-point operations of the step's matrix products (the ``mm``, ``addmm``,
  ``addmm_``, ``bmm``, ``baddbmm``, ``mv`` and ``addmv`` ops), 2 m k n each, from the recorded
  shapes: the arithmetic the algorithm asks for, independent of this machine's speed;
* ``gemm_share``: the GEMMs' part of the step's self CPU time; ``gemm_gflops``: their rate;
* ``step_s``: the profiled step's self CPU time (one thread).

A second kind of worker times single-threaded ``torch.mm`` at the shapes the two variants use
(the fused chunk tiles, the unfused block's E-row products), rounds alternating, median rate.

Summary per (hidden, step): the unfused / fused ratio of GEMM operations (the speed-up if both steps
were nothing but GEMMs at one rate), of step time, each variant's GEMM share and rate, and
``bound_if_fused_were_gemm_only`` = (GEMM operation ratio) / (unfused GEMM share): the speed-up the
fused step would reach if it were nothing but its GEMMs (gathers, activations, sums free) and ran them
at the unfused step's GEMM rate. It takes no speed from a second process: on the shared machine the
GEMM rate of one process differs from the next one's by tens of percent, the operation counts do not
(they follow from the shapes), and a share moves less than a rate (a slower machine slows GEMMs and
the rest alike). Times, shares and rates come from one profiled step per process.

Run (2-core CPU, about 10 minutes)::

    OMP_NUM_THREADS=1 python benchmarks/egnn_gemm_share.py

Writes benchmarks/results/egnn_gemm_share-<machine>.json/.csv/.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from common import spawn_worker, write_results

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::mv", "aten::addmv_", "aten::addmv",
            "aten::baddbmm")


def gemm_flops(name: str, shapes: list) -> float:
    """2 m k n of one call of a GEMM op from its recorded input shapes (0 for an unknown layout)."""
    if name in ("aten::mm", "aten::bmm"):
        a, b = shapes[0], shapes[1]
    elif name in ("aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::addmv_", "aten::addmv"):
        a, b = shapes[1], shapes[2]
    elif name == "aten::mv":
        a, b = shapes[0], shapes[1]
    else:
        return 0.0
    if not a or not b:
        return 0.0
    batch = a[0] if len(a) == 3 else 1
    m, k = a[-2], a[-1]
    n = b[-1] if len(b) >= 2 else 1
    return 2.0 * batch * m * k * n


def step_worker(spec: dict) -> dict:
    import torch
    from torch.profiler import profile

    from egnn_blocks import build_step
    from gnnmegatron.ops.dispatch import settings

    torch.set_num_threads(1)
    settings.chunk_workers = 1
    step, _, batch = build_step(dict(spec, layers=2, K=16))
    step()
    with profile(record_shapes=True) as prof:
        step()
    total_us = gemm_us = flops = 0.0
    for ev in prof.key_averages(group_by_input_shape=True):
        total_us += ev.self_cpu_time_total
        if ev.key in GEMM_OPS:
            gemm_us += ev.self_cpu_time_total
            flops += ev.count * gemm_flops(ev.key, ev.input_shapes)
    return dict(step_s=total_us / 1e6, gemm_s=gemm_us / 1e6, gemm_share=gemm_us / total_us,
                gemm_gflop=flops / 1e9, gemm_gflops=flops / gemm_us / 1e3 if gemm_us else None,
                E=int(batch["edge_index"].shape[1]))


def sgemm_worker(spec: dict) -> dict:
    """Single-threaded ``torch.mm`` rate (GFLOP/s) at ``spec["shapes"]`` ([m, k, n, a transposed]),
    ``rounds`` rounds over all shapes, each a few repetitions; median and best per shape."""
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = []
    for m, k, n, t in spec["shapes"]:
        a = torch.randn(k, m, generator=g).t() if t else torch.randn(m, k, generator=g)
        data.append((a, torch.randn(k, n, generator=g), torch.empty(m, n)))
    rates = [[] for _ in data]
    for _ in range(spec["rounds"]):
        for (m, k, n, _t), (a, b, c), out in zip(spec["shapes"], data, rates):
            reps = max(1, int(2e9 / (2 * m * k * n)))
            torch.mm(a, b, out=c)
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            out.append(2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return dict(rates=[dict(shape=s, median_gflops=statistics.median(r), best_gflops=max(r))
                       for s, r in zip(spec["shapes"], rates)])


def plot(rows):
    def fig_fn(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        steps = sorted({r["step"] for r in rows if "step" in r})
        hiddens = sorted({r["hidden"] for r in rows if "hidden" in r})
        for ax, field, title in ((axes[0], "gemm_gflop", "GEMM GFLOP per step"),
                                 (axes[1], "gemm_share", "GEMM share of step time (1 thread)")):
            width = 0.2
            for i, (step, variant) in enumerate((s, v) for s in steps for v in ("faithful-unfused", "faithful-fused")):
                vals = [next((r.get(field) or 0 for r in rows if r.get("hidden") == h and r.get("step") == step
                              and r.get("variant") == variant), 0) for h in hiddens]
                ax.bar([x + (i - 1.5) * width for x in range(len(hiddens))], vals, width, label=f"{variant} {step}")
            ax.set_xticks(range(len(hiddens)), [str(h) for h in hiddens])
            ax.set_xlabel("hidden")
            ax.set_title(title)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        return fig
    return fig_fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--machine", default=f"cpu{os.cpu_count()}")
    ap.add_argument("--atoms", default="256:8000,512:2000,1024:1000", help="HIDDEN:ATOMS pairs")
    ap.add_argument("--steps", default="first,conservative")
    ap.add_argument("--degree", type=int, default=30)
    ap.add_argument("--sgemm-rounds", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--quick", action="store_true", help="hidden 64 on 500 atoms, first step (smoke test)")
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(sgemm_worker(spec) if spec.get("kind") == "sgemm" else step_worker(spec)))
        return
    if args.quick:
        args.atoms, args.steps, args.sgemm_rounds = "64:500", "first", 1
    atoms_of = {int(h): int(n) for h, n in (p.split(":") for p in args.atoms.split(","))}
    rows = []
    for hidden, N in atoms_of.items():
        for step in args.steps.split(","):
            for variant in ("faithful-unfused", "faithful-fused"):
                spec = dict(variant=variant, step=step, hidden=hidden, N=N, degree=args.degree)
                row = dict(spec, **spawn_worker(__file__, spec, args.timeout))
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    # the GEMM shapes of the two variants: fused chunk tiles (1 MiB elements / H rows), the unfused E-row products
    shapes = []
    for hidden, N in atoms_of.items():
        E, c = N * args.degree, max(1, (1 << 20) // hidden)
        shapes += [[c, hidden, hidden, False], [hidden, c, hidden, True], [E, hidden, hidden, False],
                   [hidden, E, hidden, True]]
    sg = spawn_worker(__file__, dict(kind="sgemm", shapes=shapes, rounds=args.sgemm_rounds), args.timeout)
    summary = {}
    for hidden in atoms_of:
        for step in args.steps.split(","):
            u, f = ({(r["variant"]): r for r in rows if r["hidden"] == hidden and r["step"] == step}.get(v)
                    for v in ("faithful-unfused", "faithful-fused"))
            key = f"h{hidden}_{step}"
            if not u or not f or "error" in u or "error" in f:
                summary[f"{key}_undetermined"] = "a worker failed: see its row"
                continue
            summary[f"{key}_gemm_gflop_ratio_unfused_to_fused"] = round(u["gemm_gflop"] / f["gemm_gflop"], 3)
            summary[f"{key}_step_time_ratio_unfused_to_fused_1thread"] = round(u["step_s"] / f["step_s"], 3)
            summary[f"{key}_bound_if_fused_were_gemm_only"] = round(
                u["gemm_gflop"] / f["gemm_gflop"] / u["gemm_share"], 3)
            for name, r in (("unfused", u), ("fused", f)):
                summary[f"{key}_{name}_gemm_share"] = round(r["gemm_share"], 3)
                summary[f"{key}_{name}_gemm_gflops"] = round(r["gemm_gflops"], 1)
    if "error" in sg:
        summary["sgemm_undetermined"] = sg["error"]
    else:
        for r in sg["rates"]:
            m, k, n, t = r["shape"]
            summary[f"sgemm_{m}x{k}{'T' if t else ''}x{n}_median_gflops"] = round(r["median_gflops"], 1)
    for k, v in summary.items():
        print(f"{k}: {v}")
    path = write_results("egnn_gemm_share", args.machine, rows, summary, plot(rows),
                         extra=dict(method=__doc__.split("\n\n")[1].replace("\n", " ")))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
