"""Inner products of a merge's inputs per vector of a tensor, for the spherical methods (model_stock, nuslerp,
multislerp, karcher).

Those methods treat a tensor as one vector or as a set of vectors and need, per vector g, the Gram matrix
G[g]_ij = <x_i, x_j> of their N inputs (norms, cosines); the merged vector is then a linear combination of the
inputs with coefficients computed from G[g]. The ways a tensor of shape (d0, ..., dk) is split:

    tensor   one vector (the flattened tensor)
    rows     vectors along the last dimension: numel / dk of them (a 1-D tensor is one row)
    cols     vectors along the first dimension: numel / d0 of them (mergekit's nuslerp "row-wise", which
             transposes dims 0 and -1 and works along the last)

`Grams` accumulates G chunk by chunk (float32 within a chunk, float64 across chunks); `rows` needs chunks that
hold whole rows (`unit`, for `MergeMethod.chunk_unit`). `per_element` spreads per-vector coefficients over the
elements of a chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["GROUPINGS", "Grams", "group_count", "unit", "per_element"]

GROUPINGS = ("tensor", "rows", "cols")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def group_count(shape: Sequence[int], grouping: str) -> int:
    """How many vectors a tensor of `shape` splits into."""
    if grouping == "tensor" or len(shape) <= 1:
        return 1
    n = _numel(shape)
    return n // shape[-1] if grouping == "rows" else n // shape[0]


def unit(shape: Sequence[int], grouping: str) -> int:
    """Elements per chunk unit: a whole row for `rows` (so that no row straddles two chunks), else 1."""
    if grouping != "rows":
        return 1
    return _numel(shape) if len(shape) <= 1 else max(1, shape[-1])


def _ids(shape: Sequence[int], start: int, n: int) -> torch.Tensor:
    """The column-vector index of each element of the chunk [start, start + n) (`cols`)."""
    period = group_count(shape, "cols")
    return torch.arange(start, start + n, dtype=torch.int64).remainder_(period)


class Grams:
    """G[g]_ij = Σ over the elements of vector g of x_i·x_j, for N inputs, as a (groups, N, N) float64 tensor."""

    def __init__(self, shape: Sequence[int], grouping: str, n: int):
        self.shape, self.grouping, self.n = tuple(shape), grouping, n
        self.G = torch.zeros(group_count(shape, grouping), n, n, dtype=torch.float64)

    def add(self, start: int, xs: Sequence[torch.Tensor]) -> None:
        """Accumulate one chunk (flat float32 slices of the N inputs starting at element `start`)."""
        X = torch.stack([x.reshape(-1) for x in xs])  # (N, m)
        m = X.shape[1]
        if m == 0:
            return
        if self.G.shape[0] == 1:
            self.G[0] += (X @ X.T).double()
        elif self.grouping == "rows":
            L = unit(self.shape, "rows")
            rows = X.reshape(self.n, m // L, L).transpose(0, 1)  # (r, N, L)
            g0 = start // L
            self.G[g0 : g0 + rows.shape[0]] += torch.bmm(rows, rows.transpose(1, 2)).double()
        else:
            ids = _ids(self.shape, start, m)
            for i in range(self.n):
                for j in range(i, self.n):
                    p = torch.zeros(self.G.shape[0], dtype=torch.float64).index_add_(0, ids, (X[i] * X[j]).double())
                    self.G[:, i, j] += p
                    if j != i:
                        self.G[:, j, i] += p


def per_element(coef: torch.Tensor, shape: Sequence[int], grouping: str, start: int, n: int) -> torch.Tensor | float:
    """Per-vector coefficients (groups,) as a factor for the chunk [start, start + n): a float when the tensor is one
    vector, else a float32 tensor of n values (one per element: its vector's coefficient)."""
    if coef.numel() == 1:
        return float(coef.reshape(-1)[0])
    c = coef.to(torch.float32)
    if grouping == "rows":
        L = unit(shape, "rows")
        return c[start // L : (start + n) // L].repeat_interleave(L)
    return c[_ids(shape, start, n)]
