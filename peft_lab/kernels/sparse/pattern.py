"""The sparsity pattern of a sparse delta S over an (out, in) weight: which entries (rows[k], cols[k]) it touches.

Built once per index set and reused every step (an adapter rebuilds it only when it reselects indices).
Construction validates the indices (range, duplicates: one device sync) and lays them out the way the
kernels read them:

- row-major order (CSR): `rows`/`cols` sorted by (row, col), entries of row r at `row_ptr[r]:row_ptr[r+1]`;
  used by the forward `y += x·S^T`, the SDDMM and the scatter `W += alpha·S`;
- column-major order (CSC), built on first use and cached: `csc()` gives the permutation from row-major to
  column-major entries and `col_ptr`; used by the input gradient `dx += dy·S`.

Indices the caller gives out of order are sorted; `order` records the sort so values follow
(`values_sorted = values[order]`). Duplicates are refused: a scatter would add them, a gather would not, so
the forward and the backward would disagree about what S is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peft_lab.errors import UserError

__all__ = ["SparsePattern"]

_INT32_MAX = 2**31 - 1


class SparsePattern:
    """Validated, row-major sorted, duplicate-free positions of a sparse delta over a weight of shape (out, in).

    Args:
        rows: (nnz,) int32/int64 row of each entry, in [0, out).
        cols: (nnz,) int32/int64 column of each entry, in [0, in).
        shape: (out, in) of the weight.
        where: names the weight in error messages (e.g. a parameter name).

    Attributes:
        rows, cols: (nnz,) int32, sorted by (row, col).
        row_ptr: (out + 1,) int64; the entries of row r are `row_ptr[r]:row_ptr[r + 1]`.
        order: (nnz,) int64 with `sorted[k] = given[order[k]]`, or None when the input was already sorted.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, shape: Sequence[int], *, where: str = "sparse delta"):
        self.where = where
        self.shape = _check_shape(shape, where)
        out_f, in_f = self.shape
        _check_index(rows, "rows", where)
        _check_index(cols, "cols", where)
        if rows.shape != cols.shape:
            raise UserError(
                f"{where}: rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must have the same length "
                "(one (row, col) pair per value)."
            )
        if rows.device != cols.device:
            raise UserError(f"{where}: rows are on {rows.device} but cols on {cols.device}; put both on one device.")
        _check_range(rows, out_f, "rows", "row", where, self.shape)
        _check_range(cols, in_f, "cols", "column", where, self.shape)

        keys = rows.long() * in_f + cols.long()  # flat row-major position, int64: out*in may pass 2**31
        self.order: torch.Tensor | None = None
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):  # strictly increasing = sorted and unique
            keys, self.order = torch.sort(keys, stable=True)
            dup = (keys[1:] == keys[:-1]).nonzero()
            if dup.numel():
                k = int(keys[int(dup[0, 0])])
                raise UserError(
                    f"{where}: {dup.numel()} duplicate (row, col) position(s), first ({k // in_f}, {k % in_f}); "
                    "each position may appear once (add duplicate values together before passing them)."
                )
        self.rows = torch.div(keys, in_f, rounding_mode="floor").to(torch.int32)
        self.cols = (keys % in_f).to(torch.int32)
        self.row_ptr = _segment_ptr(self.rows, out_f)
        self._csc: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_flat(cls, indices: torch.Tensor, shape: Sequence[int], *, where: str = "sparse delta") -> SparsePattern:
        """From flat row-major indices into the weight (the `Sparse` leaf's format): row = i // in, col = i % in."""
        out_f, in_f = _check_shape(shape, where)
        _check_index(indices, "indices", where)
        _check_range(indices, out_f * in_f, "indices", "flat index", where, (out_f, in_f))
        idx = indices.long()
        return cls(torch.div(idx, in_f, rounding_mode="floor"), idx % in_f, (out_f, in_f), where=where)

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def flat(self) -> torch.Tensor:
        """(nnz,) int64 flat row-major indices, sorted."""
        return self.rows.long() * self.shape[1] + self.cols.long()

    def csc(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Column-major layout, built once: (perm, rows_c, cols_c, col_ptr).

        `perm` (nnz,) int64 maps column-major position j to row-major position perm[j]; rows_c/cols_c (nnz,)
        int32 are the entries in column-major order; col_ptr (in + 1,) int64. Costs 16 bytes per entry, kept for
        the pattern's lifetime so the backward does not sort every step.
        """
        if self._csc is None:
            out_f, in_f = self.shape
            keys, perm = torch.sort(self.cols.long() * out_f + self.rows.long())
            cols_c = torch.div(keys, out_f, rounding_mode="floor").to(torch.int32)
            self._csc = (perm, (keys % out_f).to(torch.int32), cols_c, _segment_ptr(cols_c, in_f))
        return self._csc

    def sort_values(self, values: torch.Tensor) -> torch.Tensor:
        """Values in the caller's order -> row-major order (differentiable; a no-op when the input was sorted)."""
        return values if self.order is None else values[self.order]

    def unsort_values(self, values: torch.Tensor) -> torch.Tensor:
        """Row-major order -> the caller's order (inverse of `sort_values`)."""
        if self.order is None:
            return values
        out = torch.empty_like(values)
        out[self.order] = values
        return out

    @property
    def nbytes(self) -> int:
        ts = [self.rows, self.cols, self.row_ptr] + ([self.order] if self.order is not None else [])
        ts += list(self._csc or ())
        return sum(t.numel() * t.element_size() for t in ts)

    def check_values(self, values: torch.Tensor, name: str = "values") -> None:
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != self.nnz:
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise UserError(
                f"{self.where}: {name} must be a 1-D tensor of {self.nnz} entries (one per position), got {got}."
            )
        if not values.is_floating_point():
            raise UserError(f"{self.where}: {name} must be floating point, got {values.dtype}.")
        if values.device != self.device:
            raise UserError(
                f"{self.where}: {name} are on {values.device} but the indices on {self.device}; "
                "move them to one device."
            )

    def __repr__(self) -> str:
        return f"SparsePattern(shape={self.shape}, nnz={self.nnz}, device={self.device})"


def _segment_ptr(sorted_ids: torch.Tensor, n: int) -> torch.Tensor:
    """ptr (n + 1,) int64 with the entries of id i at ptr[i]:ptr[i+1] of a sorted id vector."""
    counts = torch.bincount(sorted_ids.long(), minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=sorted_ids.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def _check_shape(shape: Sequence[int], where: str) -> tuple[int, int]:
    try:
        out_f, in_f = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise UserError(f"{where}: the weight shape must be (out, in), got {shape!r}.") from None
    if out_f <= 0 or in_f <= 0 or out_f > _INT32_MAX or in_f > _INT32_MAX:
        raise UserError(f"{where}: the weight shape must be two positive sizes below 2**31, got {(out_f, in_f)}.")
    return out_f, in_f


def _check_index(t: torch.Tensor, name: str, where: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise UserError(f"{where}: {name} must be a tensor, got {type(t).__name__}.")
    if t.dtype not in (torch.int32, torch.int64):
        raise UserError(f"{where}: {name} must be int32 or int64, got {t.dtype} (convert with .long()).")
    if t.dim() != 1:
        raise UserError(f"{where}: {name} must be 1-D, got shape {tuple(t.shape)} (flatten it, or pass rows and cols).")


def _check_range(t: torch.Tensor, n: int, name: str, what: str, where: str, shape: tuple[int, int]) -> None:
    if t.numel() == 0:
        return
    bad = ((t < 0) | (t >= n)).nonzero()
    if bad.numel():
        k = int(bad[0, 0])
        raise UserError(
            f"{where}: {name}[{k}] = {int(t[k])} is not a valid {what} for a weight of shape {shape} "
            f"(must lie in [0, {n})); {bad.numel()} entr{'y is' if bad.numel() == 1 else 'ies are'} out of range. "
            "Check that the indices belong to this weight."
        )
