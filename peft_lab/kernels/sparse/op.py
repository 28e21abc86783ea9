"""The sparse-delta linear as one autograd op: y = x·(W + S)^T + b, gradients for x, the values (and W, b).

S is zero except at a `SparsePattern`'s positions, where it holds `values` (SpIEL's "linear-sd",
https://arxiv.org/abs/2401.16405; ALGORITHMS.md A5.2). The dense
parts are ordinary matmuls (x·W^T, dy·W); the sparse parts go to a backend with the four functions of
`reference.py`. Nothing of size (out, in) is built: the value gradient is the SDDMM
`dvalues[k] = sum_b dy[b, rows[k]] · x[b, cols[k]]`, and only x, W (a reference), the values and the pattern
are saved for the backward.

Backend: Triton on CUDA when Triton imports, the PyTorch reference elsewhere (and for float64). The
environment variable PEFT_LAB_SPARSE_BACKEND=auto|triton|reference (read at every call) forces either;
`triton` on CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported.
"""

from __future__ import annotations

import functools
import os
import weakref
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakTensorKeyDictionary

from peft_lab.errors import UserError
from peft_lab.kernels.sparse import reference
from peft_lab.kernels.sparse.pattern import SparsePattern

__all__ = ["BACKEND_ENV", "BACKENDS", "backend_for", "pattern_linear", "sparse_linear", "scatter_add_"]

BACKEND_ENV = "PEFT_LAB_SPARSE_BACKEND"
BACKENDS = ("auto", "triton", "reference")


@functools.lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    """The Triton backend, imported on first use; None when Triton is missing or broken (e.g. no CUDA build)."""
    try:
        from peft_lab.kernels.sparse import triton_kernels
    except Exception:  # ImportError, or a Triton that fails at import on this platform
        return None
    return triton_kernels


def backend_for(*tensors: torch.Tensor) -> str:
    """The backend a call on these tensors would use: "triton" or "reference" (see the module docstring)."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise UserError(f"{BACKEND_ENV}={choice!r} is not a backend; use one of {', '.join(BACKENDS)}.")
    if choice == "reference":
        return "reference"
    if choice == "auto":
        if not all(t.is_cuda for t in tensors):  # decided before importing Triton: CPU runs never pay for it
            return "reference"
        tk = _triton_module()
        ok = tk is not None and all(t.dtype in tk.DTYPES for t in tensors if t.is_floating_point())
        return "triton" if ok else "reference"
    if _triton_module() is None:
        raise UserError(
            f"{BACKEND_ENV}=triton but Triton could not be imported; install it (pip install 'peft-lab[kernels]') "
            "or use the reference backend."
        )
    return "triton"


def _impl(name: str) -> ModuleType:
    return reference if name == "reference" else _triton_module()


class _SparseLinear(torch.autograd.Function):
    """Inputs 2-D and validated by `pattern_linear`; values in the pattern's row-major order."""

    @staticmethod
    def forward(ctx, x, weight, values, bias, pattern: SparsePattern, impl: ModuleType):
        y = F.linear(x, weight, bias)  # (B, out) dense part
        xt = x.t().contiguous() if impl.FEATURE_MAJOR else x.t()  # (in, B)
        impl.linear_add_(y, xt, pattern, values)
        ctx.save_for_backward(x, weight, values)
        ctx.pattern, ctx.impl = pattern, impl
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, values = ctx.saved_tensors
        pattern, impl = ctx.pattern, ctx.impl
        need_x, need_w, need_v, need_b = ctx.needs_input_grad[:4]
        dx = dw = dv = db = None
        if need_x or need_v:
            dyt = dy.t().contiguous() if impl.FEATURE_MAJOR else dy.t()  # (out, B), shared by both kernels
        if need_x:
            dx = dy @ weight  # (B, in)
            impl.linear_t_add_(dx, dyt, pattern, values)
        if need_v:
            xt = x.t().contiguous() if impl.FEATURE_MAJOR else x.t()  # re-made here: saving x costs no memory
            dv = impl.sddmm(dyt, xt, pattern).to(values.dtype)  # when the caller keeps x alive anyway
        if need_w:
            dw = dy.t() @ x
        if need_b:
            db = dy.sum(0)
        return dx, dw, dv, db, None, None


