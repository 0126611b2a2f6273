"""Markdown + PNG report of a scaling-law sweep and its fits.

:func:`write_report` takes the run records and the dict from
:func:`gnnmegatron.scaling.fit.fit_records` (or that dict read back from JSON) and writes, in
``out_dir``:

- ``report.md``: table of runs, table of fitted parameters with bootstrap intervals,
  compute-optimal exponents and allocations, and how to read them;
- ``fits.json``: the fits, as given;
- ``loss_vs_N.png``: loss against N (log-log) per data size, with the 1-D fits (solid) and the
  joint fit at that data size (dashed);
- ``loss_vs_D.png``: loss against D per model size, same conventions;
- ``joint_residuals.png``: joint-fit predicted vs observed loss, and log residual against N;
- ``isoflop.png``: loss along iso-FLOP curves ``C = k N D`` with each curve's minimum
  ``N_opt(C)``, and the fitted ``N_opt(C)``, ``D_opt(C)`` lines.

Plots use matplotlib's object API on an Agg canvas (no pyplot, no global backend change).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from gnnmegatron.scaling.fit import (JointFit, _d_of, clean_records, fit_from_dict, fit_records, grouped_by_fraction,
                                     record_value)

PARAM_ORDER = ("alpha", "beta", "E", "A", "B")


def _g(v, digits: int = 3) -> str:
    """Compact number: 3 significant digits, '-' for missing."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, np.integer)) and abs(v) < 10 ** 4:
        return str(int(v))
    return f"{float(v):.{digits}g}"


