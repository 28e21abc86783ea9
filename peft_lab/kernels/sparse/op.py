"""The sparse-delta linear as one autograd op: y = x·(W + S)^T + b, gradients for x, the values (and W, b).

S is zero except at a `SparsePattern`'s positions, where it holds `values` (SpIEL's "linear-sd",
https://arxiv.org/abs/2401.16405; docs/kernels.md). The dense
parts are ordinary matmuls (x·W^T, dy·W); the sparse parts go to a backend with the four functions of
`reference.py`. Nothing of size (out, in) is built: the value gradient is the SDDMM
`dvalues[k] = sum_b dy[b, rows[k]] · x[b, cols[k]]`, and only x, W (a reference), the values and the pattern
are saved for the backward.

Backends: Triton on CUDA when Triton imports; on the CPU, sparse BLAS through `torch.sparse` CSR (`csr.py`,
17-24x faster than the reference on MiniLM-sized layers); the plain PyTorch reference (the spec) elsewhere.
The environment variable PEFT_LAB_SPARSE_BACKEND=auto|triton|csr|reference (read at every call) forces one;
`triton` on CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported.
"""

from __future__ import annotations

import functools
import logging
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

log = logging.getLogger(__name__)

BACKEND_ENV = "PEFT_LAB_SPARSE_BACKEND"
BACKENDS = ("auto", "triton", "csr", "reference")


_triton_error: list[str] = []  # why the Triton backend could not be imported (set by _triton_module)


@functools.lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    """The Triton backend, imported on first use; None when Triton is missing or broken (e.g. no CUDA build)."""
    _triton_error.clear()
    try:
        from peft_lab.kernels.sparse import triton_kernels
    except Exception as e:  # ImportError, or a Triton that fails at import on this platform: kept to be reported
        _triton_error.append(f"{type(e).__name__}: {e}")
        return None
    return triton_kernels


@functools.lru_cache(maxsize=1)
def _warn_reference_on_cuda() -> None:
    """Once per process: CUDA tensors take the slow reference path because Triton is unavailable, and why."""
    log.warning(
        "sparse_linear: the Triton kernels could not be imported (%s); CUDA tensors use the pure-PyTorch reference, "
        "which is much slower. Install Triton (pip install 'peft-lab[kernels]') to use the kernels.",
        _triton_error[0] if _triton_error else "unknown reason",
    )


