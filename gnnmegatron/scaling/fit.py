"""Power-law fits of loss against model size N, data size D and compute C.

Three laws, all fitted robustly on the log of the loss (Chinchilla "approach 3"):

- ``L(x) = E + A x^-alpha``                       (:func:`fit_power_law`; x is N or D)
- ``L(N, D) = E + A N^-alpha + B D^-beta``       (:func:`fit_joint`)
- compute-optimal allocation under ``C = k N D`` (:func:`compute_optimal`)

Every coefficient is positive through a log parametrisation, ``E = exp(e)``, ``A = exp(a)``,
``B = exp(b)``, and the prediction is a log-sum-exp, ``log L = LSE(e, a - alpha log N,
b - beta log D)``, so the residual ``log L_pred - log L_obs`` is computed without overflow for
any N. The objective is ``sum rho(residual)`` with ``rho`` a Huber (or soft-L1) loss of scale
``delta`` (1e-3, as Chinchilla): residuals larger than ``delta`` count linearly, so one
diverged or mis-logged run moves the fit far less than under least squares.

The irreducible loss E may be 0: ``e`` is bounded below by ``E_LOG_FLOOR`` (E = 1e-13), which
is 0 for every practical purpose, and fits that end there report ``E_at_zero: true``; pass
``irreducible=False`` to fix E = 0 exactly (a pure power law, a straight line in log-log).

Each fit starts from a grid of exponents and E values (E as a fraction of the smallest
observed loss); for every grid point the amplitudes A (and B) are solved in closed form by
(non-negative) linear least squares on relative residuals, the grid points are ranked by the
robust objective, the best ``n_starts`` are refined with ``scipy.optimize.least_squares``
(analytic Jacobian), and the best refined fit is kept.

Units: N counts non-embedding parameters, D counts atoms seen in training (or training atoms),
C counts training FLOPs; the loss is whatever the run records name (``val_loss`` by default).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import numpy as np
from scipy.optimize import brentq, least_squares, minimize_scalar, nnls

E_LOG_FLOOR = -30.0          # log E lower bound: E = exp(-30) ~ 1e-13 reads as "E = 0"
EXPONENT_BOUNDS = (0.0, 4.0)  # alpha, beta; losses in the paper fall with exponents < 1
AMP_LOG_BOUNDS = (-50.0, 200.0)
LOSSES = ("huber", "soft_l1", "linear")
ALPHA_GRID = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5)
E_FRACTIONS = (0.0, 0.25, 0.5, 0.8, 0.95)   # E init as a fraction of min(y); 0 -> E_LOG_FLOOR
FlopsModel = Union[float, Callable[[np.ndarray, np.ndarray], np.ndarray]]


def _lse(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise log-sum-exp of a (P, T) array and its softmax weights (the Jacobian of it)."""
    m = cols.max(axis=1, keepdims=True)
    w = np.exp(cols - m)
    s = w.sum(axis=1, keepdims=True)
    return (m + np.log(s))[:, 0], w / s


def _ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _check_xy(name: str, *arrays: np.ndarray) -> None:
    n = len(arrays[0])
    for a in arrays:
        if len(a) != n:
            raise ValueError(f"{name}: inputs have different lengths {[len(b) for b in arrays]}")
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"{name}: inputs must be finite and > 0, got min {np.min(a)!r}")