def pattern_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    pattern: SparsePattern,
    values: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·(W + S)^T + b for a pattern built once (the fast path for repeated calls, e.g. every training step).

    Args:
        x: (..., in) input.
        weight: (out, in), same dtype and device as x.
        pattern: positions of S over a weight of shape (out, in).
        values: (nnz,) in the order the pattern was built from; any float dtype (float32 values with
            bfloat16 x keep float32 master values; their gradient comes back in float32).
        bias: optional (out,).
    Returns:
        (..., out) in x's dtype (the autocast dtype under autocast).
    """
    _check_inputs(x, weight, pattern, values, bias)
    if torch.is_autocast_enabled(x.device.type):
        # autocast would otherwise cast inside F.linear only; cast the dense operands once, then run unautocast
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return pattern_linear(x, weight, pattern, values, bias)
    impl = _impl(backend_for(x, weight, values))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = _SparseLinear.apply(x2, weight, pattern.sort_values(values), bias, pattern, impl)
    return y.reshape(*lead, weight.shape[0])


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·(W + S)^T + b where S is zero except S[rows[k], cols[k]] = values[k].

    Differentiable in x and values (and weight/bias when they require grad); never builds a dense copy of
    W + S. The indices are validated and sorted into a `SparsePattern` (range, duplicates: one device sync)
    the first time a (rows, cols) pair of tensors is seen, and again only after either changes in place
    (tracked by the tensors' version counters; writes through `.data` bypass them). Or build a
    `SparsePattern` yourself and call `pattern_linear`.

    Args:
        x: (..., in); weight: (out, in); rows, cols: (nnz,) int32/int64 in any order, no duplicate
        positions; values: (nnz,) float; bias: optional (out,).
    Returns:
        (..., out).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UserError(f"sparse_linear: weight must be a 2-D (out, in) tensor, got {_describe(weight)}.")
    return pattern_linear(x, weight, _pattern_for(rows, cols, tuple(weight.shape)), values, bias)


# rows tensor -> (cols tensor, rows version, cols version, shape, pattern). Keyed weakly by tensor identity: an
# adapter that passes the same index buffers every step validates and sorts them once; an in-place change of
# either buffer (e.g. grow/drop reselection) bumps its version counter and rebuilds the pattern.
_PATTERNS = WeakTensorKeyDictionary()


def _pattern_for(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> SparsePattern:
    if not (isinstance(rows, torch.Tensor) and isinstance(cols, torch.Tensor)) or rows.is_inference():
        return SparsePattern(rows, cols, shape, where="sparse_linear")  # inference tensors have no version counter
    key = (rows._version, cols._version, shape)
    hit = _PATTERNS.get(rows)
    if hit is not None and hit[0]() is cols and hit[1:4] == key:
        return hit[4]
    pattern = SparsePattern(rows, cols, shape, where="sparse_linear")
    _PATTERNS[rows] = (weakref.ref(cols), *key, pattern)
    return pattern


@torch.no_grad()
def scatter_add_(
    weight: torch.Tensor, pattern: SparsePattern, values: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """`weight += alpha · S` in place, touching only the pattern's entries (merge: alpha=1, unmerge: -1).

    Float32 arithmetic at each entry, one rounding back to the weight's dtype. Returns weight.
    """
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != pattern.shape:
        raise UserError(f"{pattern.where}: the weight must have shape {pattern.shape}, got {_describe(weight)}.")
    pattern.check_values(values)
    if weight.device != pattern.device:
        raise UserError(f"{pattern.where}: the weight is on {weight.device} but the indices on {pattern.device}.")
    if not weight.is_floating_point():
        raise UserError(f"{pattern.where}: the weight must be floating point, got {weight.dtype}.")
    impl = _impl(backend_for(weight, values))
    return impl.scatter_add_(weight, pattern, pattern.sort_values(values), alpha)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return type(t).__name__


def _check_inputs(x, weight, pattern: SparsePattern, values, bias) -> None:
    where = pattern.where
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise UserError(f"{where}: x must be a floating-point tensor (..., in), got {_describe(x)}.")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != pattern.shape:
        raise UserError(
            f"{where}: the weight must have shape {pattern.shape} (the pattern's), got {_describe(weight)}."
        )
    out_f, in_f = pattern.shape
    if x.shape[-1] != in_f:
        raise UserError(f"{where}: x has {x.shape[-1]} features in its last dim but the weight takes {in_f}.")
    if x.dtype != weight.dtype:
        raise UserError(f"{where}: x is {x.dtype} but the weight is {weight.dtype}; cast one to the other.")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_f,) or bias.dtype != x.dtype:
            raise UserError(f"{where}: bias must be a {x.dtype} tensor of shape ({out_f},), got {_describe(bias)}.")
    pattern.check_values(values)
    for name, t in (("x", x), ("the weight", weight), ("bias", bias)):
        if t is not None and t.device != pattern.device:
            raise UserError(
                f"{where}: {name} is on {t.device} but the indices on {pattern.device}; put them on one device."
            )
