"""Per-structure label masks in the losses and validation metrics, against hand-computed values."""
import numpy as np
import pytest
import torch

from gnnmegatron.data.batch import collate
from gnnmegatron.training.config import LossConfig
from gnnmegatron.training.losses import ErrorAccumulator, compute_loss, label_masks, loss_denominators

CUTOFF = 3.0


def _structures():
    rng = np.random.default_rng(1)
    out = []
    for k, n in enumerate((3, 2, 4, 1, 2)):
        cell = np.eye(3) * 6.0
        out.append(dict(atomic_numbers=rng.integers(1, 10, n), positions=rng.uniform(0, 5, (n, 3)), cell=cell,
                        pbc=np.ones(3, bool), energy=float(rng.normal()), forces=rng.normal(size=(n, 3)),
                        stress=rng.normal(size=(3, 3)), source=k % 2, index=k))
    out[1]["energy"] = None          # forces and stress, no energy
    out[2]["forces"] = None          # energy only...
    out[2]["stress"] = None
    out[4]["stress"] = None
    out[3]["forces"] = None
    return out


def _outputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, N = batch["num_atoms"].numel(), batch["atomic_numbers"].numel()
    return {"energy": torch.randn(B, generator=g, dtype=torch.float64).requires_grad_(),
            "forces": torch.randn(N, 3, generator=g, dtype=torch.float64).requires_grad_(),
            "stress": torch.randn(B, 3, 3, generator=g, dtype=torch.float64).requires_grad_()}


def _rho(x, kind, delta):
    if kind == "mae":
        return abs(x)
    if kind == "mse":
        return x * x
    return 0.5 * x * x if abs(x) <= delta else delta * (abs(x) - 0.5 * delta)


def _by_hand(structs, out, cfg, weights=None):
    """The masked loss written out structure by structure."""
    weights = weights if weights is not None else [[cfg.energy_weight, cfg.force_weight, cfg.stress_weight]] * 2
    e = out["energy"].detach().numpy()
    f = out["forces"].detach().numpy()
    st = out["stress"].detach().numpy()
    terms = {"energy": [0.0, 0], "forces": [0.0, 0], "stress": [0.0, 0]}
    parts = {"energy": 0.0, "forces": 0.0, "stress": 0.0}
    atom = 0
    for g, s in enumerate(structs):
        n, w = len(s["atomic_numbers"]), weights[s["source"]]
        if s["energy"] is not None:
            r = _rho(e[g] / n - s["energy"] / n, cfg.kind, cfg.huber_delta)
            terms["energy"][0] += w[0] * r
            parts["energy"] += r
            terms["energy"][1] += 1
        if s["forces"] is not None:
            for i in range(n):
                for c in range(3):
                    r = _rho(f[atom + i, c] - s["forces"][i, c], cfg.kind, cfg.huber_delta)
                    terms["forces"][0] += w[1] * r
                    parts["forces"] += r
                    terms["forces"][1] += 1
        if s["stress"] is not None:
            for a in range(3):
                for b in range(3):
                    r = _rho(st[g, a, b] - s["stress"][a, b], cfg.kind, cfg.huber_delta)
                    terms["stress"][0] += w[2] * r
                    parts["stress"] += r
                    terms["stress"][1] += 1
        atom += n
    loss = sum(total / max(count, 1) for total, count in terms.values())
    return loss, {k: parts[k] / max(terms[k][1], 1) for k in parts}


@pytest.mark.parametrize("kind", ["mae", "mse", "huber"])
def test_masked_loss_equals_hand_computed(kind):
    structs = _structures()
    batch = collate(structs, CUTOFF, dtype=torch.float64)
    out = _outputs(batch)
    cfg = LossConfig(energy_weight=1.0, force_weight=0.7, stress_weight=0.3, kind=kind, huber_delta=0.5)
    loss, parts = compute_loss(out, batch, cfg)
    want, want_parts = _by_hand(structs, out, cfg)
    assert abs(float(loss) - want) < 1e-12 * max(1, abs(want)), (float(loss), want)
    for k in want_parts:
        assert abs(float(parts[k]) - want_parts[k]) < 1e-12, (k, float(parts[k]), want_parts[k])
    # per-source loss weights (rows: source 0, source 1)
    w = [[2.0, 0.5, 0.0], [0.25, 1.5, 3.0]]
    loss_w, parts_w = compute_loss(out, batch, cfg, source_weights=torch.tensor(w, dtype=torch.float64))
    want_w, _ = _by_hand(structs, out, cfg, weights=w)
    assert abs(float(loss_w) - want_w) < 1e-12 * max(1, abs(want_w)), (float(loss_w), want_w)
    assert all(abs(float(parts_w[k]) - want_parts[k]) < 1e-12 for k in want_parts), "parts stay unweighted means"