# ------------------------------------------------------------------------------------------
# Fit result dataclasses
# ------------------------------------------------------------------------------------------
@dataclass
class PowerLawFit:
    """``L(x) = E + A x^-alpha`` fitted on log-loss.

    Attributes:
        params: ``{"E", "A", "alpha"}``.
        x, y: the fitted points (P,), x > 0, y > 0.
        ci: parameter name -> (lo, hi) percentile interval; empty until :func:`bootstrap`.
        samples: parameter name -> (n_boot,) bootstrap estimates (not serialised).
        options: the fit options, so that :func:`bootstrap` refits the same way.
    """

    params: dict
    x: np.ndarray
    y: np.ndarray
    objective: float
    success: bool
    variable: str = "x"
    options: dict = field(default_factory=dict)
    ci: dict = field(default_factory=dict)
    level: float = 0.95
    n_boot: int = 0
    n_boot_failed: int = 0
    ci_undetermined: str | None = None
    samples: dict = field(default_factory=dict, repr=False)

    kind = "power_law"
    param_names = ("E", "A", "alpha")

    def predict(self, x) -> np.ndarray:
        p = self.params
        return p["E"] + p["A"] * np.asarray(x, dtype=float) ** (-p["alpha"])

    @property
    def residuals(self) -> np.ndarray:
        """``log L_pred - log L_obs`` per point, shape (P,)."""
        return np.log(self.predict(self.x)) - np.log(self.y)

    @property
    def E_at_zero(self) -> bool:
        return self.params["E"] <= math.exp(E_LOG_FLOOR) * 1.0001

    @property
    def n_free_params(self) -> int:
        """Parameters the fit determines (E counts unless it was fixed at 0)."""
        return len(self.param_names) - (0 if self.options.get("irreducible", True) else 1)

    def refit(self, idx: np.ndarray) -> "PowerLawFit":
        return fit_power_law(self.x[idx], self.y[idx], variable=self.variable, **self.options)

    def _data(self) -> dict:
        return {"x": self.x.tolist(), "y": self.y.tolist()}

    def to_dict(self) -> dict:
        r = self.residuals
        return {
            "kind": self.kind, "formula": self.formula(), "variable": self.variable,
            "params": {k: float(v) for k, v in self.params.items()},
            "ci": {k: [lo, hi] for k, (lo, hi) in self.ci.items()},
            "level": self.level, "n_boot": self.n_boot, "n_boot_failed": self.n_boot_failed,
            "ci_undetermined": self.ci_undetermined, "n_params": self.n_free_params,
            "n_points": len(self.y), "objective": self.objective, "success": self.success,
            "E_at_zero": self.E_at_zero, "rmse_log": float(np.sqrt(np.mean(r ** 2))),
            "residuals": r.tolist(), "options": dict(self.options), **self._data(),
        }

    def formula(self) -> str:
        v = self.variable
        return f"L({v}) = E + A * {v}^-alpha"

    @classmethod
    def _data_from(cls, d: dict) -> dict:
        return {"x": np.asarray(d["x"], float), "y": np.asarray(d["y"], float)}

    @classmethod
    def from_dict(cls, d: dict) -> "PowerLawFit":
        """Inverse of :meth:`to_dict` (bootstrap samples are not kept, intervals are)."""
        extra = {"variable": d["variable"]} if "variable" in d else {}
        return cls(params=dict(d["params"]), objective=d["objective"], success=d["success"],
                   options=dict(d.get("options", {})), ci={k: tuple(v) for k, v in d.get("ci", {}).items()},
                   level=d.get("level", 0.95), n_boot=d.get("n_boot", 0), n_boot_failed=d.get("n_boot_failed", 0),
                   ci_undetermined=d.get("ci_undetermined"), **extra, **cls._data_from(d))


@dataclass
class JointFit(PowerLawFit):
    """``L(N, D) = E + A N^-alpha + B D^-beta`` fitted on log-loss; ``x`` holds N, ``D`` holds D.

    ``params`` is ``{"E", "A", "alpha", "B", "beta"}``.
    """

    D: np.ndarray = field(default_factory=lambda: np.zeros(0))
    variable: str = "N,D"

    kind = "joint"
    param_names = ("E", "A", "alpha", "B", "beta")

    @property
    def N(self) -> np.ndarray:
        return self.x

    def predict(self, N, D=None) -> np.ndarray:
        if D is None:
            raise TypeError("JointFit.predict needs both N and D")
        p = self.params
        N, D = np.asarray(N, float), np.asarray(D, float)
        return p["E"] + p["A"] * N ** (-p["alpha"]) + p["B"] * D ** (-p["beta"])

    @property
    def residuals(self) -> np.ndarray:
        return np.log(self.predict(self.x, self.D)) - np.log(self.y)

    def refit(self, idx: np.ndarray) -> "JointFit":
        return fit_joint(self.x[idx], self.D[idx], self.y[idx], **self.options)

    def _data(self) -> dict:
        return {"N": self.x.tolist(), "D": self.D.tolist(), "y": self.y.tolist()}

    def formula(self) -> str:
        return "L(N, D) = E + A * N^-alpha + B * D^-beta"

    @classmethod
    def _data_from(cls, d: dict) -> dict:
        return {"x": np.asarray(d["N"], float), "D": np.asarray(d["D"], float), "y": np.asarray(d["y"], float)}


def fit_from_dict(d: dict) -> PowerLawFit:
    """Rebuild a :class:`PowerLawFit` or :class:`JointFit` from its ``to_dict()`` form."""
    return (JointFit if d.get("kind") == "joint" else PowerLawFit).from_dict(d)


# ------------------------------------------------------------------------------------------
# Generic robust fit of log L = LSE(e, a_i - alpha_i log x_i) over terms i
# ------------------------------------------------------------------------------------------
def _robust_fit(logx: np.ndarray, logy: np.ndarray, inits: list, *, irreducible: bool,
                loss: str, delta: float):
    """Refine each init ``theta = [e, a_1, alpha_1, a_2, alpha_2, ...]``; return the best.

    Shapes: logx (P, T) for T power-law terms, logy (P,), each theta (1 + 2T,).
    """
    T = logx.shape[1]
    lo = np.array([E_LOG_FLOOR] + [AMP_LOG_BOUNDS[0], EXPONENT_BOUNDS[0]] * T)
    hi = np.array([float(logy.max()) + 1.0] + [AMP_LOG_BOUNDS[1], EXPONENT_BOUNDS[1]] * T)
    free = slice(0, None) if irreducible else slice(1, None)   # E fixed at 0: e = -inf, not optimised

    def full(t):
        return t if irreducible else np.concatenate([[-np.inf], t])

    def lse(t):
        th = full(t)
        cols = [np.full(len(logy), th[0])] + [th[1 + 2 * i] - th[2 + 2 * i] * logx[:, i] for i in range(T)]
        return _lse(np.stack(cols, axis=1))

    def fun(t):
        return lse(t)[0] - logy

    def jac(t):
        w = lse(t)[1]
        J = np.empty((len(logy), 1 + 2 * T))
        J[:, 0] = w[:, 0]
        for i in range(T):
            J[:, 1 + 2 * i] = w[:, 1 + i]
            J[:, 2 + 2 * i] = -w[:, 1 + i] * logx[:, i]
        return J[:, free]

    # A plain least-squares pass first (a handful of Gauss-Newton steps), then the robust
    # loss from there: a Huber of scale 1e-3 on 1 %-noise residuals is nearly L1 and took
    # ~150 trf iterations from a grid start, ~25 from the least-squares optimum (same optimum).
    best, seen, bounds = None, [], (lo[free], hi[free])
    for th0 in inits:
        t0 = np.clip(np.asarray(th0, float), lo + 1e-9, hi - 1e-9)[free]
        res = least_squares(fun, t0, jac=jac, bounds=bounds, method="trf", x_scale="jac", max_nfev=200)
        if any(np.allclose(res.x, s, rtol=1e-3, atol=1e-3) for s in seen):
            continue  # same basin as an optimum already refined
        seen.append(res.x)
        if loss != "linear":
            res = least_squares(fun, res.x, jac=jac, bounds=bounds, loss=loss, f_scale=delta, method="trf",
                                x_scale="jac", max_nfev=400)
        cost = _robust_cost(res.fun, loss, delta)
        if best is None or cost < best[1]:
            best = (full(res.x), cost, bool(res.success))
    return best