def _new_fig(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.5 * ncols, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _colors(n: int):
    from matplotlib import colormaps
    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def _span(v: np.ndarray, n: int = 100) -> np.ndarray:
    return np.logspace(np.log10(v.min()) - 0.15, np.log10(v.max()) + 0.15, n)


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------
def _plot_loss_vs(path: Path, x: np.ndarray, y: np.ndarray, group: np.ndarray, groups: list, joint,
                  xlabel: str, glabel: str, loss_key: str) -> Path:
    """One series per group: points, the group's 1-D fit (solid), the joint fit (dashed)."""
    fig, (ax,) = _new_fig()
    xs = _span(x)
    for color, gi in zip(_colors(len(groups)), groups):
        m = group == gi["value"]
        ax.loglog(x[m], y[m], "o", color=color, label=f"{glabel}={_g(gi['value'])}")
        if gi.get("fit"):
            ax.loglog(xs, fit_from_dict(gi["fit"]).predict(xs), "-", color=color, lw=1.2)
        if joint is not None:
            other = np.full_like(xs, gi["value"])
            pred = joint.predict(xs, other) if xlabel.startswith("N") else joint.predict(other, xs)
            ax.loglog(xs, pred, "--", color=color, lw=0.9, alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(loss_key)
    ax.set_title(f"{loss_key} vs {xlabel.split()[0]}: solid 1-D fit, dashed joint fit", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, title=glabel, title_fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def _plot_residuals(path: Path, joint: JointFit, loss_key: str) -> Path:
    fig, (a1, a2) = _new_fig(2)
    pred = joint.predict(joint.N, joint.D)
    sc = a1.scatter(joint.y, pred, c=np.log10(joint.D), cmap="viridis", s=22)
    lo, hi = min(joint.y.min(), pred.min()) * 0.95, max(joint.y.max(), pred.max()) * 1.05
    a1.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    a1.set_xscale("log")
    a1.set_yscale("log")
    for axis in (a1.xaxis, a1.yaxis):
        axis.set_minor_formatter(NullFormatter())  # minor labels collide on a short log range
    a1.set_xlabel(f"observed {loss_key}")
    a1.set_ylabel(f"predicted {loss_key}")
    a1.set_title("joint fit: predicted vs observed", fontsize=9)
    fig.colorbar(sc, ax=a1, label="log10 D")
    a2.scatter(joint.N, 100 * joint.residuals, c=np.log10(joint.D), cmap="viridis", s=22)
    a2.axhline(0, color="k", lw=0.8)
    a2.set_xscale("log")
    a2.set_xlabel("N (non-embedding parameters)")
    a2.set_ylabel("100 x (log pred - log obs)  [~ % error]")
    a2.set_title(f"residuals, rms {100 * np.sqrt(np.mean(joint.residuals ** 2)):.2g} %", fontsize=9)
    for a in (a1, a2):
        a.grid(True, which="major", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def _plot_isoflop(path: Path, joint: JointFit, co: dict, C_runs: np.ndarray, N_runs: np.ndarray) -> Path:
    fig, (a1, a2) = _new_fig(2)
    k = co["k"]
    budgets = np.logspace(np.log10(C_runs.min()), np.log10(C_runs.max()), 5) if len(C_runs) else np.array(co["C"][::6])
    p = joint.params
    G, ea = co["G"], co["a"]
    for color, c in zip(_colors(len(budgets)), budgets):
        n_opt = G * (c / k) ** ea
        ns = np.logspace(np.log10(n_opt) - 2, np.log10(n_opt) + 2, 200)
        a1.loglog(ns, joint.predict(ns, c / (k * ns)), "-", color=color, label=f"C={c:.2g}")
        a1.loglog([n_opt], [joint.predict(n_opt, c / (k * n_opt))], "o", color=color, mec="k")
    Cg = np.logspace(np.log10(budgets.min()), np.log10(budgets.max()), 50)
    Ng = G * (Cg / k) ** ea
    a1.loglog(Ng, joint.predict(Ng, Cg / (k * Ng)), "k:", lw=1, label="N_opt(C)")
    a1.set_xlabel("N (non-embedding parameters)")
    a1.set_ylabel("predicted loss")
    a1.set_title(f"iso-FLOP curves, C = {k:.3g} N D", fontsize=9)
    a1.legend(fontsize=7)
    C = np.asarray(co["C"])
    a2.loglog(C, co["N_opt"], "-", color="C0", label=f"N_opt ~ C^{ea:.3f}")
    a2.loglog(C, co["D_opt"], "-", color="C1", label=f"D_opt ~ C^{co['b']:.3f}")
    if len(C_runs):
        a2.loglog(C_runs, N_runs, "o", color="0.6", ms=4, label="runs (C, N)")
    a2.set_xlabel("training FLOPs C")
    a2.set_ylabel("N_opt (parameters), D_opt (atoms)")
    a2.set_title(f"compute-optimal allocation (alpha={p['alpha']:.3g}, beta={p['beta']:.3g})", fontsize=9)
    a2.legend(fontsize=7)
    for a in (a1, a2):
        a.grid(True, which="major", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: list) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _param_rows(label: str, fd: dict | None) -> list:
    if not fd:
        return [[label, "-", "not fitted", "-", "-"]]
    rows = []
    for k in PARAM_ORDER:
        if k in fd["params"]:
            ci = fd.get("ci", {}).get(k)
            if fd.get("ci_undetermined"):
                lo = hi = "undetermined"
            else:
                lo, hi = (_g(ci[0], 4), _g(ci[1], 4)) if ci else ("-", "-")
            rows.append([label, k, _g(fd["params"][k], 4), lo, hi])
    return rows


def _boot_lines(fits: dict) -> list:
    """One line per bootstrapped fit: resamples fitted and failed, or why its interval is undetermined."""
    out = []
    for label, fd in (("L(N)", (fits.get("L_N") or {}).get("fit")), ("L(D)", (fits.get("L_D") or {}).get("fit")),
                      ("joint", fits.get("joint"))):
        if not fd:
            continue
        line = (f"- {label}: {fd['n_points']} runs for {fd.get('n_params', len(fd['params']))} parameters, "
                f"{fd.get('n_boot', 0)} bootstrap refits ({fd.get('n_boot_failed', 0)} failed)")
        if fd.get("ci_undetermined"):
            line += f"; interval undetermined: {fd['ci_undetermined']}"
        out.append(line)
    return out


def _runs_md(recs: list, cfg: dict) -> list:
    lk, nk, dk = cfg["loss_key"], cfg["n_key"], cfg["d_key"]
    rows = []
    for r in sorted(recs, key=lambda r: (float(r[nk]), float(_d_of(r, dk)))):
        rows.append([r.get("name", "-"), r.get("preset", "-"), _g(r[nk]), _g(_d_of(r, dk)), _g(r.get("flops")),
                     _g(r.get("val_energy_mae")), _g(r.get("val_force_mae")), _g(record_value(r, lk), 4)])
    return _table(["run", "preset", "N", "D", "FLOPs", "val energy MAE", "val force MAE", lk], rows)


_KEY_MEANING = {
    "params": "non-embedding parameters",
    "params_total": "all parameters",
    "atoms_seen": "atoms processed in training, repeats counted",
    "train_atoms": "atoms in the run's training subset, each counted once",
}


def _markdown(title: str, recs: list, fits: dict, plots: list) -> str:
    cfg = fits["config"]
    lk = cfg["loss_key"]
    L = [f"# {title}", "",
         f"{fits['n_used']} of {fits['n_records']} runs used; loss fitted: `{lk}`; N = `{cfg['n_key']}` "
         f"({_KEY_MEANING.get(cfg['n_key'], 'from the run records')}), D = `{cfg['d_key']}` "
         f"({_KEY_MEANING.get(cfg['d_key'], 'from the run records')}). Fits are "
         f"{cfg['loss']} (scale {cfg['delta']:g}) on log-loss; intervals are {100 * cfg['level']:g} % "
         f"percentile bootstrap over runs ({cfg['n_boot']} resamples, seed {cfg['seed']}).", ""]
    L += ["## Runs", ""] + _runs_md(recs, cfg) + [""]

    L += ["## Fitted parameters", "",
          "- `L(N) = E + A N^-alpha`, runs at the largest data size"
          + (f" (D = {_g(fits['L_N']['D'])})" if fits.get("L_N") else ""),
          "- `L(D) = E + A D^-alpha`, runs of the largest model"
          + (f" (N = {_g(fits['L_D']['N'])})" if fits.get("L_D") else ""),
          "- joint `L(N, D) = E + A N^-alpha + B D^-beta`, all runs", ""]
    rows = (_param_rows("L(N)", (fits.get("L_N") or {}).get("fit"))
            + _param_rows("L(D)", (fits.get("L_D") or {}).get("fit")) + _param_rows("joint", fits.get("joint")))
    L += _table(["fit", "parameter", "value", "CI low", "CI high"], rows) + [""]
    L += _boot_lines(fits) + [""]
    j = fits.get("joint")
    if j:
        L += [f"Joint fit: {j['n_points']} runs, rms log residual {j['rmse_log']:.3g} "
              f"(~{100 * j['rmse_log']:.2g} %), {j['n_boot']} bootstrap refits ({j['n_boot_failed']} failed)"
              + (", E at its floor (E = 0)" if j.get("E_at_zero") else "") + ".", ""]

    per = []
    for g in fits.get("L_N_per_data", []):
        f = g.get("fit")
        per.append([f"L(N) at D={_g(g['D'])}", g["n_runs"]] + ([_g(f["params"][k], 4) for k in ("alpha", "E", "A")]
                                                             if f else ["-", "-", "-"]))
    for g in fits.get("L_D_per_model", []):
        f = g.get("fit")
        per.append([f"L(D) at N={_g(g['N'])}", g["n_runs"]] + ([_g(f["params"][k], 4) for k in ("alpha", "E", "A")]
                                                              if f else ["-", "-", "-"]))
    if per:
        L += ["### Per data size and per model size (point estimates)", ""]
        L += _table(["fit", "runs", "alpha", "E", "A"], per) + [""]

    per_src = fits.get("per_source") or {}
    if per_src:
        L += ["## Per source", "",
              "Each source's own validation loss against the same N and D (`gnnmegatron scaling fit --per-source`).", ""]
        rows = []
        for name, f in per_src.items():
            rows += _param_rows(f"[{name}] L(N)", (f.get("L_N") or {}).get("fit"))
            rows += _param_rows(f"[{name}] joint", f.get("joint"))
        L += _table(["fit", "parameter", "value", "CI low", "CI high"], rows) + [""]
        for name, f in per_src.items():
            L += [line.replace("- ", f"- [{name}] ", 1) for line in _boot_lines(f)]
        L += [""]

    co = fits.get("compute_optimal")
    L += ["## Compute-optimal scaling", ""]
    if co:
        ci = co.get("ci", {})
        cis = lambda k: f" ({_g(ci[k][0])} .. {_g(ci[k][1])})" if k in ci else ""  # noqa: E731
        L += [f"With C = k N D, k = {co['k']:.4g} FLOPs per parameter per atom processed "
              f"({co.get('k_source', 'given')})"
              + ("" if cfg["d_key"] == "atoms_seen" else
                 f"; D here is `{cfg['d_key']}`, so C counts one pass over the data and the frontier is that "
                 f"of the data-limited law measured (runs that repeat their data)") + ":", "",
              f"- N_opt ∝ C^a, **a = {co['a']:.4f}**{cis('a')}  (a = beta / (alpha + beta))",
              f"- D_opt ∝ C^b, **b = {co['b']:.4f}**{cis('b')}  (b = alpha / (alpha + beta))",
              f"- N_opt = G (C/k)^a with G = {co['G']:.4g}; D_opt = (C/k) / N_opt", ""]
        idx = np.unique(np.linspace(0, len(co["C"]) - 1, 6).round().astype(int))
        L += _table(["C (FLOPs)", "N_opt", "D_opt", "predicted loss"],
                    [[_g(co["C"][i]), _g(co["N_opt"][i]), _g(co["D_opt"][i]), _g(co["L_opt"][i], 4)] for i in idx])
        L += [""]
    else:
        L += ["Not computed (no joint fit).", ""]

    L += ["## How to read this", "",
          "- alpha (beta) is how fast the loss falls with model (data) size: doubling N cuts the reducible "
          "part A N^-alpha by a factor 2^alpha. E is the loss no size removes (noise, label error, model class).",
          "- The intervals come from refitting on runs resampled with replacement; an interval much wider "
          "than the estimate, or E at 0, says the sweep does not pin that parameter down (add sizes further apart).",
          "- The joint fit should agree with the 1-D fits where they overlap; residuals above a few % or a trend in "
          "the residual plot mean the law does not describe the runs (e.g. under-trained large models).",
          "- a > b says extra compute should go mostly to parameters, a < b mostly to data; a ≈ b ≈ 0.5 is "
          "the Chinchilla balance. Exponents extrapolate: trust them within the swept range of C.", ""]
    if fits.get("warnings"):
        L += ["## Warnings", ""] + [f"- {w}" for w in fits["warnings"]] + [""]
    if plots:
        L += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(L)


def write_report(records: Sequence[dict], fits: dict | None, out_dir, title: str = "Scaling-law fits",
                 **fit_kwargs) -> list:
    """Write ``report.md``, ``fits.json`` and the PNG plots into ``out_dir``.

    Args:
        records: run records (see :func:`gnnmegatron.scaling.fit.fit_records`).
        fits: the dict :func:`fit_records` returned (or read back from its JSON); if None,
            ``fit_records(records, **fit_kwargs)`` is called.
        out_dir: folder, created if absent.
        title: the report's heading.

    Returns:
        The written paths (``report.md`` first, then ``fits.json``, then the PNGs).
    """
    if fits is None:
        fits = fit_records(records, **fit_kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = fits["config"]
    lk, nk, dk = cfg["loss_key"], cfg["n_key"], cfg["d_key"]
    recs, _ = clean_records(records, lk, nk, dk)
    plots = []
    if recs:
        N = np.array([float(r[nk]) for r in recs])
        D = np.array([float(_d_of(r, dk)) for r in recs])
        y = np.array([float(record_value(r, lk)) for r in recs])
        joint = fit_from_dict(fits["joint"]) if fits.get("joint") else None
        # Runs grouped by data size as fit_records did (by data_fraction when every run has one);
        # each group is drawn at its median D, which is where the joint-fit curve is evaluated.
        per_data = fits.get("L_N_per_data", [])
        by_frac = grouped_by_fraction(recs)
        frac_to_D = {g["data_fraction"]: g["D"] for g in per_data if g.get("data_fraction") is not None}
        dplot = np.array([frac_to_D.get(float(r["data_fraction"]), d) if by_frac else d for r, d in zip(recs, D)])
        dgroups = [{"value": g["D"], "fit": g.get("fit")} for g in per_data]
        plots.append(_plot_loss_vs(out / "loss_vs_N.png", N, y, dplot, dgroups, joint,
                                   "N (non-embedding parameters)", "D", lk))
        mgroups = [{"value": g["N"], "fit": g.get("fit")} for g in fits.get("L_D_per_model", [])]
        plots.append(_plot_loss_vs(out / "loss_vs_D.png", D, y, N, mgroups, joint,
                                   "D (atoms seen)", "N", lk))
        if joint is not None:
            plots.append(_plot_residuals(out / "joint_residuals.png", joint, lk))
            co = fits.get("compute_optimal")
            if co:
                C_runs = np.array([float(r["flops"]) for r in recs if r.get("flops")])
                N_runs = np.array([float(r[nk]) for r in recs if r.get("flops")])
                plots.append(_plot_isoflop(out / "isoflop.png", joint, co, C_runs, N_runs))
    md = out / "report.md"
    md.write_text(_markdown(title, recs, fits, plots))
    fj = out / "fits.json"
    fj.write_text(json.dumps(fits, indent=1))
    return [md, fj] + plots