def test_unlabelled_structures_get_no_gradient_and_micro_batches_add_up():
    structs = _structures()
    batch = collate(structs, CUTOFF, dtype=torch.float64)
    out = _outputs(batch)
    cfg = LossConfig(stress_weight=1.0)
    loss, _ = compute_loss(out, batch, cfg)
    loss.backward()
    assert out["energy"].grad[1] == 0 and out["energy"].grad[0] != 0
    assert torch.equal(out["forces"].grad[5:9], torch.zeros(4, 3)), "structure 2 has no forces"
    assert torch.equal(out["stress"].grad[2], torch.zeros(3, 3))
    # two micro-batches normalised by the step's counts sum to the loss of the whole batch
    parts = [collate(structs[:2], CUTOFF, dtype=torch.float64), collate(structs[2:], CUTOFF, dtype=torch.float64)]
    den = loss_denominators(parts)
    assert den == {"graphs": 4, "force_components": 3 * (3 + 2 + 2), "stress_graphs": 3}
    total = 0.0
    atom = 0
    for k, part in enumerate(parts):
        n = int(part["num_atoms"].sum())
        g = slice(0, 2) if k == 0 else slice(2, 5)
        sub = {"energy": out["energy"].detach()[g], "forces": out["forces"].detach()[atom:atom + n],
               "stress": out["stress"].detach()[g]}
        atom += n
        total += float(compute_loss(sub, part, cfg, den)[0])
    assert abs(total - float(loss)) < 1e-12


def test_a_batch_without_labels_for_a_term_contributes_nothing():
    structs = [dict(s, forces=None) for s in _structures()]
    batch = collate(structs, CUTOFF, dtype=torch.float64)
    out = _outputs(batch)
    loss, parts = compute_loss(out, batch, LossConfig(force_weight=5.0))
    assert float(parts["forces"]) == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.equal(out["forces"].grad, torch.zeros_like(out["forces"]))
    bare = collate([{k: s[k] for k in ("atomic_numbers", "positions", "cell", "pbc")} for s in structs], CUTOFF,
                   dtype=torch.float64)
    loss, parts = compute_loss(_outputs(bare), bare, LossConfig())
    assert float(loss) == 0.0 and set(parts) == {"energy", "forces"}, "same keys in every micro-batch"
    assert label_masks(bare)["energy"].tolist() == [False] * 5


def test_error_accumulator_masks_and_splits_by_source():
    structs = _structures()
    batch = collate(structs, CUTOFF, dtype=torch.float64)
    out = _outputs(batch, seed=3)
    base = torch.zeros(5, dtype=torch.float64)
    acc = ErrorAccumulator(num_sources=2)
    acc.update({k: v.detach() for k, v in out.items()}, batch, base)
    e = out["energy"].detach().numpy()
    f = out["forces"].detach().numpy()
    offsets = np.concatenate([[0], np.cumsum([len(s["atomic_numbers"]) for s in structs])])
    for src, res in enumerate(acc.per_source()):
        mine = [g for g, s in enumerate(structs) if s["source"] == src]
        labelled = [g for g in mine if structs[g]["energy"] is not None]
        n = [len(structs[g]["atomic_numbers"]) for g in labelled]
        want_e = np.mean([abs(e[g] - structs[g]["energy"]) / k for g, k in zip(labelled, n)])
        want_b = np.mean([abs(structs[g]["energy"]) / k for g, k in zip(labelled, n)])
        comps = [np.abs(f[offsets[g]:offsets[g + 1]] - structs[g]["forces"]).ravel() for g in mine
                 if structs[g]["forces"] is not None]
        assert abs(res["energy_mae_per_atom"] - want_e) < 1e-12 and abs(res["baseline_energy_mae_per_atom"] - want_b) < 1e-12
        if comps:
            assert abs(res["force_mae"] - np.concatenate(comps).mean()) < 1e-12
        assert res["graphs"] == len(mine) and res["energy_graphs"] == len(labelled)
    overall = acc.result()
    assert overall["graphs"] == 5 and overall["energy_graphs"] == 4
    assert overall["force_components"] == 3 * (3 + 2 + 2)
    # the sums reduce like the single-source accumulator's
    single = ErrorAccumulator()
    single.update({k: v.detach() for k, v in out.items()}, batch, base)
    assert all(abs(single.result()[k] - overall[k]) < 1e-12 for k in overall)