def _robust_cost(r: np.ndarray, loss: str, delta: float) -> float:
    z = (r / delta) ** 2
    if loss == "huber":
        rho = np.where(z <= 1, z, 2 * np.sqrt(z) - 1)
    elif loss == "soft_l1":
        rho = 2 * (np.sqrt(1 + z) - 1)
    else:
        rho = z
    return float(0.5 * delta ** 2 * rho.sum())


def _rank_inits(cands: list, y: np.ndarray, loss: str, delta: float, n_starts: int) -> list:
    """Rank candidate ``(theta, predicted loss)`` pairs by the robust log objective; keep the best thetas."""
    scored = []
    for theta, pred in cands:
        if np.all(pred > 0):
            scored.append((_robust_cost(np.log(pred) - np.log(y), loss, delta), theta))
    scored.sort(key=lambda s: s[0])
    return [t for _, t in scored[:max(1, n_starts)]]


def _validate_opts(loss: str, n_starts: int, delta: float) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if n_starts < 1 or delta <= 0:
        raise ValueError(f"need n_starts >= 1 and delta > 0, got n_starts={n_starts}, delta={delta}")


def fit_power_law(x: Sequence[float], y: Sequence[float], *, n_starts: int = 4, loss: str = "huber",
                  delta: float = 1e-3, irreducible: bool = True, seed: int = 0,
                  variable: str = "x") -> PowerLawFit:
    """Fit ``L(x) = E + A x^-alpha`` robustly on log-loss.

    Args:
        x: sizes (P,), e.g. N parameters or D atoms; > 0.
        y: losses (P,); > 0.
        n_starts: how many of the best grid initialisations (alpha x E grid) are refined.
        loss: ``"huber"`` (default), ``"soft_l1"`` or ``"linear"`` (plain least squares).
        delta: robust-loss scale on the log residual (1e-3 = 0.1 % of the loss).
        irreducible: fit E >= 0 (True) or fix E = 0 (False, a pure power law).
        seed: kept for API symmetry; the grid start is deterministic.
        variable: label used in formulas and reports ("N" or "D").
    """
    del seed  # deterministic grid; bootstrap carries the randomness
    _validate_opts(loss, n_starts, delta)
    x, y = np.asarray(x, float), np.asarray(y, float)
    _check_xy("fit_power_law", x, y)
    need = 3 if irreducible else 2
    if len(np.unique(x)) < need:
        raise ValueError(f"fit_power_law needs >= {need} distinct x values, got {len(np.unique(x))}")
    w = 1.0 / y ** 2
    cands = []
    for alpha in ALPHA_GRID:
        u = x ** -alpha
        for frac in (E_FRACTIONS if irreducible else (0.0,)):
            E = frac * y.min()
            A = float(np.sum(w * u * (y - E)) / np.sum(w * u * u))
            A = max(A, 1e-12)
            theta = [math.log(E) if E > 0 else E_LOG_FLOOR, math.log(A), alpha]
            cands.append((theta, E + A * u))
    inits = _rank_inits(cands, y, loss, delta, n_starts)
    th, cost, ok = _robust_fit(np.log(x)[:, None], np.log(y), inits, irreducible=irreducible,
                               loss=loss, delta=delta)
    params = {"E": float(math.exp(th[0])) if np.isfinite(th[0]) else 0.0,
              "A": float(math.exp(th[1])), "alpha": float(th[2])}
    opts = {"n_starts": n_starts, "loss": loss, "delta": delta, "irreducible": irreducible}
    return PowerLawFit(params=params, x=x, y=y, objective=cost, success=ok, variable=variable, options=opts)


