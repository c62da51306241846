"""TFDS builders that write ArrayRecord files."""
