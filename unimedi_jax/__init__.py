"""UniMedI in JAX/Flax: unified 2D + 3D medical vision-language pre-training."""

import os
import sys

# transformers advises at import that PyTorch is missing, which a JAX install means; not ours.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

if sys.argv[:1] == ["-m"]:  # `python -m unimedi_jax.<command>`, before the command imports JAX
    from unimedi_jax.core.host_memory import restart_with_huge_pages

    restart_with_huge_pages()
