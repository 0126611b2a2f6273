"""Backend choice, CSR plans and the knobs of the chunked torch path.

Backends (one public function per op, ``backend=`` picks one):

* ``"reference"``: plain torch that materialises every edge tensor; autograd does the
  rest. The oracle of the tests.
* ``"torch"``: the CPU path. Edges are processed in chunks (bounded memory), backward
  recomputes; large problems run the chunk body through ``torch.compile`` (lazily, cached).
* ``"triton"``: the GPU kernels in ``gnnmegatron.kernels``. On CPU only with
  ``TRITON_INTERPRET=1`` set before the kernels are imported (slow; tests use it).

Which backend runs, first match wins:

1. the op's ``backend=`` argument (``ModelConfig.ops_backend`` when it is not ``"auto"``);
2. ``use_backend(name)`` (context manager) or ``set_backend(name)`` (process-wide);
3. the environment variable ``GNNMEGATRON_OPS_BACKEND``;
4. by device: ``"triton"`` for CUDA tensors when triton imports, else ``"torch"``.

``"auto"`` at any level means "no preference here".

Deterministic mode (``deterministic()``): on when ``torch.use_deterministic_algorithms(True)``
is set or ``GNNMEGATRON_DETERMINISTIC=1``. The triton backend then takes the first audited
config instead of autotuning and sums dQ (and the double backward's dQ) over a source-sorted
(transposed) CSR plan instead of fp32 atomics, so a run's gradients are bit-identical from run to
run. The torch and reference backends need nothing: on CPU their sums run in a fixed order,
and on CUDA torch's own deterministic setting covers ``index_add_``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

BACKENDS = ("reference", "torch", "triton")
ENV_BACKEND = "GNNMEGATRON_OPS_BACKEND"
ENV_COMPILE = "GNNMEGATRON_OPS_COMPILE"
ENV_CHUNK = "GNNMEGATRON_OPS_CHUNK_ELEMENTS"
ENV_DETERMINISTIC = "GNNMEGATRON_DETERMINISTIC"
ENV_WORKERS = "GNNMEGATRON_OPS_CHUNK_WORKERS"

_override: str | None = None


@dataclass
class OpsSettings:
    """Knobs of the chunked torch backend (module-level ``settings``; tests change them).

    Attributes:
        chunk_elements: edges per chunk = ``max(1, chunk_elements // F)``, so each [chunk, F]
            temporary holds ``chunk_elements`` values. 2^20 (4 MiB fp32, 4096 edges at F=256):
            on 2 EPYC cores at N=16k, E=512k, F=256 forward+backward took 0.88 s compiled
            (1.4 s eager) at 2^20 against 1.2 s at 2^18 and 1.7 s at 2^16 -- fewer chunk calls,
            temporaries still cache-sized; ``benchmarks/kernels.py --sweep-chunk`` re-measures.
        chunk_edges: if set, a fixed number of edges per chunk (overrides ``chunk_elements``).
        compile: ``"auto"`` (compile the chunk bodies when ``E * F >= compile_min_elements``),
            ``"always"``, or ``"never"``. Env ``GNNMEGATRON_OPS_COMPILE`` sets the default.
        compile_min_elements: ``E * F`` from which ``"auto"`` compiles. A cold compile costs
            20-50 s on 2 cores (about 4 s from the inductor cache); the compiled body saves
            about 2.5x of eager time, so it pays on large, repeated calls only.
        chunk_workers: threads of the chunk loops that ``run_chunks`` drives (the fused faithful op,
            the force-loss double backwards); ``None``: torch's intra-op thread count. Env
            ``GNNMEGATRON_OPS_CHUNK_WORKERS``.
    """

    chunk_elements: int = int(os.environ.get(ENV_CHUNK, 1 << 20))
    chunk_edges: int | None = None
    compile: str = os.environ.get(ENV_COMPILE, "auto")
    compile_min_elements: int = 1 << 24
    chunk_workers: int | None = int(os.environ[ENV_WORKERS]) if os.environ.get(ENV_WORKERS) else None

    def workers(self, chunks: int) -> int:
        """Threads that share a chunk loop (``run_chunks``): ``chunk_workers``, else torch's intra-op
        thread count; never more than the chunks."""
        want = self.chunk_workers if self.chunk_workers is not None else torch.get_num_threads()
        return max(1, min(int(want), chunks))

    def edges_per_chunk(self, num_features: int) -> int:
        if self.chunk_edges is not None:
            return max(1, int(self.chunk_edges))
        return max(1, int(self.chunk_elements) // max(1, int(num_features)))

    def want_compile(self, work: int) -> bool:
        mode = {"1": "always", "0": "never", "true": "always", "false": "never"}.get(str(self.compile).lower(),
                                                                                     str(self.compile).lower())
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"ops compile setting must be auto, always or never, got {self.compile!r}")
        return mode == "always" or (mode == "auto" and work >= self.compile_min_elements)


settings = OpsSettings()


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown ops backend {name!r} from {where}; use one of {list(BACKENDS)} or 'auto'")
    return name


def set_backend(name: str | None) -> None:
    """Process-wide backend override (``None`` or ``"auto"`` removes it)."""
    global _override
    _override = None if name in (None, "auto") else _check_name(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str | None):
    """``with use_backend("reference"): ...`` -- override inside the block only."""
    global _override
    before = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = before


def deterministic() -> bool:
    """Whether the ops run in deterministic mode (see the module docstring)."""
    env = os.environ.get(ENV_DETERMINISTIC, "0").lower() in ("1", "true", "yes", "on")
    return env or torch.are_deterministic_algorithms_enabled()


def backend_requested(backend: str | None) -> bool:
    """Whether a backend was asked for explicitly (argument, override or environment), as
    opposed to chosen by device."""
    return any(value not in (None, "", "auto") for value in (backend, _override, os.environ.get(ENV_BACKEND)))


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1``: triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (only checks that it imports)
    except Exception:  # pragma: no cover - triton missing or broken
        return False
    return True


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that runs for tensors on ``device`` (see the module docstring for the order)."""
    name = "auto"
    for value, where in ((backend, "the backend= argument"), (_override, "set_backend/use_backend"),
                         (os.environ.get(ENV_BACKEND), f"${ENV_BACKEND}")):
        if value not in (None, "", "auto"):
            name = _check_name(value, where)
            break
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("ops backend 'triton' was asked for but triton does not import; "
                               "use backend='torch' or install triton")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(f"ops backend 'triton' needs CUDA tensors, got device {device}; set "
                               f"TRITON_INTERPRET=1 before importing the kernels to run them on CPU (slow)")
    return name


class CSRPlan(NamedTuple):
    """Destination-sorted (CSR) view of an edge list, computed once per graph and shared by ops.

    Attributes:
        ptr: [N + 1] int64; the edges of destination i are sorted positions ptr[i]..ptr[i+1].
        perm: [E] int64 edge ids in destination order, or ``None`` when the edges are already
            sorted by destination (then sorted position == edge id).
        index: [E] int64 destination of each edge (in the caller's edge order).
    """

    ptr: torch.Tensor
    perm: torch.Tensor | None
    index: torch.Tensor


def is_sorted(index: torch.Tensor) -> bool:
    """Whether ``index`` is non-decreasing (one pass and a device sync)."""
    return index.numel() <= 1 or bool((index[1:] >= index[:-1]).all())


def csr_plan(index: torch.Tensor, num_nodes: int, sorted: bool | None = None) -> CSRPlan:
    """Build the ``CSRPlan`` of destination ``index`` [E] over ``num_nodes`` nodes.

    Args:
        index: [E] int64 destination of each edge (``edge_index[0]``), values in [0, num_nodes).
        num_nodes: N.
        sorted: ``True`` if ``index`` is known to be sorted, ``False`` if known not to be,
            ``None`` to check (a device sync; under ``torch.compile`` it assumes unsorted,
            which stays traceable and is correct for sorted input too).
    """
    index = index.reshape(-1).to(torch.long)
    if sorted is None:
        sorted = False if torch.compiler.is_compiling() else is_sorted(index)
    perm = None if sorted else torch.argsort(index, stable=True)
    keys = index if perm is None else index[perm]
    ptr = torch.searchsorted(keys, torch.arange(num_nodes + 1, device=index.device, dtype=torch.long))
    return CSRPlan(ptr, perm, index)


def ptr_to_index(ptr: torch.Tensor) -> torch.Tensor:
    """[N + 1] CSR pointer -> [E] sorted segment id of each row."""
    counts = ptr[1:] - ptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def autocast_inputs(device: torch.device, *tensors, promote: bool = False):
    """The autocast policy of the fused ops.

    Under ``torch.autocast`` (bf16 or fp16 on the tensors' device), ``fused_message_aggregate``
    behaves like the GEMMs it replaces: every floating input is cast to the autocast dtype and the
    op runs in it with float32 accumulation. ``edge_vector_aggregate`` (``promote=True``) is a
    reduction into coordinates and forces and, like autocast's reductions, runs in the widest
    input dtype (float32 vectors times bf16 scalars -> float32). The casts are differentiable, so
    gradients reach each input in its own dtype. Outside autocast the tensors are returned
    unchanged. Returns ``(tensors, context)``: call the op inside ``context``, which turns autocast
    off so the ops' own matmuls are not cast again.
    """
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return tensors, contextlib.nullcontext()
    floats = [t.dtype for t in tensors if t is not None and t.is_floating_point()]
    if promote:
        dt = functools.reduce(torch.promote_types, floats) if floats else None
    else:
        dt = torch.get_autocast_dtype(kind)
    cast = tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)
    return cast, torch.autocast(kind, enabled=False)


