"""``gnnmegatron doctor``: run every op's backends against the reference on the devices present.

For each device (the CPU, and the GPU when there is one), each op and each backend that can run
there, at a few shapes, it computes the outputs and their gradients (and, for the two message ops,
node_split's ``fused_message_aggregate`` and the study's E_GCL ``faithful_message_aggregate``, the
double backward a force loss takes), compares them with the reference backend run in float64 on
the same (rounded) inputs, times forward + backward (+ the double backward for the ``[grad2]``
rows; median of a few runs, "time ms"), and prints one table row with PASS or FAIL. On a GPU the
triton rows of the message ops also run deterministic mode twice and require bit-identical results.
The exit status is 1 if any row fails, so a GPU user validates the kernels in about a minute::

    gnnmegatron doctor            # all devices, small and medium shapes
    gnnmegatron doctor --quick    # small shapes only
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

# Normalised error limits: max |backend - reference| / max |reference| over each output.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# faithful_message_aggregate in float32: the coordinate MLP's last weight gradient dv = sum_e gs_e a3_e sums
# all E edges' terms, whose activation factor a3 leans to one sign, to a result far smaller than the sum of
# their sizes; at the medium shape its rounding reached 8.9e-6 of max|dv| on the torch backend (a chunked
# float32 GEMV, as the unfused block's weight-gradient GEMM), every other output below 1.3e-6
TOLERANCE_OVERRIDES = {("faithful_message", torch.float32): 3e-5}
SHAPES = {  # name -> (N nodes, E edges, F features, K radial functions)
    "small": (64, 1024, 32, 16),
    "medium": (2048, 65536, 128, 32),
}
OPS = ("segment_reduce[sum]", "segment_reduce[max]", "edge_vector_aggregate", "fused_message_aggregate",
       "fused_message_aggregate[grad2]", "faithful_message_aggregate", "faithful_message_aggregate[grad2]")
# faithful_message_aggregate's inputs (P, Q, R, C, b1, W2, b2, w, Wc, bc, v) that carry the geometry:
# a force loss puts tangents on their gradients only (the [grad2] row's second loss)
FAITHFUL_GEOMETRY = (0, 1, 2, 7)


@dataclass
class Row:
    op: str
    device: str
    backend: str
    dtype: str
    shape: str
    max_error: float | None
    tolerance: float
    time_ms: float | None
    result: str  # PASS, FAIL, SKIP
    note: str = ""


@contextlib.contextmanager
def _env(name: str, value: str | None):
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _graph(N, E, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    dst = torch.randint(0, N, (E,), generator=g)
    src = torch.randint(0, N, (E,), generator=g)
    return torch.stack([dst, src]).to(device)  # unsorted: exercises the permuted path


def _inputs(op, N, E, F, K, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(device)

    if op.startswith("segment_reduce"):
        return (rnd(E, F),)
    if op == "edge_vector_aggregate":
        return rnd(E, 3), rnd(E)
    if op.startswith("faithful_message"):  # the study's edge MLP and coordinate MLP, F wide
        return (rnd(N, F), rnd(N, F), rnd(E, K), rnd(K, F, scale=0.5), rnd(F), rnd(F, F, scale=F ** -0.5), rnd(F),
                rnd(E).abs(), rnd(F, F, scale=F ** -0.5), rnd(F), rnd(F))
    return rnd(N, F), rnd(N, F), rnd(E, K), rnd(K, F, scale=0.5), rnd(F), rnd(E).abs(), rnd(F)


def _evaluate(op, backend, edge_index, N, tensors, weight_dtype):
    """Outputs and gradients of ``op`` (a list of tensors) for the given backend; the loss weights
    are rounded to ``weight_dtype`` (the tested dtype) so that the reference sees the same ones."""
    from gnnmegatron.ops import (edge_vector_aggregate, faithful_message_aggregate, fused_message_aggregate,
                                 segment_reduce)

    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    if op.startswith("segment_reduce"):
        outs = [segment_reduce(leaves[0], edge_index[0], N, op[len("segment_reduce["):-1], backend=backend)]
    elif op == "edge_vector_aggregate":
        outs = [edge_vector_aggregate(leaves[0], leaves[1], edge_index, N, backend=backend)]
    elif op.startswith("faithful_message"):
        outs = list(faithful_message_aggregate(leaves[0], leaves[1], edge_index, *leaves[2:], backend=backend))
    else:
        P, Q, R, C, b, w, v = leaves
        outs = list(fused_message_aggregate(P, Q, edge_index, R, C, b, w, v, backend=backend))
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(weight_dtype).to(o.dtype).to(o.device)
               for o in outs]
    loss = sum((o * wt).sum() for o, wt in zip(outs, weights))
    second = op.endswith("[grad2]")
    grads = torch.autograd.grad(loss, leaves, create_graph=second)
    result = [o.detach() for o in outs] + [gr.detach() for gr in grads]
    if second:  # a loss on the gradients, as a force loss takes (faithful: on the geometry's gradients)
        on = [grads[i] for i in FAITHFUL_GEOMETRY] if op.startswith("faithful_message") else grads
        loss2 = sum((gr.double() * gr.double()).sum() for gr in on)
        result += [torch.zeros_like(t) if gg is None else gg.detach()
                   for t, gg in zip(leaves, torch.autograd.grad(loss2, leaves, allow_unused=True))]
    return result


def _max_error(got, want) -> float:
    worst = 0.0
    for a, e in zip(got, want):
        if e.numel() == 0:
            continue
        scale = float(e.double().abs().max()) or 1.0
        worst = max(worst, float((a.double() - e.double()).abs().max()) / scale)
    return worst


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats) -> float:
    fn()  # warm-up: compile, autotune
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def available_backends(device: torch.device) -> dict:
    """{backend: reason it cannot run or None} on ``device``."""
    from gnnmegatron.ops.dispatch import triton_available, triton_interpret

    out = {"reference": None, "torch": None}
    if not triton_available():
        out["triton"] = "triton does not import"
    elif device.type == "cuda" or triton_interpret():
        out["triton"] = None
    else:
        out["triton"] = "needs a CUDA device (or TRITON_INTERPRET=1 before import)"
    return out


def check(op, device, backend, dtype, shape, repeats=3) -> Row:
    N, E, F, K = SHAPES[shape]
    edge_index = _graph(N, E, device)
    tensors = _inputs(op, N, E, F, K, dtype, device)
    name = str(dtype).replace("torch.", "")
    tol = next((t for (prefix, dt), t in TOLERANCE_OVERRIDES.items() if op.startswith(prefix) and dt == dtype),
               TOLERANCE[dtype])
    try:
        want = _evaluate(op, "reference", edge_index, N, [t.double() for t in tensors], dtype)
        got = _evaluate(op, backend, edge_index, N, tensors, dtype)
        err = _max_error(got, want)
        ms = _time(lambda: _evaluate(op, backend, edge_index, N, tensors, dtype), device, repeats)
        ok, note = err <= tol, ""
        if backend == "triton" and device.type == "cpu":
            note = "TRITON_INTERPRET: CPU emulation, time is not a GPU time"
        message_op = op.startswith(("fused_message", "faithful_message"))
        if ok and backend == "triton" and device.type == "cuda" and message_op:
            with _env("GNNMEGATRON_DETERMINISTIC", "1"):
                runs = [_evaluate(op, backend, edge_index, N, tensors, dtype) for _ in range(2)]
            same = all(torch.equal(a, b) for a, b in zip(*runs))
            ok, note = same, "deterministic: bit-identical" if same else "deterministic mode: results differ"
        return Row(op, str(device), backend, name, shape, err, tol, ms, "PASS" if ok else "FAIL", note)
    except Exception as exc:  # reported as a failed row, not a crash
        return Row(op, str(device), backend, name, shape, None, tol, None, "FAIL",
                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def run(devices=None, shapes=None, quick=False, repeats=3, progress=None) -> list[Row]:
    """All rows (see the module docstring). ``devices``: e.g. ["cpu", "cuda"] (default: present ones)."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        interpreted = device.type == "cpu"
        dev_shapes = shapes or (["small"] if quick else ["small", "medium"])
        dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
        for backend, why_not in available_backends(device).items():
            if backend == "reference":
                continue  # the oracle itself
            if why_not:
                rows.append(Row("*", str(device), backend, "-", "-", None, 0.0, None, "SKIP", why_not))
                continue
            # the triton interpreter on CPU is slow: small shapes only
            use_shapes = ["small"] if (backend == "triton" and interpreted) else dev_shapes
            for shape in use_shapes:
                for dtype in dtypes:
                    for op in OPS:
                        row = check(op, device, backend, dtype, shape, repeats)
                        rows.append(row)
                        if progress:
                            progress(row)
    return rows


