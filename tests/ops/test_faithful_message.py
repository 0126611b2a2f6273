"""faithful_message_aggregate (the fused faithful E_GCL edge MLP): torch backend vs the reference
(values, every gradient, double backward with tangents on every input, third order), gradcheck
and gradgradcheck in float64, the conservative-force pass's pruned backward, and the
no-[E, H]-tensor property of forward, backward and double backward."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gnnmegatron.ops import faithful_message_aggregate, settings
from ops_cases import GRAPHS, assert_close, assert_close_scaled, make_graph

NAMES = ["P", "Q", "R", "C", "b1", "W2", "b2", "w", "Wc", "bc", "v"]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """13 edges per chunk: several chunks, and E is never a multiple of it."""
    monkeypatch.setattr(settings, "chunk_edges", 13)


def faithful_inputs(E, N, F1, K, dtype, F2=None, F3=None, seed=0, w=True, coord=True, b=True):
    """Differentiable inputs in NAMES order (None where absent); F2/F3 default to F1."""
    F2, F3 = F2 or F1, F3 or F1
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()

    P, Q = rnd(N, F1), rnd(N, F1)
    R, C = rnd(E, K), rnd(K, F1, scale=0.5)
    b1 = rnd(F1) if b else None
    W2, b2 = rnd(F2, F1, scale=F1 ** -0.5), (rnd(F2) if b else None)
    wt = torch.rand(E, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if w else None
    if coord:
        Wc, bc, v = rnd(F3, F2, scale=F2 ** -0.5), (rnd(F3) if b else None), rnd(F3)
    else:
        Wc = bc = v = None
    return [P, Q, R, C, b1, W2, b2, wt, Wc, bc, v]


def run(backend, ei, inputs, activation="silu", seed=1, order=2):
    """Outputs, first-order gradients of a random loss, and (order >= 2) the gradients of a loss on
    every first-order gradient (a tangent on every input of the backward), (order 3) once more."""
    P, Q, R, C, b1, W2, b2, w, Wc, bc, v = inputs
    out = faithful_message_aggregate(P, Q, ei, R, C, b1, W2, b2, w, Wc, bc, v, activation=activation,
                                     backend=backend)
    m, s = out if v is not None else (out, None)
    g = torch.Generator().manual_seed(seed)

    def rand_like(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    loss = (m * rand_like(m)).sum() + ((s * rand_like(s)).sum() if s is not None else 0)
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(loss, leaves, create_graph=order >= 2, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    result = [m] + ([s] if s is not None else []) + list(grads)
    if order >= 2:
        loss2 = sum((gr * rand_like(gr)).sum() for gr in grads if gr.requires_grad)
        second = torch.autograd.grad(loss2, leaves, allow_unused=True, create_graph=order >= 3)
        second = [torch.zeros_like(t) if gg is None else gg for t, gg in zip(leaves, second)]
        result += second
        if order >= 3:
            loss3 = sum((gg * gg).sum() for gg in second if gg.requires_grad)
            result += [torch.zeros_like(t) if x is None else x
                       for t, x in zip(leaves, torch.autograd.grad(loss3, leaves, allow_unused=True))]
    return result


def _names(inputs, order):
    present = [n for n, t in zip(NAMES, inputs) if t is not None]
    names = ["m"] + (["s"] if inputs[10] is not None else []) + ["d" + n for n in present]
    if order >= 2:
        names += ["dd" + n for n in present]
    if order >= 3:
        names += ["ddd" + n for n in present]
    return names


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("kind", GRAPHS)
def test_torch_backend_matches_reference_on_ragged_graphs(kind, sorted_):
    ei, n = make_graph(kind, sorted_, hub_edges=300)
    inputs = faithful_inputs(ei.shape[1], n, 6, 5, torch.float64, F2=7, F3=4)
    ref = run("reference", ei, inputs)
    out = run("torch", ei, inputs)
    for a, e, name in zip(out, ref, _names(inputs, 2)):
        assert_close(a, e, torch.float64, f"{kind}/{'sorted' if sorted_ else 'unsorted'} {name}")
    if kind == "ragged":  # the comparison is not vacuous: every output and gradient is non-zero
        assert all(float(t.detach().abs().max()) > 0 for t in ref)


@pytest.mark.parametrize("activation", ["silu", "gelu", "tanh", "softplus"])
def test_activations(activation):
    ei, n = make_graph("ragged", False)
    inputs = faithful_inputs(ei.shape[1], n, 5, 3, torch.float64)
    ref = run("reference", ei, inputs, activation)
    out = run("torch", ei, inputs, activation)
    for a, e, name in zip(out, ref, _names(inputs, 2)):
        assert_close(a, e, torch.float64, f"{activation} {name}")


@pytest.mark.parametrize("w,coord,b", [(False, False, False), (True, False, True), (False, True, False)])
def test_optional_arguments(w, coord, b):
    ei, n = make_graph("isolated", True)
    inputs = faithful_inputs(ei.shape[1], n, 4, 3, torch.float64, w=w, coord=coord, b=b)
    for a, e, name in zip(run("torch", ei, inputs), run("reference", ei, inputs), _names(inputs, 2)):
        assert_close(a, e, torch.float64, f"{name} (w={w}, coord={coord}, b={b})")


@pytest.mark.parametrize("activation", ["silu", "gelu", "tanh", "softplus"])
@pytest.mark.parametrize("coord", [True, False])
def test_force_loss_double_backward(activation, coord):
    """The double backward a force loss runs: tangents on P, Q, R and w only (the buffered,
    stacked-GEMM path of the torch twin), every gradient of the second loss vs the reference."""
    ei, n = make_graph("hub", False, hub_edges=40)
    inputs = faithful_inputs(ei.shape[1], n, 5, 3, torch.float64, F2=6, F3=4, coord=coord)
    results = []
    for backend in ("reference", "torch"):
        P, Q, R, C, b1, W2, b2, w, Wc, bc, v = inputs
        out = faithful_message_aggregate(P, Q, ei, R, C, b1, W2, b2, w, Wc, bc, v, activation=activation,
                                         backend=backend)
        m, s = out if coord else (out, None)
        loss = (m * m.detach().cos()).sum() + ((s * s.detach().sin()).sum() if coord else 0)
        geometry = [P, Q, R, w]
        grads = torch.autograd.grad(loss, geometry, create_graph=True)
        loss2 = sum((g * g.detach().sin()).sum() for g in grads)
        leaves = [t for t in inputs if t is not None]
        results.append(list(grads) + list(torch.autograd.grad(loss2, leaves)))
    for i, (a, e) in enumerate(zip(results[1], results[0])):
        assert_close(a, e, torch.float64, f"{activation} coord={coord} output {i}")


def test_third_order_matches_reference():
    ei, n = make_graph("ragged", False)
    inputs = faithful_inputs(ei.shape[1], n, 4, 3, torch.float64)
    for a, e, name in zip(run("torch", ei, inputs, order=3), run("reference", ei, inputs, order=3),
                          _names(inputs, 3)):
        assert_close(a, e, torch.float64, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_table(dtype):
    """Half inputs compute in fp32 (the oracle computes in fp32 from the same rounded inputs); outputs
    and gradients, first and second order, come back in the input dtype."""
    ei, n = make_graph("ragged", True)
    inputs = faithful_inputs(ei.shape[1], n, 16, 8, dtype)
    ref, out = run("reference", ei, inputs, order=2), run("torch", ei, inputs, order=2)
    assert all(t.dtype == dtype for t in out)
    first = len(_names(inputs, 1))
    for i, (a, e, name) in enumerate(zip(out, ref, _names(inputs, 2))):
        (assert_close if i < first else assert_close_scaled)(a, e, dtype, name)


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
def test_gradcheck_and_gradgradcheck_float64(sorted_):
    g = torch.Generator().manual_seed(3)
    n, E = 4, 9
    ei = torch.stack([torch.randint(0, n, (E,), generator=g), torch.randint(0, n, (E,), generator=g)])
    if sorted_:
        ei = ei[:, ei[0].argsort()]
    inputs = faithful_inputs(E, n, 3, 2, torch.float64, F2=2, F3=3, seed=4)

    def fn(*args):
        return faithful_message_aggregate(args[0], args[1], ei, *args[2:], activation="silu", backend="torch")

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_conservative_pass_prunes_weight_gradients(monkeypatch):
    """``autograd.grad(loss, geometry, create_graph=True)`` runs the backward for P, Q, R, w only;
    ``.backward()`` of the force loss then reaches every weight, equal to the reference."""
    import gnnmegatron.ops.faithful_message as fm

    ei, n = make_graph("ragged", True)
    inputs = faithful_inputs(ei.shape[1], n, 5, 3, torch.float64)
    seen = []
    real = fm.faithful_message_bwd

    def spy(*args):
        seen.append(list(args[19]))
        return real(*args)

    monkeypatch.setattr(fm, "faithful_message_bwd", spy)
    results = {}
    for backend in ("reference", "torch"):
        for t in inputs:
            t.grad = None
        P, Q, R, C, b1, W2, b2, w, Wc, bc, v = inputs
        x = R.detach().clone().requires_grad_()  # a "geometry" leaf feeding R and w
        m, s = faithful_message_aggregate(P * 1.0, Q, ei, R * x, C, b1, W2, b2, w * x[:, 0], Wc, bc, v,
                                          backend=backend)
        energy = (m ** 2).sum() + (s ** 2).sum()
        (force,) = torch.autograd.grad(energy, x, create_graph=True)
        (force ** 2).sum().backward()
        results[backend] = [force] + [t.grad.clone() for t in inputs]
    assert seen[0] == [False, False, True, False, False, False, False, True, False, False, False], seen[0]
    assert all(seen[1]) and len(seen) == 2  # the force loss's backward: every gradient
    for a, e, name in zip(results["torch"], results["reference"], ["force"] + NAMES):
        assert_close(a, e, torch.float64, name)


def test_never_materialises_an_edge_by_hidden_tensor(monkeypatch):
    """Forward, backward and double backward allocate nothing of E x H elements (chunk = 64 edges)."""
    monkeypatch.setattr(settings, "chunk_edges", 64)
    E, N, F, K = 3000, 100, 32, 4
    g = torch.Generator().manual_seed(0)
    ei = torch.stack([torch.randint(0, N, (E,), generator=g), torch.randint(0, N, (E,), generator=g)])
    inputs = faithful_inputs(E, N, F, K, torch.float32)

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    with Largest():
        run("torch", ei, inputs, order=2)
    assert Largest.biggest <= max(N * F, E * K, 64 * F * 2), \
        f"largest tensor has {Largest.biggest} elements; E*F = {E * F}"
    Largest.biggest = 0
    with Largest():
        run("reference", ei, inputs, order=1)
    assert Largest.biggest >= E * F  # the control: the reference does materialise it


def test_clear_errors():
    ei, n = make_graph("ragged", True)
    P, Q, R, C, b1, W2, b2, w, Wc, bc, v = faithful_inputs(ei.shape[1], n, 4, 3, torch.float64)
    with pytest.raises(ValueError, match=r"W2 \[4, 5\] must be \[F2, F1=4\]"):
        faithful_message_aggregate(P, Q, ei, R, C, b1, W2.detach().new_zeros(4, 5))
    with pytest.raises(ValueError, match="Wc and v come together"):
        faithful_message_aggregate(P, Q, ei, R, C, b1, W2, b2, w, Wc)
    with pytest.raises(ValueError, match="unknown activation"):
        faithful_message_aggregate(P, Q, ei, R, C, b1, W2, activation="relu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        faithful_message_aggregate(P, Q, ei, R, C, b1, W2, backend="triton")


def test_chunk_workers_are_deterministic(monkeypatch):
    """Chunks spread over 2 worker threads (fixed assignment, partial sums added in worker order): two
    runs are bit-identical, and equal the one-worker run to rounding (forward, backward, force loss)."""
    ei, n = make_graph("hub", False, hub_edges=200)
    inputs = faithful_inputs(ei.shape[1], n, 8, 3, torch.float64)

    def once(workers):
        monkeypatch.setattr(settings, "chunk_workers", workers)
        P, Q, R, C, b1, W2, b2, w, Wc, bc, v = inputs
        m, s = faithful_message_aggregate(P, Q, ei, R, C, b1, W2, b2, w, Wc, bc, v, backend="torch")
        loss = (m * m.detach().cos()).sum() + (s * s.detach().sin()).sum()
        grads = torch.autograd.grad(loss, [P, Q, R, w], create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), [t for t in inputs if t is not None])
        return [m, s] + list(grads) + list(second)

    two, again, one = once(2), once(2), once(1)
    for i, (a, b, c) in enumerate(zip(two, again, one)):
        assert torch.equal(a, b), f"output {i}: two 2-worker runs differ"
        assert_close_scaled(a, c, torch.float64, f"output {i}: 2 workers vs 1")
