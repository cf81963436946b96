"""Models: the hybrid ConvNeXt + Transformer, transfer-learning baselines, ensemble, checkpoints."""
