"""Fused faithful E_GCL (``message: faithful``, ``execution: fused``: ``faithful_message_aggregate``)
== the unfused faithful block, float64, training mode: energy, conservative forces, stress, direct
forces and every parameter gradient of an energy + force (+ stress) loss, whose backward runs the
ops' double backward; on the ragged / empty / isolated-atom / one-atom / hub graphs of the op
tests, sorted and shuffled; plus the no-[E, H]-tensor property of the fused faithful step."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gnnmegatron.ops import settings
from test_egnn import DT, make_model, rel_err
from test_egnn_fused import _loss_and_grads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from ops_cases import GRAPHS, make_graph  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread_small_chunks():
    before = torch.get_num_threads(), settings.chunk_edges
    torch.set_num_threads(1)
    settings.chunk_edges = 37  # several chunks per graph, never a multiple of E
    yield
    torch.set_num_threads(before[0])
    settings.chunk_edges = before[1]


def op_graph_batch(kind: str, sorted_: bool, seed: int = 0) -> dict:
    """A model batch on an op-test graph: random positions in a 3 Å box (all edges inside the 12 Å
    cutoff), self-loops moved to the next atom, periodic 7 Å cells (so that stress is non-zero; the
    graph's edges carry no image shift). ``one_atom``: three one-atom structures and a pair."""
    ei, n = make_graph(kind, sorted_, seed=seed, hub_edges=60)
    dst, src = ei[0], ei[1]
    src = torch.where(src == dst, (dst + 1) % n, src)
    g = torch.Generator().manual_seed(seed + 1)
    graph = torch.tensor([0, 1, 2, 3, 3]) if kind == "one_atom" else torch.zeros(n, dtype=torch.long)
    B = int(graph.max()) + 1
    return dict(atomic_numbers=torch.randint(1, 80, (n,), generator=g),
                positions=3.0 * torch.rand(n, 3, generator=g, dtype=DT),
                cell=7.0 * torch.eye(3, dtype=DT).expand(B, 3, 3).clone(), pbc=torch.ones(B, 3, dtype=torch.bool),
                batch=graph, edge_index=torch.stack([dst, src]), edge_shift=torch.zeros(dst.numel(), 3, dtype=DT))


def compare(overrides: dict, batch: dict, what: str, grad_tol: float = 1e-9):
    unfused = make_model(**overrides).train()
    fused = make_model(**overrides, execution="fused").train()
    fused.load_state_dict(unfused.state_dict())
    ref, ref_grads = _loss_and_grads(unfused, batch)
    out, grads = _loss_and_grads(fused, batch)
    for key in ref:
        err = rel_err(out[key], ref[key])
        assert err < 1e-10, f"{what}: {key} differs, max rel error {err:.2e}"
    assert set(grads) == set(ref_grads), f"{what}: gradients of {set(ref_grads) ^ set(grads)} differ in presence"
    for name, g in ref_grads.items():
        err = rel_err(grads[name], g)
        assert err < grad_tol, f"{what}: gradient of {name} differs, max rel error {err:.2e}"
    return ref, ref_grads


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "shuffled"])
@pytest.mark.parametrize("kind", GRAPHS)
def test_fused_faithful_equals_unfused_on_op_graphs(kind, sorted_):
    """Conservative forces and stress (double backward) on every op-test graph."""
    batch = op_graph_batch(kind, sorted_)
    ref, grads = compare(dict(cutoff=12.0), batch, f"{kind}/{sorted_}")
    if kind in ("ragged", "hub"):  # not vacuous: forces, stress and every gradient are non-zero
        assert ref["forces"].abs().max() > 1e-4 and ref["stress"].abs().max() > 1e-6
        zero = [n for n, g in grads.items() if not g.abs().max() > 0]
        assert not zero, f"all-zero gradients: {zero}"


@pytest.mark.parametrize("kind", ["ragged", "isolated", "hub"])
def test_fused_faithful_direct_forces_equal_unfused(kind):
    """Direct forces: the head reads the last block's edge features, which that block still builds."""
    compare(dict(cutoff=12.0, force_mode="direct", activation="tanh"), op_graph_batch(kind, False), kind)


VARIANTS = {
    "gauss-ln-tanh-gelu": dict(radial_basis="gaussian", layer_norm=True, coord_tanh=True, coords_range=0.5,
                               message_normalizer=8.0, coord_normalizer=2.0, activation="gelu"),
    "softplus-clamp": dict(activation="softplus", coord_clamp=0.05, residual=False),
    "no-coords": dict(update_coords=False, layers=2),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_faithful_variants(variant):
    compare(dict(cutoff=12.0, **VARIANTS[variant]), op_graph_batch("ragged", False), variant)


def test_fused_faithful_builds_no_edge_by_hidden_tensor():
    """Forward, forces (backward), stress and the force-loss double backward never allocate [E, H]."""
    batch = op_graph_batch("hub", False)
    model = make_model(cutoff=12.0, hidden=24, execution="fused").train()
    E, H = batch["edge_index"].shape[1], 24
    seen = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == E and t.shape[1] >= H:
                    seen.append((str(func), tuple(t.shape)))
            return out

    with Shapes():
        out = model(batch, compute_stress=True)
        (out["forces"].pow(2).sum() + out["energy"].sum() + out["stress"].pow(2).sum()).backward()
    assert not seen, f"[E, H] tensors were built: {seen[:5]}"
    with Shapes():
        make_model(cutoff=12.0, hidden=24).train()(batch)
    assert seen, "control: the unfused faithful model does build [E, H] tensors"
