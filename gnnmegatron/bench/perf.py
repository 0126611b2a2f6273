"""An alpha-beta performance model of a training step, and its projection to 1024 GPUs.

Step time of a ``(tp, pp, dp)`` layout, per replica step of ``m`` micro-batches::

    t_step = (t_compute (r + (1 - r) / tp) / pp + m t_0 / pp) / (1 - bubble)   compute over the model-parallel ranks
           + t_tp                                           tensor-parallel collectives (not overlapped)
           + t_pp                                           pipeline point-to-point messages
           + (1 - overlap) * t_dp                           gradient all-reduce over dp, partly hidden

* ``t_compute``: analytic training FLOPs of the step's atoms and edges (``flops_per_step``) divided by
  the device's sustained FLOP/s (``Device.flops``): on CPU fitted to single-process steps of the
  same model (``benchmarks/scaling.py``), for a GPU given (e.g. 40 % of an H100's dense bf16 peak).
* ``r``: the fraction of ``t_compute`` that every tensor-parallel rank repeats (``Device.tp_serial_fraction``:
  per-edge geometry and radial basis, embeddings, the replicated heads and the coordinate update): on
  CPU measured by timing one rank's shard of the model (built with a group-less layout, so its
  collectives are no-ops and its compute is the real rank's) against the whole model in one
  process (``gnnmegatron.bench.harness.measure_tp_shard``); 0 (perfectly sharded) unless given.
* ``t_0``: a fixed cost per micro-batch pass through the model (``Device.overhead_s``: dispatch,
  launches, per-tensor loops), measured with the FLOP rate on CPU from single-process steps of
  different sizes (``t = t_0 + FLOPs / rate``); 0 for GPUs unless given.
* ``bubble``: the idle fraction of a pipelined step, ``(pp - 1) / (m + pp - 1)`` (``(pp - 1) / (v m + pp - 1)``
  interleaved; conservative forces run four pipelined sweeps, each with this bubble): the step is
  the busy time over ``1 - bubble``, i.e. ``(1 + (pp - 1) / (v m))`` times it.
* ``t_tp``: the tensor-parallel block's collectives per block (``tp_bytes_per_block``: two N x H
  all-reduces per direction for the dense node_split block, one for the grouped block, plus E
  scalars; the force pass and its loss backward repeat them) as ring all-reduces on the
  intra-node link.
* ``t_pp``: ``2 m`` messages of N x (H + 3) per stage boundary (four sweeps under conservative
  forces) at the inter-stage link's alpha and beta (``Device.p2p`` where point-to-point messages
  cost other than the collectives: gloo on CPU, where a two-rank all-reduce takes several times a
  one-way message).
* ``t_dp``: a ring all-reduce of the rank's gradients (or a tree all-reduce, whichever is faster)
  over the data-parallel link; ``overlap`` is the fraction hidden behind the backward pass.

Collectives (``Link``: latency ``alpha`` in seconds, bandwidth ``beta`` in bytes/s per rank):
ring all-reduce ``2 (n-1) alpha + 2 (n-1)/n S / beta``; tree all-reduce ``2 log2(n) alpha + 2 S / beta``;
all-gather ``(n-1) alpha + (n-1)/n S / beta``; point-to-point ``alpha + S / beta``.
Link presets are nominal per-GPU numbers (assumptions, stated in the README): NVLink 4 (H100 SXM,
450 GB/s per direction, 2 us), InfiniBand NDR (50 GB/s per GPU with one 400 Gb/s NIC each, 5 us),
Slingshot-11 (25 GB/s per NIC, 2.5 us); ``gloo-loopback`` is measured on this machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gnnmegatron.models.config import ModelConfig

from .memory import Layout, Workload

__all__ = ["Device", "LINKS", "Link", "all_gather_time", "allreduce_time", "estimate_step", "p2p_time", "project",
           "tp_bytes_per_block"]


@dataclass(frozen=True)
class Link:
    """A communication link: latency (s) and bandwidth per rank (bytes/s)."""

    name: str
    alpha: float
    beta: float


LINKS = {
    "nvlink4": Link("nvlink4", 2e-6, 450e9),
    "ib-ndr": Link("ib-ndr", 5e-6, 50e9),
    "slingshot11": Link("slingshot11", 2.5e-6, 25e9),
}


@dataclass(frozen=True)
class Device:
    """A device: sustained training FLOP/s on this model, memory, and GPUs per node (the TP domain).

    ``overhead_s``: seconds one micro-batch's pass through the whole model costs whatever its size
    (operator dispatch, kernel launches, the optimizer's per-tensor loop): measured on CPU from
    single-process steps of different sizes, 0 unless given for a GPU. It is divided over pipeline
    stages (each runs its share of the blocks) but not over tensor-parallel ranks (each dispatches
    every operator of its blocks).

    ``tp_serial_fraction``: the part of the FLOP-proportional compute that tensor parallelism does
    not divide (each tp rank repeats it); measured on CPU with ``harness.measure_tp_shard``, 0
    unless given for a GPU.

    ``intra`` / ``inter``: the links of the collectives inside and between nodes; ``p2p``: the link
    of the pipeline's point-to-point messages where it differs from those (default: the same)."""

    name: str
    flops: float
    memory: float
    per_node: int = 8
    intra: Link = LINKS["nvlink4"]
    inter: Link = LINKS["ib-ndr"]
    overhead_s: float = 0.0
    tp_serial_fraction: float = 0.0
    p2p: Link | None = None

    def __post_init__(self):
        if not 0.0 <= self.tp_serial_fraction <= 1.0:
            raise ValueError(f"Device {self.name!r}: tp_serial_fraction={self.tp_serial_fraction} must be in [0, 1] "
                             "(the fraction of the compute every tensor-parallel rank repeats)")


def allreduce_time(nbytes: float, n: int, link: Link) -> float:
    """The faster of a ring and a tree all-reduce of ``nbytes`` over ``n`` ranks."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    ring = 2 * (n - 1) * link.alpha + 2 * (n - 1) / n * nbytes / link.beta
    tree = 2 * math.log2(n) * link.alpha + 2 * nbytes / link.beta
    return min(ring, tree)


def all_gather_time(nbytes: float, n: int, link: Link) -> float:
    """All-gather of ``nbytes`` in all (each rank contributes ``nbytes / n``)."""
    if n <= 1:
        return 0.0
    return (n - 1) * link.alpha + (n - 1) / n * nbytes / link.beta


def p2p_time(nbytes: float, link: Link) -> float:
    return link.alpha + nbytes / link.beta


def tp_bytes_per_block(cfg: ModelConfig, n: int, e: int, tp: int, conservative: bool) -> list[float]:
    """Payloads (bytes) of the all-reduces one block issues per training step on each TP rank.

    From the block's pinned volumes (tests/parallel/test_comm_volume.py): forward + first-order
    backward, fp32, dense 3 N H + N H / tp + 4 E + H / tp elements, grouped 2 N H + 4 E + H / tp;
    a conservative-force step runs the block's forward, its force pass and the loss's backward
    through both: about twice the first-order traffic.
    """
    if tp <= 1:
        return []
    H = cfg.hidden
    if cfg.message_groups:
        sizes = [n * H, n * H, 4 * e]
    else:
        sizes = [n * H, n * H, n * H, 4 * e]
    reps = 2 if conservative else 1
    return [4.0 * s for s in sizes] * reps


def estimate_step(cfg: ModelConfig, layout: Layout, workload: Workload, device: Device, *,
                  overlap: float = 0.0, params: int | None = None) -> dict[str, float]:
    """Modelled seconds of one optimizer step (per replica) and its parts; see the module docstring."""
    from gnnmegatron.models.presets import count_parameters, flops_per_step

    m, n, e = layout.micro_batches, workload.atoms, workload.edges
    flops = flops_per_step(cfg, n * m, e * m, conservative=workload.conservative)
    r = device.tp_serial_fraction if layout.tp > 1 else 0.0
    compute = flops / device.flops * (r + (1 - r) / layout.tp) / layout.pp + device.overhead_s * m / layout.pp
    v = layout.virtual_stages
    bubble = (layout.pp - 1) / (v * m + layout.pp - 1) if layout.pp > 1 else 0.0
    intra = device.intra if layout.tp <= device.per_node else device.inter
    t_tp = 0.0
    if layout.tp > 1:
        per_block = sum(allreduce_time(b, layout.tp, intra) for b in tp_bytes_per_block(
            cfg, n, e, layout.tp, workload.conservative))
        t_tp = per_block * m * cfg.layers / layout.pp
    t_pp = 0.0
    if layout.pp > 1:
        link = device.p2p or (device.intra if layout.tp * layout.pp <= device.per_node else device.inter)
        sweeps = 4 if workload.conservative else 2
        t_pp = sweeps * m * v * p2p_time(4.0 * n * (cfg.hidden + 3), link)
    if params is None:
        params = count_parameters(cfg)["total"]
    grad_bytes = 4.0 * params / (layout.tp * layout.pp)
    dp_link = device.intra if layout.world <= device.per_node else device.inter
    t_dp = allreduce_time(grad_bytes, layout.dp, dp_link)
    step = compute / (1 - bubble) + t_tp + t_pp + (1 - overlap) * t_dp
    return {"step_s": step, "compute_s": compute, "bubble": bubble, "tp_s": t_tp, "pp_s": t_pp, "dp_s": t_dp,
            "atoms_per_s": layout.dp * m * n / step, "flops": flops}


def project(cfg: ModelConfig, workload: Workload, device: Device, gpus: list[int], *, tp: int = 1, pp: int = 1,
            micro_batches: int = 1, overlap: float = 0.0, strong_global_atoms: int | None = None) -> list[dict]:
    """Weak- and strong-scaling efficiency from 1 to ``max(gpus)`` devices for one (tp, pp).

    Weak scaling: every replica keeps ``micro_batches`` x ``workload.atoms`` atoms per step.
    Strong scaling: a fixed global batch (``strong_global_atoms``, default the workload on the
    smallest layout) divided over dp replicas (atoms per micro-batch shrink, per-edge density
    kept). Efficiency = throughput(N) / (N / N0 x throughput(N0)).
    """
    from gnnmegatron.models.presets import count_parameters

    params = count_parameters(cfg)["total"]
    base_world = tp * pp
    out = []
    base = None
    global_atoms = strong_global_atoms or workload.atoms * micro_batches
    for g in gpus:
        if g % base_world:
            continue
        dp = g // base_world
        layout = Layout(tp=tp, pp=pp, dp=dp, micro_batches=micro_batches)
        weak = estimate_step(cfg, layout, workload, device, overlap=overlap, params=params)
        per_replica = max(1, global_atoms // (dp * micro_batches))
        strong = estimate_step(cfg, layout, Workload(per_replica, workload.edges_per_atom, workload.conservative,
                                                     workload.stress, workload.bf16), device, overlap=overlap,
                               params=params)
        row = {"gpus": g, "dp": dp, "weak_atoms_per_s": weak["atoms_per_s"], "strong_atoms_per_s": strong["atoms_per_s"],
               "weak_step_s": weak["step_s"], "strong_step_s": strong["step_s"]}
        if base is None:
            base = row
        row["weak_efficiency"] = row["weak_atoms_per_s"] / (g / base["gpus"] * base["weak_atoms_per_s"])
        row["strong_efficiency"] = row["strong_atoms_per_s"] / (g / base["gpus"] * base["strong_atoms_per_s"])
        out.append(row)
    return out
