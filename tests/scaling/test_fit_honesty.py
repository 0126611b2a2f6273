"""Bootstrap intervals that cannot be trusted are reported as undetermined; failed resamples are counted
and printed for every fit; multi-source records are fitted per source."""
import json
import subprocess
import sys

import numpy as np
import pytest

from gnnmegatron.scaling.fit import (
    bootstrap, fit_joint, fit_power_law, fit_records, fit_records_per_source, summarize_fits,
)


def _law(x, A=5.0, alpha=0.4, E=0.02):
    return E + A * np.asarray(x, float) ** -alpha


def test_as_many_points_as_parameters_is_undetermined():
    x = np.array([1e3, 1e4, 1e5])
    f = bootstrap(fit_power_law(x, _law(x)), n_boot=20, seed=0)
    assert f.ci == {} and "3 points for 3 parameters" in f.ci_undetermined
    d = f.to_dict()
    assert d["ci_undetermined"] == f.ci_undetermined and d["n_params"] == 3
    N = np.array([1e4, 1e5, 1e6, 1e4, 1e6])
    D = np.array([1e4, 1e4, 1e5, 1e6, 1e6])
    j = bootstrap(fit_joint(N, D, 0.02 + 5 * N ** -0.3 + 8 * D ** -0.3), n_boot=10, seed=0)
    assert j.ci == {} and "5 points for 5 parameters" in j.ci_undetermined


def test_mostly_failing_resamples_make_the_interval_undetermined():
    # 7 runs but 5 at one size: a resample usually lacks one of the other two sizes and cannot be fitted
    x = np.array([1e3] * 5 + [1e4, 1e5])
    f = bootstrap(fit_power_law(x, _law(x) * (1 + 0.01 * np.arange(7))), n_boot=50, seed=1)
    tries = f.n_boot + f.n_boot_failed
    assert f.n_boot_failed > tries / 2, (f.n_boot, f.n_boot_failed)
    assert f.ci == {} and "could not be fitted" in f.ci_undetermined and str(f.n_boot_failed) in f.ci_undetermined
    # a well-spread sweep of the same law keeps its interval, with its failed count (0 here) recorded
    x = np.logspace(3, 7, 9)
    g = bootstrap(fit_power_law(x, _law(x) * np.exp(0.01 * np.random.default_rng(0).standard_normal(9))),
                  n_boot=50, seed=1)
    assert g.ci_undetermined is None and g.ci["alpha"][0] < 0.4 < g.ci["alpha"][1]
    assert g.n_boot_failed <= (g.n_boot + g.n_boot_failed) / 2


def _records(alpha_a=0.3, alpha_b=0.6, sizes=np.logspace(3, 6, 6), data=(1e4, 1e5, 1e6)):
    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        for d in data:
            la = 0.01 + 2.0 * n ** -alpha_a + 3.0 * d ** -0.3
            lb = 0.02 + 4.0 * n ** -alpha_b + 2.0 * d ** -0.5
            la, lb = (v * np.exp(0.005 * rng.standard_normal()) for v in (la, lb))
            out.append({"name": f"n{n:.0f}-d{d:.0f}", "params": float(n), "atoms_seen": float(d), "flops": 6 * n * d,
                        "val_loss": (la + lb) / 2, "val_energy_mae": 0.0, "val_force_mae": 0.0,
                        "val_sources": {"a": {"loss": la, "energy_mae": la, "force_mae": 0.0},
                                        "b": {"loss": lb, "energy_mae": lb, "force_mae": 0.0}}})
    return out


def test_per_source_fits_recover_each_sources_exponent():
    fits = fit_records_per_source(_records(), n_boot=4)
    assert set(fits["per_source"]) == {"a", "b"}
    a = fits["per_source"]["a"]["joint"]["params"]["alpha"]
    b = fits["per_source"]["b"]["joint"]["params"]["alpha"]
    assert abs(a - 0.3) < 0.06 and abs(b - 0.6) < 0.1, (a, b)
    assert fits["per_source"]["a"]["config"]["loss_key"] == "val_sources.a.loss"
    everything = summarize_fits(fits)
    lines = [line for line in everything if not line.startswith("note: ")]  # the fits warnings, after the fits
    assert [line for line in everything if line.startswith("note: ")] == [f"note: {w}" for w in fits["warnings"]]
    bootstrapped = [line for line in lines if "largest" in line or "joint" in line]
    assert len(bootstrapped) == 9 and all("failed" in line for line in lines)
    assert any(line.startswith("[b] joint L(N, D): alpha = ") for line in lines)
    with pytest.raises(ValueError, match="per-source fits read val_loss"):
        fit_records_per_source(_records(), loss_key="steps", n_boot=0)
    assert fit_records(_records(), n_boot=0)["joint"] is not None


def test_scaling_fit_cli_prints_every_fit_with_failed_resamples(tmp_path):
    runs = tmp_path / "runs.jsonl"
    recs = _records(sizes=np.logspace(3, 6, 3), data=(1e4, 1e6))  # 3 model sizes x 2 data sizes
    runs.write_text("\n".join(json.dumps(r) for r in recs))
    out = subprocess.run([sys.executable, "-m", "gnnmegatron.cli", "scaling", "fit", str(runs), "--out",
                          str(tmp_path / "fits.json"), "--n-boot", "20", "--per-source"],
                         capture_output=True, text=True, check=True).stdout
    assert "[a] L(N) at the largest D" in out and "[b] joint L(N, D)" in out
    for line in out.splitlines()[:-1]:
        assert "failed" in line or "not fitted" in line, line
    fits = json.loads((tmp_path / "fits.json").read_text())
    ln = fits["L_N"]["fit"]  # 3 model sizes at the largest data size: 3 points for E, A, alpha
    assert ln["ci"] == {} and "3 points for 3 parameters" in ln["ci_undetermined"]
    assert "L(N) at the largest D: alpha = " in out and "interval undetermined (3 points for 3 parameters" in out
    from gnnmegatron.scaling.report import write_report

    md = write_report(recs, fits, tmp_path / "report")[0].read_text()
    assert "bootstrap refits" in md and "## Per source" in md and "| undetermined | undetermined |" in md
