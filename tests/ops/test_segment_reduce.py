"""segment_reduce: torch backend vs the reference on ragged graphs, layouts, dtypes, gradients."""

import pytest
import torch

from gnnmegatron.ops import csr_plan, segment_reduce, settings
from gnnmegatron.ops.dispatch import ptr_to_index
from ops_cases import GRAPHS, TOL, assert_close, make_graph


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(settings, "chunk_edges", 13)


def _both(src, ei, n, reduce, **kw):
    outs = {}
    for backend in ("reference", "torch"):
        x = src.detach().clone().requires_grad_()
        out = segment_reduce(x, ei[0], n, reduce, backend=backend, **kw)
        g = torch.Generator().manual_seed(1)
        go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        (grad,) = torch.autograd.grad((out * go).sum(), x)
        outs[backend] = (out, grad)
    return outs


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("kind", GRAPHS)
def test_torch_backend_matches_reference(kind, sorted_, reduce):
    ei, n = make_graph(kind, sorted_)
    src = torch.randn(ei.shape[1], 5, dtype=torch.float64)
    outs = _both(src, ei, n, reduce)
    for i, what in enumerate(("out", "grad")):
        assert_close(outs["torch"][i], outs["reference"][i], torch.float64, f"{kind} {reduce} {what}")
    if reduce == "max" and n:
        empty = torch.ones(n, dtype=torch.bool)
        empty[ei[0]] = False
        assert torch.all(outs["torch"][0][empty] == 0), "empty segments must give 0"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_dtype_table(dtype, reduce):
    ei, n = make_graph("hub", False, hub_edges=500)
    src = torch.randn(ei.shape[1], 7, dtype=torch.float64).to(dtype)
    outs = _both(src, ei, n, reduce)
    assert outs["torch"][0].dtype == dtype
    if reduce == "max" and dtype in (torch.bfloat16, torch.float16):
        # half types have ties: the reference splits a tied gradient, segment_reduce gives it to the
        # first maximal row; the per-segment gradient sums agree.
        outs = {k: (o, segment_reduce(g, ei[0], n, "sum", backend="reference")) for k, (o, g) in outs.items()}
    for i, what in enumerate(("out", "grad")):
        assert_close(outs["torch"][i], outs["reference"][i], dtype, f"{reduce} {what}")


def test_ptr_layout_plan_and_trailing_dims():
    ei, n = make_graph("isolated", True)
    plan = csr_plan(ei[0], n)
    assert plan.perm is None and plan.ptr.shape == (n + 1,)
    assert torch.equal(ptr_to_index(plan.ptr), ei[0])
    src = torch.randn(ei.shape[1], 2, 3, dtype=torch.float64)
    expected = segment_reduce(src, ei[0], n, "sum", backend="reference")
    assert expected.shape == (n, 2, 3)
    for out in (segment_reduce(src, plan.ptr, reduce="sum", layout="ptr", backend="torch"),
                segment_reduce(src, plan=plan, reduce="sum", backend="torch")):
        assert_close(out, expected, torch.float64, "ptr layout")
    unsorted, _ = make_graph("isolated", False)
    assert csr_plan(unsorted[0], n).perm is not None
    with pytest.raises(ValueError, match="num_segments"):
        segment_reduce(src, ei[0], reduce="sum")
    with pytest.raises(ValueError, match="reduce must be one of"):
        segment_reduce(src, ei[0], n, "min")


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_gradcheck_and_gradgradcheck_float64(reduce):
    ei, n = make_graph("isolated", False)
    x = torch.randn(ei.shape[1], 3, dtype=torch.float64, requires_grad=True)

    def fn(t):
        return segment_reduce(t, ei[0], n, reduce, backend="torch")

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_tolerance_table_covers_the_tested_dtypes():
    assert set(TOL) >= {torch.float64, torch.float32, torch.bfloat16, torch.float16}
