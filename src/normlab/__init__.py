"""normlab: a lab for activations, gradients and Batch Normalization, built on PyTorch."""

__version__ = "0.1.0"
