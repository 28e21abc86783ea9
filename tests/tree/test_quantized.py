"""The `Quantized` leaf: per-channel symmetric int8/int4 with float32 scales — its bound, packing, size, disk."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_lab.tree import Quantized, Tree, load_tree, quantize, save_tree
from peft_lab.tree.quantized import error_bound, pack_int4, unpack_int4

shapes = st.one_of(
    st.tuples(st.integers(1, 40)),
    st.tuples(st.integers(1, 12), st.integers(1, 20)),
    st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from([8, 4]), seed=st.integers(0, 2**16), log_mag=st.floats(-8, 3))
def test_error_within_the_stated_bound(shape, bits, seed, log_mag):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10**log_mag
    if len(shape) >= 2 and shape[0] > 1:
        x[0] = 0  # an unchanged channel
    q = quantize(x, bits)
    err = (q.dense() - x).abs()
    bound = error_bound(x, bits)
    # the scheme's bound s_c/2, plus float32 rounding of x/s and q*s (a few ulps of |x|)
    assert (err <= bound * (1 + 1e-5) + 4 * torch.finfo(torch.float32).eps * x.abs()).all()
    qmax = 2 ** (bits - 1) - 1
    assert q.codes().abs().max() <= qmax
    assert q.codes().dtype == torch.int8 and q.codes().shape == x.shape
    if len(shape) >= 2 and shape[0] > 1:
        assert torch.equal(q.dense()[0], torch.zeros_like(x[0])), "a zero channel must stay exactly zero"
    # the bound is tight up to the factor: max|x_c| / (2 q_max)
    C = shape[0] if len(shape) >= 2 else 1
    amax = x.reshape(C, -1).abs().amax(1)
    torch.testing.assert_close(q.error_bound(), amax / qmax / 2)


def test_bound_is_reached_not_just_respected():
    """Round-to-nearest really has error up to s/2: a value halfway between two codes."""
    s = 1.0 / 127
    x = torch.tensor([[1.0, 0.5 * s + 1e-7, 3.5 * s - 1e-7]])
    err = (quantize(x, 8).dense() - x).abs().max()
    assert err > 0.49 * s


@pytest.mark.parametrize("n", [1, 2, 7, 8, 31])
def test_int4_packing_round_trip(n):
    q = torch.randint(-7, 8, (n,), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 2)
    assert torch.equal(unpack_int4(packed, n), q)
    # first of each pair in the low nibble, codes offset by 8
    assert packed[0] & 0x0F == int(q[0]) + 8


@pytest.mark.parametrize("shape", [(64, 64), (32, 16, 3, 3), (128, 36)])
def test_size_against_16_bit(shape):
    x = torch.randn(shape)
    C, n = shape[0], x.numel() // shape[0]
    for bits, least in ((8, 1.8), (4, 3.2)):
        q = quantize(x, bits)
        assert q.nbytes == math.ceil(x.numel() * bits / 8) + 4 * C  # codes + float32 scales
        assert 2 * x.numel() / q.nbytes >= least, (bits, shape)
    assert 2 * n / (n + 4) >= 1.8  # the docstring's formula agrees with the measurement


def test_quantized_leaf_through_disk_and_dtypes(tmp_path):
    x = torch.randn(5, 7, dtype=torch.bfloat16)
    tree = Tree({"a.weight": quantize(x, 8), "a.bias": quantize(torch.randn(7), 4)})
    save_tree(tree, tmp_path / "q.safetensors")
    back = load_tree(tmp_path / "q.safetensors")
    for k in tree:
        assert isinstance(back[k], Quantized)
        assert torch.equal(back[k].dense(), tree[k].dense()), k
    assert back["a.weight"].dense(None).dtype == torch.bfloat16  # dense(None) gives the original dtype
    assert back["a.bias"].q.dtype == torch.uint8 and back["a.bias"].bits == 4


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([1.0, float("nan")]), 8)
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.ones(3), 3)
    with pytest.raises(ValueError, match="needs codes"):
        Quantized(torch.zeros(3, dtype=torch.int8), torch.zeros(1), 8, (4,))
