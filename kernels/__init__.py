"""Triton kernels and their launchers (installed as ``gnnmegatron.kernels``)."""