def fit_joint(N: Sequence[float], D: Sequence[float], y: Sequence[float], *, n_starts: int = 8,
              loss: str = "huber", delta: float = 1e-3, irreducible: bool = True,
              seed: int = 0) -> JointFit:
    """Fit ``L(N, D) = E + A N^-alpha + B D^-beta`` (Chinchilla approach 3) on log-loss.

    The start grid is alpha x beta x E (8 x 8 x 5); A and B at each grid point solve a
    non-negative least-squares problem on relative residuals, the best ``n_starts`` grid
    points are refined with a robust ``least_squares`` and the best result is kept.

    Args:
        N: parameters per run (P,). D: atoms seen per run (P,). y: loss per run (P,).
        n_starts, loss, delta, irreducible, seed: as :func:`fit_power_law`.
    """
    del seed
    _validate_opts(loss, n_starts, delta)
    N, D, y = (np.asarray(v, float) for v in (N, D, y))
    _check_xy("fit_joint", N, D, y)
    n_par = 5 if irreducible else 4
    if len({(a, b) for a, b in zip(N, D)}) < n_par or len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise ValueError(f"fit_joint needs >= {n_par} distinct (N, D) points with >= 2 distinct N and D; got "
                         f"{len(y)} points, {len(np.unique(N))} distinct N, {len(np.unique(D))} distinct D")
    iw = 1.0 / y
    cands = []
    for alpha in ALPHA_GRID:
        u = N ** -alpha
        for beta in ALPHA_GRID:
            v = D ** -beta
            M = np.stack([u * iw, v * iw], axis=1)
            for frac in (E_FRACTIONS if irreducible else (0.0,)):
                E = frac * y.min()
                (A, B), _ = nnls(M, (y - E) * iw)
                A, B = max(A, 1e-12), max(B, 1e-12)
                theta = [math.log(E) if E > 0 else E_LOG_FLOOR, math.log(A), alpha, math.log(B), beta]
                cands.append((theta, E + A * u + B * v))
    inits = _rank_inits(cands, y, loss, delta, n_starts)
    th, cost, ok = _robust_fit(np.log(np.stack([N, D], axis=1)), np.log(y), inits,
                               irreducible=irreducible, loss=loss, delta=delta)
    params = {"E": float(math.exp(th[0])) if np.isfinite(th[0]) else 0.0, "A": float(math.exp(th[1])),
              "alpha": float(th[2]), "B": float(math.exp(th[3])), "beta": float(th[4])}
    opts = {"n_starts": n_starts, "loss": loss, "delta": delta, "irreducible": irreducible}
    return JointFit(params=params, x=N, D=D, y=y, objective=cost, success=ok, options=opts)


UNDETERMINED_FAILED_FRACTION = 0.5
"""A bootstrap interval is reported undetermined when more than this fraction of its resamples fail."""


def bootstrap(fit: PowerLawFit, *, n_boot: int = 200, level: float = 0.95, seed: int = 0,
              max_tries: int | None = None) -> PowerLawFit:
    """Percentile bootstrap: resample the runs with replacement, refit, take percentiles.

    Works for :class:`PowerLawFit` and :class:`JointFit` (refits with the same options).
    Resamples that cannot be fitted (too few distinct points) are drawn again, up to
    ``max_tries`` (default ``4 * n_boot``) draws in all; they are counted in ``n_boot_failed``.

    The interval is reported as *undetermined* (``ci`` empty, ``ci_undetermined`` saying why,
    the failed count kept) when the fit has no more points than parameters (it interpolates
    them: every resample that fits at all reproduces its own points, so the spread measures
    nothing), when most resamples failed (more than ``UNDETERMINED_FAILED_FRACTION`` of the
    draws: the successful ones are a biased few), or when fewer than 2 resamples could be fitted.

    Returns:
        A copy of ``fit`` with ``ci`` (name -> (lo, hi)), ``samples`` (name -> (n_boot,)),
        ``level``, ``n_boot`` (successful refits), ``n_boot_failed`` and ``ci_undetermined`` set.
        Deterministic for a given ``seed``.
    """
    if not 0 < level < 1 or n_boot < 2:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 2, got level={level}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    P = len(fit.y)
    max_tries = 4 * n_boot if max_tries is None else max_tries
    rows, failed, tries = [], 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while len(rows) < n_boot and tries < max_tries:
            tries += 1
            idx = rng.integers(0, P, size=P)
            try:
                f = fit.refit(idx)
            except ValueError:
                failed += 1
                continue
            rows.append([f.params[k] for k in fit.param_names])
    reason = None
    if P <= fit.n_free_params:
        reason = (f"{P} points for {fit.n_free_params} parameters: the fit passes through every point, so "
                  f"resampling cannot measure its uncertainty")
    elif len(rows) < 2:
        reason = f"only {len(rows)} of {tries} resamples could be fitted"
    elif failed > UNDETERMINED_FAILED_FRACTION * tries:
        reason = (f"{failed} of {tries} resamples could not be fitted (too few distinct points); the "
                  f"{len(rows)} that could are not a fair sample")
    if reason is not None:
        return replace(fit, ci={}, samples={}, level=level, n_boot=len(rows), n_boot_failed=failed,
                       ci_undetermined=reason)
    arr = np.asarray(rows)
    samples = {k: arr[:, i] for i, k in enumerate(fit.param_names)}
    ci = {k: _ci(s, level) for k, s in samples.items()}
    return replace(fit, ci=ci, samples=samples, level=level, n_boot=len(rows), n_boot_failed=failed,
                   ci_undetermined=None)


