"""Conversions to other frameworks' formats (PyTorch: timm, MONAI, Hugging Face)."""
