"""The ops are torch.library custom ops: opcheck (schema, fake tensors, autograd registration)
and a smoke test that a module using all three compiles with torch.compile on CPU."""

import pytest
import torch
from torch import nn

from gnnmegatron.ops import csr_plan, edge_vector_aggregate, fused_message_aggregate, segment_reduce, settings
from ops_cases import assert_close, assert_close_scaled, make_graph


@pytest.fixture(autouse=True)
def eager_chunks(monkeypatch):
    monkeypatch.setattr(settings, "compile", "never")


def test_opcheck_custom_ops():
    ei, n = make_graph("ragged", False)
    plan = csr_plan(ei[0], n)
    E = ei.shape[1]
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    P, Q, R, C, b, v = rnd(n, 4), rnd(n, 4), rnd(E, 3), rnd(3, 4), rnd(4), rnd(4)
    w = torch.rand(E, generator=g, dtype=torch.float64, requires_grad=True)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.gnnmegatron.fused_message_fwd.default,
                          (P, Q, plan.index, ei[1], plan.ptr, plan.perm, R, C, b, w, v, "silu", "torch", False),
                          test_utils=tests)
    gm, gs = rnd(n, 4), rnd(E)
    torch.library.opcheck(torch.ops.gnnmegatron.fused_message_bwd.default,
                          (gm, gs, P, Q, plan.index, ei[1], plan.ptr, plan.perm, R, C, b, w, v, None, None, "silu",
                           "torch", [True] * 7, False), test_utils=tests)
    gg = (rnd(n, 4), rnd(n, 4), rnd(E, 3), rnd(3, 4), rnd(4), rnd(E), rnd(4))
    torch.library.opcheck(torch.ops.gnnmegatron.fused_message_bwd2.default,
                          (gm, gs, P, Q, plan.index, ei[1], plan.ptr, plan.perm, R, C, b, w, v, *gg, None, None,
                           "silu", "torch", [True] * 9, False), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.gnnmegatron.segment_reduce.default,
                          (rnd(E, 4), plan.index, plan.ptr, plan.perm, "max", "torch"), test_utils=tests)
    torch.library.opcheck(torch.ops.gnnmegatron.edge_vector_aggregate.default,
                          (rnd(E, 3), rnd(E), plan.index, plan.ptr, plan.perm, "torch"), test_utils=tests)


def test_opcheck_faithful_ops():
    ei, n = make_graph("ragged", False)
    plan = csr_plan(ei[0], n)
    E = ei.shape[1]
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    P, Q, R, C, b1, W2, b2 = rnd(n, 4), rnd(n, 4), rnd(E, 3), rnd(3, 4), rnd(4), rnd(5, 4), rnd(5)
    Wc, bc, v = rnd(3, 5), rnd(3), rnd(3)
    w = torch.rand(E, generator=g, dtype=torch.float64, requires_grad=True)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    prim = (P, Q, plan.index, ei[1], plan.ptr, plan.perm, R, C, b1, W2, b2, w, Wc, bc, v)
    torch.library.opcheck(torch.ops.gnnmegatron.faithful_message_fwd.default, prim + ("silu", "torch", False, -1),
                          test_utils=tests)
    gm, gs = rnd(n, 5), rnd(E)
    torch.library.opcheck(torch.ops.gnnmegatron.faithful_message_bwd.default,
                          (gm, gs) + prim + ("silu", "torch", [True] * 11, False, -1), test_utils=tests)
    tangents = (rnd(n, 4), rnd(n, 4), rnd(E, 3), rnd(3, 4), rnd(4), rnd(5, 4), rnd(5), rnd(E), rnd(3, 5), rnd(3),
                rnd(3))
    torch.library.opcheck(torch.ops.gnnmegatron.faithful_message_bwd2.default,
                          (gm, gs) + prim + tangents + ("silu", "torch", [True] * 13, False, -1),
                          test_utils=("test_schema", "test_faketensor"))


