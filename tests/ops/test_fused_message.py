"""fused_message_aggregate: torch backend vs the reference (values, gradients, double backward),
gradcheck / gradgradcheck in float64, and the no-[E, F]-tensor property."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gnnmegatron.ops import fused_message_aggregate, settings
from ops_cases import GRAPHS, assert_close, fused_inputs, make_graph


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """13 edges per chunk: several chunks, and E is never a multiple of it."""
    monkeypatch.setattr(settings, "chunk_edges", 13)
    monkeypatch.setattr(settings, "compile", "never")


def _run(backend, ei, inputs, activation="silu", seed=1, second_order=False):
    P, Q, R, C, b, w, v = inputs
    out = fused_message_aggregate(P, Q, ei, R, C, b, w, v, activation=activation, backend=backend)
    m, s = out if v is not None else (out, None)
    g = torch.Generator().manual_seed(seed)
    loss = (m * torch.randn(m.shape, generator=g, dtype=torch.float64).to(m.dtype)).sum()
    if s is not None:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)).sum()
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(loss, leaves, create_graph=second_order, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    result = [m] + ([s] if s is not None else []) + list(grads)
    if second_order:  # a loss on the gradients (what a force loss does), differentiated again
        loss2 = sum((gr * gr).sum() for gr in grads if gr.requires_grad)
        result += [torch.zeros_like(t) if gg is None else gg
                   for t, gg in zip(leaves, torch.autograd.grad(loss2, leaves, allow_unused=True))]
    return result


NAMES = ["m", "s", "dP", "dQ", "dR", "dC", "db", "dw", "dv"]


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("kind", GRAPHS)
def test_torch_backend_matches_reference_on_ragged_graphs(kind, sorted_):
    ei, n = make_graph(kind, sorted_, hub_edges=2000)
    dtype = torch.float64
    inputs = fused_inputs(ei.shape[1], n, 6, 5, dtype)
    ref = _run("reference", ei, inputs, second_order=True)
    out = _run("torch", ei, inputs, second_order=True)
    names = NAMES + ["dd" + k for k in ("P", "Q", "R", "C", "b", "w", "v")]
    for a, e, name in zip(out, ref, names):
        assert_close(a, e, dtype, f"{kind}/{'sorted' if sorted_ else 'unsorted'} {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtype_table(dtype):
    ei, n = make_graph("ragged", True)
    inputs = fused_inputs(ei.shape[1], n, 24, 8, dtype)
    # the oracle computes in fp32 from the same (rounded) inputs
    ref = _run("reference", ei, inputs)
    out = _run("torch", ei, inputs)
    assert all(t.dtype == dtype for t in out)
    for a, e, name in zip(out, ref, NAMES):
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("activation", ["silu", "gelu", "tanh", "softplus"])
def test_activations(activation):
    ei, n = make_graph("ragged", False)
    inputs = fused_inputs(ei.shape[1], n, 5, 3, torch.float64)
    ref = _run("reference", ei, inputs, activation, second_order=True)
    out = _run("torch", ei, inputs, activation, second_order=True)
    for i, (a, e) in enumerate(zip(out, ref)):
        assert_close(a, e, torch.float64, f"{activation} output {i}")


@pytest.mark.parametrize("w,v,b", [(False, False, False), (True, False, True), (False, True, False)])
def test_optional_arguments(w, v, b):
    ei, n = make_graph("ragged", True)
    inputs = fused_inputs(ei.shape[1], n, 4, 3, torch.float64, w=w, v=v, b=b)
    for i, (a, e) in enumerate(zip(_run("torch", ei, inputs), _run("reference", ei, inputs))):
        assert_close(a, e, torch.float64, f"output {i} (w={w}, v={v}, b={b})")


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
def test_gradcheck_and_gradgradcheck_float64(sorted_):
    g = torch.Generator().manual_seed(3)
    n, E = 4, 9
    ei = torch.stack([torch.randint(0, n, (E,), generator=g), torch.randint(0, n, (E,), generator=g)])
    if sorted_:
        ei = ei[:, ei[0].argsort()]
    inputs = fused_inputs(E, n, 3, 2, torch.float64, seed=4)

    def fn(*args):
        return fused_message_aggregate(*args[:2], ei, *args[2:], activation="silu", backend="torch")

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_never_materialises_an_edge_by_feature_tensor(monkeypatch):
    """Forward, backward and double backward allocate nothing near [E, F] (chunk = 64 edges)."""
    monkeypatch.setattr(settings, "chunk_edges", 64)
    E, N, F, K = 3000, 100, 32, 4
    g = torch.Generator().manual_seed(0)
    ei = torch.stack([torch.randint(0, N, (E,), generator=g), torch.randint(0, N, (E,), generator=g)])
    inputs = fused_inputs(E, N, F, K, torch.float32)

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    with Largest():
        _run("torch", ei, inputs, second_order=True)
    assert Largest.biggest <= max(N * F, E * K, 64 * F * 2), \
        f"largest tensor has {Largest.biggest} elements; E*F = {E * F}"
    Largest.biggest = 0
    with Largest():
        _run("reference", ei, inputs)
    assert Largest.biggest >= E * F  # the control: the reference does materialise it


def test_clear_errors():
    ei, n = make_graph("ragged", True)
    P, Q, R, C, b, w, v = fused_inputs(ei.shape[1], n, 4, 3, torch.float64)
    with pytest.raises(ValueError, match=r"C \[4, 4\] must be \[K=3, F=4\]"):
        fused_message_aggregate(P, Q, ei, R, C.detach().new_zeros(4, 4))
    with pytest.raises(ValueError, match="unknown activation"):
        fused_message_aggregate(P, Q, ei, R, C, activation="relu")
    with pytest.raises(ValueError, match="unknown ops backend"):
        fused_message_aggregate(P, Q, ei, R, C, backend="cuda")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_message_aggregate(P, Q, ei, R, C, backend="triton")


def test_mixed_dtypes_are_refused_with_their_names():
    import pytest
    import torch

    from gnnmegatron.ops import fused_message_aggregate

    P = torch.zeros(3, 4)
    edge_index = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"share one dtype, got \['torch.bfloat16', 'torch.float32'\]"):
        fused_message_aggregate(P, P, edge_index, torch.zeros(2, 2), torch.zeros(2, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize("activation", ["silu", "gelu", "tanh", "softplus"])
@pytest.mark.parametrize("w,v", [(True, True), (False, False), (True, False)])
def test_force_loss_double_backward(activation, w, v):
    """The double backward a force loss runs: cotangents on dP, dQ, dR and dw only (the buffered path
    of the torch twin); the second loss's gradients of every input vs the reference."""
    ei, n = make_graph("hub", False, hub_edges=40)
    inputs = fused_inputs(ei.shape[1], n, 6, 3, torch.float64, w=w, v=v)
    results = []
    for backend in ("reference", "torch"):
        P, Q, R, C, b, wt, vec = inputs
        out = fused_message_aggregate(P, Q, ei, R, C, b, wt, vec, activation=activation, backend=backend)
        m, s = out if v else (out, None)
        loss = (m * m.detach().cos()).sum() + ((s * s.detach().sin()).sum() if v else 0)
        geometry = [t for t in (P, Q, R, wt) if t is not None]
        grads = torch.autograd.grad(loss, geometry, create_graph=True)
        loss2 = sum((g * g.detach().sin()).sum() for g in grads)
        results.append(list(grads) + list(torch.autograd.grad(loss2, [t for t in inputs if t is not None])))
    for i, (a, e) in enumerate(zip(results[1], results[0])):
        assert_close(a, e, torch.float64, f"{activation} w={w} v={v} output {i}")


def test_chunk_workers_are_deterministic(monkeypatch):
    """Eager chunks spread over 2 worker threads (fixed assignment, partial sums added in worker order):
    two runs are bit-identical and equal the one-worker run to rounding (forward, backward, force loss)."""
    from ops_cases import assert_close_scaled

    ei, n = make_graph("hub", False, hub_edges=200)
    inputs = fused_inputs(ei.shape[1], n, 8, 3, torch.float64)

    def once(workers):
        monkeypatch.setattr(settings, "chunk_workers", workers)
        P, Q, R, C, b, w, v = inputs
        m, s = fused_message_aggregate(P, Q, ei, R, C, b, w, v, backend="torch")
        loss = (m * m.detach().cos()).sum() + (s * s.detach().sin()).sum()
        grads = torch.autograd.grad(loss, [P, Q, R, w], create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), list(inputs))
        return [m, s] + list(grads) + list(second)

    two, again, one = once(2), once(2), once(1)
    for i, (a, b, c) in enumerate(zip(two, again, one)):
        assert torch.equal(a, b), f"output {i}: two 2-worker runs differ"
        assert_close_scaled(a, c, torch.float64, f"output {i}: 2 workers vs 1")