def wanted_grads(needs_input_grad, tensors) -> list[bool]:
    """``needs_input_grad``, narrowed to the tensors the running backward pass will actually use.

    ``needs_input_grad`` only says an input requires grad. In ``torch.autograd.grad(E, positions,
    create_graph=True)`` (conservative forces) the weights require grad too, but their gradients are
    not on the path to the positions: ``torch._C._will_engine_execute_node`` tells, for the node that
    would receive each gradient, whether this pass runs it. A backward that skips those gradients
    saves their work, and its outputs then carry no cotangent into the double backward. Any failure
    of that private API keeps the plain flag."""
    out = []
    for need, t in zip(needs_input_grad, tensors):
        if need and t is not None:
            try:
                node = torch.autograd.graph._get_grad_fn_or_grad_acc(t)
                need = node is None or bool(torch._C._will_engine_execute_node(node))
            except Exception:
                need = True
        out.append(bool(need and t is not None))
    return out


def drop_zero(t: torch.Tensor | None, limit: int = 1 << 16) -> torch.Tensor | None:
    """``None`` for an absent, empty or (when it has at most ``limit`` elements) all-zero cotangent: the
    double backward then skips its terms (autograd hands zeros for outputs the loss does not use)."""
    if t is None or t.numel() == 0:
        return None
    if t.numel() <= limit and not bool(t.any()):
        return None
    return t


