"""Custom kernels beside their PyTorch references."""

from peft_lab.kernels.sparse import SparsePattern, pattern_linear, scatter_add_, sparse_linear

__all__ = ["SparsePattern", "pattern_linear", "scatter_add_", "sparse_linear"]
