"""Custom kernels beside their PyTorch references."""

from peft_lab.kernels.sparse.op import sparse_linear

__all__ = ["sparse_linear"]
