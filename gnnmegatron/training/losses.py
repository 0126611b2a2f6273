"""Energy/force/stress losses and validation metrics.

Shapes:
    B graphs, N atoms. Energies are compared per atom (eV/atom) so that graphs of
    different sizes weigh alike; forces per Cartesian component (eV/Å); stress per
    component (eV/Å^3).
"""

from __future__ import annotations

import torch

from gnnmegatron.training.config import LossConfig


def elementwise(pred: torch.Tensor, target: torch.Tensor, kind: str, delta: float,
                denominator: float | None = None) -> torch.Tensor:
    """The chosen pointwise loss (mae, mse or huber) summed over all elements and divided by
    ``denominator`` (default: the number of elements, i.e. the mean)."""
    if pred.numel() == 0:
        return pred.sum() * 0.0
    diff = pred - target
    if kind == "mae":
        total = diff.abs().sum()
    elif kind == "mse":
        total = diff.square().sum()
    elif kind == "huber":
        total = torch.nn.functional.huber_loss(pred, target, delta=delta, reduction="sum")
    else:
        raise ValueError(f"unknown loss kind {kind!r}; use mae, mse or huber")
    return total / (pred.numel() if denominator is None else max(float(denominator), 1.0))


def label_masks(batch: dict) -> dict[str, torch.Tensor]:
    """Per-graph label masks ``{"energy", "forces", "stress"}`` [B] bool of a batch.

    A batch from ``collate`` has ``has_energy``/``has_forces``/``has_stress``; a batch without a
    target key has no such label anywhere; a target without its ``has_*`` key (a batch built by
    hand) counts as labelled for every graph.
    """
    B = int(batch["num_atoms"].numel())
    device = batch["num_atoms"].device
    out = {}
    for name in ("energy", "forces", "stress"):
        flag = batch.get(f"has_{name}")
        if flag is not None:
            out[name] = flag.to(torch.bool)
        else:
            out[name] = torch.full((B,), name in batch, dtype=torch.bool, device=device)
    return out


def loss_denominators(batches) -> dict[str, float]:
    """Counts that normalise a step's loss over all its micro-batches: energy-labelled graphs
    (energy per atom), force components of force-labelled graphs and stress-labelled graphs.
    Passing them to every micro-batch's :func:`compute_loss` makes the sum of the micro-batch
    losses the loss of one batch holding them all, each term averaged over its labelled
    structures only."""
    graphs = components = stress = 0
    for b in batches:
        masks = label_masks(b)
        graphs += int(masks["energy"].sum())
        components += 3 * int(b["num_atoms"][masks["forces"]].sum())
        stress += int(masks["stress"].sum())
    return {"graphs": graphs, "force_components": components, "stress_graphs": stress}


def _pointwise(pred: torch.Tensor, target: torch.Tensor, kind: str, delta: float) -> torch.Tensor:
    diff = pred - target
    if kind == "mae":
        return diff.abs()
    if kind == "mse":
        return diff.square()
    if kind == "huber":
        return torch.nn.functional.huber_loss(pred, target, delta=delta, reduction="none")
    raise ValueError(f"unknown loss kind {kind!r}; use mae, mse or huber")


def loss_at(cfg: LossConfig, step: int, max_steps: int) -> LossConfig:
    """The loss weights in force at optimizer step ``step`` (0-based) under ``cfg.stages``: the last
    stage whose ``start * max_steps <= step`` replaces the weights it names (``cfg`` itself before any)."""
    import dataclasses

    active = [st for st in (cfg.stages or []) if float(st["start"]) * max_steps <= step]
    if not active:
        return cfg
    weights = {k: float(v) for k, v in active[-1].items() if k != "start"}
    return dataclasses.replace(cfg, stages=None, **weights)


def active_terms(cfg: LossConfig, source_weights: torch.Tensor | None = None) -> list[str]:
    """The loss terms with a positive weight for some source (the keys of ``compute_loss``'s parts)."""
    W = _term_weights(cfg, source_weights)
    weights = [cfg.energy_weight, cfg.force_weight, cfg.stress_weight] if W is None else W.max(0).values.tolist()
    return [name for name, w in zip(("energy", "forces", "stress"), weights) if w > 0]


def _term_weights(cfg: LossConfig, source_weights: torch.Tensor | None) -> torch.Tensor | None:
    """[S, 3] per-source (energy, force, stress) weights, or None when every source uses ``cfg``'s."""
    if source_weights is None:
        return None
    base = torch.tensor([cfg.energy_weight, cfg.force_weight, cfg.stress_weight], dtype=torch.float64)
    w = torch.as_tensor(source_weights, dtype=torch.float64)
    if w.dim() != 2 or w.shape[1] != 3:
        raise ValueError(f"source_weights must be [S, 3] (energy, force, stress weight per source), got {list(w.shape)}")
    return None if bool((w == base).all()) else w


