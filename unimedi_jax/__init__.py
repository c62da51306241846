"""UniMedI in JAX/Flax: unified 2D + 3D medical vision-language pre-training."""
