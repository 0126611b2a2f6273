"""``benchmarks/egnn_blocks.py``'s variants compute the same model: for each step (first-order and
conservative), the faithful block unfused, with its first linear split per node (the benchmark's
step in between) and fused give the same parameter gradients from the same seed, and so do
node_split unfused and fused (float32: they agree to 5e-7 of each gradient's size, checked to 2e-5;
a 1 % change of one term of the split variant's first layer shows as 1.3e-3). A variant that
silently computed something else would make the benchmark's speed-ups meaningless."""

import json
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


def test_rows_cache_resumes_and_measures_timed_out_rows_again(tmp_path, monkeypatch):
    """``--rows-cache``: finished (hidden, step) groups are not measured again, a group with a row
    that timed out is, and the newest row of a variant counts."""
    calls = []

    def fake_run_group(specs, rounds, timeout):
        calls.append(specs[0]["step"])
        return [dict(s, rounds=rounds, step_s=1.0, step_min_s=1.0, cpu_s=1.0, atoms_per_s=float(s["N"]),
                     peak_mem_bytes=1, rounds_step_s=[1.0], rounds_cpu_s=[1.0]) for s in specs]

    monkeypatch.setattr(egnn_blocks, "run_group", fake_run_group)
    monkeypatch.setattr(egnn_blocks, "write_results", lambda *a, **k: tmp_path / "results.json")
    cache = tmp_path / "rows.jsonl"
    args = ["--quick", "--variants", "faithful-unfused,faithful-fused", "--rows-cache", str(cache)]
    egnn_blocks.main(args)
    assert calls == ["first", "conservative"]
    egnn_blocks.main(args)
    assert calls == ["first", "conservative"]  # all cached
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == 4 and all(r["device"] == "cpu" for r in rows)
    rows[3]["error"] = "timeout after 240 s"  # the conservative group's faithful-fused row
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    egnn_blocks.main(args)
    assert calls == ["first", "conservative", "conservative"]
    egnn_blocks.main(args)  # the new rows, appended after the timed-out one, count
    assert calls == ["first", "conservative", "conservative"]
