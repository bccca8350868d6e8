"""iais_scale: distributed training of single-stream image-text retrieval models with the IAIS regularizer."""

__version__ = "0.1.0"
