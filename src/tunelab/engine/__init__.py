"""The one training loop every method runs on, with checkpointing, metrics and distribution."""
