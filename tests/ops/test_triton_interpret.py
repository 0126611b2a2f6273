"""Triton kernels through the interpreter (CPU, tiny inputs), compared with the reference.

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


@pytest.mark.skipif(sys.platform != "linux", reason="triton runs on Linux only")
def test_triton_kernels_match_reference_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, cwd=str(HERE),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreter checks failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "ALL OK" in proc.stdout, proc.stdout[-4000:]


def main() -> None:  # runs in the subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from gnnmegatron.kernels import fused_message as fm_kernels
    from gnnmegatron.ops import edge_vector_aggregate, fused_message_aggregate, segment_reduce
    from ops_cases import assert_close, fused_inputs, make_graph

    torch.set_num_threads(1)
    checks = 0

    def fused_case(kind, sorted_, dtype, F, K, activation="silu", w=True, v=True, seed=0):
        nonlocal checks
        ei, n = make_graph(kind, sorted_, seed=seed, hub_edges=150)
        inputs = fused_inputs(ei.shape[1], n, F, K, dtype, seed=seed, w=w, v=v)
        results = {}
        for backend in ("reference", "triton"):
            out = fused_message_aggregate(inputs[0], inputs[1], ei, *inputs[2:], activation=activation,
                                          backend=backend)
            m, s = out if v else (out, None)
            g = torch.Generator().manual_seed(5)
            loss = (m * torch.randn(m.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
            if s is not None:
                loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
            leaves = [t for t in inputs if t is not None]
            results[backend] = [m] + ([s] if s is not None else []) + list(torch.autograd.grad(loss, leaves))
        for i, (a, e) in enumerate(zip(results["triton"], results["reference"])):
            assert_close(a, e, dtype, f"triton fused {kind} sorted={sorted_} {dtype} F={F} {activation} output {i}")
            checks += 1

    # ragged graphs, sorted and unsorted; F=20 with BLOCK_F=16 takes the multi-block (atomic) path
    for kind in ("ragged", "empty", "isolated", "one_atom", "hub"):
        for sorted_ in (True, False):
            fused_case(kind, sorted_, torch.float32, F=20, K=3)
    fm_kernels.INTERPRET_CONFIG["BLOCK_F"] = 32  # one F block: direct stores of s, dR, dw
    fused_case("ragged", True, torch.float32, F=20, K=5)
    for activation in ("gelu", "tanh", "softplus"):
        fused_case("ragged", False, torch.float32, F=20, K=5, activation=activation)
    fused_case("ragged", True, torch.float32, F=8, K=3, w=False, v=False)
    fused_case("ragged", True, torch.float64, F=8, K=3)
    fused_case("ragged", False, torch.bfloat16, F=16, K=16)
    fused_case("ragged", True, torch.float16, F=16, K=4)

    # gradcheck through the kernels (float64, tiny)
    ei, n = make_graph("ragged", False, seed=2)
    ei, n = ei[:, :10] % 4, 4
    inputs = fused_inputs(10, 4, 3, 2, torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda *a: fused_message_aggregate(a[0], a[1], ei, *a[2:], backend="triton"),
                                    inputs, fast_mode=True)
    checks += 1

    for kind in ("ragged", "empty", "isolated", "hub"):
        for sorted_ in (True, False):
            ei, n = make_graph(kind, sorted_, hub_edges=150)
            for dtype in (torch.float32, torch.bfloat16):
                src = torch.randn(ei.shape[1], 20, dtype=torch.float64).to(dtype)
                for reduce in ("sum", "mean", "max"):
                    outs = []
                    for backend in ("reference", "triton"):
                        x = src.clone().requires_grad_()
                        out = segment_reduce(x, ei[0], n, reduce, backend=backend)
                        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                                         dtype=torch.float64).to(dtype)
                        outs.append((out, torch.autograd.grad((out * go).sum(), x)[0]))
                    if reduce == "max" and dtype == torch.bfloat16:  # ties: the reference splits the
                        outs = [(o, segment_reduce(gr, ei[0], n, "sum", backend="reference"))  # gradient, we
                                for o, gr in outs]                                              # pick the first
                    for i in range(2):
                        assert_close(outs[1][i], outs[0][i], dtype, f"triton segment {reduce} {kind} {sorted_} {i}")
                        checks += 1
            vec, g = torch.randn(ei.shape[1], 3), torch.randn(ei.shape[1])
            assert_close(edge_vector_aggregate(vec, g, ei, n, backend="triton"),
                         edge_vector_aggregate(vec, g, ei, n, backend="reference"), torch.float32,
                         f"triton edge_vector {kind} {sorted_}")
            checks += 1
    print(f"ALL OK ({checks} comparisons)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
