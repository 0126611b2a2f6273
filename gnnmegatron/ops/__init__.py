"""gnnmegatron.ops: fused message-passing ops with reference, torch (CPU) and triton (GPU) backends.

Public ops (one function each; ``backend=`` or the dispatch rules pick the implementation):

* ``segment_reduce(src, index_or_ptr, num_segments, reduce)``: sum / mean / max per segment.
* ``fused_message_aggregate(P, Q, edge_index, R, C, b, w, v)``: ``m_i = sum_j w_ij act(P_i + Q_j
  + R_ij C + b)`` (+ per-edge ``s_ij = act(.) . v``) without an [E, F] tensor.
* ``faithful_message_aggregate(P, Q, edge_index, R, C, b1, W2, b2, w, Wc, bc, v)``: HydraGNN's whole
  edge MLP ``act(act(P_i + Q_j + R_ij C + b1) W2^T + b2)``, summed per receiver with ``w``, and the
  coordinate MLP's scalar ``act(a Wc^T + bc) . v``, tile by tile without an [E, H] tensor.
* ``edge_vector_aggregate(vec, g, edge_index, N)``: ``out_i = sum_j vec_ij g_ij``.

All four are ``torch.library`` custom ops (``gnnmegatron::...``) with fake implementations
and autograd (double backward included), so models using them run under ``torch.compile``.
See ``gnnmegatron.ops.dispatch`` for the backend order (argument, ``use_backend``,
``$GNNMEGATRON_OPS_BACKEND``, device) and for deterministic mode
(``torch.use_deterministic_algorithms(True)`` or ``GNNMEGATRON_DETERMINISTIC=1``).
"""

from gnnmegatron.ops.activations import ACTIVATIONS
from gnnmegatron.ops.dispatch import (
    BACKENDS,
    ENV_BACKEND,
    CSRPlan,
    OpsSettings,
    csr_plan,
    deterministic,
    resolve_backend,
    set_backend,
    settings,
    use_backend,
)
from gnnmegatron.ops.edge_vector import edge_vector_aggregate, edge_vector_aggregate_reference
from gnnmegatron.ops.faithful_message import faithful_message_aggregate, faithful_message_reference
from gnnmegatron.ops.fused_message import fused_message_aggregate, fused_message_reference
from gnnmegatron.ops.segment_reduce import REDUCTIONS, segment_reduce, segment_reduce_reference

__all__ = [
    "ACTIVATIONS", "BACKENDS", "CSRPlan", "ENV_BACKEND", "OpsSettings", "REDUCTIONS", "csr_plan", "deterministic",
    "edge_vector_aggregate", "edge_vector_aggregate_reference", "faithful_message_aggregate",
    "faithful_message_reference", "fused_message_aggregate", "fused_message_reference",
    "resolve_backend", "segment_reduce", "segment_reduce_reference", "set_backend", "settings", "use_backend",
]