def backend_for(*tensors: torch.Tensor) -> str:
    """The backend a call on these tensors would use: "triton", "csr" or "reference" (see the module docstring)."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise UserError(f"{BACKEND_ENV}={choice!r} is not a backend; use one of {', '.join(BACKENDS)}.")
    if choice in ("reference", "csr"):
        return choice
    if choice == "auto":
        if all(t.device.type == "cpu" for t in tensors):  # decided before importing Triton: CPU runs never pay for it
            return "csr"
        if not all(t.is_cuda for t in tensors):
            return "reference"
        tk = _triton_module()
        if tk is None:
            _warn_reference_on_cuda()
            return "reference"
        return "triton" if all(t.dtype in tk.DTYPES for t in tensors if t.is_floating_point()) else "reference"
    if _triton_module() is None:
        raise UserError(
            f"{BACKEND_ENV}=triton but Triton could not be imported "
            f"({_triton_error[0] if _triton_error else 'unknown'}); "
            "install it (pip install 'peft-lab[kernels]') or use the reference backend."
        )
    return "triton"


def _impl(name: str) -> ModuleType:
    if name == "csr":
        from peft_lab.kernels.sparse import csr

        return csr
    return reference if name == "reference" else _triton_module()


_WIDEN_ELEMENTS = 1 << 18  # a narrowed input is widened for the value gradient in blocks of about this many


class _SparseLinear(torch.autograd.Function):
    """Inputs 2-D and validated by `pattern_linear`; values in the pattern's row-major order."""

    @staticmethod
    def forward(ctx, x, weight, values, bias, pattern: SparsePattern, impl: ModuleType, x_saved):
        y = F.linear(x, weight, bias)  # (B, out) dense part
        xt = x.t().contiguous() if impl.FEATURE_MAJOR else x.t()  # (in, B)
        impl.linear_add_(y, xt, pattern, values)
        need_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]  # only the W and value gradients read x
        keep = (x if x_saved is None else x_saved) if need_x else None
        ctx.save_for_backward(keep, weight, values)
        ctx.pattern, ctx.impl, ctx.x_dtype = pattern, impl, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, values = ctx.saved_tensors
        pattern, impl = ctx.pattern, ctx.impl
        narrowed = x is not None and x.dtype != ctx.x_dtype  # kept in 16 bits (`saved_input_dtype`)
        need_x, need_w, need_v, need_b = ctx.needs_input_grad[:4]
        dx = dw = dv = db = None
        if need_x or need_v:
            dyt = dy.t().contiguous() if impl.FEATURE_MAJOR else dy.t()  # (out, B), shared by both kernels
        if need_x:
            dx = dy @ weight  # (B, in)
            impl.linear_t_add_(dx, dyt, pattern, values)
        if need_v and narrowed:  # widened a block of rows at a time, so no full-size copy of x comes back
            step = max(1, _WIDEN_ELEMENTS // max(1, x.shape[1]))
            for s in range(0, x.shape[0], step):
                xb = x[s : s + step].to(ctx.x_dtype)
                xt = xb.t().contiguous() if impl.FEATURE_MAJOR else xb.t()
                dyb = dy[s : s + step].t()
                part = impl.sddmm(dyb.contiguous() if impl.FEATURE_MAJOR else dyb, xt, pattern)
                dv = part if dv is None else dv.add_(part)
            dv = dv.to(values.dtype) if dv is not None else torch.zeros_like(values)
        elif need_v:
            xt = x.t().contiguous() if impl.FEATURE_MAJOR else x.t()  # re-made here: saving x costs no memory
            dv = impl.sddmm(dyt, xt, pattern).to(values.dtype)  # when the caller keeps x alive anyway
        if need_w:
            dw = dy.t() @ (x.to(ctx.x_dtype) if narrowed else x)
        if need_b:
            db = dy.sum(0)
        return dx, dw, dv, db, None, None, None


def pattern_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    pattern: SparsePattern,
    values: torch.Tensor,
    bias: torch.Tensor | None = None,
    saved_input_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x·(W + S)^T + b for a pattern built once (the fast path for repeated calls, e.g. every training step).

    Args:
        x: (..., in) input.
        weight: (out, in), same dtype and device as x.
        pattern: positions of S over a weight of shape (out, in).
        values: (nnz,) in the order the pattern was built from; any float dtype (float32 values with
            bfloat16 x keep float32 master values; their gradient comes back in float32).
        bias: optional (out,).
        saved_input_dtype: keep x for the backward in this narrower float dtype (e.g. torch.bfloat16 halves
            what a float32 layer keeps). The forward and dx are unchanged; the value (and weight) gradients
            then see x rounded to that dtype. Calls on the same x tensor (e.g. query and value projections of
            one attention input) share one narrowed copy. None keeps x as it is.
    Returns:
        (..., out) in x's dtype (the autocast dtype under autocast).
    """
    _check_inputs(x, weight, pattern, values, bias)
    _check_saved_dtype(saved_input_dtype, pattern.where)
    if torch.is_autocast_enabled(x.device.type):
        # autocast would otherwise cast inside F.linear only; cast the dense operands once, then run unautocast
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return pattern_linear(x, weight, pattern, values, bias, saved_input_dtype)
    impl = _impl(backend_for(x, weight, values))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_saved = None
    if (
        saved_input_dtype is not None
        and saved_input_dtype != x.dtype
        and torch.is_grad_enabled()
        and (values.requires_grad or weight.requires_grad)
    ):
        x_saved = _narrowed(x, x2, saved_input_dtype)
    y = _SparseLinear.apply(x2, weight, pattern.sort_values(values), bias, pattern, impl, x_saved)
    return y.reshape(*lead, weight.shape[0])


# x -> (x's version, dtype, narrowed 2-D copy), keyed weakly by tensor identity: the projections that read one
# input (query, key, value) keep one narrowed copy between them; the entry goes when x does.
_NARROWED = WeakTensorKeyDictionary()


def _narrowed(x: torch.Tensor, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if x.is_inference():  # no version counter: no sharing
        return x2.detach().to(dtype)
    hit = _NARROWED.get(x)
    if hit is not None and hit[0] == x._version and hit[1] == dtype and hit[2].shape == x2.shape:
        return hit[2]
    copy = x2.detach().to(dtype)
    _NARROWED[x] = (x._version, dtype, copy)
    return copy


def _check_saved_dtype(dtype, where: str) -> None:
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        raise UserError(f"{where}: saved_input_dtype must be torch.bfloat16, torch.float16 or None, got {dtype!r}.")


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None = None,
    saved_input_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x·(W + S)^T + b where S is zero except S[rows[k], cols[k]] = values[k].

    Differentiable in x and values (and weight/bias when they require grad); never builds a dense copy of
    W + S. The indices are validated and sorted into a `SparsePattern` (range, duplicates: one device sync)
    the first time a (rows, cols) pair of tensors is seen, and again only after either changes in place
    (tracked by the tensors' version counters; writes through `.data` bypass them). Or build a
    `SparsePattern` yourself and call `pattern_linear`.

    Args:
        x: (..., in); weight: (out, in); rows, cols: (nnz,) int32/int64 in any order, no duplicate
        positions; values: (nnz,) float; bias: optional (out,); saved_input_dtype: see `pattern_linear`.
    Returns:
        (..., out).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UserError(f"sparse_linear: weight must be a 2-D (out, in) tensor, got {_describe(weight)}.")
    pattern = _pattern_for(rows, cols, tuple(weight.shape))
    return pattern_linear(x, weight, pattern, values, bias, saved_input_dtype)


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
