"""The fused SCE variance (merging/fused/_stats.py) against its torch reference and mergekit's `torch.var`:
bit-identical float32 results on inputs with zeros of both signs, repeated (bfloat16-rounded) values, 2-8 models."""

from __future__ import annotations

import pytest
import torch

from merging import fused
from merging.methods.sce import _square_sum, _torch_variance, _variance
from tests.merging.fused.test_fused import tricky

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is a dependency; PEFT_LAB_FUSED=0 set")


@pytest.mark.parametrize("T", [2, 3, 4, 8])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_variance_is_torch_var_bit_for_bit(T, bf16):
    xs = [x * 0.01 for x in tricky(50_000, T, T)]
    if bf16:  # few mantissa bits: the exact variance often sits on a float32 rounding midpoint
        xs = [x.bfloat16().float() for x in xs]
    for x in xs[1:]:  # entries no model changes differently: zero variance
        x[:100] = xs[0][:100]
    want = torch.var(torch.stack(xs), dim=0, unbiased=False)
    got, nonzero = _variance(xs)
    assert torch.equal(got.view(torch.int32), _torch_variance(xs).view(torch.int32))
    assert torch.equal(got, want)
    assert nonzero == int(torch.count_nonzero(want)) and 0 < nonzero < want.numel()


def test_fused_square_sum_is_the_float64_sum_of_float32_squares(monkeypatch):
    x = tricky(100_001, 5, 1)[0] * 1e-3
    fast = _square_sum(x)
    monkeypatch.setattr(fused, "ENABLED", False)
    ref = _square_sum(x)
    assert ref == float(x.square().sum(dtype=torch.float64))
    assert abs(fast - ref) <= 1e-14 * ref  # the same terms, summed in another order
    assert abs(fast - float((x * x).double().sum())) <= 1e-14 * ref
