"""SMART-IQA blind image quality assessment in JAX/Flax NNX."""

__version__ = "0.1.0"
