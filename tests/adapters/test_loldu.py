"""LoLDU specifics: the choices listed in docs/adapters.md#loldu."""

from __future__ import annotations

import pytest
import torch

from peft_lab.adapters import build_adapter
from peft_lab.adapters.loldu import LoLDULayer, truncated_ldu
from peft_lab.errors import UserError
from tests.helpers.adapters import MLP, ConvNet, perturb, snapshot


@pytest.mark.parametrize("shape", [(17, 33), (33, 17), (8, 8)])
def test_full_ldu_reconstructs_w(shape):
    torch.manual_seed(0)
    W = torch.randn(*shape)
    k = min(shape)
    perm, L, D, U = truncated_ldu(W, k, "w")
    assert perm.dtype == torch.int64 and perm.shape == (shape[0],)
    torch.testing.assert_close((L * D @ U)[perm], W, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.diagonal(U), torch.ones(k))  # unit upper
    torch.testing.assert_close(torch.diagonal(L), torch.ones(k))  # unit lower
    assert torch.equal(torch.triu(L, 1), torch.zeros_like(L))


def test_trainable_count_is_r_per_layer_plus_scale():
    a = build_adapter("loldu", r=5, modules_to_save=[])
    a.attach(MLP())
    assert a.num_trainable() == 5 * 3  # fc1, fc2, head
    b = build_adapter("loldu", r=5, train_scale=True, modules_to_save=[])
    b.attach(MLP())
    assert b.num_trainable() == 6 * 3
    assert {n.rsplit(".", 1)[-1] for n in b.trainable_parameters()} == {"z", "scale"}


def test_init_exact_and_zero_z_gives_residual():
    torch.manual_seed(0)
    model = MLP()
    W = model.fc1.weight.detach().clone()
    x = torch.randn(6, 33)
    y0 = model(x)
    a = build_adapter("loldu", r=4, alpha=2.0)
    adapted = a.attach(model)
    assert torch.equal(adapted(x), y0), "exactly the base function at init (the coefficient is exactly 0)"
    layer: LoLDULayer = adapted.fc1
    assert layer.scale.item() == 0.5 and not layer.scale.requires_grad  # σ = alpha / r, frozen by default
    with torch.no_grad():
        layer.z.zero_()  # z = 0 -> W' = W_res = W − σ P L_r diag(z0) Ū_r
    perm, L, z0, U = truncated_ldu(W, 4, "fc1")
    W_res = W - 0.5 * (L * z0 @ U)[perm]
    leaf = a.delta_tree()["fc1.weight"]
    torch.testing.assert_close(W + leaf.dense(), W_res, rtol=0, atol=1e-5)


def test_gradient_of_z_is_rank_one_projection():
    """∂L/∂z_i = σ · <G, (P L_r)[:, i] ⊗ Ū_r[i, :]> with G = ∂L/∂W'."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10, bias=False)
    layer = LoLDULayer(lin, r=3, sigma=0.7, train_scale=False, where="lin")
    x = torch.randn(5, 12)
    dy = torch.randn(5, 10)
    (layer(x) * dy).sum().backward()
    G = dy.T @ x  # (out, in) gradient w.r.t. the effective weight
    expect = 0.7 * torch.einsum("oi,or,ri->r", G, layer.PL, layer.U)
    torch.testing.assert_close(layer.z.grad, expect, rtol=1e-5, atol=1e-6)


def test_trained_scale_round_trip(tmp_path):
    from peft_lab.adapters import load_adapter

    torch.manual_seed(0)
    model = MLP()
    sd0 = snapshot(model)
    a = build_adapter("loldu", r=3, train_scale=True)
    adapted = a.attach(model)
    perturb(a)
    x = torch.randn(4, 33)
    y = adapted(x)
    a.save(tmp_path / "ad")
    fresh = MLP()
    fresh.load_state_dict(sd0)
    b = load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(b.model.fc1.z, adapted.fc1.z) and torch.equal(b.model.fc1.scale, adapted.fc1.scale)
    torch.testing.assert_close(b.model(x), y, rtol=0, atol=1e-6)


def test_singular_weight_is_a_user_error_naming_the_layer():
    model = MLP()
    with torch.no_grad():
        model.fc2.weight.zero_()
        model.fc2.weight[:, :2] = torch.randn(33, 2)  # rank 2
    before = snapshot(model)
    with pytest.raises(UserError, match=r"fc2 \(33, 17\) is singular.*pivot 2"):
        build_adapter("loldu", r=4).attach(model)
    assert type(model.fc1) is torch.nn.Linear, "no layer is swapped in when one fails"
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    build_adapter("loldu", r=2).attach(MLP())  # rank 2 is fine


def test_rank_larger_than_layer_allows():
    with pytest.raises(UserError, match=r"r=18 exceeds .*fc1 \(17, 33\).*at most 17"):
        build_adapter("loldu", r=18).attach(MLP())


def test_conv_weights_are_flattened():
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(2, 3, 5, 5)
    y0 = model(x)
    a = build_adapter("loldu", r=5, target_modules=["conv"])
    adapted = a.attach(model)
    layer = adapted.conv
    assert tuple(layer.U.shape) == (5, 27) and tuple(layer.PL.shape) == (6, 5)  # (out, in·kh·kw) = (6, 27)
    assert torch.equal(layer(x), layer.base_layer(x))
    torch.testing.assert_close(adapted(x), y0, rtol=0, atol=1e-6)  # (downstream kernels may pick another layout)
    perturb(a)
    leaf = a.delta_tree()["conv.weight"]
    assert leaf.shape == (6, 3, 3, 3)
    b = layer.base_layer
    expect = torch.nn.functional.conv2d(x, b.weight + leaf.dense(), b.bias, padding=1)
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-5)
    grouped = torch.nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(UserError, match="groups=2"):
        build_adapter("loldu", r=2, target_modules=["conv"]).attach(_wrap(grouped))


def _wrap(conv):
    m = torch.nn.Module()
    m.conv = conv
    return m
