"""The report writes its Markdown and plots from run records and fits (also fits read back from JSON)."""
import json
import math

import numpy as np

from gnnmegatron.scaling.fit import fit_records
from gnnmegatron.scaling.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records(sizes_n=(1e4, 1e5, 1e6, 1e7), sizes_d=(1e4, 1e5, 1e6, 1e7), seed=0, with_flops=True):
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes_n:
        for d in sizes_d:
            loss = (0.02 + 5.0 * n ** -0.35 + 8.0 * d ** -0.28) * math.exp(0.01 * rng.standard_normal())
            r = {"name": f"n{n:.0e}-d{d:.0e}", "preset": f"egnn-{int(math.log10(n))}", "params": int(n),
                 "params_total": int(1.2 * n), "data_fraction": d / max(sizes_d), "train_graphs": int(d / 20),
                 "atoms_seen": int(d), "val_energy_mae": 0.012, "val_force_mae": 0.051,
                 "val_loss": loss, "best_val_loss": loss}
            if with_flops:
                r["flops"] = 12.0 * n * d
            out.append(r)
    return out


def test_report_writes_markdown_and_plots(tmp_path):
    recs = records()
    fits = json.loads(json.dumps(fit_records(recs, n_boot=10, seed=0)))  # as the CLI reads it back
    paths = write_report(recs, fits, tmp_path / "rep", title="Synthetic sweep")
    names = [p.name for p in paths]
    assert names == ["report.md", "fits.json", "loss_vs_N.png", "loss_vs_D.png", "joint_residuals.png",
                     "isoflop.png"]
    for p in paths:
        assert p.exists() and p.stat().st_size > 0, p
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000, p
    md = paths[0].read_text()
    alpha = fits["joint"]["params"]["alpha"]
    assert "# Synthetic sweep" in md
    assert f"| joint | alpha | {alpha:.4g} |" in md
    lo, hi = fits["joint"]["ci"]["alpha"]
    assert f"{lo:.4g} | {hi:.4g}" in md
    assert "| run | preset | N | D | FLOPs | val energy MAE | val force MAE | val_loss |" in md
    assert sum(line.startswith("| n1e") for line in md.splitlines()) == len(recs)
    assert f"a = {fits['compute_optimal']['a']:.4f}" in md and "k = 12 FLOPs" in md
    assert "![isoflop](isoflop.png)" in md
    assert json.loads(paths[1].read_text())["joint"]["params"]["alpha"] == alpha


def test_report_without_a_joint_fit_still_writes(tmp_path):
    # One data size only: no joint fit, no compute-optimal; fits computed by write_report itself.
    recs = records(sizes_d=(1e6,), with_flops=False)
    recs.append({"name": "broken", "params": 0, "atoms_seen": 10, "val_loss": 0.3})
    paths = write_report(recs, None, tmp_path, n_boot=5)
    names = {p.name for p in paths}
    assert names == {"report.md", "fits.json", "loss_vs_N.png", "loss_vs_D.png"}
    md = (tmp_path / "report.md").read_text()
    assert "Not computed (no joint fit)." in md
    assert "| joint | - | not fitted |" in md
    assert "run 'broken' dropped" in md
