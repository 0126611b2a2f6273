"""CPU training is bit-for-bit repeatable at several threads: the premise of the bit-for-bit resume.

The backward of advanced indexing (``h[idx]``: ``index_put_`` with accumulate) adds in thread
order on CPU, so repeated backwards of a large graph differ in the last bits; ``index_select``'s
backward (``index_add``) does not. The model gathers through ``index_select`` everywhere: the
first test checks its gathers on unsorted edges (with advanced indexing, 10 backwards gave 10
different results when this was written), the second a ~1700-atom cell (~100k edges) through
forward, conservative forces, stress and the force-loss backward, three times on 2 threads, for
the unfused faithful and the fused node_split model: every gradient must be bit-identical.
"""

import numpy as np
import pytest
import torch


def _big_batch():
    from ase.build import bulk

    from gnnmegatron.data.batch import collate

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (8, 8, 7)
    atoms.positions += 0.05 * np.random.default_rng(0).standard_normal(atoms.positions.shape)
    return collate([{"atomic_numbers": atoms.numbers, "positions": atoms.positions, "cell": atoms.cell.array,
                     "pbc": atoms.pbc}], cutoff=5.0)


def test_the_model_gathers_have_a_deterministic_backward():
    from gnnmegatron.models import ModelConfig
    from gnnmegatron.models.egnn import EGCL, edge_vectors

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        n, e = 2000, 60000
        edge_index = torch.randint(0, n, (2, e), generator=g)  # unsorted, as in the worst case
        pos = torch.randn(n, 3, generator=g, requires_grad=True)
        offset = torch.zeros(e, 3)
        h = torch.randn(n, 64, generator=g, requires_grad=True)
        rbf = torch.randn(e, 8, generator=g)
        block = EGCL(ModelConfig(hidden=64, num_rbf=8), update_coords=False)
        weights = torch.randn(e, 64, generator=g)
        grads = []
        for _ in range(10):
            pos.grad = h.grad = None
            vec, dist = edge_vectors(pos, edge_index, offset)
            ((vec * weights[:, :3]).sum() + block.edge_messages(h, edge_index, rbf).mul(weights).sum()).backward()
            grads.append((pos.grad.clone(), h.grad.clone()))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a[0], grads[0][0]) and torch.equal(a[1], grads[0][1]) for a in grads), \
        "the gathers' backward differs between identical runs"


@pytest.mark.parametrize("overrides", [{}, {"message": "node_split", "execution": "fused"}],
                         ids=["faithful-unfused", "node_split-fused"])
def test_repeated_backward_is_bit_identical_on_two_threads(overrides):
    from gnnmegatron.models import AtomisticModel, get_preset

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = AtomisticModel(get_preset("egnn-small", **overrides)).train()
        batch = _big_batch()
        assert batch["edge_index"].shape[1] > 50_000
        runs = []
        for _ in range(3):
            model.zero_grad()
            out = model(batch, compute_forces=True, compute_stress=True)
            loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum() + out["stress"].pow(2).sum()
            loss.backward()
            runs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        torch.set_num_threads(before)
    for name in runs[0]:
        for other in runs[1:]:
            assert torch.equal(runs[0][name], other[name]), \
                f"{name}: gradients differ between identical runs by {float((runs[0][name] - other[name]).abs().max()):.2e}"
