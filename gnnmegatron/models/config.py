"""``ModelConfig``: the validated hyper-parameters of the EGNN interatomic potential.

Every field maps one-to-one onto YAML (``model:`` section of a pretraining config) and
onto ``gnnmegatron.models.presets.get_preset(name, **overrides)``. Validation happens in
``__post_init__`` (also after ``dataclasses.replace``) and every message shows the value
that was rejected, e.g. ``ModelConfig.hidden must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("silu", "gelu", "tanh", "softplus")
"""Smooth activations only: conservative forces differentiate the network twice
(forces, then the force loss), and ReLU-like kinks give discontinuous forces."""

FORCE_MODES = ("conservative", "direct")
RADIAL_BASES = ("bessel", "gaussian")
MESSAGES = ("faithful", "node_split")
EXECUTIONS = ("unfused", "fused")
OPS_BACKENDS = ("auto", "reference", "torch", "triton")
HEADS = ("shared", "per_source", "embedding")
"""Energy heads of a multi-source model: one head for every source, one head per source, or one
head whose input is shifted by a learned per-source embedding (``AtomisticModel``)."""


class ModelConfigError(ValueError):
    """A ``ModelConfig`` field is missing, unknown or out of range."""


@dataclass
class ModelConfig:
    """Hyper-parameters of ``AtomisticModel`` (EGNN backbone + energy/force heads).

    Attributes:
        hidden: node/edge feature width H (the study scales it from 800 to 10000).
        layers: number of EGCL message-passing blocks L (the study: 3 to 30).
        num_rbf: number of radial basis functions K.
        cutoff: neighbour-list radius in Å; the envelope takes messages to zero there.
        max_z: largest atomic number the embedding table accepts (table has max_z+1 rows).
        activation: one of ``ACTIVATIONS``.
        force_mode: ``"conservative"`` (forces = -dE/dx by autograd, stress available) or
            ``"direct"`` (an equivariant per-edge force head; no stress).
        compute_stress: default of ``forward(compute_stress=None)``; conservative mode only.
        update_coords: E(n)-GNN coordinate updates between blocks (the last block never
            updates coordinates, as in HydraGNN, because nothing would read them).
        coord_tanh: squash the per-edge coordinate weight with ``tanh(.) * coords_range``.
        coords_range: scale of the tanh-squashed coordinate weight (Å), ``coord_tanh`` only.
        coord_clamp: if set, clamp each per-edge coordinate translation to
            ``[-coord_clamp, coord_clamp]`` Å (EGNN's ``clamp`` option). ``None`` = off.
        coord_normalizer: constant divisor of the summed coordinate update (EGNN's C).
            A constant (not the neighbour count of a mean) keeps the update smooth when an
            atom crosses the cutoff.
        message_normalizer: constant divisor of the summed messages (1.0 = plain sum as in
            E_GCL; e.g. the average neighbour count keeps activations O(1) for big H).
        radial_basis: ``"bessel"`` (DimeNet sin(n pi r/c)/r) or ``"gaussian"``.
        envelope_exponent: p of the polynomial envelope (value, slope and curvature vanish
            at the cutoff for any p >= 2).
        residual: ``h <- h + phi_h([h, m])`` instead of ``h <- phi_h([h, m])``.
        layer_norm: apply ``LayerNorm(H)`` to each block's output node features.
        message: ``"faithful"`` (HydraGNN's E_GCL: edge MLP Linear-act-Linear-act, edge-level
            coordinate MLP and force head) or ``"node_split"`` (the tensor-parallel-native EGNN of
            docs/architecture.md: one edge linear + act, messages summed with the envelope, the node MLP's
            first linear acting on the summed messages; coordinate and direct-force scalars are
            ``a_ij . v`` with a bias-free ``Linear(H, 1)``).
        message_groups: node_split only. ``None`` (default): the node MLP's first linear mixes
            all H message channels, ``W0 [h ; m]``. ``G``: the H message channels form G groups
            of H/G and the message enters through a block-diagonal ``W0m`` that mixes each group
            only within itself (``y = W0h h + blockdiag(W0m_1..W0m_G) m``; the node MLP's second
            linear then mixes all channels), like attention heads before their output
            projection. Under tensor parallelism (tp must divide G) each rank's message slice
            then stays on its rank and a block needs one N x H all-reduce per direction (the
            dense block: two forward, one plus an all-gather of N x H/tp backward;
            ``gnnmegatron.parallel.egnn_tp``).
        execution: ``"unfused"`` (plain torch edge tensors) or ``"fused"`` (the
            ``gnnmegatron.ops`` message-passing ops; node_split never builds an [E, H] tensor).
            Both give the same outputs and gradients.
        ops_backend: backend of the fused ops (``"auto"`` = dispatch by device and
            ``$GNNMEGATRON_OPS_BACKEND``); see ``gnnmegatron.ops.dispatch``.
        sources: names of the data sources of a multi-source model (e.g. ``["mptrj", "ani1x"]``),
            in the order of their ids (``batch["source"]``). Empty (default) or one name: a
            single-source model. With two or more, the per-element reference energies are per
            source (``reference_energies`` [S, max_z + 1]) and the model needs each graph's source.
        heads: ``"shared"`` (one energy head for all sources), ``"per_source"`` (an energy head per
            source on the shared backbone, as HydraGNN's branches) or ``"embedding"`` (one head whose
            input is the node features plus a learned embedding of the graph's source). The last two
            need two or more ``sources``. Forces of ``direct`` models come from one shared head.
    """

    hidden: int = 128
    layers: int = 4
    num_rbf: int = 16
    cutoff: float = 5.0
    max_z: int = 100
    activation: str = "silu"
    force_mode: str = "conservative"
    compute_stress: bool = False
    update_coords: bool = True
    coord_tanh: bool = False
    coords_range: float = 15.0
    coord_clamp: float | None = None
    coord_normalizer: float = 1.0
    message_normalizer: float = 1.0
    radial_basis: str = "bessel"
    envelope_exponent: int = 5
    residual: bool = True
    layer_norm: bool = False
    message: str = "faithful"
    message_groups: int | None = None
    execution: str = "unfused"
    ops_backend: str = "auto"
    sources: list[str] = field(default_factory=list)
    heads: str = "shared"

    def __post_init__(self):
        for name, low in (("hidden", 1), ("layers", 1), ("num_rbf", 1), ("max_z", 1),
                          ("envelope_exponent", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ModelConfigError(f"ModelConfig.{name} must be an integer >= {low}, got {value!r}")
        for name in ("cutoff", "coords_range", "coord_normalizer", "message_normalizer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ModelConfigError(f"ModelConfig.{name} must be a number > 0, got {value!r}")
            setattr(self, name, float(value))
        if self.coord_clamp is not None:
            if isinstance(self.coord_clamp, bool) or not isinstance(self.coord_clamp, (int, float)) \
                    or not self.coord_clamp > 0:
                raise ModelConfigError(f"ModelConfig.coord_clamp must be None or a number > 0 Å, "
                                       f"got {self.coord_clamp!r}")
            self.coord_clamp = float(self.coord_clamp)
        for name, allowed in (("activation", ACTIVATIONS), ("force_mode", FORCE_MODES),
                              ("radial_basis", RADIAL_BASES), ("message", MESSAGES), ("execution", EXECUTIONS),
                              ("ops_backend", OPS_BACKENDS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ModelConfigError(f"ModelConfig.{name}={value!r} is not one of {list(allowed)}")
        for name in ("compute_stress", "update_coords", "coord_tanh", "residual", "layer_norm"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ModelConfigError(f"ModelConfig.{name} must be true or false, got {value!r}")
        if self.message_groups is not None:
            g = self.message_groups
            if isinstance(g, bool) or not isinstance(g, int) or g < 1:
                raise ModelConfigError(f"ModelConfig.message_groups must be None or an integer >= 1, got {g!r}")
            if self.message != "node_split":
                raise ModelConfigError(f"ModelConfig.message_groups={g} needs message='node_split', "
                                       f"got message={self.message!r}")
            if self.hidden % g:
                raise ModelConfigError(f"ModelConfig.message_groups={g} must divide hidden={self.hidden}")
        if isinstance(self.sources, str) or not isinstance(self.sources, (list, tuple)):
            raise ModelConfigError(f"ModelConfig.sources must be a list of source names, got {self.sources!r}")
        self.sources = list(self.sources)
        bad = [s for s in self.sources if not isinstance(s, str) or not s.strip()]
        if bad:
            raise ModelConfigError(f"ModelConfig.sources must hold non-empty names, got {bad!r} in {self.sources}")
        dup = sorted({s for s in self.sources if self.sources.count(s) > 1})
        if dup:
            raise ModelConfigError(f"ModelConfig.sources has duplicate name(s) {dup}: {self.sources}")
        if self.heads not in HEADS:
            raise ModelConfigError(f"ModelConfig.heads={self.heads!r} is not one of {list(HEADS)}")
        if self.heads != "shared" and len(self.sources) < 2:
            raise ModelConfigError(f"ModelConfig.heads={self.heads!r} needs two or more sources, got sources="
                                   f"{self.sources}; use heads: shared for a single-source model")
        if self.compute_stress and self.force_mode != "conservative":
            raise ModelConfigError(
                f"ModelConfig.compute_stress=True needs force_mode='conservative' (stress is dE/dstrain), "
                f"got force_mode={self.force_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (YAML/JSON/checkpoint friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Inverse of ``to_dict``; unknown keys are errors (a typo must not fall back to a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelConfigError(f"unknown ModelConfig field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**values)

    @property
    def num_sources(self) -> int:
        """Sources with their own reference energies (1 for a single-source model)."""
        return max(len(self.sources), 1)

    @property
    def multi_source(self) -> bool:
        """Two or more sources: per-source references (and heads), the batch must name each graph's source."""
        return len(self.sources) >= 2

    @property
    def coord_blocks(self) -> int:
        """Number of blocks that own a coordinate MLP (all but the last when ``update_coords``)."""
        return self.layers - 1 if self.update_coords else 0