def describe_fit(label: str, fd: dict | None) -> str:
    """One line per fit for the command line: exponent(s), interval or why it is undetermined, and
    how many bootstrap resamples failed."""
    if not fd:
        return f"{label}: not fitted"
    names = [k for k in ("alpha", "beta") if k in fd["params"]]
    parts = []
    for k in names:
        ci = fd.get("ci", {}).get(k)
        parts.append(f"{k} = {fd['params'][k]:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""))
    if fd.get("ci_undetermined"):
        interval = f"interval undetermined ({fd['ci_undetermined']})"
    elif fd.get("n_boot"):
        interval = f"{100 * fd.get('level', 0.95):g} % bootstrap interval"
    else:
        interval = "no bootstrap"
    return (f"{label}: {', '.join(parts)}; {fd['n_points']} points; {interval}; {fd.get('n_boot', 0)} resamples "
            f"fitted, {fd.get('n_boot_failed', 0)} failed")


# ------------------------------------------------------------------------------------------
# Compute-optimal allocation
# ------------------------------------------------------------------------------------------
@dataclass
class ComputeOptimal:
    """``N_opt(C)``, ``D_opt(C)`` minimising the joint law on ``C = k N D``.

    Attributes:
        C, N_opt, D_opt, L_opt: arrays (M,) for M compute budgets (FLOPs).
        a, b: exponents, ``N_opt ~ C^a``, ``D_opt ~ C^b`` (a = beta/(alpha+beta), b = alpha/(alpha+beta)).
        G: prefactor ``(alpha A / (beta B))^(1/(alpha+beta))``; k: FLOPs per parameter per atom.
        ci: ``{"a": (lo, hi), "b": (lo, hi)}`` from the joint fit's bootstrap samples, if any.
    """

    C: np.ndarray
    N_opt: np.ndarray
    D_opt: np.ndarray
    L_opt: np.ndarray
    a: float
    b: float
    G: float
    k: float | None
    ci: dict = field(default_factory=dict)
    method: str = "closed_form"

    def to_dict(self) -> dict:
        return {"C": self.C.tolist(), "N_opt": self.N_opt.tolist(), "D_opt": self.D_opt.tolist(),
                "L_opt": self.L_opt.tolist(), "a": self.a, "b": self.b, "G": self.G, "k": self.k,
                "ci": {k: list(v) for k, v in self.ci.items()}, "method": self.method,
                "formula": "N_opt = G (C/k)^a, D_opt = (C/k)/N_opt, a = beta/(alpha+beta), b = alpha/(alpha+beta)"}


def compute_optimal(joint: JointFit, C, flops_per_param_per_atom: FlopsModel = 6.0,
                    level: float | None = None) -> ComputeOptimal:
    """Compute-optimal model and data size for budgets ``C`` under ``C = k N D``.

    ``k`` (FLOPs per parameter per atom seen) comes from the analytic FLOPs counter of the
    model: :func:`estimate_flops_per_param_per_atom` takes the median of ``C / (N D)`` over a
    sweep's runs (6 is the dense-transformer value, 2 forward + 4 backward per parameter per
    token; an EGNN's edge work and force backward make it larger). With a constant ``k``::

        N_opt = G (C/k)^(beta/(alpha+beta)),   G = (alpha A / (beta B))^(1/(alpha+beta)),
        D_opt = (C/k) / N_opt.

    If ``flops_per_param_per_atom`` is a callable ``f(N, D) -> C`` the optimum is found
    numerically (:func:`compute_optimal_numerical`) and a, b are the log-log slopes of N_opt
    and D_opt against C.
    """
    C = np.atleast_1d(np.asarray(C, float))
    if callable(flops_per_param_per_atom):
        return compute_optimal_numerical(joint, C, flops_per_param_per_atom)
    k = float(flops_per_param_per_atom)
    if k <= 0 or np.any(C <= 0):
        raise ValueError(f"need k > 0 and C > 0, got k={k}, min C={C.min()}")
    p = joint.params
    al, be = p["alpha"], p["beta"]
    if al <= 0 or be <= 0:
        raise ValueError(f"compute-optimal needs alpha, beta > 0, got alpha={al}, beta={be}")
    a, b = be / (al + be), al / (al + be)
    G = (al * p["A"] / (be * p["B"])) ** (1.0 / (al + be))
    N_opt = G * (C / k) ** a
    D_opt = (C / k) / N_opt
    ci = {}
    if joint.samples:
        sa, sb = joint.samples["alpha"], joint.samples["beta"]
        ok = (sa > 0) & (sb > 0)
        if ok.sum() >= 2:
            lvl = joint.level if level is None else level
            ci = {"a": _ci(sb[ok] / (sa[ok] + sb[ok]), lvl), "b": _ci(sa[ok] / (sa[ok] + sb[ok]), lvl)}
    return ComputeOptimal(C=C, N_opt=N_opt, D_opt=D_opt, L_opt=joint.predict(N_opt, D_opt), a=a, b=b,
                          G=float(G), k=k, ci=ci)


def compute_optimal_numerical(joint: JointFit, C, flops_per_param_per_atom: FlopsModel = 6.0,
                              grid: int = 2001) -> ComputeOptimal:
    """Minimise ``L(N, D)`` along each iso-FLOP curve numerically (checks the closed form).

    For each budget, a grid over log N (D solved from the FLOPs model; for a callable
    ``f(N, D)``, by root finding in log D, assuming f grows with D) brackets the minimum,
    then a bounded Brent search refines it to ~1e-10 in log N.
    """
    C = np.atleast_1d(np.asarray(C, float))
    f = flops_per_param_per_atom
    if callable(f):
        def d_of(n, c):
            g = lambda ld: math.log(float(f(np.asarray(n), np.asarray(math.exp(ld))))) - math.log(c)  # noqa: E731
            return math.exp(brentq(g, -50.0, 150.0, xtol=1e-14))
        k = None
    else:
        k = float(f)

        def d_of(n, c):
            return c / (k * n)

    def L(logn, c):
        n = math.exp(logn)
        return float(joint.predict(n, d_of(n, c)))

    N_opt = np.empty_like(C)
    for i, c in enumerate(C):
        hi = math.log(c / k) if k else math.log(c)
        xs = np.linspace(0.0, hi, grid)
        vals = [L(t, c) for t in xs]
        j = int(np.argmin(vals))
        lo_b, hi_b = xs[max(j - 2, 0)], xs[min(j + 2, grid - 1)]
        r = minimize_scalar(L, bounds=(lo_b, hi_b), args=(c,), method="bounded",
                            options={"xatol": 1e-10})
        N_opt[i] = math.exp(r.x)
    D_opt = np.array([d_of(n, c) for n, c in zip(N_opt, C)])
    if len(C) >= 2 and np.ptp(np.log(C)) > 0:
        a = float(np.polyfit(np.log(C), np.log(N_opt), 1)[0])
        b = float(np.polyfit(np.log(C), np.log(D_opt), 1)[0])
    else:
        p = joint.params
        a, b = p["beta"] / (p["alpha"] + p["beta"]), p["alpha"] / (p["alpha"] + p["beta"])
    G = float(N_opt[0] / (C[0] / k) ** a) if k else float("nan")
    return ComputeOptimal(C=C, N_opt=N_opt, D_opt=D_opt, L_opt=joint.predict(N_opt, D_opt), a=a, b=b,
                          G=G, k=k, method="numerical")


def estimate_flops_per_param_per_atom(records: Iterable[dict], n_key: str = "params",
                                      d_key: str = "atoms_seen") -> float | None:
    """Median of ``flops / (N * D)`` over records that have all three; None if none do."""
    ks = [r["flops"] / (r[n_key] * _d_of(r, d_key)) for r in records
          if r.get("flops") and r.get(n_key) and _d_of(r, d_key)]
    return float(np.median(ks)) if ks else None


# ------------------------------------------------------------------------------------------
# Fitting a sweep's run records
# ------------------------------------------------------------------------------------------
def _d_of(r: dict, d_key: str):
    v = r.get(d_key)
    if v is None and d_key == "atoms_seen":
        v = r.get("train_atoms")
    return v


def record_value(r: dict, key: str):
    """``r[key]``, where a dotted key reads nested dicts (``val_sources.mptrj.loss``); None if absent."""
    if key in r:
        return r[key]
    node = r
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def record_sources(records: Iterable[dict]) -> list[str]:
    """Source names of multi-source run records (``val_sources`` keys), in first-seen order."""
    names: list[str] = []
    for r in records:
        for name in (r.get("val_sources") or {}):
            if name not in names:
                names.append(name)
    return names


def source_loss_key(loss_key: str, source: str) -> str:
    """The per-source record key of a loss key: ``val_loss`` -> ``val_sources.<source>.loss``."""
    metric = {"val_loss": "loss", "val_energy_mae": "energy_mae", "val_force_mae": "force_mae",
              "best_val_loss": "best_loss"}.get(loss_key)
    if metric is None:
        raise ValueError(f"per-source fits read val_loss, val_energy_mae, val_force_mae or best_val_loss of each "
                         f"source; got loss key {loss_key!r}")
    return f"val_sources.{source}.{metric}"


def load_fits(path: Union[str, Path]) -> dict:
    """A fits JSON written by ``scaling fit`` (ValueError naming the file when it is not one)."""
    path = Path(path)
    try:
        fits = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"fits {path}: not JSON ({exc.msg}, line {exc.lineno}); give the file `gnnmegatron "
                         f"scaling fit` wrote") from None
    cfg = fits.get("config") if isinstance(fits, dict) else None
    missing = [k for k in ("loss_key", "n_key", "d_key") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"fits {path}: not a `gnnmegatron scaling fit` result (its config lacks {missing}); "
                         f"refit with `gnnmegatron scaling fit RUNS --out {path}` or leave --fits out")
    return fits


