"""Sparse-delta linear y = x·(W + S)^T + b: reference (the spec), Triton kernels, dispatching autograd op, benchmark.

- `pattern.py`: `SparsePattern`, the validated positions of S (sorted, CSR/CSC layouts);
- `reference.py`: the four sparse functions in plain PyTorch (the spec);
- `triton_kernels.py`: the same four as Triton kernels (imported lazily);
- `op.py`: `sparse_linear` / `pattern_linear` (one autograd Function, backend dispatch) and `scatter_add_`;
- `bench.py`: `python -m peft_lab.kernels.sparse.bench` (Triton vs reference vs naive vs PEFT's SHiRA).
"""

from peft_lab.kernels.sparse.op import BACKEND_ENV, backend_for, pattern_linear, scatter_add_, sparse_linear
from peft_lab.kernels.sparse.pattern import SparsePattern

__all__ = ["BACKEND_ENV", "SparsePattern", "backend_for", "pattern_linear", "scatter_add_", "sparse_linear"]
