"""Memory per rank of a layout: parameters, gradients, optimizer state, activations, buffers.

``estimate_memory(cfg, layout, workload)`` adds up what the trainer holds on the busiest rank of a
``(tp, pp, dp)`` layout:

* **parameters, gradients**: the rank's own tensors, counted exactly by building that rank's part
  of the model on the meta device (``PipelineStageModel`` + ``parallelize``, no memory); fp32
  (bf16 training keeps fp32 master weights and autocasts).
* **optimizer state**: AdamW's two moments in fp32; ZeRO-1 divides them over dp (whole tensors,
  balanced up to one tensor: the estimate uses an even split).
* **activations**: what autograd saves for backward, *measured* once per (model, tp, force mode)
  by running one block and the heads of this rank's tensor-parallel shard on two tiny batches and
  counting saved tensors (``torch.autograd.graph.saved_tensors_hooks``; the collectives of a
  group-less layout are no-ops but every shape is the real rank's), then scaled linearly in atoms
  and edges to the workload. Per stage: blocks x micro-batches alive (1F1B: ``min(pp - s, m)``,
  GPipe and conservative forces: ``m``); activation checkpointing keeps each block's input
  (N x (H + 3)) plus one block's activations.
* **buffers**: the batch itself (positions, edges, targets), pipeline send/receive buffers
  (N x (H + 3) per message in flight) and, for data parallelism, one gradient bucket.
* **framework**: a fixed process overhead: measured on CPU (torch imported, gloo group), 0.5 GiB
  assumed for a CUDA context on GPUs.
* **workspace** (CPU, fused execution): the torch backend's per-chunk tiles. Its fused ops run the
  edges in chunks of ``chunk_elements / F`` edges with ``[chunk, F]`` buffers, and a force-training
  step holds about a dozen fp32 tiles at its peak (forward, backward and double backward together):
  ``CPU_WORKSPACE_BYTES_PER_ELEMENT`` bytes per element of one tile, ``min(E, chunk_elements / F) x F``
  elements, F the rank's hidden slice. Measured on the 2-core VM by sweeping
  ``GNNMEGATRON_OPS_CHUNK_ELEMENTS`` with live-memory runs (``benchmarks/scaling.py`` repeats the
  sweep and uses its own fit). The Triton kernels keep their tiles on chip: no GPU workspace.

The numbers are bytes of live tensors, what ``torch.cuda.max_memory_allocated`` reports on a GPU
(the caching allocator's reserve comes on top there). A CPU process's resident set is larger by
what glibc's allocator keeps after ``free`` (freed tiles between tensors that stay alive): on the
2-core VM 4-32 % above the live peak, most with many micro-batches alive
(``benchmarks/results/scaling-cpu2.json``, ``allocator_retained_fraction``); ``harness.run_config(...,
memory="live")`` measures the live peak on CPU. ``plan`` ranks layouts that fit a memory budget with
``perf.estimate_step``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch

from gnnmegatron.models.config import ModelConfig
from gnnmegatron.parallel.layout import ParallelLayout

__all__ = ["Layout", "MemorySplit", "Workload", "activation_coefficients", "build_rank_shard", "cpu_tile_elements",
           "estimate_memory", "rank_parameters"]

GIB = 2 ** 30
CUDA_CONTEXT_BYTES = 0.5 * GIB
CPU_PROCESS_BYTES = 0.45 * GIB  # python + torch + numpy + zarr + gloo, measured: 0.40-0.47 GiB RSS at rank start
CPU_WORKSPACE_BYTES_PER_ELEMENT = 50.0  # ~12 fp32 [chunk, F] tiles alive at a force-training step's peak (measured)
DP_BUCKET_BYTES = 25 * 2 ** 20


@dataclass(frozen=True)
class Layout:
    """A parallel layout and its training options.

    Attributes:
        tp, pp, dp: tensor-, pipeline- and data-parallel sizes.
        micro_batches: micro-batches per step and replica (pipeline: m).
        schedule: ``1f1b``, ``gpipe`` or ``interleaved`` (conservative forces run GPipe).
        zero: 0 (replicated AdamW state) or 1 (sharded over dp).
        checkpointing: activation checkpointing of every block.
        virtual_stages: chunks per pipeline rank.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batches: int = 1
    schedule: str = "1f1b"
    zero: int = 0
    checkpointing: bool = False
    virtual_stages: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        opts = [f"m={self.micro_batches}"] + (["zero1"] if self.zero else []) + (["ckpt"] if self.checkpointing else [])
        return f"tp{self.tp} pp{self.pp} dp{self.dp} " + " ".join(opts)


