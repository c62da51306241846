"""What training is built from: TrainState, the compiled step, checkpoints, the loop's parts."""