class TinyMessageBlock(nn.Module):
    """P, Q by linears, fused message + per-edge scalars, max-pool of the messages, coordinate sum."""

    def __init__(self, F=8, K=4):
        super().__init__()
        self.lin = nn.Linear(F, 2 * F)
        self.C = nn.Parameter(torch.randn(K, F) * 0.3)
        self.b = nn.Parameter(torch.zeros(F))
        self.v = nn.Parameter(torch.randn(F))

    def forward(self, h, edge_index, rbf, w, vec, plan):
        P, Q = self.lin(h).chunk(2, dim=-1)
        m, s = fused_message_aggregate(P, Q, edge_index, rbf, self.C, self.b, w, self.v, plan=plan)
        pooled = segment_reduce(m[edge_index[1]], plan=plan, reduce="max")
        dx = edge_vector_aggregate(vec, s, plan=plan)
        return (m * pooled).sum() + (dx * dx).sum()


def test_module_using_the_ops_compiles_on_cpu():
    torch.manual_seed(0)
    ei, n = make_graph("hub", True, hub_edges=40)
    E = ei.shape[1]
    h, rbf, w, vec = torch.randn(n, 8), torch.randn(E, 4), torch.rand(E), torch.randn(E, 3)
    model = TinyMessageBlock()
    plan = csr_plan(ei[0], n, sorted=True)

    def step(module):
        module.zero_grad()
        loss = module(h, ei, rbf, w, vec, plan)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in module.parameters()]

    eager = step(model)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    got = step(compiled)
    for i, (a, e) in enumerate(zip(got, eager)):
        assert_close(a, e, torch.float32, f"compiled vs eager, output {i}")


def test_compiled_chunk_bodies_compile_once_over_many_chunks(monkeypatch):
    """The chunk bodies compiled (``settings.compile = "always"``) over 7 sorted chunks (slices at
    7 storage offsets), with and without w and v, forward, backward and a force-style double backward: no recompile-limit
    failure (the eager fallback and its warning) and the eager bodies' results. Q is a column slice of one
    ``[n, 16]`` tensor (as node_split's P and Q are): the bodies get it at storage offset 0, copied once
    per call rather than once per chunk."""
    import warnings

    import gnnmegatron.ops.fused_message_torch as fmt

    ei, n = make_graph("ragged", True, seed=3)
    E = ei.shape[1]
    g = torch.Generator().manual_seed(1)
    P, Q = torch.randn(n, 8, generator=g), torch.randn(n, 16, generator=g)[:, 8:]
    R, C, b = torch.randn(E, 3, generator=g), torch.randn(3, 8, generator=g), torch.randn(8, generator=g)
    w, v = torch.rand(E, generator=g), torch.randn(8, generator=g)
    monkeypatch.setattr(settings, "chunk_edges", 6)  # 7 chunks: slices at 7 storage offsets
    node_offsets = []
    real_run = fmt._run

    def run_spy(kind, work, bufs, *args):
        node_offsets.extend(a.storage_offset() for a in args if torch.is_tensor(a) and a.shape == (n, 8))
        return real_run(kind, work, bufs, *args)

    monkeypatch.setattr(fmt, "_run", run_spy)

    def run(mode):
        monkeypatch.setattr(settings, "compile", mode)
        out = []
        for ww, vv in ((w, v), (None, v), (w, None), (None, None)):  # the bodies' variants a model reaches
            p, r = P.clone().requires_grad_(), R.clone().requires_grad_()
            res = fused_message_aggregate(p, Q, ei, r, C, b, ww, vv, backend="torch")
            m, s = res if vv is not None else (res, torch.zeros(()))
            gp, gr = torch.autograd.grad(m.square().sum() + s.sum(), (p, r), create_graph=True)
            (gp.square().sum() + gr.square().sum()).backward()
            out += [m, s, gp, gr, p.grad, r.grad]
        return out

    eager = run("never")
    node_offsets.clear()
    monkeypatch.setattr(fmt, "_compiled", {})
    monkeypatch.setattr(fmt, "_compile_failed", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = run("always")
    assert not fmt._compile_failed and set(fmt._compiled) == {"fwd", "bwd"}
    assert node_offsets and not any(node_offsets), "a whole-node tensor reached the compiled bodies off offset 0"
    for a, e in zip(compiled, eager):
        assert_close_scaled(a, e, torch.float32, "compiled chunk bodies")
