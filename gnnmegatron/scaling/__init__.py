"""gnnmegatron.scaling."""