def run_chunks(work: list, body, new_state, parallel: bool = True, device: torch.device | None = None) -> list:
    """Run ``body(state, item)`` over the chunks ``work``; returns the per-worker states.

    A chunk's many small ops (gathers, elementwise, ``[chunk, H]`` GEMMs), each its own intra-op
    parallel region, stall at every region's barrier when another job takes a core: on the shared
    2-core machines the fused faithful step ran 3.8x slower at 2 intra-op threads than at one
    (52 s against 14 s wall at 8000 atoms, load average 6). So the chunks are spread over
    ``settings.workers`` threads instead, each running its ops single-threaded with its own state
    (buffers and partial sums, ``new_state()``); worker k takes chunks k, k + workers, ... (a fixed
    assignment), and callers add the states' partial sums in worker order, so results do not depend
    on timing. Per-edge outputs are written by their chunk's worker only. ``parallel=False`` (e.g.
    collectives inside the body, which every rank must issue in the same order) runs them in order
    on the calling thread, as do the chunks of tensors on a GPU (``device``): there the calling thread
    only queues kernels, and more threads would queue them on the same stream with more buffers.
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    workers = settings.workers(len(work)) if (parallel and on_cpu) else 1
    if workers <= 1:
        state = new_state()
        for item in work:
            body(state, item)
        return [state]
    import concurrent.futures

    states = [new_state() for _ in range(workers)]
    before = torch.get_num_threads()

    def run(k):
        torch.set_num_threads(1)  # this thread's OpenMP setting: its ops run single-threaded
        with torch.no_grad():
            for item in work[k::workers]:
                body(states[k], item)

    torch.set_num_threads(1)
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(run, k) for k in range(workers)]:
                future.result()
    finally:
        torch.set_num_threads(before)
    return states


def rows_add_(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out[index[e]] += src[e]`` in place (rows): ``scatter_add_`` with the index broadcast over the
    columns, which on CPU is deterministic (each output element sums its rows in index order).

    Not ``index_add_``: on the 2-core machines the same ``[4096, 256]`` into ``[8000, 256]`` call took
    0.07 ms to 52 ms from one repetition to the next (torch 2.13, CPU; its per-index path), while
    ``scatter_add_`` stayed at 0.07 ms; in the chunk loops that was 24 of a step's 30 s."""
    return out.scatter_add_(0, index.unsqueeze(1).expand(-1, src.shape[1]), src)


def first_layer_grads_(t: torch.Tensor, acc: dict, dR: torch.Tensor | None, idx, dst: torch.Tensor,
                       src: torch.Tensor, Rc: torch.Tensor, C: torch.Tensor) -> None:
    """One chunk's cotangent ``t`` [chunk, F] of a split first layer ``z = P[dst] + Q[src] + Rc C (+ b)``
    onto its inputs: ``acc["P"]`` and ``acc["Q"]`` get the rows of ``t`` added at ``dst`` and
    ``src``, ``acc["C"]`` gets ``Rc^T t``, and ``dR[idx] = t C^T``; each only where that entry
    (or ``dR``) is present and not None. ``idx`` is the chunk's slice or index tensor into the edges."""
    if acc.get("P") is not None:
        rows_add_(acc["P"], dst, t)
    if acc.get("Q") is not None:
        rows_add_(acc["Q"], src, t)
    if dR is not None:
        if isinstance(idx, slice):
            torch.mm(t, C.t(), out=dR[idx])
        else:
            dR[idx] = t @ C.t()
    if acc.get("C") is not None:
        acc["C"].addmm_(Rc.t(), t)
