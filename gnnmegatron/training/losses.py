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


def loss_denominators(batches) -> dict[str, float]:
    """Counts that normalise a step's loss over all its micro-batches: graphs (energy per atom),
    force components and graphs with a stress label. Passing them to every micro-batch's
    :func:`compute_loss` makes the sum of the micro-batch losses the loss of one batch holding
    them all."""
    graphs = sum(int(b["num_atoms"].numel()) for b in batches)
    components = sum(3 * int(b["atomic_numbers"].shape[0]) for b in batches)
    stress = sum(int(b["has_stress"].sum()) for b in batches if "has_stress" in b)
    return {"graphs": graphs, "force_components": components, "stress_graphs": stress}


def compute_loss(out: dict, batch: dict, cfg: LossConfig,
                 denominators: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted training loss.

    Args:
        out: model output with ``energy`` [B], ``forces`` [N, 3], optionally ``stress`` [B, 3, 3].
        batch: graph batch with targets ``energy`` [B], ``forces`` [N, 3], ``num_atoms`` [B]
            and, for stress, ``stress`` [B, 3, 3] and ``has_stress`` [B].
        cfg: loss weights and kind.
        denominators: ``loss_denominators`` of the whole step (gradient accumulation / pipeline
            micro-batches); default: this batch's own counts (the mean over the batch).

    Returns:
        (loss, parts) where parts holds the detached per-term losses.
    """
    d = denominators or {}
    n = batch["num_atoms"].to(out["energy"].dtype)
    parts: dict[str, torch.Tensor] = {}
    loss = out["energy"].new_zeros(())
    if cfg.energy_weight > 0:
        parts["energy"] = elementwise(out["energy"] / n, batch["energy"] / n, cfg.kind, cfg.huber_delta,
                                      d.get("graphs"))
        loss = loss + cfg.energy_weight * parts["energy"]
    if cfg.force_weight > 0:
        parts["forces"] = elementwise(out["forces"], batch["forces"], cfg.kind, cfg.huber_delta,
                                      d.get("force_components"))
        loss = loss + cfg.force_weight * parts["forces"]
    if cfg.stress_weight > 0 and "stress" in out:
        mask = batch["has_stress"]
        denom = None if "stress_graphs" not in d else 9 * d["stress_graphs"]
        parts["stress"] = elementwise(out["stress"][mask], batch["stress"][mask], cfg.kind, cfg.huber_delta, denom)
        loss = loss + cfg.stress_weight * parts["stress"]
    return loss, {k: v.detach() for k, v in parts.items()}


class ErrorAccumulator:
    """Sums absolute errors over batches: energy MAE per atom (eV/atom) and force MAE (eV/Å).

    Also accumulates the two baselines the demo reports: a composition-only linear energy
    model (``baseline_energy`` in the batch, eV) and zero forces.
    """

    def __init__(self):
        self.sums = {"energy_abs": 0.0, "graphs": 0.0, "force_abs": 0.0, "force_components": 0.0,
                     "baseline_energy_abs": 0.0, "zero_force_abs": 0.0, "atoms": 0.0}

    def update(self, out: dict, batch: dict, baseline_energy: torch.Tensor | None = None) -> None:
        n = batch["num_atoms"].to(torch.float64)
        e_true = batch["energy"].detach().double()
        self.sums["energy_abs"] += ((out["energy"].detach().double() - e_true) / n).abs().sum().item()
        self.sums["graphs"] += float(n.numel())
        self.sums["atoms"] += float(n.sum().item())
        f_true = batch["forces"].detach().double()
        self.sums["force_abs"] += (out["forces"].detach().double() - f_true).abs().sum().item()
        self.sums["zero_force_abs"] += f_true.abs().sum().item()
        self.sums["force_components"] += float(f_true.numel())
        if baseline_energy is not None:
            self.sums["baseline_energy_abs"] += ((baseline_energy.double() - e_true) / n).abs().sum().item()

    def state(self) -> torch.Tensor:
        """The sums as one float64 tensor (for an all-reduce across data-parallel ranks)."""
        return torch.tensor(list(self.sums.values()), dtype=torch.float64)

    def load(self, values: torch.Tensor) -> None:
        self.sums = dict(zip(self.sums, values.tolist()))

    def result(self) -> dict[str, float]:
        g = max(self.sums["graphs"], 1.0)
        c = max(self.sums["force_components"], 1.0)
        return {
            "energy_mae_per_atom": self.sums["energy_abs"] / g,
            "force_mae": self.sums["force_abs"] / c,
            "baseline_energy_mae_per_atom": self.sums["baseline_energy_abs"] / g,
            "baseline_force_mae": self.sums["zero_force_abs"] / c,
            "graphs": self.sums["graphs"],
            "atoms": self.sums["atoms"],
        }
