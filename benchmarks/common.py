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