@dataclass(frozen=True)
class Workload:
    """What one micro-batch holds: atoms, and edges per atom (the neighbour density)."""

    atoms: int = 512
    edges_per_atom: float = 30.0
    conservative: bool = True
    stress: bool = False
    bf16: bool = False

    @property
    def edges(self) -> int:
        return int(round(self.atoms * self.edges_per_atom))


@dataclass
class MemorySplit:
    """Bytes per rank (the busiest rank of the layout)."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    framework: float
    workspace: float = 0.0

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer + self.activations + self.buffers + self.framework
                + self.workspace)

    def as_gib(self) -> dict[str, float]:
        out = {k: v / GIB for k, v in dataclasses.asdict(self).items()}
        out["total"] = self.total / GIB
        return out


def _group_less(tp: int, pp: int, tp_rank: int = 0, pp_rank: int = 0) -> ParallelLayout:
    """One rank's layout with no process groups: builds (and runs, with no-op collectives) its shard."""
    rank = tp_rank + tp * pp_rank
    return ParallelLayout(tp=tp, pp=pp, dp=1, rank=rank, world_size=tp * pp,
                          tp_ranks=tuple(range(pp_rank * tp, pp_rank * tp + tp)),
                          pp_ranks=tuple(tp_rank + tp * s for s in range(pp)), dp_ranks=(rank,))


def build_rank_shard(cfg: ModelConfig, tp: int, seed: int = 0):
    """Tensor-parallel rank 0's shard of ``cfg``'s model (the whole model for ``tp = 1``), built with a
    group-less layout (collectives are no-ops, every shape the real rank's) and initialised, in
    training mode."""
    from gnnmegatron.models import AtomisticModel
    from gnnmegatron.models.init import init_specs, materialize
    from gnnmegatron.parallel import parallelize
    from gnnmegatron.parallel.sharding import local_pieces

    with torch.device("meta"):
        model = AtomisticModel(cfg)
    specs = init_specs(model)
    if tp > 1:
        parallelize(model, _group_less(tp, 1))
    materialize(model, specs, seed, pieces=local_pieces(model))
    return model.train()


def rank_parameters(cfg: ModelConfig, layout: Layout) -> list[dict[str, int]]:
    """Per pipeline stage (tp rank 0): parameter count, and blocks held. Built on meta: no memory."""
    from gnnmegatron.models import AtomisticModel
    from gnnmegatron.parallel import parallelize
    from gnnmegatron.parallel.pipeline.stage import PipelineStageModel, split_layers

    out = []
    chunks = split_layers(cfg, layout.pp, layout.virtual_stages) if layout.pp > 1 else None
    for s in range(layout.pp):
        with torch.device("meta"):
            model = AtomisticModel(cfg)
        if chunks is not None:
            mine = [c for c in chunks if c.rank == s]
            model = PipelineStageModel.from_model(model, mine, len(chunks))
            blocks = sum(len(c.blocks) for c in mine)
        else:
            blocks = cfg.layers
        if layout.tp > 1:
            parallelize(model, _group_less(layout.tp, layout.pp, 0, s))
        out.append({"params": sum(p.numel() for p in model.parameters()), "blocks": blocks,
                    "first": s == 0, "last": s == layout.pp - 1})
    return out


