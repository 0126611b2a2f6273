"""Pieces shared by the three fused-message kernels (forward, backward, double backward)."""

from __future__ import annotations

import torch

from ._common import DTYPE_NAMES, pow2
from .codes import MAX_K

# Interpreter configuration (tests may change it, e.g. BLOCK_F below F to run several F slices).
INTERPRET_CONFIG = {"BLOCK_E": 16, "BLOCK_F": 16}
BLOCK_KS = (16, 32, 64)


def interpret_config(cls) -> dict:
    return dict(INTERPRET_CONFIG)


def block_k(K: int) -> int:
    if K > MAX_K:
        raise ValueError(f"the triton fused-message kernels take K <= {MAX_K} radial functions, got K={K}; "
                         f"use backend='torch'")
    return pow2(K, lo=16)


def kernel_class(dtype: torch.dtype, K: int) -> tuple[str, int]:
    """(dtype name, BLOCK_K): the class whose audited configs a launch may use."""
    return DTYPE_NAMES[dtype], block_k(K)