def compute_loss(out: dict, batch: dict, cfg: LossConfig, denominators: dict[str, float] | None = None,
                 source_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted training loss over the labelled structures.

    Each term averages only over the structures that carry its label (``label_masks``): the
    energy term over energy-labelled graphs, the force term over the force components of
    force-labelled graphs, the stress term over stress-labelled graphs. A batch without any
    label for a term contributes zero to it (with zero gradients).

    Args:
        out: model output with ``energy`` [B], ``forces`` [N, 3], optionally ``stress`` [B, 3, 3].
        batch: graph batch with targets ``energy`` [B], ``forces`` [N, 3], ``num_atoms`` [B],
            ``stress`` [B, 3, 3] and the masks ``has_energy``, ``has_forces``, ``has_stress`` [B].
        cfg: loss weights and kind.
        denominators: ``loss_denominators`` of the whole step (gradient accumulation / pipeline
            micro-batches); default: this batch's own counts (the mean over its labelled structures).
        source_weights: [S, 3] per-source (energy, force, stress) loss weights, indexed by
            ``batch["source"]``; default: ``cfg``'s weights for every source.

    Returns:
        (loss, parts) where parts holds the detached per-term losses (unweighted means over the
        labelled structures).
    """
    masks = label_masks(batch)
    d = denominators or {}
    n = batch["num_atoms"].to(out["energy"].dtype)
    W = _term_weights(cfg, source_weights)
    if W is not None:
        W = W.to(device=out["energy"].device, dtype=out["energy"].dtype)
        src = batch["source"]
        if src.numel() and int(src.max()) >= W.shape[0]:
            raise ValueError(f"batch['source'] holds id {int(src.max())} but only {W.shape[0]} sources have loss weights")
    active = [cfg.energy_weight, cfg.force_weight, cfg.stress_weight] if W is None else W.max(0).values.tolist()
    parts: dict[str, torch.Tensor] = {}
    loss = out["energy"].new_zeros(())

    def term(values, mask, den, weight_column, per):
        # values: pointwise losses; mask selects labelled entries; per: entry -> graph (for weights)
        zero = values.new_zeros(())
        masked = torch.where(mask, values, zero)
        den = max(float(den), 1.0)
        part = masked.sum() / den
        if W is None:
            return part, None
        w = W[:, weight_column].index_select(0, src)
        if per is not None:
            w = w.index_select(0, per)
        w = w.reshape(w.shape + (1,) * (masked.dim() - 1))
        return part, (masked * w).sum() / den

    if active[0] > 0 and "energy" not in batch:  # no label of any kind: contributes nothing
        parts["energy"] = loss
    elif active[0] > 0:
        m = masks["energy"]
        values = _pointwise(out["energy"] / n, batch["energy"] / n, cfg.kind, cfg.huber_delta)
        part, weighted = term(values, m, d.get("graphs", int(m.sum())), 0, None)
        parts["energy"] = part
        loss = loss + (cfg.energy_weight * part if weighted is None else weighted)
    if active[1] > 0 and "forces" not in batch:
        parts["forces"] = out["energy"].new_zeros(())
    elif active[1] > 0:
        atom_mask = masks["forces"].index_select(0, batch["batch"])
        values = _pointwise(out["forces"], batch["forces"], cfg.kind, cfg.huber_delta)
        den = d.get("force_components", 3 * int(atom_mask.sum()))
        part, weighted = term(values, atom_mask[:, None], den, 1, batch["batch"])
        parts["forces"] = part
        loss = loss + (cfg.force_weight * part if weighted is None else weighted)
    if active[2] > 0 and "stress" in out and "stress" not in batch:
        parts["stress"] = out["energy"].new_zeros(())
    elif active[2] > 0 and "stress" in out:
        mask = masks["stress"]
        den = 9 * d.get("stress_graphs", int(mask.sum()))
        if W is None:
            parts["stress"] = elementwise(out["stress"][mask], batch["stress"][mask], cfg.kind, cfg.huber_delta,
                                          den)
            loss = loss + cfg.stress_weight * parts["stress"]
        else:
            values = _pointwise(out["stress"], batch["stress"], cfg.kind, cfg.huber_delta)
            part, weighted = term(values, mask[:, None, None], den, 2, None)
            parts["stress"] = part
            loss = loss + weighted
    return loss, {k: v.detach() for k, v in parts.items()}


class ErrorAccumulator:
    """Sums errors over batches: energy MAE and RMSE per atom (eV/atom), force MAE and RMSE (eV/Å) and,
    when the outputs hold stress, stress MAE (eV/Å^3), overall and per source. The trainer's validation,
    ``gnnmegatron evaluate`` and ``predict``'s summary all use it, so their numbers mean the same.

    Also accumulates the two baselines the demo reports: a composition-only linear energy
    model (``baseline_energy`` in the batch, eV) and zero forces. Only labelled structures count:
    energy errors over graphs with an energy label, force errors over the components of graphs
    with force labels (``energy_graphs`` and ``force_components`` say how many).

    Args:
        num_sources: keep sums per source id (``batch["source"]``) as well; 1 sums everything
            together (whatever the batch's source ids).
    """

    KEYS = ("energy_abs", "graphs", "force_abs", "force_components", "baseline_energy_abs", "zero_force_abs",
            "atoms", "energy_graphs", "energy_sq", "force_sq", "stress_abs", "stress_components")

    def __init__(self, num_sources: int = 1):
        self.num_sources = int(num_sources)
        self.sums = torch.zeros(self.num_sources, len(self.KEYS), dtype=torch.float64)

    def update(self, out: dict, batch: dict, baseline_energy: torch.Tensor | None = None) -> None:
        masks = {k: v.cpu() for k, v in label_masks(batch).items()}
        n = batch["num_atoms"].detach().cpu().to(torch.float64)
        B = n.numel()
        graph = batch["batch"].detach().cpu()
        zeros = torch.zeros(B, dtype=torch.float64)
        rows = {k: zeros for k in self.KEYS}
        rows["graphs"] = torch.ones(B, dtype=torch.float64)
        rows["atoms"] = n
        if "energy" in batch:
            e_true = batch["energy"].detach().cpu().double()
            e_mask = masks["energy"].to(torch.float64)
            e_err = (out["energy"].detach().cpu().double() - e_true) / n
            rows["energy_abs"] = e_err.abs() * e_mask
            rows["energy_sq"] = torch.where(e_mask > 0, e_err.square(), zeros)
            rows["energy_graphs"] = e_mask
            if baseline_energy is not None:
                rows["baseline_energy_abs"] = ((baseline_energy.detach().cpu().double() - e_true) / n).abs() * e_mask
        if "forces" in batch and "forces" in out:
            f_true = batch["forces"].detach().cpu().double()
            f_mask = masks["forces"].to(torch.float64)
            f_err = out["forces"].detach().cpu().double() - f_true
            rows["force_abs"] = zeros.clone().index_add_(0, graph, f_err.abs().sum(1)) * f_mask
            sq = zeros.clone().index_add_(0, graph, f_err.square().sum(1))
            rows["force_sq"] = torch.where(f_mask > 0, sq, zeros)  # unlabelled forces may be NaN
            rows["zero_force_abs"] = zeros.clone().index_add_(0, graph, f_true.abs().sum(1)) * f_mask
            rows["force_components"] = 3 * n * f_mask
        if "stress" in batch and "stress" in out:
            s_mask = masks["stress"].to(torch.float64)
            s_err = (out["stress"].detach().cpu().double() - batch["stress"].detach().cpu().double()).abs()
            rows["stress_abs"] = torch.where(s_mask > 0, s_err.reshape(B, -1).sum(1), zeros)
            rows["stress_components"] = 9 * s_mask
        table = torch.stack([rows[k] for k in self.KEYS], dim=1)  # [B, K]
        if self.num_sources == 1:
            self.sums[0] += table.sum(0)
        else:
            src = batch["source"].detach().cpu()
            self.sums.index_add_(0, src, table)

    def state(self) -> torch.Tensor:
        """The sums as one float64 tensor (for an all-reduce across data-parallel ranks)."""
        return self.sums.reshape(-1).clone()

    def load(self, values: torch.Tensor) -> None:
        self.sums = values.to(torch.float64).reshape(self.num_sources, len(self.KEYS)).clone()

    @classmethod
    def _result(cls, sums: torch.Tensor) -> dict[str, float]:
        s = dict(zip(cls.KEYS, sums.tolist()))
        g = max(s["energy_graphs"], 1.0)
        c = max(s["force_components"], 1.0)
        return {
            "energy_mae_per_atom": s["energy_abs"] / g,
            "force_mae": s["force_abs"] / c,
            "energy_rmse_per_atom": (s["energy_sq"] / g) ** 0.5,
            "force_rmse": (s["force_sq"] / c) ** 0.5,
            "stress_mae": s["stress_abs"] / s["stress_components"] if s["stress_components"] else None,
            "stress_components": s["stress_components"],
            "baseline_energy_mae_per_atom": s["baseline_energy_abs"] / g,
            "baseline_force_mae": s["zero_force_abs"] / c,
            "graphs": s["graphs"],
            "atoms": s["atoms"],
            "energy_graphs": s["energy_graphs"],
            "force_components": s["force_components"],
        }

    def result(self) -> dict[str, float]:
        """Metrics over every source together."""
        return self._result(self.sums.sum(0))

    def per_source(self) -> list[dict[str, float]]:
        """Metrics of each source id (``num_sources`` dicts)."""
        return [self._result(row) for row in self.sums]
