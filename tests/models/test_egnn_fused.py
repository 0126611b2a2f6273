"""Fused execution (gnnmegatron.ops) == unfused execution, for the faithful and the node_split
EGNN: energies, forces, stress and every parameter gradient of an energy + force loss (float64,
training mode, so forces carry a graph and the loss runs a double backward). Plus physics
checks of the node_split model in fused mode and the no-[E, H]-tensor property."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gnnmegatron.models import AtomisticModel, ModelConfig, get_preset
from gnnmegatron.models.presets import count_parameters, forward_flops
from gnnmegatron.ops import settings
from test_egnn import DT, cluster, make_batch, make_model, periodic_cell, random_rotation, rel_err, with_


@pytest.fixture(autouse=True, scope="module")
def _one_thread_small_chunks():
    before = torch.get_num_threads(), settings.chunk_edges
    torch.set_num_threads(1)
    settings.chunk_edges = 37  # several chunks per graph, never a multiple of E
    yield
    torch.set_num_threads(before[0])
    settings.chunk_edges = before[1]


@pytest.fixture(scope="module")
def mixed_batch():
    return make_batch([periodic_cell(1), cluster(2)])


CASES = {
    "faithful": dict(),
    "faithful-clamp-direct": dict(coord_clamp=0.05, force_mode="direct"),
    "node_split": dict(message="node_split"),
    "node_split-gauss-ln-tanh": dict(message="node_split", radial_basis="gaussian", layer_norm=True, coord_tanh=True,
                                     coords_range=0.5, message_normalizer=8.0, coord_normalizer=2.0,
                                     activation="gelu"),
    "node_split-direct": dict(message="node_split", force_mode="direct", activation="tanh"),
    "node_split-grouped": dict(message="node_split", message_groups=2, layer_norm=True),
}


def _loss_and_grads(model, batch):
    stress = model.cfg.force_mode == "conservative"
    out = model(batch, compute_stress=stress)
    loss = (out["energy"] ** 2).sum() + (out["forces"] - 0.1).pow(2).sum()
    if stress:
        loss = loss + out["stress"].pow(2).sum()
    model.zero_grad()
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_unfused(mixed_batch, case):
    unfused = make_model(**CASES[case]).train()
    fused = make_model(**CASES[case], execution="fused").train()
    fused.load_state_dict(unfused.state_dict())
    ref, ref_grads = _loss_and_grads(unfused, mixed_batch)
    out, grads = _loss_and_grads(fused, mixed_batch)
    for key in ref:
        err = rel_err(out[key], ref[key])
        assert err < 1e-10, f"{case}: {key} differs, max rel error {err:.2e}"
    assert set(grads) == set(ref_grads) == {n for n, _ in unfused.named_parameters()}, \
        f"{case}: parameters without gradient: {set(dict(unfused.named_parameters())) - set(grads)}"
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, f"{case}: {name} has an all-zero gradient"
        err = rel_err(grads[name], g)
        assert err < 1e-9, f"{case}: gradient of {name} differs, max rel error {err:.2e}"


def test_fused_handles_graphs_without_edges():
    from ase import Atoms
    batch = make_batch([Atoms(numbers=[29], positions=[[0, 0, 0]]),
                        Atoms(numbers=[29, 79], positions=[[0, 0, 0], [9, 0, 0]])])
    for message in ("faithful", "node_split"):
        out = make_model(message=message, execution="fused")(batch, compute_stress=True)
        assert torch.all(out["forces"] == 0) and torch.isfinite(out["energy"]).all()


@pytest.mark.parametrize("mode", ["conservative", "direct"])
def test_node_split_fused_invariance(mixed_batch, mode):
    model = make_model(message="node_split", execution="fused", force_mode=mode)
    ref = model(mixed_batch)
    R = random_rotation(11)
    moved = with_(mixed_batch, positions=mixed_batch["positions"] @ R.T + torch.tensor([1.1, -0.4, 0.3], dtype=DT),
                  cell=mixed_batch["cell"] @ R.T)
    out = model(moved)
    assert rel_err(out["energy"], ref["energy"]) < 1e-10
    assert rel_err(out["forces"], ref["forces"] @ R.T) < 1e-10
    assert ref["forces"].abs().max() > 1e-4
    # shuffled edges (unsorted destinations: the ops take their perm path)
    perm = torch.randperm(mixed_batch["edge_index"].shape[1], generator=torch.Generator().manual_seed(0))
    shuffled = with_(mixed_batch, edge_index=mixed_batch["edge_index"][:, perm],
                     edge_shift=mixed_batch["edge_shift"][perm])
    out = model(shuffled)
    assert rel_err(out["energy"], ref["energy"]) < 1e-12 and rel_err(out["forces"], ref["forces"]) < 1e-10


def test_node_split_fused_forces_match_finite_differences():
    model = make_model(message="node_split", execution="fused")
    batch = make_batch([cluster(4, n=5)])
    forces = model(batch)["forces"]
    pos, h = batch["positions"], 1e-5
    fd = torch.zeros_like(pos)
    with torch.no_grad():
        for a in range(pos.shape[0]):
            for c in range(3):
                plus, minus = pos.clone(), pos.clone()
                plus[a, c] += h
                minus[a, c] -= h
                fd[a, c] = -(model(with_(batch, positions=plus), compute_forces=False)["energy"].sum()
                             - model(with_(batch, positions=minus), compute_forces=False)["energy"].sum()) / (2 * h)
    assert rel_err(forces, fd) < 1e-6, f"forces vs finite differences: {rel_err(forces, fd):.2e}"


def test_node_split_fused_builds_no_edge_by_hidden_tensor(mixed_batch):
    """Forward, forces (backward) and the force-loss double backward never allocate [E, H]."""
    model = make_model(message="node_split", execution="fused", hidden=24).train()
    E, H = mixed_batch["edge_index"].shape[1], 24
    seen = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] >= E and t.shape[1] == H:
                    seen.append((str(func), tuple(t.shape)))
            return out

    with Shapes():
        out = model(mixed_batch)
        (out["forces"].pow(2).sum() + out["energy"].sum()).backward()
    assert not seen, f"[E, H] tensors were built: {seen[:5]}"
    unfused = make_model(message="node_split", hidden=24).train()
    with Shapes():
        unfused(mixed_batch)
    assert seen, "control: the unfused model does build [E, H] tensors"


def test_config_validation_and_parameter_counts():
    with pytest.raises(Exception, match="message='tp'"):
        ModelConfig(message="tp")
    with pytest.raises(Exception, match="execution='fast'"):
        ModelConfig(execution="fast")
    cfg = get_preset("egnn-small", message="node_split")
    H, K, L = cfg.hidden, cfg.num_rbf, cfg.layers
    faithful = count_parameters(get_preset("egnn-small"))
    split = count_parameters(cfg)
    # node_split drops the second edge linear (H^2 + H) per block and the coordinate MLP's hidden layer
    assert faithful["total"] - split["total"] == L * (H * H + H) + cfg.coord_blocks * (H * H + H)
    flops = forward_flops(cfg)
    assert flops["per_edge"] < forward_flops(get_preset("egnn-small"))["per_edge"] / 10
    assert isinstance(AtomisticModel(cfg), AtomisticModel) and K > 0
