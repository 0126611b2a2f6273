"""Forward + backward time and peak memory of ``fused_message_aggregate`` vs the naive edge MLP.

The computation (one EGNN first edge layer with its aggregation), with h [N, F], radial basis
R [E, K], envelope w [E], weight W = [A, B, C] [F, 2F + K], bias b [F]::

    m_i = sum_{j : (i, j)} w_ij act(W [h_i ; h_j ; R_ij] + b)

Methods (every one returns m and back-propagates a random dL/dm to h, R, w, W, b):

* ``naive``: what HydraGNN/PyG-style code runs today: ``h[dst]``, ``h[src]``, concatenate,
  ``Linear`` on E rows, activation, times w, ``index_add`` (scatter-add).
* ``torch_scatter`` / ``pyg``: the same with torch-scatter's ``scatter`` / a PyG
  ``MessagePassing`` (aggr="add"), only when those packages import.
* ``fused-torch``: ``P, Q = h A^T, h B^T`` per node, then ``fused_message_aggregate``
  with the torch backend (chunked, compiled chunk bodies, recomputing backward).
* ``fused-triton``: the same with the triton backend (CUDA only).
* ``fused-triton-det``: the triton backend in deterministic mode (``GNNMEGATRON_DETERMINISTIC=1``:
  dQ over the source-sorted plan instead of fp32 atomics, first config instead of autotuning),
  CUDA only: the price of bit-reproducible GPU training.

Group ``grad2`` times the conservative-force step instead of forward + backward: forward, the
gradient of a random dL/dm with respect to h with ``create_graph`` (the "forces"), a loss on
that gradient, and its backward to every parameter (the fused op's double backward: the triton
bwd2 kernel, or its closed-form torch twin on CPU; autograd through the edge MLP for ``naive``).

Each configuration runs in its own subprocesses (``--worker``) so that memory figures do not
mix. Peak memory, CPU: the resident set size (RSS, /proc/self/statm) sampled every 0.5 ms
by a thread during one forward + backward after a warm-up step, minus the RSS just before it
(inputs, parameters and the compiled code are already resident): the working memory of one
step. That step runs in a second subprocess whose glibc malloc has a fixed 128 KiB mmap
threshold (``MALLOC_MMAP_THRESHOLD_``), so tensor buffers are unmapped when freed and the RSS
follows live tensors; timing runs in a first subprocess with the default allocator.
``ru_maxrss`` of the memory worker (its whole-life high-water mark, including imports, inputs
and the warm-up/compile step) is recorded too. GPU: ``torch.cuda.max_memory_allocated``
minus the allocation before the step. Times: median of ``--repeats`` steps after one warm-up
step (which includes torch.compile's first compile on CPU).

On CUDA the forward's achieved bandwidth is ``fused_message_bytes(...) / forward time``
(the bytes the kernel must move once, see ``gnnmegatron.kernels.fused_message``) against the
card's nominal HBM bandwidth.

Run (about 15-20 min on 2 cores; needs about 16 GB free for the naive path at the headline size)::

    OMP_NUM_THREADS=2 python benchmarks/kernels.py      # on a GPU machine: the same one command

``--quick`` runs small sizes only (a smoke test); ``--sweep-chunk`` times chunk sizes; ``--grad2``
runs only the ``grad2`` group (writes kernels-grad2-<machine>.json).
Writes benchmarks/results/kernels-<machine>.json/.csv/.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import threading
import time

from common import gpu_kind, time_then_memory, write_results

HEADLINE = dict(N=65536, E=2_000_000, F=256, K=32)
GRAD2 = dict(N=16384, E=16384 * 24, F=128, K=32)  # the conservative-force step
TARGET_SPEEDUP = 3.0
TARGET_MEMORY_RATIO = 5.0
TARGET_BANDWIDTH_FRACTION = 0.7
# Nominal HBM bandwidth (bytes/s) by device-name substring, first match wins.
HBM_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
                 ("A100", 1.555e12), ("L40S", 0.864e12), ("A10", 0.6e12), ("V100", 0.9e12)]


# ----------------------------------------------------------------------------- worker side
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak RSS during a block, sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.0005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _make_inputs(N, E, F, K, device, dtype, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    dst = torch.sort(torch.randint(0, N, (E,), generator=g)).values
    src = torch.randint(0, N, (E,), generator=g)
    ei = torch.stack([dst, src]).to(device)
    h = torch.randn(N, F, generator=g).to(device=device, dtype=dtype).requires_grad_()
    R = torch.rand(E, K, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = torch.rand(E, generator=g).to(device=device, dtype=dtype).requires_grad_()
    lin = torch.nn.Linear(2 * F + K, F).to(device=device, dtype=dtype)
    grad_m = torch.randn(N, F, generator=g).to(device=device, dtype=dtype)
    return ei, h, R, w, lin, grad_m


def _method(name, ei, lin, F, num_nodes):
    import torch
    import torch.nn.functional as Fn

    dst, src = ei[0], ei[1]
    if name == "naive":
        def run(h, R, w):
            a = Fn.silu(lin(torch.cat([h[dst], h[src], R], dim=-1)))
            return torch.zeros_like(h).index_add_(0, dst, a * w.unsqueeze(1))
    elif name == "torch_scatter":
        import torch_scatter

        def run(h, R, w):
            a = Fn.silu(lin(torch.cat([h[dst], h[src], R], dim=-1)))
            return torch_scatter.scatter(a * w.unsqueeze(1), dst, dim=0, dim_size=h.shape[0], reduce="sum")
    elif name == "pyg":
        from torch_geometric.nn import MessagePassing

        class Layer(MessagePassing):
            def __init__(self):
                super().__init__(aggr="add", flow="target_to_source")

            def forward(self, h, R, w):
                return self.propagate(ei, h=h, R=R, w=w)

            def message(self, h_i, h_j, R, w):
                return Fn.silu(lin(torch.cat([h_i, h_j, R], dim=-1))) * w.unsqueeze(1)

        layer = Layer()

        def run(h, R, w):
            return layer(h, R, w)
    else:
        from gnnmegatron.ops import csr_plan, fused_message_aggregate
        plan = csr_plan(dst, num_nodes, sorted=True)
        backend = name.split("-")[1]

        def run(h, R, w):
            W = lin.weight
            P = Fn.linear(h, W[:, :F])
            Q = Fn.linear(h, W[:, F:2 * F])
            C = W[:, 2 * F:].t()
            return fused_message_aggregate(P, Q, ei, R, C, lin.bias, w, activation="silu", plan=plan,
                                           backend=backend)
    return run


def worker(spec: dict) -> dict:
    import torch
    device = torch.device(spec.get("device", "cpu"))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    if spec.get("chunk_elements"):
        from gnnmegatron.ops import settings
        settings.chunk_elements = int(spec["chunk_elements"])
    if spec.get("compile"):
        from gnnmegatron.ops import settings
        settings.compile = spec["compile"]
    if spec["method"].endswith("-det"):
        os.environ["GNNMEGATRON_DETERMINISTIC"] = "1"
    N, E, F, K = spec["N"], spec["E"], spec["F"], spec["K"]
    ei, h, R, w, lin, grad_m = _make_inputs(N, E, F, K, device, dtype)
    run = _method(spec["method"], ei, lin, F, N)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        for t in (h, R, w, *lin.parameters()):
            t.grad = None
        sync()
        t0 = time.perf_counter()
        m = run(h, R, w)
        sync()
        t1 = time.perf_counter()
        if spec.get("group") == "grad2":  # conservative-force step: a loss on dE/dh, differentiated
            (force,) = torch.autograd.grad((m * grad_m).sum(), h, create_graph=True)
            (force * force).sum().backward()
        else:
            m.backward(grad_m)
        sync()
        t2 = time.perf_counter()
        del m
        return t1 - t0, t2 - t0

    t_warm = time.perf_counter()
    step()  # warm-up: allocator, autotuning, torch.compile
    warmup_s = time.perf_counter() - t_warm
    if spec.get("phase") == "memory":
        return memory_row(step, cuda)
    fwd, total = [], []
    for _ in range(spec.get("repeats", 3)):
        f_s, t_s = step()
        fwd.append(f_s)
        total.append(t_s)
    for t in (h, R, w, *lin.parameters()):
        t.grad = None
    row = dict(spec)
    row.update(fwd_s=statistics.median(fwd), fwd_bwd_s=statistics.median(total), fwd_bwd_min_s=min(total),
               warmup_s=warmup_s)
    if cuda:
        row.update(memory_row(step, cuda))
        if spec["method"] == "fused-triton":
            from gnnmegatron.kernels.fused_message import fused_message_bytes
            nbytes = fused_message_bytes(N, E, F, K, h.element_size(), has_w=True)
            name = torch.cuda.get_device_name()
            bw = next((b for key, b in HBM_BANDWIDTH if key in name), None)
            row.update(fwd_bytes=nbytes, fwd_bytes_per_s=nbytes / row["fwd_s"], device_name=name,
                       hbm_bytes_per_s=bw, hbm_fraction=(nbytes / row["fwd_s"] / bw) if bw else None)
    return row


def memory_row(step, cuda) -> dict:
    """Peak working memory of one ``step()`` (see the module docstring): on a GPU the CUDA allocator's
    peak above the allocation before it, on the CPU the sampled RSS high-water mark above the RSS
    before it."""
    import torch
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return dict(peak_mem_bytes=torch.cuda.max_memory_allocated() - before)
    with RssSampler() as sampler:
        step()
    return dict(peak_mem_bytes=sampler.peak - sampler.base, rss_before_step_bytes=sampler.base,
                ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# ----------------------------------------------------------------------------- driver side
def run_worker(spec: dict, timeout: float) -> dict:
    """Timing in one subprocess and, on CPU, the memory step in a second (``common.time_then_memory``)."""
    t0 = time.time()
    row = dict(spec)
    row.update(time_then_memory(__file__, spec, timeout, memory=spec["device"] == "cpu"))
    row["wall_s"] = round(time.time() - t0, 1)
    return row


def available_methods(device: str) -> list[str]:
    import importlib.util
    methods = ["naive"]
    for name, module in (("torch_scatter", "torch_scatter"), ("pyg", "torch_geometric")):
        if importlib.util.find_spec(module) is not None:
            methods.append(name)
    methods.append("fused-torch")
    if device == "cuda":
        methods += ["fused-triton", "fused-triton-det"]
    return methods


def plot(rows, headline_key, plt):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    head = [r for r in rows if r.get("group") == "headline" and "error" not in r]
    names = [r["method"] for r in head]
    axes[0].bar(names, [r["fwd_bwd_s"] for r in head], color="tab:blue")
    axes[0].set_ylabel("forward + backward (s)")
    axes[0].set_title(f"{headline_key}: time")
    axes[1].bar(names, [r["peak_mem_bytes"] / 2**30 for r in head], color="tab:orange")
    axes[1].set_ylabel("peak working memory (GiB)")
    axes[1].set_title(f"{headline_key}: memory")
    for group, marker in (("sweep_degree", "o"), ("sweep_F", "s")):
        sweep = [r for r in rows if r.get("group") == group and "error" not in r]
        xs = sorted({(r["E"] // r["N"], r["F"]) for r in sweep})
        speed = []
        for x in xs:
            by = {r["method"]: r for r in sweep if (r["E"] // r["N"], r["F"]) == x}
            if "naive" in by and "fused-torch" in by:
                speed.append((x, by["naive"]["fwd_bwd_s"] / by["fused-torch"]["fwd_bwd_s"]))
        if speed:
            labels = [f"E/N={d}" if group == "sweep_degree" else f"F={f}" for (d, f), _ in speed]
            axes[2].plot(labels, [s for _, s in speed], marker=marker, label=group.replace("sweep_", "vs "))
    axes[2].axhline(TARGET_SPEEDUP, color="gray", ls="--", lw=1, label=f"target {TARGET_SPEEDUP:g}x")
    axes[2].set_ylabel("speed-up of fused vs naive (fwd+bwd)")
    axes[2].set_title("sweeps (N = 16384)")
    axes[2].legend()
    fig.tight_layout()
    return fig


def plot_grad2(rows, plt):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    done = [r for r in rows if r.get("group") == "grad2" and "error" not in r]
    names = [r["method"] for r in done]
    axes[0].bar(names, [r["fwd_bwd_s"] for r in done], color="tab:blue")
    axes[0].set_ylabel("conservative-force step (s)")
    axes[1].bar(names, [r.get("peak_mem_bytes", 0) / 2**30 for r in done], color="tab:orange")
    axes[1].set_ylabel("peak working memory (GiB)")
    if done:
        size = f"N={done[0]['N']} E={done[0]['E']} F={done[0]['F']} K={done[0]['K']}"
        axes[0].set_title(f"grad2, {size}: time")
        axes[1].set_title("memory")
    fig.tight_layout()
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--machine", default=None, help="results name suffix (default: cpu<cores> or the GPU kind)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--sweep-chunk", action="store_true", help="time the torch backend's chunk sizes only")
    ap.add_argument("--grad2", action="store_true", help="time the conservative-force (double backward) group only")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.machine:
        machine = args.machine
    elif device == "cuda":
        machine = gpu_kind()
    else:
        machine = f"cpu{os.cpu_count()}"
    methods = available_methods(device)
    if args.quick:
        head, base_n, degrees, widths = dict(N=4096, E=65536, F=64, K=16), 2048, (8, 32), (32, 64)
    else:
        head, base_n, degrees, widths = HEADLINE, 16384, (8, 16, 32), (64, 128)
    specs = []
    grad2_size = dict(N=2048, E=32768, F=64, K=16) if args.quick else GRAD2
    grad2 = [dict(grad2_size, method=m, group="grad2") for m in methods if m not in ("torch_scatter", "pyg")]
    if args.sweep_chunk:
        for ce in (1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21):
            specs.append(dict(head, method="fused-torch", group="chunk", chunk_elements=ce))
    elif args.grad2:
        specs += grad2
    else:
        specs += [dict(head, method=m, group="headline") for m in methods]
        specs += [dict(N=base_n, E=base_n * d, F=256 if not args.quick else 64, K=head["K"], method=m,
                       group="sweep_degree") for d in degrees for m in methods if m in ("naive", "fused-torch",
                                                                                           "fused-triton")]
        specs += [dict(N=base_n, E=base_n * 32, F=f, K=head["K"], method=m, group="sweep_F")
                  for f in widths for m in methods if m in ("naive", "fused-torch", "fused-triton")]
        specs += grad2
    rows = []
    for spec in specs:
        spec.update(device=device, dtype="float32", repeats=args.repeats)
        row = run_worker(spec, args.timeout)
        rows.append(row)
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                 if k in ("method", "group", "N", "E", "F", "fwd_s", "fwd_bwd_s", "peak_mem_bytes", "error",
                          "chunk_elements", "hbm_fraction")}
        print(json.dumps(shown), flush=True)

    def get(method, group="headline"):
        return next((r for r in rows if r["method"] == method and r.get("group") == group and "error" not in r), None)

    summary = {}
    naive, fused = get("naive"), get("fused-triton" if device == "cuda" else "fused-torch")
    if naive and fused:
        summary.update(
            size=f"N={head['N']} E={head['E']} F={head['F']} K={head['K']}",
            fused_backend=fused["method"],
            naive_fwd_bwd_s=round(naive["fwd_bwd_s"], 3), fused_fwd_bwd_s=round(fused["fwd_bwd_s"], 3),
            speedup_vs_naive=round(naive["fwd_bwd_s"] / fused["fwd_bwd_s"], 2),
            forward_speedup_vs_naive=round(naive["fwd_s"] / fused["fwd_s"], 2),
            naive_peak_mem_bytes=naive["peak_mem_bytes"], fused_peak_mem_bytes=fused["peak_mem_bytes"],
            peak_memory_ratio_vs_naive=round(naive["peak_mem_bytes"] / max(1, fused["peak_mem_bytes"]), 2),
            target_speedup=TARGET_SPEEDUP, target_peak_memory_ratio=TARGET_MEMORY_RATIO,
        )
        if "ru_maxrss_bytes" in naive and "ru_maxrss_bytes" in fused:  # CPU rows (GPU rows: CUDA allocator peak)
            summary["ru_maxrss_ratio_vs_naive"] = round(naive["ru_maxrss_bytes"] / max(1, fused["ru_maxrss_bytes"]), 2)
        summary["meets_targets"] = bool(summary["speedup_vs_naive"] >= TARGET_SPEEDUP
                                        and summary["peak_memory_ratio_vs_naive"] >= TARGET_MEMORY_RATIO)
        if fused.get("hbm_fraction") is not None:
            summary["hbm_bandwidth_fraction"] = round(fused["hbm_fraction"], 3)
            summary["fwd_bytes"] = fused["fwd_bytes"]
            summary["meets_targets"] = summary["meets_targets"] and summary["hbm_bandwidth_fraction"] >= \
                TARGET_BANDWIDTH_FRACTION
    for other in ("torch_scatter", "pyg"):
        r = get(other)
        if r and fused:
            summary[f"speedup_vs_{other}"] = round(r["fwd_bwd_s"] / fused["fwd_bwd_s"], 2)
    if "torch_scatter" not in methods:
        summary["torch_scatter"] = "not installed: baseline skipped"
    if "pyg" not in methods:
        summary["pyg"] = "not installed: baseline skipped"
    g_naive = get("naive", "grad2")
    g_fused = get("fused-triton" if device == "cuda" else "fused-torch", "grad2")
    if g_naive and g_fused:
        summary.update(grad2_size=f"N={grad2_size['N']} E={grad2_size['E']} F={grad2_size['F']} K={grad2_size['K']}",
                       grad2_naive_s=round(g_naive["fwd_bwd_s"], 3), grad2_fused_s=round(g_fused["fwd_bwd_s"], 3),
                       grad2_speedup_vs_naive=round(g_naive["fwd_bwd_s"] / g_fused["fwd_bwd_s"], 2),
                       grad2_peak_memory_ratio_vs_naive=round(g_naive["peak_mem_bytes"]
                                                              / max(1, g_fused["peak_mem_bytes"]), 2))
    det, nondet = get("fused-triton-det"), get("fused-triton")
    if det and nondet:
        summary["deterministic_slowdown"] = round(det["fwd_bwd_s"] / nondet["fwd_bwd_s"], 3)
    name = "kernels-chunk" if args.sweep_chunk else "kernels-grad2" if args.grad2 else "kernels"
    extra = {
        "method": {
            "computation": "m_i = sum_j w_ij silu(W [h_i; h_j; R_ij] + b), backward of a random dL/dm to h, R, w, "
                           "W, b; float32",
            "time": f"median of {args.repeats} forward+backward steps after one warm-up step (the warm-up includes "
                    "torch.compile's compile on CPU and autotuning on GPU); group grad2: the conservative-force "
                    "step (forward, dL/dh with create_graph, loss |dL/dh|^2, its backward) in fwd_bwd_s",
            "peak_mem_bytes": ("CPU: peak RSS sampled every 0.5 ms during one forward+backward step (after a "
                               "warm-up step) minus the RSS just before it: the working memory of the step; "
                               "inputs, parameters and compiled code excluded. Measured in a separate subprocess "
                               "per configuration with MALLOC_MMAP_THRESHOLD_=131072 so that freed tensor "
                               "buffers leave the RSS (glibc's default dynamic threshold keeps them, which hides "
                               "reuse). GPU: "
                               "torch.cuda.max_memory_allocated minus the allocation before the step."),
            "ru_maxrss_bytes": "whole-life peak RSS of the configuration's subprocess (imports, inputs, warm-up "
                               "and compile included)",
        },
    }
    out = write_results(name, machine, rows, summary,
                        None if args.sweep_chunk else (lambda plt: plot_grad2(rows, plt)) if args.grad2 else
                        (lambda plt: plot(rows, summary.get("size", ""), plt)),
                        device=device, extra=extra)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