class _Saved:
    """Bytes of tensors saved for backward, each storage once, parameters excluded."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.params and t.device.type != "meta":
            self.seen[key] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _tiny_batch(atoms: int, cutoff: float, seed: int, lattice: float = 3.61):
    import numpy as np
    from ase.build import bulk

    from gnnmegatron.data.batch import collate

    cells = max(1, atoms // 4)
    reps = [1, 1, 1]
    k = 0
    while reps[0] * reps[1] * reps[2] < cells:
        reps[k % 3] += 1
        k += 1
    a = bulk("Cu", "fcc", a=lattice, cubic=True) * tuple(reps)
    a.positions += 0.05 * np.random.default_rng(seed).standard_normal(a.positions.shape)
    return collate([{"atomic_numbers": a.numbers, "positions": a.positions, "cell": a.cell.array, "pbc": a.pbc}],
                   cutoff)


def activation_coefficients(cfg: ModelConfig, tp: int, conservative: bool, stress: bool) -> dict[str, float]:
    """Saved-activation bytes per atom and per edge of one block (and of the rest: embedding, heads).

    Measured on this machine by running the rank-0 tensor-parallel shard of a 2-block and a
    3-block model (group-less layout) forward + forces + loss on small periodic cells of two sizes
    and two densities and fitting ``bytes = blocks * (a_N N + a_E E) + (c_N N + c_E E)``.
    """
    import json

    return dict(_coefficients(json.dumps(cfg.to_dict(), sort_keys=True), tp, conservative, stress))


@functools.lru_cache(maxsize=64)
def _coefficients(cfg_json: str, tp: int, conservative: bool, stress: bool) -> tuple:
    """Saved bytes are affine in the hidden size (every saved tensor is [N or E, H or H/tp] or
    hidden-free), so they are measured at two small widths and evaluated at the model's."""
    import json

    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    if not conservative:
        cfg = dataclasses.replace(cfg, force_mode="direct", compute_stress=False)
    unit = tp * (cfg.message_groups or 1)
    widths = (8 * unit, 16 * unit) if 16 * unit < cfg.hidden else (cfg.hidden, cfg.hidden)
    fits = [_measure(dataclasses.replace(cfg, hidden=w), tp, stress) for w in dict.fromkeys(widths)]
    h0, h1 = widths
    out = []
    for j, name in enumerate(("block_per_atom", "block_per_edge", "fixed_per_atom", "fixed_per_edge")):
        y0, y1 = fits[0][j], fits[-1][j]
        value = y0 if h1 == h0 else y0 + (y1 - y0) * (cfg.hidden - h0) / (h1 - h0)
        out.append((name, float(value)))
    return tuple(out)


def _measure(cfg: ModelConfig, tp: int, stress: bool) -> np.ndarray:
    """Least-squares ``[a_N, a_E, c_N, c_E]`` of saved bytes on 2- and 3-block models (one width)."""
    rows = []
    for layers in (2, 3):  # the last block has no coordinate MLP: the fixed part absorbs that difference
        c = dataclasses.replace(cfg, layers=layers)
        model = build_rank_shard(c, tp)
        # two sizes and two densities, so that atoms and edges vary independently
        for atoms, lattice in ((32, 3.4), (32, 4.2), (108, 3.4), (108, 4.2)):
            batch = _tiny_batch(atoms, c.cutoff, seed=atoms, lattice=lattice)
            saved = _Saved(model.parameters())
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                out = model(batch, compute_forces=True, compute_stress=stress and c.force_mode == "conservative")
                loss = out["energy"].sum() + out["forces"].pow(2).sum()
            rows.append((layers, int(batch["atomic_numbers"].shape[0]), int(batch["edge_index"].shape[1]),
                         saved.total))
            del out, loss
    A = np.array([[l * n, l * e, n, e] for l, n, e, _ in rows], dtype=np.float64)
    y = np.array([b for *_, b in rows], dtype=np.float64)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return coef


