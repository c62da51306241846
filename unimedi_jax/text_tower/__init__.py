"""The text tower a run is set up with: a local Hugging Face BERT read from disk, or a
from-scratch one with its WordPiece vocabulary; the flax module itself is ``models/text.py``."""