def load_records(path: Union[str, Path]) -> list:
    """Read run records from a JSON list, a JSON object with a ``"runs"`` list, or JSON lines.

    Raises:
        FileNotFoundError: no such file. ValueError: not JSON (names the line), or not JSON objects.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"run records {path} do not exist (a sweep writes <out_dir>/runs.jsonl)") from None
    except IsADirectoryError:
        hint = f"; {path / 'runs.jsonl'} is there" if (path / "runs.jsonl").is_file() else ""
        raise ValueError(f"run records {path} is a folder; give its runs.jsonl (a sweep writes "
                         f"<out_dir>/runs.jsonl){hint}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        records = []
        for k, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {k} is not JSON ({exc.msg}, column {exc.colno}); run records are "
                                 f"a JSON list, an object with a 'runs' list, or one JSON object per line") from None
        data = records
    if isinstance(data, dict):  # {"runs": [...]}, or JSON lines holding one record
        data = data["runs"] if "runs" in data else [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: run records must be JSON objects (one per run)")
    return list(data)


def clean_records(records: Iterable[dict], loss_key: str = "val_loss", n_key: str = "params",
                  d_key: str = "atoms_seen") -> tuple[list, list]:
    """Keep records with positive finite N, D and loss; return ``(kept, warnings)``."""
    kept, notes = [], []
    names = {"N": n_key, "D": d_key, "loss": loss_key}
    for r in records:
        vals = {"N": r.get(n_key), "D": _d_of(r, d_key), "loss": record_value(r, loss_key)}
        bad = [f"{k} ({names[k]}={vals[k]!r})" for k, v in vals.items() if not is_positive_number(v)]
        if bad:
            notes.append(f"run {r.get('name', '?')!r} dropped: missing, non-numeric, non-finite or non-positive "
                         f"{', '.join(bad)}")
            continue
        if r.get("flops") is not None and not is_positive_number(r["flops"]):
            notes.append(f"run {r.get('name', '?')!r}: flops={r['flops']!r} is not a positive number; ignored")
            r = {k: v for k, v in r.items() if k != "flops"}
        kept.append(r)
    return kept, notes


def grouped_by_fraction(records: Sequence[dict]) -> bool:
    """Whether runs are grouped by data size through ``data_fraction`` (every record has a number
    there) rather than through D; the fits and the report's plots group them the same way."""
    return all(is_positive_number(r.get("data_fraction")) for r in records)


