"""Shared helpers of the benchmark scripts: machine description, versions, result files.

Every benchmark writes ``results/<name>-<machine>.json`` (machine, command, versions, date, rows,
summary) plus a CSV and a PNG beside it (docs/architecture.md, "Benchmarks").
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def pin_one_core() -> int:
    """Pin this process (and threads it starts later, e.g. zarr's I/O loop) to one core."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        import numcodecs.blosc
        numcodecs.blosc.set_nthreads(1)
    except Exception:
        pass
    return cpu


def machine_info(device: str = "cpu") -> str:
    """GPU name and memory for ``device="cuda"``, else the CPU model and core count."""
    if device == "cuda":
        import torch

        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def gpu_kind() -> str:
    """Short name of the GPU for result file names: ``h200``, ``h100``, else the name's last word."""
    import torch

    name = torch.cuda.get_device_name()
    return "h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for dist in ("torch", "triton", "megatron-core", "zarr", "numcodecs", "numpy", "ase", "torch-scatter",
                 "torch-geometric"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def write_results(name: str, machine: str, rows: list[dict], summary: dict, plot, *, device: str = "cpu",
                  extra: dict | None = None) -> Path:
    """Write <name>-<machine>.json/.csv/.png in the project's benchmark format.

    ``plot(plt)`` returns the figure to save as the PNG (None: no PNG); ``extra`` adds keys to the
    JSON (e.g. how a quantity was measured); ``device`` picks the machine description.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"{name}-{machine}"
    doc = {
        "benchmark": name,
        "machine": machine_info(device),
        "command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""),
                             "python"] + [shlex.quote(a) for a in sys.argv]),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min_at_end": os.getloadavg()[0],
        **(extra or {}),
        "rows": rows,
        "summary": summary,
    }
    base.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(base.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    if plot is None:
        return base.with_suffix(".json")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plot(plt)
    fig.savefig(base.with_suffix(".png"), dpi=120, bbox_inches="tight")
    plt.close(fig)
    return base.with_suffix(".json")


def spawn_worker(script: str, spec: dict, timeout: float, env: dict | None = None) -> dict:
    """Run ``python script --worker <spec as JSON>`` in a fresh process and return the JSON dict it
    prints last, or ``{"error": ...}`` (a timeout, an out-of-memory stop at a data limit, or the
    last line of its stderr)."""
    import subprocess

    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout after {timeout:.0f} s")
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["?"]
        oom = any("can't allocate memory" in ln or "MemoryError" in ln for ln in lines)
        return dict(error="out of memory (data limit reached)" if oom else lines[-1][:300])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_then_memory(script: str, spec: dict, timeout: float, memory: bool = True) -> dict:
    """The worker's timing phase in one process and, unless it failed or ``memory`` is False, its
    memory phase in a second one whose glibc malloc has a fixed 128 KiB mmap threshold, so every
    tensor buffer is mapped on allocation and unmapped on free and RSS follows live tensors (timing
    runs with the default allocator behaviour). A failed memory phase becomes ``memory_error``."""
    row = spawn_worker(script, dict(spec, phase="time"), timeout)
    if memory and "error" not in row:
        row.update(memory_phase(script, spec, timeout))
    return row


def memory_phase(script: str, spec: dict, timeout: float) -> dict:
    """The worker's memory phase alone (as in ``time_then_memory``); an error becomes ``memory_error``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    mem = spawn_worker(script, dict(spec, phase="memory"), timeout, env)
    return mem if "error" not in mem else {"memory_error": mem["error"]}
