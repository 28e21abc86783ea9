"""Kronecker specifics: LoKr through PEFT and DiffuseKronA's choices (docs/adapters.md#kronecker)."""

from __future__ import annotations

import pytest
import torch

from peft_lab.adapters import build_adapter, load_adapter
from peft_lab.adapters.kronecker import KronALayer, factorization
from peft_lab.errors import UserError
from peft_lab.tree import Kronecker
from tests.helpers.adapters import MLP, ConvNet, perturb


class Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(96, 64)
        self.b = torch.nn.Linear(64, 12)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_factorization_rules():
    assert factorization(768) == (24, 32)
    assert factorization(320) == (16, 20)
    assert factorization(128, 32) == (32, 4)  # f dividing dim: exactly (f, dim/f), unsorted
    assert factorization(17) == (1, 17)  # prime


@pytest.mark.parametrize("decompose_both", [False, True])
def test_lokr_leaf_equals_peft_delta(decompose_both):
    model = Wide()
    a = build_adapter("kronecker", r=1, factor=4, decompose_both=decompose_both, alpha=1.5)
    a.attach(model)
    perturb(a)
    layer = a.impl.layers()["a"]
    assert ("default" in layer.lokr_w1_a) == decompose_both
    leaf = a.delta_tree()["a.weight"]
    assert isinstance(leaf, Kronecker) and leaf.scale == 1.5
    assert tuple(leaf.A.shape) == (4, 4)  # (o1, i1) = (4, 4) with factor 4: 64 = 4·16, 96 = 4·24
    torch.testing.assert_close(leaf.dense(), layer.get_delta_weight("default"))
    torch.testing.assert_close(leaf.matvec(torch.ones(2, 96)), torch.ones(2, 96) @ leaf.dense().T, rtol=1e-5, atol=1e-5)


def test_lokr_conv_leaf_equals_peft_delta():
    a = build_adapter("kronecker", r=2, target_modules=["conv"])
    a.attach(ConvNet())
    perturb(a)
    leaf = a.delta_tree()["conv.weight"]
    assert leaf.shape == (6, 3, 3, 3)
    torch.testing.assert_close(leaf.dense(), a.impl.layers()["conv"].get_delta_weight("default"))


def test_full_mode_keeps_both_factors_full_and_s():
    model = Wide()
    a = build_adapter("kronecker", r=2, full=True, alpha=4.0)
    a.attach(model)
    layer = a.impl.layers()["a"]
    assert "default" in layer.lokr_w1 and "default" in layer.lokr_w2  # no low-rank factors
    o, i = factorization(64), factorization(96)
    assert tuple(layer.lokr_w2["default"].shape) == (o[1], i[1])
    assert layer.scaling["default"] == 2.0  # s = alpha / r of OUR config, whatever rank PEFT was given
    n_a = o[0] * i[0] + o[1] * i[1]
    n_b = factorization(12)[0] * factorization(64)[0] + factorization(12)[1] * factorization(64)[1]
    assert a.num_trainable() == n_a + n_b


def test_diffusekrona_independent_factors(tmp_path):
    torch.manual_seed(0)
    model = Wide()
    base_w = model.a.weight.detach().clone()
    a = build_adapter("kronecker", a1=8, a2=2, target_modules=["a"])
    adapted = a.attach(model)
    layer = adapted.a
    assert isinstance(layer, KronALayer)
    assert tuple(layer.kron_A.shape) == (8, 2) and tuple(layer.kron_B.shape) == (8, 48)
    assert float(layer.kron_B.detach().abs().max()) == 0 and float(layer.kron_A.detach().abs().max()) > 0  # B = 0
    assert a.num_trainable() == 8 * 2 + 8 * 48
    perturb(a)
    x = torch.randn(5, 96)
    K = torch.kron(layer.kron_A, layer.kron_B)  # s = 1 by default
    torch.testing.assert_close(layer(x), x @ (base_w + K).T + model.a.base_layer.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.delta_tree()["a.weight"].dense(), K.detach())
    # a1 != a2 cannot be a PEFT LoKr dir: it is saved in peft-lab's own format
    a.save(tmp_path / "ad")
    assert not (tmp_path / "ad" / "adapter_config.json").exists()
    assert (tmp_path / "ad" / "adapter.safetensors").exists()
    fresh = Wide()
    (
        fresh.a.weight.data.copy_(base_w),
        fresh.a.bias.data.copy_(model.a.base_layer.bias),
        fresh.b.load_state_dict(model.b.state_dict()),
    )
    back = load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(back.model(x), adapted(x), rtol=1e-6, atol=1e-6)


def test_diffusekrona_bad_inputs():
    with pytest.raises(UserError, match="a1 | out"):
        build_adapter("kronecker", a1=5, a2=2, target_modules=["a"]).attach(Wide())
    with pytest.raises(UserError, match="set both"):
        build_adapter("kronecker", a1=4)
    with pytest.raises(UserError, match="Conv2d"):
        build_adapter("kronecker", a1=2, a2=1, target_modules=["conv"]).attach(ConvNet())
    with pytest.raises(UserError, match="no rank_dropout"):
        build_adapter("kronecker", a1=2, a2=2, rank_dropout=0.1)


def test_peft_mode_on_odd_shapes_and_counts():
    a = build_adapter("kronecker", r=4)
    a.attach(MLP())
    # fc1 17x33: (o1, o2) = (1, 17), (i1, i2) = (3, 11); r=4 < max(17, 11)/2 -> W2 = (17x4)(4x11); W1 full 1x3
    assert a.impl.layers()["fc1"].lokr_w2_a["default"].shape == (17, 4)
    assert a.delta_tree()["fc1.weight"].shape == (17, 33)


def test_fast_forward_equals_peft_dense_delta_forward():
    """Our LoKr layers apply kron(W1, W2) to x without forming it; PEFT's own forward forms it."""
    from peft.tuners.lokr.layer import Linear

    torch.manual_seed(0)
    a = build_adapter("kronecker", r=2, factor=4)
    a.attach(Wide())
    perturb(a)
    layer = a.impl.layers()["a"]
    assert type(layer).__name__ == "FastLoKrLinear" and isinstance(layer, Linear)
    x = torch.randn(3, 5, 96)
    fast = layer._get_delta_activations("default", x)
    dense = Linear._get_delta_activations(layer, "default", x)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-6)
