"""The benchmark harness: a config under a layout, timed in fresh processes.

``run_config(spec)`` launches ``world`` processes (``torch.distributed.run``, gloo on CPU, NCCL on
GPUs) running :func:`worker`, which builds the real ``Trainer`` for the config with the layout's
overrides, runs ``warmup`` optimizer steps and then ``steps`` measured ones, and writes one JSON
per rank. Measured per step and rank:

* step time (each step starts after a barrier; the slowest rank's time is the step's), the
  cores a rank keeps busy (process CPU time over wall time: the compute thread and the loader's
  prefetch thread), and the time the step waited for its data (``next`` on the trainer's batch
  iterator: reading, collating, neighbour lists);
* atoms and graphs processed (over all replicas) and the analytic training FLOPs of those atoms
  and edges (``flops_per_step``, printed per layer by ``layer_flops``): achieved FLOP/s per rank
  and its fraction of the device's peak (``device_peak_flops``: measured large-matmul rate on CPU,
  the datasheet number for known GPUs);
* peak memory of the rank (CPU: the resident-set high-water mark, reset after warm-up; GPU:
  ``torch.cuda.max_memory_allocated``: live tensors, not the caching allocator's reserve), and on
  CPU the resident set at the rank's start (interpreter and libraries), once its trainer is built
  (model, store, loader; optimizer state not yet allocated) and after the warm-up steps (where the
  peak's measurement starts);
* collectives: bytes of the tensor-parallel collectives and the seconds spent in them
  (``CommCounter``; on CPU the calls block, so this includes waiting for the other ranks), bytes
  sent point to point by the pipeline, and the exposed seconds of the data-parallel gradient
  all-reduce (waiting in ``GradReducer.finish``; the rest overlaps the backward) and waiting in
  pipeline receives.

On CPU the resident set also holds what glibc's allocator keeps after ``free``: transient
blocks (the fused ops' per-chunk tiles) are served from the heap once the allocator's dynamic
mmap threshold has risen past them, and holes between blocks that stay alive (saved activations)
are not returned, so the high-water mark depends on allocation order (more with many
micro-batches alive). ``run_config(..., memory="live")`` runs the ranks with a fixed
``MALLOC_MMAP_THRESHOLD_`` of 128 KiB: every block of 128 KiB or more is its own mapping, returned
when freed, and the high-water mark follows the live tensors, as ``max_memory_allocated`` does on
a GPU (steps run slower: a memory measurement, not a timing one).

``measure_tp_shard`` times one tensor-parallel rank's shard of a model against the whole model in
one process: the part of the compute tensor parallelism does not divide (performance model).

``scaling(...)`` sweeps world sizes for strong scaling (fixed global batch: ``budget_atoms``
divided over the replicas) and weak scaling (fixed per-replica batch), with efficiency against
the smallest world.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["LIVE_MEMORY_ENV", "affine_fit", "device_peak_flops", "layer_flops", "measure_allreduce_link",
           "measure_link", "measure_tp_shard", "run_config", "worker"]

LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # glibc: blocks >= 128 KiB mapped, unmapped on free

GPU_PEAK_FLOPS = {  # dense fp32 / bf16 tensor-core peaks (datasheets)
    "H100": {"float32": 67e12, "bfloat16": 989e12},
    "H200": {"float32": 67e12, "bfloat16": 989e12},
    "A100": {"float32": 19.5e12, "bfloat16": 312e12},
}


def device_peak_flops(device: str = "cpu", dtype: str = "float32", threads: int | None = None) -> float:
    """FLOP/s a device can reach: on CPU, a measured 1024^3 matmul on ``threads`` threads (the
    process's own setting by default); on GPU, the datasheet number for its name."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, peaks in GPU_PEAK_FLOPS.items():
            if key in name:
                return peaks.get(dtype, peaks["float32"])
        return float("nan")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            a @ b
            reps += 1
        return reps * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def layer_flops(cfg, atoms: int, edges: int) -> list[tuple[str, float]]:
    """Analytic forward FLOPs per layer (each block, the heads) for ``atoms`` and ``edges``."""
    from gnnmegatron.models.presets import forward_flops

    f = forward_flops(cfg)
    H = cfg.hidden
    head = (2 * H * H + 2 * H) * atoms
    total = f["per_atom"] * atoms + f["per_edge"] * edges
    per_block = (total - head) / cfg.layers
    return [(f"block {i}", per_block) for i in range(cfg.layers)] + [("energy head", head)]


def _rss_peak_reset() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; 0 where absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _wait_for_peers(spec: dict) -> None:
    """Side-by-side runs (``run_config(..., start_together=(dir, n))``): every run's ranks announce
    themselves in ``dir`` after warm-up and wait until ``n`` processes have, so that the measured steps of
    independent runs overlap (their start-up would otherwise share the cores with the others'
    measured steps)."""
    together = spec.get("start_together")
    if not together:
        return
    folder, count = Path(together[0]), int(together[1])
    (folder / f"{os.getpid()}.ready").write_text("")
    deadline = time.monotonic() + 1800
    while len(list(folder.glob("*.ready"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"side-by-side run: fewer than {count} processes reached {folder} in 30 minutes")
        time.sleep(0.01)


def worker(spec: dict) -> dict:
    """One rank of a harness run (called under torchrun); returns its measurements."""
    import torch.distributed as dist

    from gnnmegatron.models.presets import flops_per_step
    from gnnmegatron.parallel.comm_stats import CommCounter
    from gnnmegatron.training.config import load_config
    from gnnmegatron.training.trainer import Trainer

    rss_start = _status_bytes("VmRSS")  # the process before the trainer: interpreter, torch, megatron-core, gnnmegatron
    cfg = load_config(spec["config"], spec.get("overrides", []))
    t = Trainer(cfg, resume="overwrite")
    rss_built = _status_bytes("VmRSS")  # + the trainer: model, optimizer (state not yet allocated), store, loader
    rank = t.rank
    dp_time = [0.0]
    if t.grad_reducer is not None:  # the exposed part of the gradient all-reduce (the rest overlaps the backward)
        original = t.grad_reducer.finish

        def timed():
            t0 = time.perf_counter()
            original()
            dp_time[0] += time.perf_counter() - t0

        t.grad_reducer.finish = timed
    batches = t._batches()
    rows = []
    device = t.device.type
    for k in range(spec["warmup"] + spec["steps"]):
        measure = k >= spec["warmup"]
        if measure and k == spec["warmup"]:
            _wait_for_peers(spec)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            else:
                _rss_peak_reset()
            rss_warm = _status_bytes("VmRSS")  # after warm-up: + optimizer state, gradients, compiled code, caches
        if dist.is_initialized():
            dist.barrier()
        dp_time[0] = 0.0
        if t.engine is not None:
            t.engine.profile = True
            t.engine.trace.clear()
            sent0 = t.engine.channels.bytes_sent
        t0, c0 = time.perf_counter(), time.process_time()
        micro = [{key: (v.to(t.device) if torch.is_tensor(v) else v) for key, v in b.items()} for b in next(batches)]
        t_data = time.perf_counter() - t0
        with CommCounter() as cc:
            t.train_step(micro)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0  # every thread of the process: compute and the loader's prefetch
        if not measure:
            continue
        atoms = sum(int(b["num_atoms"].sum()) for b in micro)
        edges = sum(int(b["edge_index"].shape[1]) for b in micro)
        graphs = sum(int(b["num_atoms"].numel()) for b in micro)
        rows.append({"step_s": wall, "cpu_s": cpu, "data_s": t_data, "dp_allreduce_s": dp_time[0],
                     "tp_bytes": cc.total_bytes(), "tp_s": cc.total_seconds(),
                     "pp_bytes": (t.engine.channels.bytes_sent - sent0) if t.engine is not None else 0,
                     "pp_recv_wait_s": sum(w for *_, w, _e in t.engine.trace) if t.engine is not None else 0.0,
                     "atoms": atoms, "edges": edges, "graphs": graphs,
                     "flops": flops_per_step(t.model_cfg, atoms, edges)})
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM")
    return {"rank": rank, "world": t.world, "layout": t.describe_layout(), "steps": rows, "peak_bytes": peak,
            "rss_start_bytes": rss_start, "rss_built_bytes": rss_built, "rss_warm_bytes": rss_warm,
            "device": device, "is_logger": t.is_logger, "dp_rank": t.groups.dp_rank,
            "first_of_replica": t.groups.tp_rank == 0 and t.groups.pp_rank == 0}


def run_config(config: str | Path, world: int, *, overrides: list[str] | None = None, steps: int = 5,
               warmup: int = 2, timeout: float = 3600, env: dict | None = None,
               start_together: tuple[str, int] | None = None, memory: str = "resident") -> dict[str, Any]:
    """Run ``config`` on ``world`` fresh processes and summarise (see the module docstring).

    ``memory="live"``: the ranks' CPU allocator returns freed blocks of 128 KiB or more at once, so
    the measured peak is that of the live tensors (slower steps; see the module docstring).

    ``start_together=(folder, n)``: this run is one of several run side by side (from threads of the
    caller) with ``n`` processes in all; each starts its measured steps only when all ``n`` have
    finished their warm-up."""
    from gnnmegatron.training.config import load_config

    if memory not in ("resident", "live"):
        raise ValueError(f"memory={memory!r}: use 'resident' (the process's resident set) or 'live'")
    bad = [f"{name}={value!r} must be an integer >= {low}" for name, value, low in
           (("processes", world, 1), ("steps", steps, 1), ("warmup", warmup, 0))
           if not (isinstance(value, int) and value >= low)]
    if bad:
        raise ValueError(f"benchmark of {config}: {'; '.join(bad)}")
    # the config and its layout are checked here, before any process starts (a mistake is one message)
    load_config(config, list(overrides or [])).parallel.resolve(world)
    env = {**(LIVE_MEMORY_ENV if memory == "live" else {}), **(env or {})}
    with tempfile.TemporaryDirectory(prefix="gnnmegatron-bench-") as tmp:
        # the ranks train in a run directory of their own: the config's run_dir (a trained run, say) is
        # never touched (its trainer starts with resume="overwrite")
        spec = {"config": str(config), "overrides": list(overrides or []) + [f"run_dir={Path(tmp) / 'run'}"],
                "steps": steps, "warmup": warmup, "out": tmp,
                "start_together": list(start_together) if start_together else None}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "gnnmegatron.bench.harness", str(spec_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                   **env})
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark run of {config} on {world} processes failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    return {**summarise(ranks), "memory_mode": memory}


def summarise(ranks: list[dict]) -> dict[str, Any]:
    """Per-step maxima over ranks, then medians and percentiles over steps."""
    steps = len(ranks[0]["steps"])
    walls = [max(r["steps"][k]["step_s"] for r in ranks) for k in range(steps)]
    firsts = [r for r in ranks if r["first_of_replica"]]
    atoms = [sum(r["steps"][k]["atoms"] for r in firsts) for k in range(steps)]
    graphs = [sum(r["steps"][k]["graphs"] for r in firsts) for k in range(steps)]
    flops = [sum(r["steps"][k]["flops"] for r in firsts) for k in range(steps)]
    data = [max(r["steps"][k]["data_s"] for r in ranks) for k in range(steps)]
    dp = [max(r["steps"][k]["dp_allreduce_s"] for r in ranks) for k in range(steps)]
    world = ranks[0]["world"]
    med = statistics.median(walls)
    ordered = sorted(walls)
    return {
        "world": world, "layout": ranks[0]["layout"], "steps": steps,
        "step_s_p50": med, "step_s_p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "step_s_min": ordered[0],
        "atoms_per_s": statistics.median(a / w for a, w in zip(atoms, walls)),
        "graphs_per_s": statistics.median(g / w for g, w in zip(graphs, walls)),
        "flops_per_s_per_rank": statistics.median(f / w / world for f, w in zip(flops, walls)),
        "data_wait_fraction": statistics.median(d / w for d, w in zip(data, walls)),
        # cores a rank keeps busy: its processes' CPU time over the step's wall time (CPU runs)
        "cpu_utilisation": statistics.median(r["steps"][k].get("cpu_s", 0.0) / walls[k] for r in ranks
                                             for k in range(steps)),
        "dp_allreduce_s": statistics.median(dp),
        "tp_collective_s": statistics.median(max(r["steps"][k].get("tp_s", 0.0) for r in ranks) for k in range(steps)),
        "tp_bytes_per_step": max(r["steps"][0]["tp_bytes"] for r in ranks),
        "pp_bytes_per_step": max(r["steps"][0]["pp_bytes"] for r in ranks),
        "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
        "rss_start_bytes_per_rank": [r.get("rss_start_bytes", 0) for r in ranks],
        "rss_built_bytes_per_rank": [r.get("rss_built_bytes", 0) for r in ranks],
        "rss_warm_bytes_per_rank": [r.get("rss_warm_bytes", 0) for r in ranks],
        "atoms_per_step": statistics.median(atoms),
        "edges_per_atom": statistics.median(sum(r["steps"][k]["edges"] for r in firsts) / max(a, 1)
                                            for k, a in zip(range(steps), atoms)),
    }


if __name__ == "__main__":  # a rank of run_config, under torch.distributed.run
    _spec = json.loads(Path(sys.argv[1]).read_text())
    _result = worker(_spec)
    (Path(_spec["out"]) / f"rank{_result['rank']:05d}.json").write_text(json.dumps(_result))


def _link_worker(sizes: list[int], reps: int) -> list[tuple[int, float]]:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = dist.get_rank()
    out = []
    for n in sizes:
        buf = torch.zeros(max(1, n // 4), dtype=torch.float32)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)
        out.append((n, (time.perf_counter() - t0) / (2 * reps)))
    return out


def _allreduce_worker(sizes: list[int], reps: int) -> list[tuple[int, float]]:
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = []
    for n in sizes:
        buf = torch.ones(max(1, n // 4), dtype=torch.float32)
        dist.all_reduce(buf)  # the first call of a size sets up gloo's buffers
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(buf)
        out.append((n, (time.perf_counter() - t0) / reps))
    return out


def affine_fit(x, y) -> tuple[float, float]:
    """Least-squares intercept and slope of ``y = a + b x``."""
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
    return float(a), float(b)


def _fit_link(name: str, rows, latencies: float):
    """A ``Link`` from ``(bytes, seconds)`` rows fitted as ``t = latencies x alpha + bytes / beta``."""
    from .perf import Link

    a, inv_beta = affine_fit([r[0] for r in rows], [r[1] for r in rows])
    return Link(name, max(a / latencies, 1e-7), 1.0 / max(inv_beta, 1e-15))


def measure_link(sizes=(1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22), reps: int = 20):
    """Alpha (s) and beta (bytes/s) of point-to-point messages between two gloo processes on this
    machine, fitted by least squares to one-way times of a ping-pong over message ``sizes``."""
    from gnnmegatron.parallel.testing import run_distributed

    rows = run_distributed(_link_worker, 2, list(sizes), reps, timeout=600, preload_megatron=False)[0]
    return _fit_link("gloo-loopback", rows, 1.0), rows


def measure_allreduce_link(sizes=(1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22), reps: int = 20):
    """The link that makes the model's two-rank ring all-reduce (``2 alpha + S / beta``) match gloo's
    measured all-reduce of ``sizes`` bytes between two processes on this machine: gloo's collectives
    cost several one-way message latencies per call (its algorithm's phases and thread hand-offs)."""
    from gnnmegatron.parallel.testing import run_distributed

    rows = run_distributed(_allreduce_worker, 2, list(sizes), reps, timeout=600, preload_megatron=False)[0]
    return _fit_link("gloo-allreduce", rows, 2.0), rows


def measure_tp_shard(cfg, tp: int, batches: list[dict], *, reps: int = 5, warmup: int = 2) -> dict:
    """Seconds of a training step's model work (forward, forces when the model is conservative, the
    loss's backward) of the whole model and of tensor-parallel rank 0's shard, in this process, on
    two or more ``batches`` of different sizes, and the part of the compute the shard does not divide.

    The shard is built with a group-less layout (``bench.memory``): its collectives are no-ops and
    its tensors have the real rank's shapes, so its time is that rank's compute without
    communication. Whole and shard alternate, ``reps`` times after ``warmup`` on every batch; the
    minimum of each is kept (the machine's noise only adds). The times are fitted as
    ``t = fixed + per_atom x atoms`` for each; ``divided = per_atom(shard) / per_atom(whole)`` is
    ``r + (1 - r) / tp`` of the performance model, so ``serial_fraction`` ``r`` is the size-
    proportional compute each tp rank repeats (the fixed cost per pass is the model's ``t_0``).
    """
    from .memory import build_rank_shard

    if tp < 2 or cfg.hidden % tp:
        raise ValueError(f"measure_tp_shard: tp={tp} must be at least 2 and divide hidden={cfg.hidden}")
    atoms = [int(b["atomic_numbers"].shape[0]) for b in batches]
    if len(set(atoms)) < 2:
        raise ValueError(f"measure_tp_shard: give batches of at least two sizes (atoms: {atoms})")
    forces = cfg.force_mode == "conservative"

    def step(model, batch):
        t0 = time.perf_counter()
        out = model(batch, compute_forces=forces)
        loss = out["energy"].sum() + (out["forces"].pow(2).sum() if forces else 0.0)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    models = {1: build_rank_shard(cfg, 1), tp: build_rank_shard(cfg, tp)}
    times = {size: [[] for _ in batches] for size in models}
    for k in range(warmup + reps):
        for j, batch in enumerate(batches):
            for size, model in models.items():
                t = step(model, batch)
                if k >= warmup:
                    times[size][j].append(t)
    whole = [min(t) for t in times[1]]
    shard = [min(t) for t in times[tp]]
    slope = {name: affine_fit(atoms, v)[1] for name, v in (("whole", whole), ("shard", shard))}
    divided = slope["shard"] / slope["whole"] if slope["whole"] > 0 else float("nan")
    serial = min(1.0, max(0.0, (tp * divided - 1) / (tp - 1))) if divided == divided else float("nan")
    return {"tp": tp, "atoms": atoms, "whole_s": whole, "shard_s": shard, "divided": divided,
            "serial_fraction": serial}
