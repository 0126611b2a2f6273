"""``gnnmegatron plan``: the layouts that fit a preset on N devices, best first.

For every (tp, pp, dp) with ``tp * pp * dp = gpus`` that the model allows (tp divides the hidden
size and the message groups, at most one node's devices; pp at most the number of blocks),
activation checkpointing off or on, ZeRO stage 0 or 1 and a few micro-batch counts, it estimates
the busiest rank's memory (``memory.estimate_memory``) and the step time
(``perf.estimate_step``), keeps the layouts within the device memory and sorts them by modelled
atoms/s.
"""

from __future__ import annotations

import dataclasses

from gnnmegatron.models.config import ModelConfig

from .memory import GIB, Layout, Workload, estimate_memory
from .perf import Device, estimate_step

__all__ = ["candidate_layouts", "plan", "format_plan"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: ModelConfig, gpus: int, per_node: int, micro_batches=(1, 4, 8, 16)) -> list[Layout]:
    out = []
    for tp in _divisors(gpus):
        if tp > per_node or cfg.hidden % tp or (tp > 1 and cfg.message != "node_split"):
            continue
        if cfg.message_groups and cfg.message_groups % tp:
            continue
        for pp in _divisors(gpus // tp):
            if pp > cfg.layers:
                continue
            dp = gpus // (tp * pp)
            for m in micro_batches:  # at pp = 1: gradient accumulation over m micro-batches
                if pp > 1 and m < pp:
                    continue
                for ckpt in (False, True):
                    for zero in ((0, 1) if dp > 1 else (0,)):
                        out.append(Layout(tp=tp, pp=pp, dp=dp, micro_batches=m, zero=zero, checkpointing=ckpt,
                                          schedule="1f1b"))
    return out


def plan(cfg: ModelConfig, gpus: int, device: Device, workload: Workload, *, limit: int = 10,
         device_kind: str = "cuda") -> list[dict]:
    """Layouts that fit ``device.memory``, best modelled atoms/s first (at most ``limit``)."""
    rows = []
    coef_cache: dict = {}
    for layout in candidate_layouts(cfg, gpus, device.per_node):
        key = (layout.tp, workload.conservative, workload.stress)
        if key not in coef_cache:
            from .memory import activation_coefficients

            coef_cache[key] = activation_coefficients(cfg, layout.tp, workload.conservative, workload.stress)
        mem = estimate_memory(cfg, layout, workload, device=device_kind, coefficients=coef_cache[key])
        if mem.total > device.memory:
            continue
        perf = estimate_step(cfg, layout, workload, device, overlap=0.5)
        rows.append({"layout": layout, "memory": mem, "perf": perf})
    # checkpointing recomputes: about a third more compute per step (a forward of every block again)
    for r in rows:
        if r["layout"].checkpointing:
            r["perf"] = dict(r["perf"], atoms_per_s=r["perf"]["atoms_per_s"] / 1.33, step_s=r["perf"]["step_s"] * 1.33)
    rows.sort(key=lambda r: -r["perf"]["atoms_per_s"])
    return rows[:limit]


def format_plan(cfg_name: str, rows: list[dict], gpus: int, device: Device, workload: Workload) -> str:
    lines = [f"{cfg_name} on {gpus} x {device.name} ({device.memory / GIB:.0f} GiB, {device.flops / 1e12:.0f} TFLOP/s "
             f"sustained assumed), {workload.atoms} atoms per micro-batch, {workload.edges_per_atom:g} edges/atom, "
             f"{'conservative' if workload.conservative else 'direct'} forces"]
    if not rows:
        lines.append("  no layout fits: use more devices, fewer atoms per micro-batch, or a smaller model")
        return "\n".join(lines)
    head = ("layout", "params", "grads", "optim", "activ", "buffers", "framework", "total GiB", "step s", "atoms/s")
    lines.append("  " + "  ".join(f"{h:>9s}" if i else f"{h:28s}" for i, h in enumerate(head)))
    for r in rows:
        m, p = r["memory"].as_gib(), r["perf"]
        lines.append("  " + f"{r['layout'].describe():28s}" + "".join(
            f"  {v:9.2f}" for v in (m["parameters"], m["gradients"], m["optimizer"], m["activations"], m["buffers"],
                                    m["framework"], m["total"])) + f"  {p['step_s']:9.3g}  {p['atoms_per_s']:9.3g}")
    return "\n".join(lines)


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '80' (GiB) -> bytes."""
    t = text.strip().lower()
    for suffix, scale in (("gib", GIB), ("gb", 1e9), ("tib", 1024 * GIB), ("tb", 1e12), ("mib", 2 ** 20), ("mb", 1e6)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * scale
    return float(t) * GIB


def with_tp_default(cfg: ModelConfig) -> ModelConfig:
    """Planning for GPUs assumes fused execution (what the tensor-parallel blocks run)."""
    return dataclasses.replace(cfg, execution="fused")
