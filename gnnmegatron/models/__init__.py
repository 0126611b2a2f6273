"""gnnmegatron.models: single-device EGNN interatomic potential (the reference for every parallel layout)."""

from gnnmegatron.models.config import ModelConfig, ModelConfigError
from gnnmegatron.models.egnn import EGCL, EGCLOutput, EGNNStack, edge_vectors, scatter_sum
from gnnmegatron.models.potential import AtomisticModel
from gnnmegatron.models.presets import (
    PRESETS,
    STUDY_GRID,
    PresetNotFoundError,
    count_parameters,
    flops_per_step,
    format_preset_table,
    forward_flops,
    get_preset,
    list_presets,
)
from gnnmegatron.models.radial import BesselBasis, GaussianBasis, PolynomialEnvelope

__all__ = [
    "AtomisticModel", "BesselBasis", "EGCL", "EGCLOutput", "EGNNStack", "GaussianBasis", "ModelConfig",
    "ModelConfigError", "PRESETS", "PolynomialEnvelope", "PresetNotFoundError", "STUDY_GRID", "count_parameters",
    "edge_vectors", "flops_per_step", "format_preset_table", "forward_flops", "get_preset", "list_presets",
    "scatter_sum",
]
