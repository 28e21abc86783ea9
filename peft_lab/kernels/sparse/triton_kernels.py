"""Triton kernels for the sparse-delta linear: the four functions of `reference.py`, same signatures.

Imported lazily by `op.py` (Triton is an optional dependency). Runs on CUDA tensors, or on CPU tensors when
this module was imported under `TRITON_INTERPRET=1` (the interpreter is chosen when the kernels are defined).

Cost model, which shapes the kernels. The sparse work is B·nnz multiply-adds (1% of the dense matmul at 1%
density) but it is gather-bound: each entry reads a B-long column of x (or dy) at a random feature. Operands
therefore come feature-major (x^T (in, B), dy^T (out, B), contiguous, transposed once per call by `op.py`), so
a gather of BLOCK_B batch rows is one contiguous run (64 bf16 = one 128-byte line) instead of 64 sectors.

- `_spmm_kernel` (forward y += x·S^T; and dx += dy·S on the column-major layout): one program owns an output
  tile of BLOCK_B batch rows x BLOCK_O features, walks the CSR segment of its features BLOCK_K entries at a
  time, gathers (BLOCK_B, BLOCK_K) inputs, scales them by the values and reduces them into the tile with a
  one-hot (BLOCK_K, BLOCK_O) matmul: a segmented sum on tensor cores, without atomics, deterministic. The
  tile is added to the dense result x·W^T in one coalesced read-modify-write. The one-hot matmul costs
  BLOCK_O multiply-adds per gathered element; BLOCK_O = 16 is the smallest tile `tl.dot` accepts.
- `_sddmm_kernel`: one program per BLOCK_K entries (row-major order, so neighbouring entries share rows of
  dy^T in cache) and per slice of the batch; float32 dot products over the batch; the slices write separate
  partial rows that are summed afterwards (deterministic; slices keep the GPU busy when nnz is small).
- `_scatter_kernel`: W[r, c] += delta, one entry per lane; positions are unique, so there are no races.

Every kernel masks positions outside its tensors (the pattern was validated; this is defence in depth): no
kernel reads or writes out of bounds whatever the indices hold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_lab.errors import UserError
from peft_lab.kernels.sparse.pattern import SparsePattern

__all__ = [
    "FEATURE_MAJOR",
    "INTERPRETED",
    "DTYPES",
    "usable_on",
    "linear_add_",
    "linear_t_add_",
    "sddmm",
    "scatter_add_",
]

FEATURE_MAJOR = True  # gathers along contiguous batch runs; see the module docstring
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# spmm tile: 64 batch rows x 16 features, 32 entries per step; sddmm: 32 entries x 64 batch rows per step
# (64 x 64 compiled to 249 registers a thread for sm_90, 32 x 64 to about half: more programs in flight).
# Chosen by the cost model above, not tuned on hardware (no GPU was available when they were written).
SPMM_BLOCK_B, SPMM_BLOCK_O, SPMM_BLOCK_K = 64, 16, 32
SDDMM_BLOCK_K, SDDMM_BLOCK_B = 32, 64
SCATTER_BLOCK = 1024
SDDMM_MIN_PROGRAMS = 1024  # split the batch until there are about this many programs (~8 per H100 SM)


@triton.jit
def _store_rounded(ptr, val, mask):
    """Store float32 `val` into `ptr`'s dtype, rounding to nearest even like torch.

    For bfloat16 the rounding is spelled out in integer ops: the interpreter (TRITON_INTERPRET=1, the CPU
    tests) truncates float32 -> bfloat16 where GPUs round, and the explicit form gives the same bits on both.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = val.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        hi = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
        tl.store(ptr, hi.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)


