"""Triton kernels and their launchers (installed as ``gnnmegatron.kernels``).

One op per module, named ``_<op>_fwd_kernel`` (jit) -> ``<op>_fwd`` (launcher); the autograd
Functions and public ops live in ``gnnmegatron.ops`` (this package never imports it):

* ``segment_reduce``: CSR segment sum / mean / max.
* ``fused_message`` (forward), ``fused_message_bwd`` (recomputing backward, deterministic dQ
  over the source-sorted plan), ``fused_message_bwd2`` (double backward).
* ``faithful_message`` (forward), ``faithful_message_bwd`` (recomputing backward),
  ``faithful_message_bwd2`` (double backward of a force loss): the fused faithful E_GCL (the whole
  edge MLP, its sum and the coordinate MLP's scalar, tile by tile through a per-program workspace).
* ``edge_vector``: per-destination sum of scaled edge vectors.
* ``codes``: activation / reduction codes and limits (plain Python, no triton import).
* ``aot``: ahead-of-time compile and resource audit of every kernel variant
  (``python -m gnnmegatron.kernels.aot``; no GPU needed).

Import only where triton is wanted: ``TRITON_INTERPRET=1`` must be set before the import to
run the kernels on CPU (triton reads it when a kernel is decorated).
"""
