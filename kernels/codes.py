"""Integer codes and limits shared by the kernels and the ops (plain Python: importing this module
does not import triton, so ``gnnmegatron.ops`` can use it on machines without triton).
"""

ACTIVATIONS = ("silu", "gelu", "tanh", "softplus")
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
"""Integer code of each activation in the kernels (the runtime ``ACT`` argument)."""

REDUCE_CODE = {"sum": 0, "mean": 1, "max": 2}
"""``REDUCE`` constexpr of the segment-reduce kernel."""

MAX_K = 64
"""Largest radial width K the fused-message kernels take: the whole [K, BLOCK_F] slice of C
stays in registers as one ``tl.dot`` operand (BLOCK_K = 16, 32 or 64). The ops send larger K
to the torch backend when the backend is chosen automatically."""
