"""Training: TrainState, the compiled step, the loop."""