def is_positive_number(v) -> bool:
    if isinstance(v, bool):
        return False
    try:
        x = float(v)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(x) and x > 0)


def _fit_with_ci(fn, *args, n_boot, seed, level, notes, label, **kw):
    try:
        f = fn(*args, **kw)
    except ValueError as e:
        notes.append(f"{label}: not fitted ({e})")
        return None
    if n_boot >= 2:
        f = bootstrap(f, n_boot=n_boot, seed=seed, level=level)
        if f.ci_undetermined:
            notes.append(f"{label}: confidence interval undetermined ({f.ci_undetermined}; {f.n_boot_failed} "
                         f"resamples failed)")
    return f


def fit_records(records: Sequence[dict], loss_key: str = "val_loss", n_key: str = "params",
                d_key: str = "atoms_seen", n_boot: int = 200, seed: int = 0, level: float = 0.95,
                loss: str = "huber", delta: float = 1e-3,
                flops_per_param_per_atom: float | None = None, n_compute_points: int = 25) -> dict:
    """Fit every law to a sweep's run records; return a JSON-serialisable dict.

    Runs are grouped by data size (``data_fraction`` if every record has it, else D) and by
    model size (N). Keys of the result:

    - ``L_N``: ``L(N)`` over runs of the largest data group, with bootstrap CIs; ``L_N_per_data``:
      one point-estimate fit per data group with >= 3 distinct N.
    - ``L_D``: ``L(D)`` over runs of the largest model, with CIs; ``L_D_per_model``: per model.
    - ``joint``: ``L(N, D)`` over all runs, with CIs.
    - ``compute_optimal``: ``N_opt(C)``, ``D_opt(C)`` on ``n_compute_points`` budgets spanning the
      runs' FLOPs (x 0.1 .. x 10), exponents a, b with CIs; k is ``flops_per_param_per_atom`` or,
      if None, :func:`estimate_flops_per_param_per_atom` of the runs (6.0 if no run has FLOPs).
    - ``warnings``: runs dropped and fits skipped, as sentences. Any fit may be None.
    """
    recs, notes = clean_records(records, loss_key, n_key, d_key)
    kw = {"loss": loss, "delta": delta}
    bk = {"n_boot": n_boot, "seed": seed, "level": level, "notes": notes}
    out = {"config": {"loss_key": loss_key, "n_key": n_key, "d_key": d_key, "n_boot": n_boot, "seed": seed,
                      "level": level, "loss": loss, "delta": delta},
           "n_records": len(records), "n_used": len(recs),
           "L_N": None, "L_N_per_data": [], "L_D": None, "L_D_per_model": [], "joint": None,
           "compute_optimal": None, "warnings": notes}
    if not recs:
        notes.append("no usable runs")
        return out
    Nv = np.array([float(r[n_key]) for r in recs])
    Dv = np.array([float(_d_of(r, d_key)) for r in recs])
    yv = np.array([float(record_value(r, loss_key)) for r in recs])
    by_frac = grouped_by_fraction(recs)
    dgroup = np.array([float(r["data_fraction"]) for r in recs]) if by_frac else Dv

    data_groups = []
    for g in np.unique(dgroup):
        m = dgroup == g
        data_groups.append((float(np.median(Dv[m])), float(g), m))
    data_groups.sort(key=lambda t: t[0])
    for Dmed, g, m in data_groups:
        f = _fit_with_ci(fit_power_law, Nv[m], yv[m], variable="N", n_boot=0, seed=seed, level=level,
                         notes=notes, label=f"L(N) at D={Dmed:.3g}", **kw)
        out["L_N_per_data"].append({"D": Dmed, "data_fraction": g if by_frac else None, "n_runs": int(m.sum()),
                                    "fit": f.to_dict() if f else None})
    Dmed, g, m = data_groups[-1]
    f = _fit_with_ci(fit_power_law, Nv[m], yv[m], variable="N", label=f"L(N) at largest D={Dmed:.3g}", **bk, **kw)
    out["L_N"] = {"D": Dmed, "data_fraction": g if by_frac else None, "n_runs": int(m.sum()),
                  "fit": f.to_dict() if f else None}

    for n in np.unique(Nv):
        m = Nv == n
        f = _fit_with_ci(fit_power_law, Dv[m], yv[m], variable="D", n_boot=0, seed=seed, level=level,
                         notes=notes, label=f"L(D) at N={n:.3g}", **kw)
        out["L_D_per_model"].append({"N": float(n), "n_runs": int(m.sum()), "fit": f.to_dict() if f else None})
    n = float(Nv.max())
    m = Nv == n
    f = _fit_with_ci(fit_power_law, Dv[m], yv[m], variable="D", label=f"L(D) at largest N={n:.3g}", **bk, **kw)
    out["L_D"] = {"N": n, "n_runs": int(m.sum()), "fit": f.to_dict() if f else None}

    joint = _fit_with_ci(fit_joint, Nv, Dv, yv, label="joint L(N, D)", **bk, **kw)
    if joint is not None:
        out["joint"] = joint.to_dict()
        # k is the cost of one parameter meeting one atom: always per atom processed (atoms_seen),
        # whatever D means in the fit, so C = k N D counts one pass over D atoms.
        k_runs = estimate_flops_per_param_per_atom(recs, n_key, "atoms_seen")
        if flops_per_param_per_atom:
            k, k_source = float(flops_per_param_per_atom), "given"
        elif k_runs:
            k, k_source = k_runs, "median C/(N x atoms processed) of runs"
        else:
            k, k_source = 6.0, "default 6 (no run has flops)"
        C_runs = np.array([float(r["flops"]) for r in recs if r.get("flops")])
        Cs = C_runs if len(C_runs) else k * Nv * Dv
        C = np.logspace(np.log10(Cs.min() / 10), np.log10(Cs.max() * 10), n_compute_points)
        try:
            co = compute_optimal(joint, C, k)
            out["compute_optimal"] = {**co.to_dict(), "k_source": k_source}
        except ValueError as e:
            notes.append(f"compute-optimal: not computed ({e})")
    return out


