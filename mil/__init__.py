"""Slide-level multiple-instance learning: bags of tile embeddings to predictions."""

__version__ = "0.1.0"
