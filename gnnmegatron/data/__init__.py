"""gnnmegatron.data."""
