"""Sparse-delta linear: reference (the spec), Triton kernels, dispatching autograd op, benchmark."""