def fit_records_per_source(records: Sequence[dict], loss_key: str = "val_loss", **kwargs) -> dict:
    """:func:`fit_records` over all sources together and over each source of multi-source runs.

    Records of multi-source runs carry ``val_sources`` (``{name: {loss, energy_mae, force_mae}}``,
    written by the sweep); each source's fits use its own validation loss (``source_loss_key``)
    with the same N and D. Returns the overall fits with ``per_source``: ``{name: fits}`` added
    (empty when no record names sources).
    """
    out = fit_records(records, loss_key=loss_key, **kwargs)
    out["per_source"] = {}
    for name in record_sources(records):
        key = source_loss_key(loss_key, name)
        out["per_source"][name] = fit_records(records, loss_key=key, **kwargs)
    return out


def summarize_fits(fits: dict) -> list[str]:
    """Lines for the command line: every fit with its exponents, interval (or why undetermined) and
    failed bootstrap resamples, overall and per source."""
    def block(f: dict, prefix: str) -> list[str]:
        lines = [describe_fit(f"{prefix}L(N) at the largest D", (f.get("L_N") or {}).get("fit")),
                 describe_fit(f"{prefix}L(D) at the largest N", (f.get("L_D") or {}).get("fit")),
                 describe_fit(f"{prefix}joint L(N, D)", f.get("joint"))]
        for g in f.get("L_N_per_data", []):
            lines.append(describe_fit(f"{prefix}L(N) at D={g['D']:.3g}", g.get("fit")))
        for g in f.get("L_D_per_model", []):
            lines.append(describe_fit(f"{prefix}L(D) at N={g['N']:.3g}", g.get("fit")))
        return lines

    lines = block(fits, "")
    for name, f in (fits.get("per_source") or {}).items():
        lines += block(f, f"[{name}] ")
    seen = set()
    for f in [fits, *(fits.get("per_source") or {}).values()]:
        for note in f.get("warnings") or []:
            if note not in seen:  # runs dropped, fits skipped: why something is undetermined
                seen.add(note)
                lines.append(f"note: {note}")
    return lines
