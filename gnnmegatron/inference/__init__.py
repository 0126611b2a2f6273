"""gnnmegatron.inference: use trained models — loading, the ASE calculator, batched prediction, model cards.

* ``load_model(path)``: a checkpoint file or run directory -> (``AtomisticModel``, ``ModelInfo``);
  checkpoint formats are dispatched through a registry (``register_checkpoint_format``).
* ``GNNMegatronCalculator(path)``: ASE calculator (energy, free_energy, energies, forces, stress)
  with a Verlet-skin neighbour list; ``source=NAME`` picks the source of a multi-source model.
* ``predict(model, inputs, "out.npz")``: batched inference over a graph store or an ASE file,
  with per-structure errors against references.
* ``evaluate_checkpoint(run, stores)``: the trainer's validation metrics of a checkpoint on graph
  stores, with the baselines, as JSON and a parity plot (``gnnmegatron evaluate``).
* Each loads the moving average of the weights when the checkpoint has one (``weights="raw"``
  for the trained weights) and a run's latest checkpoint, or with ``best=True`` its best.
* ``write_model_card`` / ``read_model_card``: the JSON + Markdown card beside each checkpoint.
"""

from gnnmegatron.inference.calculator import GNNMegatronCalculator, UnknownElementError
from gnnmegatron.inference.loading import (
    CheckpointFormat,
    ModelInfo,
    ModelLoadError,
    UnknownSourceError,
    checkpoint_formats,
    load_model,
    register_checkpoint_format,
)
from gnnmegatron.training.model_card import read_model_card, write_model_card
from gnnmegatron.inference.predict import predict
from gnnmegatron.inference.evaluate import evaluate_checkpoint

__all__ = [
    "CheckpointFormat", "GNNMegatronCalculator", "ModelInfo", "ModelLoadError", "UnknownElementError", "UnknownSourceError",
    "checkpoint_formats", "evaluate_checkpoint", "load_model", "predict", "read_model_card", "register_checkpoint_format",
    "write_model_card",
]
