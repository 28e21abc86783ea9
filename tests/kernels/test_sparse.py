"""Sparse-delta linear: the reference against dense autograd; the Triton kernels and the CPU sparse-BLAS
backend (`csr`) against the reference.

Without CUDA the Triton kernels run on the CPU under TRITON_INTERPRET=1 (set below, before Triton is
imported); with CUDA they run compiled on the GPU. `pytest -m gpu` adds larger shapes on the GPU.

Tolerances (Triton vs reference, both accumulate in float32):
- float32 results: rtol 1e-5, atol 1e-5 (only the summation order differs);
- bfloat16 results (y, dx): both round the same float32 sum once to bfloat16, so they differ by at most one
  bfloat16 ulp where the float32 sums straddle a rounding boundary: rtol 2**-7, atol 1e-2, and an RMS
  error ratio below 1e-3;
- value gradients are float32 sums of exact products of the (16-bit) inputs: rtol 1e-5 in every dtype;
- the scatter (index op) must match bit for bit.
The reference against dense float64/float32 autograd: rtol 1e-5.
The csr backend against the reference: the same tolerances per dtype, and 1e-10 in float64.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of Triton

from peft_lab.errors import UserError  # noqa: E402
from peft_lab.kernels import SparsePattern, pattern_linear, scatter_add_, sparse_linear  # noqa: E402
from peft_lab.kernels.sparse import op, reference  # noqa: E402
from tests.conftest import REPO  # noqa: E402

tk = op._triton_module()
needs_triton = pytest.mark.skipif(tk is None, reason="Triton is not installed")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and tk is not None and not tk.INTERPRETED else "cpu"

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-2),
}
RMS_RATIO = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3}


def err_ratio(ref: torch.Tensor, got: torch.Tensor) -> float:
    """RMS of the error over RMS of the reference (flash-linear-attention's get_err_ratio)."""
    ref, got = ref.double(), got.double()
    return ((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{name}: {got.dtype}{tuple(got.shape)}"
    if ref.numel() == 0:
        return
    torch.testing.assert_close(got, ref, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    assert err_ratio(ref, got) <= RMS_RATIO[dtype], f"{name}: RMS error ratio {err_ratio(ref, got):.2e}"


def make_case(batch, out_f, in_f, nnz, dtype=torch.float32, vdtype=torch.float32, seed=0, device="cpu", shuffle=False):
    """x (batch, in), W (out, in), b (out,), unique random positions (rows, cols), values (nnz,)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(nnz, float):  # a density
        nnz = max(1, round(nnz * out_f * in_f))
    flat = torch.randperm(out_f * in_f, generator=g)[:nnz]
    if not shuffle:
        flat = flat.sort().values
    to = dict(device=device)
    x = torch.randn(batch, in_f, generator=g).to(dtype=dtype, **to)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype=dtype, **to)
    b = torch.randn(out_f, generator=g).to(dtype=dtype, **to)
    v = torch.randn(nnz, generator=g).to(dtype=vdtype, **to)
    dy = torch.randn(batch, out_f, generator=g).to(dtype=dtype, **to)
    return x, w, b, (flat // in_f).to(**to), (flat % in_f).to(**to), v, dy


def run(backend, monkeypatch, x, w, b, rows, cols, v, dy, need_w=False):
    """y, dx, dv (and dW, db) through `sparse_linear` on one backend."""
    monkeypatch.setenv(op.BACKEND_ENV, backend)
    x = x.clone().requires_grad_()
    v = v.clone().requires_grad_()
    w = w.clone().requires_grad_(need_w)
    b = b.clone().requires_grad_(need_w) if b is not None else None
    y = sparse_linear(x, w, rows, cols, v, b)
    wrt = (x, v) + ((w, b) if need_w else ())
    return (y.detach(),) + torch.autograd.grad(y, wrt, dy)


def dense_truth(x, w, b, rows, cols, v, dy):
    """y, dx, dv, dW, db by autograd through the dense x·(W + S)^T + b (what the op must equal)."""
    x, w, v = (t.clone().requires_grad_() for t in (x, w, v))
    b = b.clone().requires_grad_()
    s = torch.zeros(w.shape, dtype=v.dtype).index_put((rows.long(), cols.long()), v)
    y = x @ (w + s).T + b
    return (y.detach(),) + torch.autograd.grad(y, (x, v, w, b), dy)


# ---------------------------------------------------------------------------------------------------------
# The pattern
# ---------------------------------------------------------------------------------------------------------
def test_pattern_sorts_and_lays_out_csr_and_csc():
    rows = torch.tensor([2, 0, 1, 0, 2])
    cols = torch.tensor([0, 3, 1, 1, 2])
    p = SparsePattern(rows, cols, (3, 4))
    assert p.rows.tolist() == [0, 0, 1, 2, 2] and p.cols.tolist() == [1, 3, 1, 0, 2]
    assert p.rows.dtype == p.cols.dtype == torch.int32
    assert p.row_ptr.tolist() == [0, 2, 3, 5]
    assert p.order.tolist() == [3, 1, 2, 0, 4]
    v = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0])
    assert p.sort_values(v).tolist() == [13.0, 11.0, 12.0, 10.0, 14.0]
    assert torch.equal(p.unsort_values(p.sort_values(v)), v)
    perm, rows_c, cols_c, col_ptr = p.csc()
    assert cols_c.tolist() == [0, 1, 1, 2, 3] and rows_c.tolist() == [2, 0, 1, 2, 0]
    assert torch.equal(p.rows[perm], rows_c) and torch.equal(p.cols[perm], cols_c)
    assert col_ptr.tolist() == [0, 1, 3, 4, 5]
    assert p.csc()[0] is perm  # built once


def test_pattern_sorted_input_keeps_order_and_from_flat_matches():
    flat = torch.tensor([1, 5, 6, 11], dtype=torch.int32)
    p = SparsePattern.from_flat(flat, (3, 4))
    assert p.order is None and p.rows.tolist() == [0, 1, 1, 2] and p.cols.tolist() == [1, 1, 2, 3]
    assert torch.equal(p.flat, flat.long())
    empty = SparsePattern(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), (3, 4))
    assert empty.nnz == 0 and empty.row_ptr.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "rows, cols, match",
    [
        ([0, 3], [0, 1], r"rows\[1\] = 3 is not a valid row .* shape \(3, 4\)"),
        ([0, -1], [0, 1], r"rows\[1\] = -1"),
        ([0, 1], [4, 1], r"cols\[0\] = 4 is not a valid column"),
        ([1, 0, 1], [2, 0, 2], r"1 duplicate .* first \(1, 2\)"),
        ([0.0, 1.0], [0, 1], r"rows must be int32 or int64"),
        ([0, 1], [0], r"same length"),
    ],
)
def test_pattern_refuses_bad_indices(rows, cols, match):
    with pytest.raises(UserError, match=match):
        SparsePattern(torch.tensor(rows), torch.tensor(cols), (3, 4))


def test_pattern_refuses_bad_shapes_and_devices():
    with pytest.raises(UserError, match="must be 1-D"):
        SparsePattern(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), (3, 4))
    with pytest.raises(UserError, match=r"shape must be \(out, in\)"):
        SparsePattern(torch.tensor([0]), torch.tensor([0]), (3,))
    with pytest.raises(UserError, match="one device"):
        SparsePattern(torch.tensor([0]), torch.tensor([0], device="meta"), (3, 4))
    with pytest.raises(UserError, match=r"indices\[0\] = 12 is not a valid flat index"):
        SparsePattern.from_flat(torch.tensor([12]), (3, 4))


# ---------------------------------------------------------------------------------------------------------
# The reference (the spec) against dense autograd
# ---------------------------------------------------------------------------------------------------------
CASES = [  # (batch, out, in, nnz or density): odd sizes, empty and single-entry deltas, 0.1% to 10%
    (5, 17, 33, 0),
    (0, 5, 7, 3),
    (5, 17, 33, 1),
    (1, 1, 1, 1),
    (37, 17, 33, 0.10),
    (3, 64, 160, 0.001),
    (70, 48, 40, 0.01),
    (20, 33, 17, 0.05),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_equals_dense_autograd(case, dtype, monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 64)  # several chunks even on small shapes
    x, w, b, rows, cols, v, dy = make_case(*case, dtype=dtype, vdtype=dtype, shuffle=True)
    got = run("reference", monkeypatch, x, w, b, rows, cols, v, dy, need_w=True)
    want = dense_truth(x, w, b, rows, cols, v, dy)
    for name, a, e in zip(["y", "dx", "dvalues", "dW", "db"], got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_reference_gradcheck_float64(monkeypatch):
    monkeypatch.setenv(op.BACKEND_ENV, "reference")
    x, w, b, rows, cols, v, _ = make_case(4, 7, 9, 0.3, dtype=torch.float64, vdtype=torch.float64, shuffle=True)
    pattern = SparsePattern(rows, cols, w.shape)
    x3 = x.reshape(2, 2, 9)  # leading dims are flattened and restored
    args = tuple(t.clone().requires_grad_() for t in (x3, w, v, b))
    assert torch.autograd.gradcheck(lambda x_, w_, v_, b_: pattern_linear(x_, w_, pattern, v_, b_), args)


def test_op_saves_no_dense_out_by_in_tensor(monkeypatch):
    monkeypatch.setenv(op.BACKEND_ENV, "reference")
    x, w, b, rows, cols, v, _ = make_case(8, 24, 40, 0.05)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse_linear(x.requires_grad_(), w, rows, cols, v.requires_grad_(), b)
    big = [t for t in saved if t.numel() >= w.numel()]
    assert len(big) == 1 and big[0].data_ptr() == w.data_ptr()  # the weight itself, by reference, no W + S


def test_values_follow_caller_order(monkeypatch):
    monkeypatch.setenv(op.BACKEND_ENV, "reference")
    x, w, b, rows, cols, v, dy = make_case(6, 9, 11, 0.2, shuffle=True)
    perm = torch.randperm(v.numel(), generator=torch.Generator().manual_seed(3))
    a = run("reference", monkeypatch, x, w, b, rows, cols, v, dy)
    c = run("reference", monkeypatch, x, w, b, rows[perm], cols[perm], v[perm], dy)
    torch.testing.assert_close(c[0], a[0])
    torch.testing.assert_close(c[2], a[2][perm])  # the value gradient comes back in the caller's order


def test_sparse_linear_reuses_its_pattern_until_the_indices_change(monkeypatch):
    monkeypatch.setenv(op.BACKEND_ENV, "reference")
    x, w, b, *_ = make_case(6, 9, 11, 0.2)
    rows, cols, v = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])
    p = op._pattern_for(rows, cols, (9, 11))
    assert op._pattern_for(rows, cols, (9, 11)) is p  # validated and sorted once
    assert op._pattern_for(rows.clone(), cols, (9, 11)) is not p  # another tensor: its own pattern
    rows[0] = 5  # an in-place write (a reselection) bumps the version counter: the pattern is rebuilt
    assert op._pattern_for(rows, cols, (9, 11)) is not p
    s = torch.zeros(9, 11)
    s[5, 0], s[1, 1], s[2, 2] = 1.0, 2.0, 3.0
    torch.testing.assert_close(sparse_linear(x, w, rows, cols, v, b), x @ (w + s).T + b)
    cols[2] = 11  # out of range after the first validation: caught on the rebuild
    with pytest.raises(UserError, match=r"cols\[2\] = 11"):
        sparse_linear(x, w, rows, cols, v, b)


def test_autocast_runs_in_the_autocast_dtype(monkeypatch):
    monkeypatch.setenv(op.BACKEND_ENV, "reference")
    x, w, b, rows, cols, v, _ = make_case(6, 9, 11, 0.2)
    v = v.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_linear(x, w, rows, cols, v, b)
    assert y.dtype == torch.bfloat16
    want = sparse_linear(x.bfloat16(), w.bfloat16(), rows, cols, v.detach(), b.bfloat16())
    torch.testing.assert_close(y, want)
    y.float().sum().backward()
    assert v.grad.dtype == torch.float32 and v.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(4, 10)), "x has 10 features"),
        (dict(x=torch.randn(4, 11, dtype=torch.float64)), "x is torch.float64 but the weight is torch.float32"),
        (dict(x=torch.ones(4, 11, dtype=torch.long)), "x must be a floating-point tensor"),
        (dict(b=torch.randn(8)), r"bias must be a torch.float32 tensor of shape \(9,\)"),
        (dict(v=torch.randn(3)), "values must be a 1-D tensor of"),
        (dict(v="int"), "values must be floating point"),
        (dict(v="meta"), "values are on meta but the indices on cpu"),
        (dict(w=torch.randn(9, 11, 1)), "weight must be a 2-D"),
        (dict(rows="oob"), r"rows\[0\] = 9 is not a valid row"),
    ],
)
def test_bad_inputs_give_clear_errors(change, match):
    x, w, b, rows, cols, v, _ = make_case(4, 9, 11, 0.2)
    if change.get("v") == "int":
        change["v"] = torch.zeros(v.numel(), dtype=torch.long)
    elif change.get("v") == "meta":
        change["v"] = v.to("meta")
    if change.get("rows") == "oob":
        change["rows"] = rows.clone().index_fill_(0, torch.tensor([0]), 9)
    args = dict(x=x, w=w, b=b, rows=rows, cols=cols, v=v) | change
    with pytest.raises(UserError, match=match):
        sparse_linear(args["x"], args["w"], args["rows"], args["cols"], args["v"], args["b"])


def test_backend_selection(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.delenv(op.BACKEND_ENV, raising=False)
    assert op.backend_for(t) == "csr"  # auto: sparse BLAS on CPU tensors
    monkeypatch.setenv(op.BACKEND_ENV, "reference")
    assert op.backend_for(t) == "reference"
    monkeypatch.setenv(op.BACKEND_ENV, "cuda-please")
    with pytest.raises(UserError, match="is not a backend; use one of auto, triton, csr, reference"):
        op.backend_for(t)
    if tk is not None:
        monkeypatch.setenv(op.BACKEND_ENV, "triton")
        assert op.backend_for(t) == "triton"


def test_a_broken_triton_is_reported_once_when_cuda_tensors_fall_back(monkeypatch, caplog):
    """The fallback to the slow reference on CUDA used to be silent; it now logs why, once."""
    import sys

    class FakeCuda:  # what backend_for looks at on a CUDA tensor (no GPU here)
        device = torch.device("cuda")
        is_cuda = True
        dtype = torch.float16

        def is_floating_point(self):
            return True

    monkeypatch.delenv(op.BACKEND_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "peft_lab.kernels.sparse.triton_kernels", None)  # the import fails
    monkeypatch.delattr("peft_lab.kernels.sparse.triton_kernels", raising=False)
    for cached in (op._triton_module, op._warn_reference_on_cuda):
        cached.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=op.__name__):
            assert op.backend_for(FakeCuda()) == "reference"
            assert op.backend_for(FakeCuda()) == "reference"
        warnings = [r for r in caplog.records if "Triton kernels could not be imported" in r.getMessage()]
        assert len(warnings) == 1 and "ModuleNotFoundError" in warnings[0].getMessage()
        monkeypatch.setenv(op.BACKEND_ENV, "triton")
        with pytest.raises(UserError, match=r"could not be imported \(ModuleNotFoundError"):
            op.backend_for(FakeCuda())
    finally:
        for cached in (op._triton_module, op._warn_reference_on_cuda):
            cached.cache_clear()


# ---------------------------------------------------------------------------------------------------------
# The CPU sparse-BLAS backend against the reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_csr_matches_reference(case, dtype, monkeypatch):
    vdtype = torch.float32 if dtype == torch.bfloat16 else dtype
    x, w, b, rows, cols, v, dy = make_case(*case, dtype=dtype, vdtype=vdtype, shuffle=True)
    ref = run("reference", monkeypatch, x, w, b, rows, cols, v, dy, need_w=True)
    got = run("csr", monkeypatch, x, w, b, rows, cols, v, dy, need_w=True)
    for name, a, c in zip(("y", "dx", "dvalues", "dW", "db"), ref, got, strict=True):
        assert_close(name, a, c, torch.float32 if name == "dvalues" and dtype == torch.bfloat16 else dtype)


def test_csr_gradcheck_float64(monkeypatch):
    monkeypatch.setenv(op.BACKEND_ENV, "csr")
    x, w, b, rows, cols, v, _ = make_case(4, 6, 5, 0.3, dtype=torch.float64, vdtype=torch.float64)
    x, v, b = (t.detach().requires_grad_() for t in (x, v, b))
    assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, w, rows, cols, v, b), (x, v, b))


# ---------------------------------------------------------------------------------------------------------
# Triton against the reference
# ---------------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(case, dtype, monkeypatch):
    x, w, b, rows, cols, v, dy = make_case(*case, dtype=dtype, device=TRITON_DEVICE, shuffle=True)
    ref = run("reference", monkeypatch, x, w, b, rows, cols, v, dy)
    got = run("triton", monkeypatch, x, w, b, rows, cols, v, dy)
    assert_close("y", ref[0], got[0], dtype)
    assert_close("dx", ref[1], got[1], dtype)
    assert_close("dvalues", ref[2], got[2], torch.float32)


@needs_triton
def test_triton_handles_layouts_and_value_dtypes(monkeypatch):
    """3-D and non-contiguous x, no bias, bfloat16 values, weight and bias gradients through the op."""
    x, w, b, rows, cols, v, dy = make_case(24, 20, 36, 0.08, dtype=torch.bfloat16, device=TRITON_DEVICE)
    x3 = x.reshape(4, 6, 36).transpose(0, 1)  # (6, 4, 36), non-contiguous
    dy3 = dy.reshape(4, 6, 20).transpose(0, 1)
    for bias, vals in ((None, v.bfloat16()), (b, v)):
        ref = run("reference", monkeypatch, x3, w, bias, rows, cols, vals, dy3, need_w=bias is not None)
        got = run("triton", monkeypatch, x3, w, bias, rows, cols, vals, dy3, need_w=bias is not None)
        for name, r, g in zip(["y", "dx", "dvalues", "dW", "db"][: len(ref)], ref, got, strict=True):
            assert_close(name, r, g, torch.bfloat16 if name != "dvalues" else torch.float32)


@needs_triton
def test_triton_sddmm_batch_slices(monkeypatch):
    """Few entries and a long batch: the SDDMM splits the batch over programs and sums the slices."""
    x, w, b, rows, cols, v, dy = make_case(300, 6, 10, 3, device=TRITON_DEVICE)
    pattern = SparsePattern(rows, cols, w.shape)
    got = tk.sddmm(dy.t().contiguous(), x.t().contiguous(), pattern)
    torch.testing.assert_close(got, reference.sddmm(dy.t(), x.t(), pattern), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scatter_add_is_bit_exact(dtype, monkeypatch):
    _, w, _, rows, cols, v, _ = make_case(1, 17, 33, 0.1, dtype=dtype, device=TRITON_DEVICE, shuffle=True)
    v = v * 1e-2  # small deltas on O(0.2) weights: rounding matters
    pattern = SparsePattern(rows, cols, w.shape)
    out = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(op.BACKEND_ENV, backend)
        wt = w.t().contiguous().t()  # a column-major weight: strides, not layout, locate entries
        out[backend] = scatter_add_(scatter_add_(wt, pattern, v, alpha=0.5), pattern, v, alpha=-1.5)
    assert torch.equal(out["triton"], out["reference"])
    untouched = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    untouched[rows, cols] = False
    assert torch.equal(out["triton"][untouched], w[untouched])
    torch.testing.assert_close(out["triton"][rows, cols].float(), (w[rows, cols].float() - v), **TOL[torch.bfloat16])


@needs_triton
def test_triton_never_touches_memory_outside_the_tensors(monkeypatch):
    """Defence in depth: positions that escaped validation (corrupted after it) are masked, never written."""
    x, w, b, rows, cols, v, dy = make_case(9, 8, 12, 0.2, device=TRITON_DEVICE)
    pattern = SparsePattern(rows, cols, w.shape)
    pattern.rows[0], pattern.cols[-1] = 8, -5  # out of range now
    buf = torch.zeros(10, 12, device=TRITON_DEVICE)
    weight = buf[1:9]  # guard rows above and below
    tk.scatter_add_(weight, pattern, torch.ones(v.numel(), device=TRITON_DEVICE))
    assert buf[0].abs().sum() == 0 and buf[9].abs().sum() == 0
    assert weight.sum() == v.numel() - 2  # every in-range entry written once
    ybuf = torch.zeros(9 + 2, 8, device=TRITON_DEVICE)
    tk.linear_add_(ybuf[1:10], x.t().contiguous(), pattern, v)
    assert ybuf[0].abs().sum() == 0 and ybuf[10].abs().sum() == 0
    assert torch.isfinite(tk.sddmm(dy.t().contiguous(), x.t().contiguous(), pattern)).all()


@needs_triton
def test_backends_train_the_same(monkeypatch):
    """A few SGD steps of a two-layer sparse-delta model give the same values on either backend."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(32, 24) / 5, torch.randn(5, 32) / 6
    p1 = SparsePattern.from_flat(torch.randperm(32 * 24)[:60], w1.shape)
    p2 = SparsePattern.from_flat(torch.randperm(5 * 32)[:20], w2.shape)
    data, target = torch.randn(4, 16, 24), torch.randint(0, 5, (4, 16))
    trained = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(op.BACKEND_ENV, backend)
        v1, v2 = torch.zeros(60, requires_grad=True), torch.zeros(20, requires_grad=True)
        opt = torch.optim.SGD([v1, v2], lr=0.5)
        for xb, tb in zip(data, target, strict=True):
            dev = lambda t: t.to(TRITON_DEVICE)  # noqa: E731
            h = torch.relu(pattern_linear(dev(xb), dev(w1), _to(p1), v1.to(TRITON_DEVICE)))
            loss = torch.nn.functional.cross_entropy(pattern_linear(h, dev(w2), _to(p2), v2.to(TRITON_DEVICE)), dev(tb))
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained[backend] = (v1.detach().clone(), v2.detach().clone(), loss.item())
    assert trained["reference"][0].abs().sum() > 0
    for a, c in zip(trained["reference"], trained["triton"], strict=True):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def _to(p: SparsePattern) -> SparsePattern:
    return p if TRITON_DEVICE == "cpu" else SparsePattern(p.rows.cuda(), p.cols.cuda(), p.shape)


@needs_triton
def test_forced_triton_refuses_float64(monkeypatch):
    monkeypatch.setenv(op.BACKEND_ENV, "triton")
    x, w, b, rows, cols, v, _ = make_case(2, 3, 4, 2, dtype=torch.float64, device=TRITON_DEVICE)
    with pytest.raises(UserError, match="float16, bfloat16 or float32"):
        sparse_linear(x, w, rows, cols, v, b)


_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from peft_lab.kernels.sparse import triton_kernels as tk
assert not tk.INTERPRETED
SIG = {
    tk._spmm_kernel: ("*{t} i32 i32 *{t} i32 i32 *i32 *i32 *fp32 *i64 i32 i32 i32",
                      dict(BLOCK_B=64, BLOCK_O=16, BLOCK_K=32)),
    tk._sddmm_kernel: ("*{t} i32 i32 *{t} i32 i32 *i32 *i32 *fp32 i32 i32 i32 i32 i32 i32",
                       dict(BLOCK_K=32, BLOCK_B=64)),
    tk._scatter_kernel: ("*{t} i32 i32 *i32 *i32 *fp32 i32 i32 i32", dict(BLOCK=1024)),
}
for cc in (80, 90):
    for t, prec in (("bf16", "tf32"), ("fp32", "ieee")):
        for fn, (sig, const) in SIG.items():
            const = dict(const, PRECISION=prec) if "PRECISION" in fn.arg_names else const
            types = sig.format(t=t).split() + ["constexpr"] * len(const)
            k = triton.compile(ASTSource(fn, dict(zip(fn.arg_names, types)), const), target=GPUTarget("cuda", cc, 32))
            assert k.asm["cubin"], (fn, cc, t)
            if fn is tk._spmm_kernel and t == "bf16":
                assert "mma" in k.asm["ptx"], "the one-hot segment sum should use tensor cores"
print("compiled")
"""


@needs_triton
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    """The kernels compile to cubins for A100 and H100 (ahead of time, no GPU needed), so the code the CPU
    tests interpret is also code the GPU compiler accepts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh compile, and no writes to ~/.triton
    root = str(REPO)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_AOT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# On a GPU (pytest -m gpu): realistic shapes, compiled kernels
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("density", [0.001, 0.01, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_matches_reference(density, dtype, monkeypatch):
    if not torch.cuda.is_available() or tk is None or tk.INTERPRETED:
        pytest.fail("needs a CUDA device and compiled Triton kernels (unset TRITON_INTERPRET)")
    x, w, b, rows, cols, v, dy = make_case(1000, 1024, 1536, density, dtype=dtype, device="cuda", shuffle=True)
    ref = run("reference", monkeypatch, x, w, b, rows, cols, v, dy)
    got = run("triton", monkeypatch, x, w, b, rows, cols, v, dy)
    # on the GPU the one-hot segment sum of 16-bit results runs in tf32: allow a little more than one ulp
    assert_close("y", ref[0], got[0], dtype)
    assert_close("dx", ref[1], got[1], dtype)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["reference", "csr"])
@pytest.mark.parametrize("widen", [1 << 18, 25])  # the value gradient widens x in blocks: one, or 2 rows at a time
def test_saved_input_dtype_keeps_a_bfloat16_input_and_changes_only_the_weight_side_gradients(
    backend, widen, monkeypatch
):
    monkeypatch.setenv(op.BACKEND_ENV, backend)
    monkeypatch.setattr(op, "_WIDEN_ELEMENTS", widen)
    x, w, b, rows, cols, v, dy = make_case(12, 9, 11, 0.3)
    x3 = x.reshape(3, 4, 11)  # leading dims are flattened: the narrowed copy is shared per original tensor
    dy3 = dy.reshape(3, 4, 9)

    def grads(dtype, need_w):
        xx, vv = x3.clone().requires_grad_(), v.clone().requires_grad_()
        ww = w.clone().requires_grad_(need_w)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = sparse_linear(xx, ww, rows, cols, vv, b, saved_input_dtype=dtype)
        wrt = (xx, vv) + ((ww,) if need_w else ())
        return (y.detach(), *torch.autograd.grad(y, wrt, dy3)), saved

    (y0, dx0, dv0, dw0), _ = grads(None, True)
    (y1, dx1, dv1, dw1), saved = grads(torch.bfloat16, True)
    assert torch.equal(y1, y0) and torch.equal(dx1, dx0)  # the forward and dx never see the narrowed copy
    kept = [t for t in saved if t.shape == (12, 11)]
    assert len(kept) == 1 and kept[0].dtype == torch.bfloat16
    xr = x3.to(torch.bfloat16).float()  # what the value and weight gradients now see
    xx, vv, ww = xr.clone().requires_grad_(), v.clone().requires_grad_(), w.clone().requires_grad_()
    dv_ref, dw_ref = torch.autograd.grad(sparse_linear(xx, ww, rows, cols, vv, b), (vv, ww), dy3)
    torch.testing.assert_close(dv1, dv_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw1, dw_ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(dv1, dv0)  # the option does change them (bf16 rounding of x) ...
    torch.testing.assert_close(dv1, dv0, rtol=2e-2, atol=2e-2)  # ... by about bf16's precision


def test_saved_input_dtype_shares_one_copy_per_input_and_saves_no_input_without_trainable_weight_side(monkeypatch):
    monkeypatch.setenv(op.BACKEND_ENV, "reference")
    x, w, b, rows, cols, v, _ = make_case(6, 9, 11, 0.3)
    x = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q = sparse_linear(x, w, rows, cols, v.clone().requires_grad_(), saved_input_dtype=torch.bfloat16)
        k = sparse_linear(x, w.clone(), rows, cols, v.clone().requires_grad_(), saved_input_dtype=torch.bfloat16)
    narrowed = [t for t in saved if t.dtype == torch.bfloat16]
    assert len(narrowed) == 2 and narrowed[0] is narrowed[1]  # query and key keep one bf16 copy of x
    (q + k).sum().backward()
    x2 = x.detach().clone()
    first = op._narrowed(x2, x2, torch.bfloat16)
    assert op._narrowed(x2, x2, torch.bfloat16) is first
    x2.add_(1.0)  # an in-place change bumps x's version: a fresh copy, not the stale one
    assert op._narrowed(x2, x2, torch.bfloat16) is not first
    x2.requires_grad_()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sparse_linear(x2, w, rows, cols, v, saved_input_dtype=torch.bfloat16)  # values frozen, W frozen
    assert not [t for t in saved if t is not None and t.shape == x2.shape]  # dx needs only W and the values
    with pytest.raises(UserError, match="saved_input_dtype"):
        sparse_linear(x, w, rows, cols, v, saved_input_dtype=torch.int8)
