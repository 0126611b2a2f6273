"""Power-law fits recover a known law from noisy synthetic sweeps, and only from those."""
import json
import math

import numpy as np
import pytest

from gnnmegatron.scaling.fit import (
    bootstrap, compute_optimal, compute_optimal_numerical, estimate_flops_per_param_per_atom, fit_from_dict,
    fit_joint, fit_power_law, fit_records,
)

TRUE = {"E": 0.02, "A": 5.0, "alpha": 0.35, "B": 8.0, "beta": 0.28}


def synthetic_sweep(seed=0, sigma=0.01, law=TRUE):
    """5 model sizes (1e4..1e8) x 4 data sizes (1e4..1e7), log-normal noise of sigma on the loss."""
    N, D = np.meshgrid(np.logspace(4, 8, 5), np.logspace(4, 7, 4), indexing="ij")
    N, D = N.ravel(), D.ravel()
    L = law["E"] + law["A"] * N ** -law["alpha"] + law["B"] * D ** -law["beta"]
    return N, D, L * np.exp(sigma * np.random.default_rng(seed).standard_normal(L.shape))


def sweep_records(seed=0, k=8.0):
    N, D, y = synthetic_sweep(seed)
    return [{"name": f"n{int(math.log10(n))}-d{int(math.log10(d))}", "preset": f"egnn-{int(math.log10(n))}",
             "params": int(n), "params_total": int(1.1 * n), "data_fraction": float(d / D.max()),
             "train_graphs": int(d / 20), "atoms_seen": int(d), "flops": k * n * d,
             "val_energy_mae": 0.01, "val_force_mae": 0.05, "val_loss": float(l), "best_val_loss": float(l)}
            for n, d, l in zip(N, D, y)]


def rel(a, b):
    return abs(a / b - 1)


@pytest.fixture(scope="module")
def joint_boot():
    N, D, y = synthetic_sweep(seed=0)
    return bootstrap(fit_joint(N, D, y), n_boot=50, seed=0)


def test_joint_fit_recovers_exponents(joint_boot):
    p = joint_boot.params
    assert rel(p["alpha"], TRUE["alpha"]) < 0.05, p
    assert rel(p["beta"], TRUE["beta"]) < 0.05, p
    assert rel(p["B"], TRUE["B"]) < 0.1 and rel(p["A"], TRUE["A"]) < 0.2, p
    rms = float(np.sqrt(np.mean(joint_boot.residuals ** 2)))
    assert 0.003 < rms < 0.015, f"rms log residual {rms} should be about the 1 % noise"


def test_bootstrap_intervals_cover_truth_and_are_informative(joint_boot):
    assert joint_boot.n_boot == 50 and joint_boot.level == 0.95
    for k, v in TRUE.items():
        lo, hi = joint_boot.ci[k]
        assert lo <= v <= hi, f"{k}: true {v} outside 95% CI ({lo:.4g}, {hi:.4g})"
    for k in ("alpha", "beta"):  # covering because narrow and right, not because huge
        lo, hi = joint_boot.ci[k]
        assert (hi - lo) / TRUE[k] < 0.25, f"{k} CI ({lo:.4g}, {hi:.4g}) is uninformative"


def test_shuffled_losses_do_not_recover_the_law(joint_boot):
    N, D, y = synthetic_sweep(seed=0)
    bad = fit_joint(N, D, np.random.default_rng(1).permutation(y))
    p = bad.params
    assert rel(p["alpha"], TRUE["alpha"]) > 0.2 or rel(p["beta"], TRUE["beta"]) > 0.2, p
    rms = float(np.sqrt(np.mean(bad.residuals ** 2)))
    assert rms > 5 * float(np.sqrt(np.mean(joint_boot.residuals ** 2))), rms


def test_huber_resists_outliers_where_least_squares_does_not():
    N, D, y = synthetic_sweep(seed=0)
    y = y.copy()
    y[7] *= 2.0   # a diverged run
    y[13] *= 0.6  # a mis-logged one
    hub, lsq = fit_joint(N, D, y), fit_joint(N, D, y, loss="linear")
    assert rel(hub.params["alpha"], TRUE["alpha"]) < 0.05 and rel(hub.params["beta"], TRUE["beta"]) < 0.05, hub.params
    assert rel(lsq.params["alpha"], TRUE["alpha"]) > 0.2, lsq.params


@pytest.mark.parametrize("loss", ["huber", "soft_l1"])
def test_power_law_recovers_exponent(loss):
    x = np.logspace(4, 8, 8)
    y = (0.05 + 3.0 * x ** -0.4) * np.exp(0.01 * np.random.default_rng(2).standard_normal(8))
    f = fit_power_law(x, y, loss=loss, variable="N")
    assert rel(f.params["alpha"], 0.4) < 0.05, f.params
    assert rel(f.params["E"], 0.05) < 0.1, f.params
    assert f.formula() == "L(N) = E + A * N^-alpha"


def test_power_law_with_zero_irreducible_loss():
    x = np.logspace(3, 7, 6)
    y = 2.0 * x ** -0.3 * np.exp(0.005 * np.random.default_rng(3).standard_normal(6))
    fixed = fit_power_law(x, y, irreducible=False)
    assert fixed.params["E"] == 0.0 and fixed.E_at_zero
    assert rel(fixed.params["alpha"], 0.3) < 0.02, fixed.params
    free = fit_power_law(x, y)  # E is free but the data have none: it should go to (near) zero
    assert free.params["E"] < 0.05 * y.min() and rel(free.params["alpha"], 0.3) < 0.05, free.params


