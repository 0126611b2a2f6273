"""``benchmarks/egnn_blocks.py``'s variants compute the same model: for each step (first-order and
conservative), the faithful block unfused, with its first linear split per node (the benchmark's
step in between) and fused give the same parameter gradients from the same seed, and so do
node_split unfused and fused (float32: they agree to 5e-7 of each gradient's size, checked to 2e-5;
a 1 % change of one term of the split variant's first layer shows as 1.3e-3). A variant that
silently computed something else would make the benchmark's speed-ups meaningless."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import egnn_blocks  # noqa: E402

from gnnmegatron.models.egnn import EGCL  # noqa: E402


def _grads(variant, step_kind):
    spec = dict(variant=variant, step=step_kind, hidden=16, N=60, degree=8, layers=2, K=4)
    unpatched = EGCL.edge_messages
    try:  # the split variant patches the class (the benchmark runs each variant in a process of its own)
        step, model, batch = egnn_blocks.build_step(spec)
        assert batch["edge_index"].shape[1] == 60 * 8
        forward_s, total_s = step()
    finally:
        EGCL.edge_messages = unpatched
    assert 0 < forward_s < total_s
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    return grads


@pytest.mark.parametrize("step_kind", egnn_blocks.STEPS)
def test_variants_give_the_same_gradients(step_kind):
    for family in (("faithful-unfused", "faithful-split", "faithful-fused"),
                   ("node_split-unfused", "node_split-fused")):
        reference = _grads(family[0], step_kind)
        for variant in family[1:]:
            got = _grads(variant, step_kind)
            assert got.keys() == reference.keys(), variant
            for name, g in got.items():
                scale = float(reference[name].abs().max()) or 1.0
                err = float((g - reference[name]).abs().max()) / scale
                assert err < 2e-5, f"{variant} {step_kind}: gradient of {name} differs by {err:.1e} of its size"
