"""gnnmegatron.ops."""
