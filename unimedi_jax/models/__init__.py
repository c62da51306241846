"""Flax linen modules only: no file I/O, no training logic."""
