"""Benchmark harness, memory planner and performance model (``gnnmegatron bench``, ``gnnmegatron plan``)."""