def test_compute_optimal_closed_form_matches_numerical(joint_boot):
    C = np.logspace(12, 24, 7)
    for k in (6.0, 37.5):
        closed = compute_optimal(joint_boot, C, k)
        num = compute_optimal_numerical(joint_boot, C, k)
        assert np.max(np.abs(closed.N_opt / num.N_opt - 1)) < 1e-3
        assert np.max(np.abs(closed.D_opt / num.D_opt - 1)) < 1e-3
        assert abs(closed.a - num.a) < 1e-3 and abs(closed.b - num.b) < 1e-3
        np.testing.assert_allclose(k * closed.N_opt * closed.D_opt, C, rtol=1e-12)
    p = joint_boot.params
    assert closed.a == pytest.approx(p["beta"] / (p["alpha"] + p["beta"]))
    assert closed.a + closed.b == pytest.approx(1.0)
    # A callable FLOPs model takes the numerical path and agrees when it is k N D.
    via_fn = compute_optimal(joint_boot, C, lambda n, d: 6.0 * n * d)
    assert via_fn.method == "numerical"
    np.testing.assert_allclose(via_fn.N_opt, compute_optimal(joint_boot, C, 6.0).N_opt, rtol=1e-3)
    # Exponent intervals come from the bootstrap samples and bracket the point value.
    lo, hi = compute_optimal(joint_boot, C).ci["a"]
    assert lo <= closed.a <= hi


def test_bootstrap_is_deterministic_for_a_seed():
    x = np.logspace(4, 8, 6)
    y = (0.1 + 2.0 * x ** -0.3) * np.exp(0.01 * np.random.default_rng(4).standard_normal(6))
    f = fit_power_law(x, y)
    a, b = bootstrap(f, n_boot=10, seed=3), bootstrap(f, n_boot=10, seed=3)
    c = bootstrap(f, n_boot=10, seed=4)
    np.testing.assert_array_equal(a.samples["alpha"], b.samples["alpha"])
    assert a.ci == b.ci
    assert not np.array_equal(a.samples["alpha"], c.samples["alpha"])


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="3 distinct x"):
        fit_power_law([1e4, 1e5, 1e5], [0.3, 0.2, 0.21])
    with pytest.raises(ValueError, match="finite and > 0"):
        fit_power_law([1e4, 1e5, 1e6], [0.3, -0.2, 0.1])
    with pytest.raises(ValueError, match="2 distinct N and D"):
        fit_joint([1e4] * 6, np.logspace(4, 6, 6), np.linspace(0.5, 0.2, 6))
    with pytest.raises(ValueError, match="loss must be one of"):
        fit_power_law([1, 2, 3], [3, 2, 1], loss="cauchy2")


def test_fit_records_is_json_and_groups_runs():
    recs = sweep_records(seed=0, k=8.0)
    recs.append({"name": "diverged", "params": 10 ** 6, "atoms_seen": 10 ** 5, "val_loss": float("nan")})
    recs.append({"name": "old-key", "params": 10 ** 6, "train_atoms": 10 ** 5, "val_loss": 0.37,
                 "data_fraction": 0.01})
    out = fit_records(recs, n_boot=10, seed=0)
    back = json.loads(json.dumps(out))
    assert back["n_records"] == 22 and back["n_used"] == 21
    assert any("diverged" in w for w in back["warnings"])
    assert back["L_N"]["D"] == 1e7 and len(back["L_N_per_data"]) == 4
    assert back["L_D"]["N"] == 1e8 and len(back["L_D_per_model"]) == 5
    assert rel(back["joint"]["params"]["alpha"], TRUE["alpha"]) < 0.05
    assert rel(back["L_N"]["fit"]["params"]["alpha"], TRUE["alpha"]) < 0.1
    assert rel(back["L_D"]["fit"]["params"]["alpha"], TRUE["beta"]) < 0.1
    assert set(back["joint"]["ci"]) == set(TRUE)
    co = back["compute_optimal"]
    assert co["k"] == pytest.approx(8.0) and co["k_source"].startswith("median")
    assert co["a"] + co["b"] == pytest.approx(1.0)
    joint = fit_from_dict(back["joint"])  # round trip keeps predict and residuals
    np.testing.assert_allclose(joint.residuals, back["joint"]["residuals"], atol=1e-12)
    assert estimate_flops_per_param_per_atom(recs) == pytest.approx(8.0)


def test_load_records_errors_name_the_file_and_line(tmp_path):
    from gnnmegatron.scaling.fit import load_records

    with pytest.raises(FileNotFoundError, match=r"run records .*nothere.jsonl do not exist"):
        load_records(tmp_path / "nothere.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"params": 1, "val_loss": 0.5}\n{"params": 2\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not JSON"):
        load_records(bad)
    one = tmp_path / "one.jsonl"
    one.write_text('{"params": 1}\n')
    assert load_records(one) == [{"params": 1}]  # JSON lines with a single record
    wrapped = tmp_path / "runs.json"
    wrapped.write_text('{"runs": [{"params": 3}]}')
    assert load_records(wrapped) == [{"params": 3}]
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be JSON objects"):
        load_records(numbers)
