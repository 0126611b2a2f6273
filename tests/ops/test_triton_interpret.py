"""Triton kernels through the interpreter (CPU, tiny inputs), compared with the reference:
values, gradients and the double backward (the fused op's bwd2 kernel), on ragged / empty /
isolated / one-atom / hub graphs, sorted and unsorted, each activation, each BLOCK_K class,
each dtype, gradcheck and gradgradcheck in float64.

``TRITON_INTERPRET=1`` must be set before ``@triton.jit`` runs (triton reads it when a kernel
is decorated, i.e. when ``gnnmegatron.kernels`` is imported), so the checks run in a fresh
subprocess: this file, executed as a script, with the variable set.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_interpreted(script: Path, timeout: int = 600) -> str:
    """Run ``script`` under TRITON_INTERPRET=1; assert it printed ALL OK; return its output."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("GNNMEGATRON_DETERMINISTIC", None)
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=str(HERE), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"interpreter checks failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "ALL OK" in proc.stdout, proc.stdout[-4000:]
    return proc.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="triton runs on Linux only")
def test_triton_kernels_match_reference_in_interpreter():
    run_interpreted(Path(__file__).resolve())


def main() -> None:  # runs in the subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from gnnmegatron.kernels import _fused_common
    from gnnmegatron.ops import edge_vector_aggregate, fused_message_aggregate, segment_reduce
    from ops_cases import assert_close, assert_close_scaled, fused_inputs, make_graph

    torch.set_num_threads(1)
    checks = 0

    def run(backend, ei, inputs, activation, second_order, dtype):
        P, Q, R, C, b, w, v = inputs
        out = fused_message_aggregate(P, Q, ei, R, C, b, w, v, activation=activation, backend=backend)
        m, s = out if v is not None else (out, None)
        g = torch.Generator().manual_seed(5)
        loss = (m * torch.randn(m.shape, generator=g, dtype=torch.float64).to(dtype).to(m.dtype)).sum()
        if s is not None:
            loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(dtype).to(s.dtype)).sum()
        leaves = [t for t in inputs if t is not None]
        grads = torch.autograd.grad(loss, leaves, create_graph=second_order)
        result = [m] + ([s] if s is not None else []) + list(grads)
        if second_order:  # a loss on the gradients, as a force loss takes: runs the bwd2 kernel
            loss2 = sum((gr.double() ** 2).sum() for gr in grads)
            second = torch.autograd.grad(loss2, leaves, allow_unused=True)
            result += [torch.zeros_like(t) if gg is None else gg for t, gg in zip(leaves, second)]
        return result

    def fused_case(kind, sorted_, dtype, F, K, activation="silu", w=True, v=True, seed=0, second_order=True):
        nonlocal checks
        ei, n = make_graph(kind, sorted_, seed=seed, hub_edges=150)
        inputs = fused_inputs(ei.shape[1], n, F, K, dtype, seed=seed, w=w, v=v)
        exact = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
        ref = run("reference", ei, exact, activation, second_order, dtype)  # float64 oracle on the same values
        got = run("triton", ei, inputs, activation, second_order, dtype)
        first = len(ref) // 2 + 1 if second_order else len(ref)  # outputs and first-order gradients
        for i, (a, e) in enumerate(zip(got, ref)):
            check = assert_close if i < first else assert_close_scaled
            check(a, e, dtype, f"triton fused {kind} sorted={sorted_} {dtype} F={F} K={K} {activation} output {i}")
            checks += 1

    # ragged graphs, sorted and unsorted, first and second order; F=20 with BLOCK_F=16: two slices
    for kind in ("ragged", "empty", "isolated", "one_atom", "hub"):
        for sorted_ in (True, False):
            fused_case(kind, sorted_, torch.float32, F=20, K=3)
    for activation in ("gelu", "tanh", "softplus"):
        fused_case("ragged", False, torch.float32, F=20, K=5, activation=activation)
    for w, v in ((False, False), (True, False), (False, True)):
        fused_case("ragged", True, torch.float32, F=8, K=3, w=w, v=v)
    _fused_common.INTERPRET_CONFIG["BLOCK_F"] = 32  # one slice covers F
    fused_case("ragged", False, torch.float32, F=20, K=20)  # BLOCK_K 32
    fused_case("isolated", False, torch.float32, F=12, K=40)  # BLOCK_K 64
    fused_case("ragged", True, torch.float64, F=8, K=3)
    fused_case("ragged", False, torch.bfloat16, F=16, K=16, second_order=False)
    fused_case("ragged", True, torch.float16, F=16, K=4, second_order=False)

    # K above the kernels' limit: a clear error when triton is asked for by name
    ei, n = make_graph("ragged", True)
    P, Q, R, C, b, w, v = fused_inputs(ei.shape[1], n, 4, 70, torch.float32)
    try:
        fused_message_aggregate(P, Q, ei, R, C, backend="triton")
        raise AssertionError("K=70 should be refused by the triton backend")
    except ValueError as exc:
        assert "K <= 64" in str(exc), exc

    # gradcheck and gradgradcheck through the kernels (float64, tiny): the second uses bwd2
    ei, n = make_graph("ragged", False, seed=2)
    ei, n = ei[:, :10] % 4, 4
    inputs = fused_inputs(10, 4, 3, 2, torch.float64, seed=3)

    def fn(*a):
        return fused_message_aggregate(a[0], a[1], ei, *a[2:], backend="triton")

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)
    checks += 2

    for kind in ("ragged", "empty", "isolated", "hub"):
        for sorted_ in (True, False):
            ei, n = make_graph(kind, sorted_, hub_edges=150)
            for dtype in (torch.float32, torch.bfloat16):
                for width in (3, 40):  # narrow and wide row classes
                    src = torch.randn(ei.shape[1], width, dtype=torch.float64).to(dtype)
                    for reduce in ("sum", "mean", "max"):
                        outs = []
                        for backend in ("reference", "triton"):
                            x = src.clone().requires_grad_()
                            out = segment_reduce(x, ei[0], n, reduce, backend=backend)
                            go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                                             dtype=torch.float64).to(dtype)
                            outs.append((out, torch.autograd.grad((out * go).sum(), x)[0]))
                        if reduce == "max" and dtype == torch.bfloat16:  # ties: the reference splits the
                            outs = [(o, segment_reduce(gr, ei[0], n, "sum", backend="reference"))  # gradient,
                                    for o, gr in outs]                                          # we pick one
                        for i in range(2):
                            assert_close(outs[1][i], outs[0][i], dtype,
                                         f"triton segment {reduce} {kind} {sorted_} F={width} {i}")
                            checks += 1
            for D in (3, 6):
                vec, g = torch.randn(ei.shape[1], D), torch.randn(ei.shape[1])
                assert_close(edge_vector_aggregate(vec, g, ei, n, backend="triton"),
                             edge_vector_aggregate(vec, g, ei, n, backend="reference"), torch.float32,
                             f"triton edge_vector {kind} {sorted_} D={D}")
                checks += 1
    print(f"ALL OK ({checks} comparisons)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
