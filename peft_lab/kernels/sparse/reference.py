"""Reference (the spec) for the sparse-delta linear: y = x·(W + S)^T + b, S zero except S[rows[k], cols[k]] = values[k].

Plain PyTorch, float32 accumulation. Never builds a dense (out, in) copy of W + S or a dense gradient of W.
"""

from __future__ import annotations

import torch

__all__ = ["sparse_delta_matmul", "sddmm", "sparse_delta_matmul_t", "scatter_add_", "acc_dtype"]


def acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    """Accumulate in float32, or float64 when an input is float64 (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def sparse_delta_matmul(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, out_features: int) -> torch.Tensor:
    """x·S^T: (B, in) -> (B, out), `y[b, rows[k]] += values[k] * x[b, cols[k]]` (float32)."""
    acc = acc_dtype(x, values)
    y = torch.zeros(x.shape[0], out_features, dtype=acc, device=x.device)
    y.index_add_(1, rows.long(), x[:, cols.long()].to(acc) * values.to(acc))
    return y


def sparse_delta_matmul_t(dy: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    """dy·S: (B, out) -> (B, in), `dx[b, cols[k]] += values[k] * dy[b, rows[k]]` (float32)."""
    acc = acc_dtype(dy, values)
    dx = torch.zeros(dy.shape[0], in_features, dtype=acc, device=dy.device)
    dx.index_add_(1, cols.long(), dy[:, rows.long()].to(acc) * values.to(acc))
    return dx


def sddmm(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """dvalues[k] = sum_b dy[b, rows[k]] * x[b, cols[k]] (float32), without the dense (out, in) gradient."""
    acc = acc_dtype(dy, x)
    return (dy[:, rows.long()].to(acc) * x[:, cols.long()].to(acc)).sum(0)


def scatter_add_(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """weight[rows[k], cols[k]] += alpha * values[k] in place (float32 arithmetic, one cast back)."""
    r, c = rows.long(), cols.long()
    weight[r, c] = (weight[r, c].float() + alpha * values.float()).to(weight.dtype)
    return weight
