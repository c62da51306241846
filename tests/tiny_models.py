"""Tiny model sizes the tests share: small enough that init and compile stay fast on a CPU.

Imported as ``tests.tiny_models`` (the repository root is on ``sys.path``: pytest's
``pythonpath = ["."]``, and the working directory of the tests' subprocesses).
"""

# VisionTransformer kwargs: 4x4 patches of 8x8 on a 32x32 image, 4x2x2 of 2x8x8 on a volume.
TINY_VIT = dict(
    width=32,
    depth=2,
    num_heads=4,
    mlp_dim=64,
    patch_2d=(8, 8),
    patch_3d=(2, 8, 8),
    image_size=(32, 32),
    volume_size=(8, 16, 16),
    pixel_mean=0.5,
    pixel_std=0.25,
)

# BertConfig kwargs (ours and transformers'), but for the vocabulary, which each test sets.
TINY_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    type_vocab_size=2,
)
