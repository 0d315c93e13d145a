"""The coordinator: reference weights, the round clock and schedules, the reference update rule,
membership, checkpoints. It handles tensors only and never builds a model."""
