"""gnnmegatron.training."""
