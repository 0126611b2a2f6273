"""The fused faithful E_GCL's Triton kernels (forward, backward, force-loss double backward) through
the interpreter (CPU, tiny inputs) against the float64 reference: outputs, every first-order
gradient and every gradient of a loss on the geometry's gradients (what a force loss runs), on the
ragged / empty / isolated / one-atom / hub graphs, sorted and unsorted, each activation, with and
without the envelope and the coordinate MLP, fp32 / fp64 / bf16, K in one and several BLOCK_KR
columns, deterministic mode (bit-identical reruns); gradcheck in float64; and the model with fused
faithful blocks on the triton backend against the unfused model (energy, forces, stress, every
parameter gradient of a force + stress loss, float64).

Widths are 17 / 18 / 12 with 16-wide interpreter blocks, so every layer runs two slices. Executed
as a script in a subprocess with ``TRITON_INTERPRET=1`` (see test_triton_interpret.py).
"""

import os
import sys
from pathlib import Path

import pytest

from test_triton_interpret import run_interpreted

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(sys.platform != "linux", reason="triton runs on Linux only")
def test_faithful_kernels_match_reference_in_interpreter():
    out = run_interpreted(Path(__file__).resolve(), timeout=900)
    assert "launches fwd" in out


def main() -> None:  # runs in the subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from gnnmegatron.kernels import faithful_message as fwd_mod
    from gnnmegatron.kernels import faithful_message_bwd as bwd_mod
    from gnnmegatron.kernels import faithful_message_bwd2 as bwd2_mod
    from gnnmegatron.ops import faithful_message_aggregate
    from ops_cases import assert_close, assert_close_scaled, make_graph
    from test_faithful_message import faithful_inputs

    torch.set_num_threads(1)
    launches = {"fwd": 0, "bwd": 0, "bwd2": 0}
    for name, kernel in (("fwd", fwd_mod.FWD), ("bwd", bwd_mod.BWD), ("bwd2", bwd2_mod.BWD2)):
        def counted(*a, _orig=kernel.launch, _name=name, **k):
            launches[_name] += 1
            return _orig(*a, **k)
        kernel.launch = counted
    checks = 0

    def run(backend, ei, inputs, activation, second_order, dtype):
        P, Q, R, C, b1, W2, b2, w, Wc, bc, v = inputs
        out = faithful_message_aggregate(P, Q, ei, R, C, b1, W2, b2, w, Wc, bc, v, activation=activation,
                                         backend=backend)
        m, s = out if v is not None else (out, None)
        g = torch.Generator().manual_seed(5)

        def rnd(t):
            return torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype).to(t.dtype)

        loss = (m * rnd(m)).sum() + ((s * rnd(s)).sum() if s is not None else 0)
        leaves = [t for t in inputs if t is not None]
        grads = torch.autograd.grad(loss, leaves, create_graph=second_order)
        result = [m] + ([s] if s is not None else []) + list(grads)
        if second_order:  # a loss on the geometry's gradients (P, Q, R, w), as a force loss takes
            geometry = [gr for t, gr in zip(leaves, grads) if any(t is x for x in (P, Q, R, w))]
            loss2 = sum((gr.double() * rnd(gr).double()).sum() for gr in geometry)
            second = torch.autograd.grad(loss2, leaves, allow_unused=True)
            result += [torch.zeros_like(t) if gg is None else gg for t, gg in zip(leaves, second)]
        return result

    def case(kind, sorted_, dtype=torch.float32, F=(17, 18, 12), K=3, activation="silu", w=True, coord=True,
             seed=0, second_order=True):
        nonlocal checks
        ei, n = make_graph(kind, sorted_, seed=seed, hub_edges=60)
        inputs = faithful_inputs(ei.shape[1], n, F[0], K, dtype, F2=F[1], F3=F[2], seed=seed, w=w, coord=coord)
        exact = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
        ref = run("reference", ei, exact, activation, second_order, dtype)
        got = run("triton", ei, inputs, activation, second_order, dtype)
        first = 1 + int(coord) + sum(t is not None for t in inputs)  # outputs and first-order gradients
        for i, (a, e) in enumerate(zip(got, ref)):
            check = assert_close if i < first else assert_close_scaled
            check(a, e, dtype, f"triton faithful {kind} sorted={sorted_} {dtype} F={F} K={K} {activation} "
                               f"w={w} coord={coord} output {i}")
            checks += 1
        return got

    for kind in ("ragged", "empty", "isolated", "one_atom", "hub"):
        for sorted_ in (True, False):
            case(kind, sorted_)
    for activation in ("gelu", "tanh", "softplus"):
        case("ragged", False, activation=activation)
    case("isolated", True, w=False, coord=False)
    case("ragged", False, w=False, coord=True)
    case("ragged", True, K=40, F=(16, 16, 16))  # K over BLOCK_KR's first 32 columns
    case("ragged", False, dtype=torch.float64, F=(9, 17, 5))
    case("ragged", True, dtype=torch.bfloat16, F=(16, 16, 16), second_order=False)

    # deterministic mode: dQ over the source-sorted plan, partial buffers: bit-identical reruns
    os.environ["GNNMEGATRON_DETERMINISTIC"] = "1"
    before = dict(launches)
    runs = [case("hub", False, seed=3) for _ in range(2)]
    assert launches["bwd"] - before["bwd"] == 4 and launches["bwd2"] - before["bwd2"] == 4, launches
    for a, b in zip(*runs):
        assert torch.equal(a, b), "deterministic triton runs differ"
    del os.environ["GNNMEGATRON_DETERMINISTIC"]

    # gradcheck through the kernels (float64, tiny)
    ei, n = make_graph("ragged", False, seed=2)
    ei, n = ei[:, :10] % 4, 4
    inputs = faithful_inputs(10, 4, 3, 2, torch.float64, F2=2, F3=3, seed=3)

    def fn(*a):
        return faithful_message_aggregate(a[0], a[1], ei, *a[2:], backend="triton")

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    checks += 1

    # the model: fused faithful blocks on the triton backend == unfused, energy, forces, stress and every
    # parameter gradient of a force + stress loss (float64)
    from gnnmegatron.models import AtomisticModel, ModelConfig

    ei, n = make_graph("ragged", False, seed=4)
    src = torch.where(ei[1] == ei[0], (ei[0] + 1) % n, ei[1])
    g = torch.Generator().manual_seed(7)
    batch = dict(atomic_numbers=torch.randint(1, 80, (n,), generator=g),
                 positions=3.0 * torch.rand(n, 3, generator=g, dtype=torch.float64),
                 cell=7.0 * torch.eye(3, dtype=torch.float64)[None], pbc=torch.ones(1, 3, dtype=torch.bool),
                 batch=torch.zeros(n, dtype=torch.long), edge_index=torch.stack([ei[0], src]),
                 edge_shift=torch.zeros(ei.shape[1], 3, dtype=torch.float64))
    results = []
    for execution in ("unfused", "fused"):
        counts = dict(launches)
        torch.manual_seed(0)
        model = AtomisticModel(ModelConfig(hidden=16, layers=2, num_rbf=4, cutoff=12.0, execution=execution,
                                           ops_backend="triton")).double().train()
        with torch.no_grad():
            model.blocks[0].coord_mlp[-1].weight.mul_(3000.0)
        out = model(batch, compute_stress=True)
        loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum() + out["stress"].pow(2).sum()
        loss.backward()
        results.append([out["energy"], out["forces"], out["stress"]] + [p.grad for p in model.parameters()])
    # the fused model ran the three kernels: forward, backward (forces, then the loss) and double backward
    assert all(launches[k] > counts[k] for k in launches), (counts, launches)
    for i, (a, e) in enumerate(zip(results[1], results[0])):
        err = float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))
        assert err < 1e-9, f"model output/gradient {i}: triton fused vs unfused, max rel error {err:.2e}"
        checks += 1
    assert all(launches[k] > 0 for k in launches), launches
    print(f"launches fwd {launches['fwd']} bwd {launches['bwd']} bwd2 {launches['bwd2']}")
    print(f"ALL OK ({checks} comparisons)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