# fmt: off
@triton.jit
def _spmm_kernel(
    src_ptr, stride_src_f, stride_src_b,  # src^T (n_minor, B): the dense operand, feature-major
    out_ptr, stride_out_b, stride_out_f,  # out (B, n_major) += sum_k values[k] · src^T[minor[k], :] at major[k]
    major_ptr, minor_ptr, val_ptr, seg_ptr,  # entries sorted by major; those of feature f at seg[f]:seg[f+1]
    B, n_major, n_minor,
    BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: on
    pid_o = tl.program_id(0)  # fastest: neighbouring programs share a batch slab of src^T in L2
    pid_b = tl.program_id(1)
    o0 = pid_o * BLOCK_O
    offs_o = o0 + tl.arange(0, BLOCK_O)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    k_lo = tl.load(seg_ptr + o0)
    k_hi = tl.load(seg_ptr + tl.minimum(o0 + BLOCK_O, n_major))

    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_seg = offs_k < k_hi
        major = tl.load(major_ptr + offs_k, mask=in_seg, other=-1)
        minor = tl.load(minor_ptr + offs_k, mask=in_seg, other=0)
        ok = in_seg & (minor >= 0) & (minor < n_minor)
        v = tl.load(val_ptr + offs_k, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(  # (BLOCK_B, BLOCK_K): each column one contiguous run of src^T
            src_ptr + minor.to(tl.int64)[None, :] * stride_src_f + offs_b.to(tl.int64)[:, None] * stride_src_b,
            mask=mask_b[:, None] & ok[None, :],
            other=0.0,
        ).to(tl.float32)
        onehot = (major[:, None] == offs_o[None, :]).to(tl.float32)  # (BLOCK_K, BLOCK_O) segment map
        acc += tl.dot(g * v[None, :], onehot, input_precision=PRECISION)

    mask = mask_b[:, None] & (offs_o < n_major)[None, :]
    ptrs = out_ptr + offs_b.to(tl.int64)[:, None] * stride_out_b + offs_o[None, :] * stride_out_f
    cur = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    _store_rounded(ptrs, cur + acc, mask)


# fmt: off
@triton.jit
def _sddmm_kernel(
    a_ptr, stride_a_f, stride_a_b,  # dy^T (n_rows, B)
    x_ptr, stride_x_f, stride_x_b,  # x^T (n_cols, B)
    rows_ptr, cols_ptr, out_ptr, stride_out_s,  # out (slices, nnz) float32 partial sums
    nnz, B, B_PER_SLICE, n_rows, n_cols,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: on
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < nnz
    r = tl.load(rows_ptr + offs_k, mask=mask_k, other=0)
    c = tl.load(cols_ptr + offs_k, mask=mask_k, other=0)
    ok = mask_k & (r >= 0) & (r < n_rows) & (c >= 0) & (c < n_cols)
    a_rows = a_ptr + r.to(tl.int64)[:, None] * stride_a_f
    x_rows = x_ptr + c.to(tl.int64)[:, None] * stride_x_f
    b_lo = pid_s * B_PER_SLICE
    b_hi = tl.minimum(b_lo + B_PER_SLICE, B)

    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for b0 in range(b_lo, b_hi, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        m = ok[:, None] & (offs_b < b_hi)[None, :]
        off_b = offs_b.to(tl.int64)[None, :]
        a = tl.load(a_rows + off_b * stride_a_b, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(x_rows + off_b * stride_x_b, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * xv, axis=1)
    tl.store(out_ptr + pid_s * stride_out_s + offs_k, acc, mask=mask_k)


@triton.jit
def _scatter_kernel(
    w_ptr, stride_w_r, stride_w_c, rows_ptr, cols_ptr, delta_ptr, nnz, n_rows, n_cols, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < nnz
    r = tl.load(rows_ptr + offs, mask=mask, other=0)
    c = tl.load(cols_ptr + offs, mask=mask, other=0)
    ok = mask & (r >= 0) & (r < n_rows) & (c >= 0) & (c < n_cols)
    ptrs = w_ptr + r.to(tl.int64) * stride_w_r + c.to(tl.int64) * stride_w_c
    w = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(delta_ptr + offs, mask=ok, other=0.0)
    _store_rounded(ptrs, w + d, ok)


INTERPRETED = not isinstance(_spmm_kernel, triton.runtime.JITFunction)


def usable_on(device: torch.device) -> bool:
    """Compiled kernels run on CUDA; interpreted ones (TRITON_INTERPRET=1 at import) on any device."""
    return INTERPRETED or device.type == "cuda"


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in DTYPES:
            raise UserError(
                f"the Triton sparse kernels take float16, bfloat16 or float32 tensors, got {t.dtype}; "
                "use the reference backend (PEFT_LAB_SPARSE_BACKEND=reference) for other dtypes."
            )
        if not usable_on(t.device):
            raise UserError(
                f"the Triton sparse kernels need CUDA tensors, got a tensor on {t.device}; use the reference "
                "backend there, or set TRITON_INTERPRET=1 before Triton is imported to interpret them on the CPU."
            )


def _precision(*tensors: torch.Tensor) -> str:
    # the one-hot matmul only routes values: tf32 rounding of the scaled inputs (rel. 2**-11) is below a
    # 16-bit result's own rounding; float32 results get exact float32 products ("ieee").
    return "tf32" if all(t.dtype in (torch.float16, torch.bfloat16) for t in tensors) else "ieee"


def _spmm_add_(out, src_t, major, minor, values, seg, n_minor):
    _check(out, src_t, values)
    batch, n_major = out.shape
    if values.numel() == 0 or batch == 0:
        return out
    grid = (triton.cdiv(n_major, SPMM_BLOCK_O), triton.cdiv(batch, SPMM_BLOCK_B))
    _spmm_kernel[grid](
        src_t, src_t.stride(0), src_t.stride(1),
        out, out.stride(0), out.stride(1),
        major, minor, values, seg,
        batch, n_major, n_minor,
        BLOCK_B=SPMM_BLOCK_B, BLOCK_O=SPMM_BLOCK_O, BLOCK_K=SPMM_BLOCK_K, PRECISION=_precision(out),
    )
    return out


def linear_add_(y: torch.Tensor, xt: torch.Tensor, pattern: SparsePattern, values: torch.Tensor) -> torch.Tensor:
    """y += x·S^T in place. y (B, out), xt (in, B), values (nnz,) row-major. Returns y."""
    return _spmm_add_(y, xt, pattern.rows, pattern.cols, values, pattern.row_ptr, pattern.shape[1])


def linear_t_add_(dx: torch.Tensor, dyt: torch.Tensor, pattern: SparsePattern, values: torch.Tensor) -> torch.Tensor:
    """dx += dy·S in place. dx (B, in), dyt (out, B), values (nnz,) row-major. Returns dx."""
    perm, rows_c, cols_c, col_ptr = pattern.csc()
    return _spmm_add_(dx, dyt, cols_c, rows_c, values[perm], col_ptr, pattern.shape[0])


def sddmm(dyt: torch.Tensor, xt: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """dvalues[k] = sum_b dy[b, rows[k]] · x[b, cols[k]]. dyt (out, B), xt (in, B). Returns (nnz,) float32."""
    _check(dyt, xt)
    nnz, batch = pattern.nnz, dyt.shape[1]
    if nnz == 0 or batch == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=dyt.device)
    n_k = triton.cdiv(nnz, SDDMM_BLOCK_K)
    slices = max(1, min(triton.cdiv(batch, SDDMM_BLOCK_B), triton.cdiv(SDDMM_MIN_PROGRAMS, n_k)))
    per_slice = triton.cdiv(triton.cdiv(batch, slices), SDDMM_BLOCK_B) * SDDMM_BLOCK_B
    slices = triton.cdiv(batch, per_slice)
    part = torch.empty((slices, nnz), dtype=torch.float32, device=dyt.device)
    _sddmm_kernel[(n_k, slices)](
        dyt, dyt.stride(0), dyt.stride(1),
        xt, xt.stride(0), xt.stride(1),
        pattern.rows, pattern.cols, part, part.stride(0),
        nnz, batch, per_slice, pattern.shape[0], pattern.shape[1],
        BLOCK_K=SDDMM_BLOCK_K, BLOCK_B=SDDMM_BLOCK_B,
    )
    return part[0] if slices == 1 else part.sum(0)


def scatter_add_(
    weight: torch.Tensor, pattern: SparsePattern, values: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """weight[rows[k], cols[k]] += alpha · values[k] in place (float32 arithmetic, rounded once). Returns weight."""
    _check(weight, values)
    if pattern.nnz == 0:
        return weight
    delta = values.to(torch.float32) * alpha  # scaled here, so the kernel's one add rounds like the reference
    _scatter_kernel[(triton.cdiv(pattern.nnz, SCATTER_BLOCK),)](
        weight, weight.stride(0), weight.stride(1), pattern.rows, pattern.cols, delta,
        pattern.nnz, pattern.shape[0], pattern.shape[1], BLOCK=SCATTER_BLOCK,
    )
    return weight
