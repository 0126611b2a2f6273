"""gnnmegatron: Megatron-style parallelism toolkit for atomistic graph neural networks."""

__version__ = "0.1.0"
