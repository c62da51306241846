"""Evaluators: retrieval, zero-shot, linear probe, slice-selection hit rate."""