def cpu_tile_elements(features: int, edges: int, chunk_elements: int | None = None) -> int:
    """Elements of one ``[chunk, F]`` tile of the torch backend's fused ops for a micro-batch of
    ``edges`` edges (``chunk_elements``: default the ops' setting, ``GNNMEGATRON_OPS_CHUNK_ELEMENTS``)."""
    from gnnmegatron.ops.dispatch import settings

    chunk = int(chunk_elements if chunk_elements is not None else settings.chunk_elements)
    rows = max(1, min(max(int(edges), 1), chunk // max(1, int(features))))
    return rows * int(features)


def estimate_memory(cfg: ModelConfig, layout: Layout, workload: Workload, *, device: str = "cpu",
                    coefficients: dict[str, float] | None = None,
                    framework_bytes: float | None = None,
                    workspace_bytes_per_element: float | None = None) -> MemorySplit:
    """Bytes on the busiest rank (the largest of the pipeline stages) of ``layout`` for ``workload``.

    ``framework_bytes``: the process's fixed overhead when measured (for example the resident set
    of a rank before its trainer is built); default ``CPU_PROCESS_BYTES`` or ``CUDA_CONTEXT_BYTES``.
    ``workspace_bytes_per_element``: bytes per element of one ``[chunk, F]`` tile of the CPU fused ops
    (default ``CPU_WORKSPACE_BYTES_PER_ELEMENT`` on CPU, none on CUDA)."""
    stages = rank_parameters(cfg, layout)
    if cfg.force_mode != "conservative":
        workload = dataclasses.replace(workload, conservative=False, stress=False)
    coef = coefficients or activation_coefficients(cfg, layout.tp, workload.conservative, workload.stress)
    n, e = workload.atoms, workload.edges
    per_block = coef["block_per_atom"] * n + coef["block_per_edge"] * e
    fixed = coef["fixed_per_atom"] * n + coef["fixed_per_edge"] * e
    workspace = 0.0
    if cfg.execution == "fused":
        per_element = workspace_bytes_per_element if workspace_bytes_per_element is not None else (
            0.0 if device == "cuda" else CPU_WORKSPACE_BYTES_PER_ELEMENT)
        workspace = per_element * cpu_tile_elements(cfg.hidden // layout.tp, e)
    best = None
    for s, st in enumerate(stages):
        p_bytes = 4.0 * st["params"]
        optimizer = 8.0 * st["params"] / (layout.dp if layout.zero else 1)
        if workload.conservative or layout.pp == 1:
            alive = layout.micro_batches if layout.pp > 1 else 1
        elif layout.schedule == "gpipe":
            alive = layout.micro_batches
        else:
            alive = min(layout.pp - s, layout.micro_batches) * (1 if layout.schedule == "1f1b" else 1.5)
        if layout.checkpointing:
            per_mb = st["blocks"] * 4.0 * n * (cfg.hidden + 3) + per_block
        else:
            per_mb = st["blocks"] * per_block
        per_mb += fixed if (st["first"] or st["last"]) else 0.0
        activations = alive * per_mb
        batch_bytes = 8.0 * n * 8 + 8.0 * e * 4  # positions, forces, numbers...; edge index and shifts
        buffers = batch_bytes * max(1, layout.micro_batches)  # a step's micro-batches are read together
        if layout.pp > 1:
            buffers += 2 * alive * 4.0 * n * (cfg.hidden + 3)
        if layout.dp > 1:
            buffers += DP_BUCKET_BYTES
        framework = framework_bytes if framework_bytes is not None else (
            CUDA_CONTEXT_BYTES if device == "cuda" else CPU_PROCESS_BYTES)
        split = MemorySplit(p_bytes, p_bytes, optimizer, activations, buffers, framework, workspace)
        if best is None or split.total > best.total:
            best = split
    return best
