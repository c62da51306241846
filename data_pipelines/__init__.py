"""Files on disk -> cleaned records -> batches. Pure numpy; never imports jax."""
