"""Training: the run config, the launch environment, the trainer loop, metrics and checkpoints."""
