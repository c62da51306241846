"""Experiments that train and evaluate many runs: the ablation of the paper's components."""
