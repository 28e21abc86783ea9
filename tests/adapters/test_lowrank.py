"""LoRA and PiSSA specifics (docs/adapters.md#lora, #pissa)."""

from __future__ import annotations

import math

import pytest
import torch

from peft_lab.adapters import build_adapter
from peft_lab.errors import UserError
from tests.helpers.adapters import MLP, ConvNet, make, perturb, snapshot


def test_lora_scale_and_rslora():
    assert build_adapter("lora", r=8).config.scale == 1.0  # alpha = null -> alpha = r
    assert build_adapter("lora", r=8, alpha=16).config.scale == 2.0
    for r in (4, 16):  # rsLoRA: s·sqrt(r) is constant in r for a fixed alpha
        c = build_adapter("lora", r=r, alpha=8, use_rslora=True).config
        assert math.isclose(c.scale * math.sqrt(r), 8)
    a = make("lora", alpha=12.0, use_rslora=True)
    a.attach(MLP())
    assert math.isclose(a.delta_tree()["fc1.weight"].scale, 12 / 2)


def test_lora_counts_and_delta_equals_s_BA():
    model = MLP()
    a = make("lora", r=3, alpha=6)
    a.attach(model)
    # r(in + out) per targeted layer; defaults on a plain module: every Linear except modules_to_save (none here)
    assert a.num_trainable() == 3 * (33 + 17) + 3 * (17 + 33) + 3 * (33 + 5)
    perturb(a)
    layer = a.layers()["fc1"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(a.delta_tree()["fc1.weight"].dense(), 2.0 * B @ A)


def test_lora_on_conv_matches_peft_delta():
    model = ConvNet()
    a = make("lora", target_modules=["conv"])
    a.attach(model)
    perturb(a)
    layer = a.layers()["conv"]
    leaf = a.delta_tree()["conv.weight"]
    assert leaf.shape == (6, 3, 3, 3)
    torch.testing.assert_close(leaf.dense(), layer.get_delta_weight("default"))


@pytest.mark.parametrize("name", ["lora", "pissa"])
def test_rank_larger_than_layer_allows(name):
    model = MLP()
    before = snapshot(model)
    with pytest.raises(UserError, match=r"r=18 exceeds .* fc1 \(17, 33\).*at most 17"):
        build_adapter(name, r=18).attach(model)
    assert type(model.fc1) is torch.nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_bad_hyperparameters():
    for bad in ({"r": 0}, {"r": 2.5}, {"alpha": -1.0}, {"dropout": 1.0}, {"init": "xavier"}):
        with pytest.raises(UserError):
            build_adapter("lora", **bad)
    with pytest.raises(UserError, match="niter"):
        build_adapter("pissa", niter=-2)


@pytest.mark.parametrize("niter", [None, 4])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_init_invariants(niter, use_rslora):
    """W_res + s·B A == W; B A has rank <= r with singular values Σ_r / s (exact SVD)."""
    torch.manual_seed(0)
    model = MLP()
    W = model.fc1.weight.detach().clone()
    a = build_adapter("pissa", r=5, alpha=10.0, niter=niter, use_rslora=use_rslora)
    a.attach(model)
    layer = a.layers()["fc1"]
    s = layer.scaling["default"]
    assert math.isclose(s, a.config.scale)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W_res = layer.base_layer.weight
    torch.testing.assert_close(W_res + s * B @ A, W, rtol=0, atol=1e-6)
    sv = torch.linalg.svdvals((B @ A).detach())
    assert float(sv[5:].max()) < 1e-5  # rank <= r
    if niter is None:
        torch.testing.assert_close(sv[:5], torch.linalg.svdvals(W)[:5] / s, rtol=1e-5, atol=1e-6)


def test_pissa_exact_vs_fast_svd_differ_but_both_reproduce_w():
    torch.manual_seed(0)
    exact, fast = MLP(), MLP()
    fast.load_state_dict(exact.state_dict())
    W = exact.fc1.weight.detach().clone()
    a, b = build_adapter("pissa", r=4), build_adapter("pissa", r=4, niter=1)
    a.attach(exact)
    b.attach(fast)
    la, lb = a.layers()["fc1"], b.layers()["fc1"]
    for layer in (la, lb):
        BA = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(layer.base_layer.weight + BA, W, rtol=0, atol=1e-6)
    assert not torch.allclose(la.lora_A["default"].weight.abs(), lb.lora_A["default"].weight.abs(), atol=1e-4)
