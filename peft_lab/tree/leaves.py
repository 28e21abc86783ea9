"""Leaves of a parameter tree.

Every leaf answers the same four members, so callers never branch on its type:

- `shape`      the shape of the (dense) tensor it stands for;
- `nbytes`     bytes it occupies as stored (factors, not the dense product);
- `dense(dtype=torch.float32)`  the dense tensor (computed in float32, cast once);
- `add_to(weight, alpha=1.0)`   `weight += alpha * dense()` in place, without building the dense
  tensor when the structure allows it (sparse scatter) — used to apply deltas and to merge/unmerge.

Structured deltas (`LowRank`, `Kronecker`, `Sparse`, `LDU`) also round-trip through disk via
`factors()` / `meta()` / `Leaf.from_factors(kind, factors, meta)`: a leaf named `p` is stored as the keys
`p.<factor>` and its kind + meta go into the safetensors header (see `peft_lab.tree.save`).

`Lazy` is file-backed (a tensor of a safetensors file, read into memory on demand) and `Thunk` is a computation
over other leaves that runs only when `dense()` is called: `tree.ops.delta` and `tree.ops.tree_map` return thunks, so
building a task-vector tree reads nothing, and a merge streams tensor by tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from peft_lab.tree.safetensors import read_tensor

__all__ = [
    "Leaf",
    "Dense",
    "Lazy",
    "Thunk",
    "LowRank",
    "Kronecker",
    "Sparse",
    "LDU",
    "LEAF_KINDS",
    "as_leaf",
]

Shape = tuple[int, ...]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


class Leaf:
    """Base class: subclasses set `kind` and implement `shape`, `nbytes`, `dense`; `add_to` has a default."""

    kind: ClassVar[str] = "leaf"
    shape: Shape
    dtype: torch.dtype  # the storage dtype of the tensor this leaf stands for

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def add_to(self, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """`weight += alpha * self` in place (float32 arithmetic, one cast back); returns `weight`."""
        _check_target(self, weight)
        d = self.dense(torch.float32)
        if weight.dtype == torch.float32:
            weight.add_(d, alpha=alpha)
        else:
            weight.copy_((weight.float() + alpha * d).to(weight.dtype))
        return weight

    # --- on-disk form of structured leaves ---
    def factors(self) -> dict[str, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} has no factored on-disk form")

    def meta(self) -> dict[str, Any]:
        return {"shape": list(self.shape)}

    @staticmethod
    def from_factors(kind: str, factors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Leaf:
        try:
            cls = LEAF_KINDS[kind]
        except KeyError:
            raise ValueError(f"unknown leaf kind {kind!r}; known: {sorted(LEAF_KINDS)}") from None
        return cls._from_factors(factors, meta)

    @classmethod
    def _from_factors(cls, factors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Leaf:
        raise TypeError(f"{cls.__name__} cannot be built from factors")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"


def _check_target(leaf: Leaf, weight: torch.Tensor) -> None:
    if tuple(weight.shape) != tuple(leaf.shape):
        raise ValueError(f"cannot add a {leaf!r} into a weight of shape {tuple(weight.shape)}")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Full tensors
# ---------------------------------------------------------------------------------------------------------
class Dense(Leaf):
    """An in-memory tensor (a full parameter or a dense delta)."""

    kind = "dense"

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        return _cast(self.tensor, dtype)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"": self.tensor}

    @classmethod
    def _from_factors(cls, factors, meta):
        return cls(factors[""])


class Lazy(Leaf):
    """A tensor inside a safetensors file, read (into a fresh tensor, nothing memory-mapped) only when asked for."""

    kind = "lazy"

    def __init__(self, path: str, key: str, dtype: torch.dtype, shape: Sequence[int]):
        self.path, self.key = str(path), key
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        return _cast(read_tensor(self.path, self.key, self.dtype, self.shape), dtype)

    def __repr__(self) -> str:
        return f"Lazy({self.path}:{self.key}, shape={self.shape}, dtype={self.dtype})"


class Thunk(Leaf):
    """A tensor computed from other leaves on demand: `fn(*[leaf.dense(float32) for leaf in inputs])`.

    `shape` and `dtype` are declared up front (the output's), so a tree of thunks can be checked and its
    output file header written before anything is computed.
    """

    kind = "thunk"

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: Sequence[Leaf],
        shape: Sequence[int],
        dtype: torch.dtype,
        name: str = "",
    ):
        self.fn, self.inputs = fn, tuple(inputs)
        self.shape, self.dtype, self.name = tuple(shape), dtype, name

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        out = self.fn(*[leaf.dense(torch.float32) for leaf in self.inputs])
        return _cast(out, dtype)

    def __repr__(self) -> str:
        return f"Thunk({getattr(self.fn, '__name__', 'fn')}, shape={self.shape}, dtype={self.dtype})"


# ---------------------------------------------------------------------------------------------------------
# Structured deltas
# ---------------------------------------------------------------------------------------------------------
class LowRank(Leaf):
    """`ΔW = scale · B @ A` with B (out, r) and A (r, in). Conv weights: A (r, in, *k), B (out, r, 1, 1)
    (flattened to matrices, product reshaped to `shape`)."""

    kind = "low_rank"

    def __init__(self, B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, shape: Sequence[int] | None = None):
        self.B, self.A, self.scale = B, A, float(scale)
        if B.shape[1] != A.shape[0]:
            raise ValueError(f"LowRank factors do not chain: B {tuple(B.shape)}, A {tuple(A.shape)}")
        self.shape = tuple(shape) if shape is not None else (B.shape[0], *A.shape[1:])
        if _numel(self.shape) != B.shape[0] * _numel(A.shape[1:]):
            raise ValueError(f"LowRank product {B.shape[0]}x{_numel(A.shape[1:])} cannot take shape {self.shape}")
        self.dtype = A.dtype

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        B = self.B.reshape(self.B.shape[0], -1).float()
        A = self.A.reshape(self.A.shape[0], -1).float()
        return _cast((self.scale * (B @ A)).reshape(self.shape), dtype)

    def factors(self):
        return {"A": self.A, "B": self.B}

    def meta(self):
        return {"shape": list(self.shape), "scale": self.scale}

    @classmethod
    def _from_factors(cls, factors, meta):
        return cls(factors["B"], factors["A"], meta.get("scale", 1.0), meta.get("shape"))


class Kronecker(Leaf):
    """`ΔW = scale · kron(A, B)` with A (o1, i1), B (o2, i2): `ΔW[p·o2 + q, j·i2 + l] = scale · A[p, j] · B[q, l]`.

    Convolutions: B is (o2, i2, *k) or its flattening (o2, i2·prod(k)); the product is reshaped to `shape`
    (out, in, *k), which is the same thing as the Kronecker product with A expanded by singleton kernel dims.
    """

    kind = "kronecker"

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, shape: Sequence[int] | None = None):
        if A.dim() != 2:
            raise ValueError(f"Kronecker factor A must be 2-D, got {tuple(A.shape)}")
        self.A, self.B, self.scale = A, B, float(scale)
        if shape is None:
            shape = (A.shape[0] * B.shape[0], A.shape[1] * B.shape[1], *B.shape[2:])
        self.shape = tuple(int(s) for s in shape)
        if _numel(self.shape) != A.numel() * B.numel():
            raise ValueError(f"kron({tuple(A.shape)}, {tuple(B.shape)}) cannot take shape {self.shape}")
        self.dtype = B.dtype

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        K = torch.kron(self.A.float(), self.B.reshape(self.B.shape[0], -1).float())
        return _cast((self.scale * K).reshape(self.shape), dtype)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ ΔW^T` for 2-D ΔW without forming it: `y.view(o1, o2) = scale · A X B^T` with X = x.view(i1, i2)."""
        (o1, i1), (o2, i2) = self.A.shape, self.B.shape[:2]
        X = x.reshape(-1, i1, i2).float()
        Y = torch.einsum("pj,njl,ql->npq", self.A.float(), X, self.B.float())
        return (self.scale * Y).reshape(*x.shape[:-1], o1 * o2)

    def factors(self):
        return {"A": self.A, "B": self.B}

    def meta(self):
        return {"shape": list(self.shape), "scale": self.scale}

    @classmethod
    def _from_factors(cls, factors, meta):
        return cls(factors["A"], factors["B"], meta.get("scale", 1.0), meta.get("shape"))


class Sparse(Leaf):
    """`ΔW` zero except `ΔW.view(-1)[indices[k]] = values[k]` (flat row-major indices, unique).

    For a 2-D weight of shape (out, in): row = idx // in, col = idx % in. Indices are int32 when the weight
    has fewer than 2**31 entries (half the memory of int64), int64 otherwise.
    """

    kind = "sparse"

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, shape: Sequence[int]):
        if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
            raise ValueError(
                "Sparse needs 1-D indices and values of equal length, "
                f"got {tuple(indices.shape)} and {tuple(values.shape)}"
            )
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"Sparse indices must be int32 or int64, got {indices.dtype}")
        self.indices, self.values = indices, values
        self.shape = tuple(int(s) for s in shape)
        self.dtype = values.dtype

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return self.indices.numel() * self.indices.element_size() + self.values.numel() * self.values.element_size()

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=torch.float32, device=self.values.device)
        out.index_put_((self.indices.long(),), self.values.float(), accumulate=True)
        return _cast(out.view(self.shape), dtype)

    def add_to(self, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        _check_target(self, weight)
        if not weight.is_contiguous():
            raise ValueError("Sparse.add_to needs a contiguous weight")
        flat = weight.view(-1)
        idx = self.indices.long()
        # float32 arithmetic at the touched entries only, one cast back: O(nnz), never O(out·in)
        flat[idx] = (flat[idx].float() + alpha * self.values.float()).to(weight.dtype)
        return weight

    def factors(self):
        return {"indices": self.indices, "values": self.values}

    @classmethod
    def _from_factors(cls, factors, meta):
        return cls(factors["indices"], factors["values"], meta["shape"])


class LDU(Leaf):
    """LoLDU delta `ΔW = scale · P L diag(d) U` with P a row permutation (`(P @ M) == M[perm]`),
    L (out, r) unit-lower-trapezoidal, U (r, in) unit-upper, d = z − z0 the change of the trained diagonal.
    Conv weights are flattened to (out, in·kh·kw); `shape` restores them."""

    kind = "ldu"

    def __init__(
        self,
        perm: torch.Tensor,
        L: torch.Tensor,
        d: torch.Tensor,
        U: torch.Tensor,
        scale: float = 1.0,
        shape: Sequence[int] | None = None,
    ):
        self.perm, self.L, self.d, self.U, self.scale = perm, L, d, U, float(scale)
        self.shape = tuple(shape) if shape is not None else (L.shape[0], U.shape[1])
        self.dtype = d.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.perm, self.L, self.d, self.U))

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        M = (self.L.float() * self.d.float()) @ self.U.float()  # (out, in)
        return _cast((self.scale * M[self.perm.long()]).reshape(self.shape), dtype)

    def factors(self):
        return {"perm": self.perm, "L": self.L, "d": self.d, "U": self.U}

    def meta(self):
        return {"shape": list(self.shape), "scale": self.scale}

    @classmethod
    def _from_factors(cls, factors, meta):
        return cls(factors["perm"], factors["L"], factors["d"], factors["U"], meta.get("scale", 1.0), meta.get("shape"))


LEAF_KINDS: dict[str, type[Leaf]] = {c.kind: c for c in (Dense, LowRank, Kronecker, Sparse, LDU)}


def as_leaf(x: Any) -> Leaf:
    if isinstance(x, Leaf):
        return x
    if isinstance(x, torch.Tensor):
        return Dense(x)
    raise TypeError(f"cannot make a tree leaf from {type(x).__name__}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