def format_table(rows: list[Row]) -> str:
    head = ["op", "device", "backend", "dtype", "shape", "max rel err", "tolerance", "time ms", "result", "note"]
    body = [[r.op, r.device, r.backend, r.dtype, r.shape, "-" if r.max_error is None else f"{r.max_error:.1e}",
             f"{r.tolerance:.0e}" if r.tolerance else "-", "-" if r.time_ms is None else f"{r.time_ms:.1f}",
             r.result, r.note] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + body]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from gnnmegatron.ops.dispatch import deterministic

    parts = [f"torch {torch.__version__}"]
    try:
        parts.append(f"triton {version('triton')}")
    except PackageNotFoundError:
        parts.append("triton not installed")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        parts.append(f"GPU {p.name} ({p.total_memory / 2**30:.0f} GiB)")
    else:
        parts.append("no GPU")
    parts.append(f"{os.cpu_count()} CPU cores")
    parts.append(f"deterministic mode {'on' if deterministic() else 'off'}")
    return ", ".join(parts)


def _write_json(json_path, env: str, rows: list[Row], finished: bool) -> None:
    tmp = f"{json_path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": env, "finished": finished, "rows": [asdict(r) for r in rows]}, f, indent=1)
    os.replace(tmp, json_path)  # a reader (or a run stopped part-way) never sees a half-written file


def main(quick=False, devices=None, json_path=None) -> int:
    env = environment()
    print(env, flush=True)
    done = []

    def progress(row):  # each row as it finishes (a GPU's first rows autotune and compile: minutes)
        done.append(row)
        print(f"  {row.result} {row.op} {row.device} {row.backend} {row.dtype} {row.shape}"
              + ("" if row.max_error is None else f" err {row.max_error:.1e}") + (f" {row.note}" if row.note else ""),
              flush=True)
        if json_path:
            _write_json(json_path, env, done, finished=False)

    rows = run(devices=devices, quick=quick, progress=progress)
    print(format_table(rows))
    failed = [r for r in rows if r.result == "FAIL"]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows pass" + (f", {len(failed)} FAIL" if failed else ""))
    if json_path:
        _write_json(json_path, env, rows, finished=True)
    return 1 if failed else 0
