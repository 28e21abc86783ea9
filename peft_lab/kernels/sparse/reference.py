"""Reference (the spec) for the sparse-delta linear of SpIEL (arXiv 2401.16405; docs/kernels.md).

S is zero except S[rows[k], cols[k]] = values[k] over a weight W of shape (out, in); for x (B, in):
    forward          y  = x·W^T + x·S^T + b,   the sparse part  y[b, rows[k]] += values[k] · x[b, cols[k]]
    input gradient   dx = dy·W + dy·S,         the sparse part  dx[b, cols[k]] += values[k] · dy[b, rows[k]]
    value gradient   dvalues[k] = sum_b dy[b, rows[k]] · x[b, cols[k]]   (SDDMM: dy^T·x sampled at the pattern)
    merge            W[rows[k], cols[k]] += alpha · values[k]

Plain PyTorch with float32 accumulation (float64 when an input is float64, for gradcheck). The sparse parts
never build a dense (out, in) matrix: they walk the entries in chunks, so the extra memory is O(B·chunk).
The Triton kernels (`triton_kernels.py`) implement the same four functions with the same signatures; the
dense parts (x·W^T, dy·W) are plain matmuls done by the caller (`op.py`).

Operands come feature-major: `xt` is x^T (in, B) and `dyt` is dy^T (out, B), any strides (a `.t()` view is
fine here; the Triton backend wants them contiguous, see `FEATURE_MAJOR`).
"""

from __future__ import annotations

import torch

from peft_lab.kernels.sparse.pattern import SparsePattern

__all__ = ["FEATURE_MAJOR", "acc_dtype", "linear_add_", "linear_t_add_", "sddmm", "scatter_add_"]

FEATURE_MAJOR = False  # index_select handles any layout; no need to copy x^T or dy^T

# entries per step x batch rows: the (B, chunk) gathers stay under 2**22 elements (16 MB in float32)
CHUNK_ELEMENTS = 1 << 22


def acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _chunks(nnz: int, batch: int) -> tuple[range, int]:
    step = max(1, CHUNK_ELEMENTS // max(batch, 1))
    return range(0, nnz, step), step


def linear_add_(y: torch.Tensor, xt: torch.Tensor, pattern: SparsePattern, values: torch.Tensor) -> torch.Tensor:
    """y += x·S^T in place.

    Args:
        y: (B, out), the dense part x·W^T (+ b).
        xt: (in, B), the input transposed.
        pattern: the positions of S; values: (nnz,) in the pattern's row-major order.
    Returns:
        y.
    """
    return _spmm_add_(y, xt, pattern.rows, pattern.cols, values)


def linear_t_add_(dx: torch.Tensor, dyt: torch.Tensor, pattern: SparsePattern, values: torch.Tensor) -> torch.Tensor:
    """dx += dy·S in place. dx (B, in), dyt (out, B), values (nnz,) row-major. Returns dx."""
    return _spmm_add_(dx, dyt, pattern.cols, pattern.rows, values)


def _spmm_add_(out: torch.Tensor, src_t: torch.Tensor, major, minor, values) -> torch.Tensor:
    """out[b, major[k]] += values[k] · src_t[minor[k], b], accumulated in float32, one cast back."""
    nnz, batch = values.numel(), out.shape[0]
    if nnz == 0 or batch == 0:
        return out
    acc = acc_dtype(out, src_t, values)
    total = out.to(acc)  # a copy unless `out` is already in the accumulation dtype
    starts, step = _chunks(nnz, batch)
    for lo in starts:
        m, n, v = major[lo : lo + step].long(), minor[lo : lo + step].long(), values[lo : lo + step].to(acc)
        total.index_add_(1, m, src_t.index_select(0, n).t().to(acc) * v)  # (B, chunk)
    if total is not out:
        out.copy_(total)
    return out


def sddmm(dyt: torch.Tensor, xt: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """dvalues[k] = sum_b dy[b, rows[k]] · x[b, cols[k]], without the dense (out, in) gradient.

    Args:
        dyt: (out, B), the output gradient transposed; xt: (in, B), the input transposed.
    Returns:
        (nnz,) float32 (float64 for float64 inputs), row-major order.
    """
    acc = acc_dtype(dyt, xt)
    nnz, batch = pattern.nnz, dyt.shape[1]
    dv = torch.zeros(nnz, dtype=acc, device=dyt.device)
    starts, step = _chunks(nnz, batch)
    for lo in starts:
        r, c = pattern.rows[lo : lo + step].long(), pattern.cols[lo : lo + step].long()
        dv[lo : lo + step] = (dyt.index_select(0, r).to(acc) * xt.index_select(0, c).to(acc)).sum(1)  # (chunk,)
    return dv


def scatter_add_(
    weight: torch.Tensor, pattern: SparsePattern, values: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """weight[rows[k], cols[k]] += alpha · values[k] in place: float32 arithmetic at the touched entries only
    (O(nnz), never O(out·in)), rounded once to the weight's dtype. Returns weight."""
    acc = acc_dtype(weight, values)
    r, c = pattern.rows.long(), pattern.cols.long()
    weight[r, c] = (weight[r, c].to(acc) + values.to(acc) * alpha).to(weight.dtype)
    return weight
