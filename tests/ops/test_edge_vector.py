"""edge_vector_aggregate: torch backend vs the reference, dtypes, gradcheck / gradgradcheck."""

import pytest
import torch

from gnnmegatron.ops import csr_plan, edge_vector_aggregate
from ops_cases import GRAPHS, assert_close, make_graph


def _run(backend, vec, g, ei, n):
    vec, g = vec.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    out = edge_vector_aggregate(vec, g, ei, n, backend=backend)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad((out * go).sum(), (vec, g), create_graph=True)
    loss2 = sum((t * t).sum() for t in grads)
    second = torch.autograd.grad(loss2, (vec, g), allow_unused=True) if loss2.requires_grad else (None, None)
    second = [torch.zeros_like(t) if s is None else s for t, s in zip((vec, g), second)]
    return [out, *grads, *second]


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("kind", GRAPHS)
def test_torch_backend_matches_reference(kind, sorted_):
    ei, n = make_graph(kind, sorted_)
    vec, g = torch.randn(ei.shape[1], 3, dtype=torch.float64), torch.randn(ei.shape[1], dtype=torch.float64)
    names = ("out", "dvec", "dg", "ddvec", "ddg")
    for a, e, name in zip(_run("torch", vec, g, ei, n), _run("reference", vec, g, ei, n), names):
        assert_close(a, e, torch.float64, f"{kind} {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dtype_table(dtype):
    ei, n = make_graph("hub", True, hub_edges=400)
    vec = torch.randn(ei.shape[1], 3, dtype=torch.float64).to(dtype)
    g = torch.randn(ei.shape[1], dtype=torch.float64).to(dtype)
    for a, e in zip(_run("torch", vec, g, ei, n)[:3], _run("reference", vec, g, ei, n)[:3]):
        assert a.dtype == dtype
        assert_close(a, e, dtype, "edge_vector")


def test_gradcheck_and_gradgradcheck_float64():
    ei, n = make_graph("isolated", False)
    plan = csr_plan(ei[0], n)
    vec = torch.randn(ei.shape[1], 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(ei.shape[1], dtype=torch.float64, requires_grad=True)

    def fn(a, b):
        return edge_vector_aggregate(a, b, plan=plan, backend="torch")

    assert torch.autograd.gradcheck(fn, (vec, g))
    assert torch.autograd.gradgradcheck(fn, (vec, g))
