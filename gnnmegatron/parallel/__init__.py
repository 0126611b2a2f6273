"""gnnmegatron.parallel."""
