"""File names and constants of the export formats, shared by the writer (``torch_export``, which
needs jax) and the PyTorch-side reader (``unimedi_jax.torch_model``, which must not import it)."""

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MODEL_CARD = "README.md"
TEXT_DIR = "text"  # torch format: the text tower as a Hugging Face BertModel directory
LAYER_NORM_EPS = 1e-6  # vit.layer_norm; timm's ViT uses the same, MONAI's ViT 1e-5
MONAI_LAYER_NORM_EPS = 1e-5
