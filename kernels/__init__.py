"""Triton kernels and their launchers (installed as ``gnnmegatron.kernels``).

One op per module, named ``_<op>_fwd_kernel`` (jit) -> ``<op>_fwd`` (launcher); the autograd
Functions and public ops live in ``gnnmegatron.ops``:

* ``segment_reduce``: CSR segment sum / mean / max.
* ``fused_message``: fused message aggregation forward and recomputing backward.
* ``edge_vector``: per-destination sum of scaled edge vectors.

Import only where triton is wanted: ``TRITON_INTERPRET=1`` must be set before the import to
run the kernels on CPU (triton reads it when a kernel is decorated).
"""
