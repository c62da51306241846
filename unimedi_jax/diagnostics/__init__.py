"""Measurements and checks of the trainer: step and encoder speed, one step on another backend,
exact resume under SIGKILL. The libraries of the benchmark, device_check and soak commands."""
