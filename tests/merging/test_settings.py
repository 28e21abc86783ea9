"""mergekit's parameter settings (gradients, conditional values, scopes) and layer positions, resolved per tensor."""

from __future__ import annotations

import pytest

from merging.architecture import layer_index, layer_positions
from merging.methods._gta import GTAModelParams
from merging.methods.slerp import SlerpParams
from merging.methods.ties import TiesParams
from merging.recipe import parse_recipe
from merging.settings import Resolver, evaluate
from peft_lab.errors import UserError


@pytest.mark.parametrize(
    "setting, name, t, want",
    [
        (0.3, "x", 0.7, 0.3),
        ([0.0, 1.0], "x", 0.25, 0.25),
        ([0, 0.5, 0.3, 0.7, 1], "x", 0.5, 0.3),  # t·(n−1) = 2: exactly the third value
        ([0, 0.5, 0.3, 0.7, 1], "x", 0.375, 0.4),  # between 0.5 and 0.3
        ([0.2, 0.8], "x", 1.0, 0.8),
        (["tensor", "global"], "x", 0.99, "tensor"),  # words are picked by index: int(t·(n−1))
        ([True, False, True], "x", 0.6, False),
        (
            [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}],
            "a.self_attn.q",
            0.5,
            0.5,
        ),
        (
            [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}],
            "l.mlp.up",
            0.0,
            0.9,
        ),
        ([{"filter": "self_attn", "value": 0.1}, {"value": 0.5}], "embed", 0.0, 0.5),
        ([{"filter": "*", "value": 0.7}], "anything", 0.0, 0.7),
        ({"filter": "mlp", "value": 0.9}, "l.mlp.up", 0.0, 0.9),  # one condition, not in a list
        ([{"filter": "mlp", "value": 0.9}], "l.attn", 0.0, None),  # nothing matches: the next scope decides
    ],
)
def test_evaluate_follows_mergekits_rules(setting, name, t, want):
    got = evaluate(setting, name, t)
    assert got == pytest.approx(want) if isinstance(want, float) else got == want


def test_scopes_resolve_from_the_most_specific():
    shared = [{"t": [{"filter": "mlp", "value": 0.9}]}, {"t": 0.4}]  # slice scope, then top level
    r = Resolver(
        SlerpParams, shared, GTAModelParams, [[{"weight": [1.0, 3.0]}, {"density": 0.5}], [{}, {"weight": 2.0}]]
    )
    assert r.shared("l.mlp.up", 0.0).t == 0.9
    assert r.shared("l.attn.q", 0.0).t == 0.4  # the filter does not match: the top level's value
    m0, m1 = r.models("x", 0.5)
    assert (m0.weight, m0.density, m1.weight, m1.density) == (2.0, 0.5, 2.0, 1.0)
    assert not r.constant
    assert r.shared("a", 0.1) is r.shared("b", 0.2)  # built once per distinct set of values


def test_settings_are_checked_when_the_recipe_is_parsed(tmp_path):
    base = {"merge_method": "slerp", "base_model": "b", "models": ["m"]}
    with pytest.raises(UserError, match=r"t=1.5 is out of range"):
        parse_recipe({**base, "parameters": {"t": [0, 1.5]}})
    with pytest.raises(UserError, match=r"t=1.5 is out of range"):
        parse_recipe({**base, "parameters": {"t": [{"filter": "mlp", "value": [0, 1.5]}, {"value": 0.5}]}})
    with pytest.raises(UserError, match=r"t='0.5x' must be a finite number"):
        parse_recipe({**base, "parameters": {"t": [0, "0.5x"]}})
    ties = {"merge_method": "ties", "base_model": "b", "models": ["m", "n"]}
    with pytest.raises(UserError, match=r"trim_scope takes one value for the whole model"):
        parse_recipe({**ties, "parameters": {"trim_scope": ["tensor", "global"]}})
    with pytest.raises(UserError, match=r"trim_scope=global ranks the whole model with one density"):
        parse_recipe({**ties, "parameters": {"trim_scope": "global", "density": [0.2, 0.5]}})
    with pytest.raises(UserError, match=r"fisher learns or computes .* one set of parameters"):
        parse_recipe({"merge_method": "fisher", "models": ["m", "n"], "parameters": {"floor": [1e-6, 1e-5]}})
    r = parse_recipe({**ties, "parameters": {"density": [0.2, 0.6], "lambda": [{"filter": "mlp", "value": 0.5}]}})
    assert not r.resolver().constant and isinstance(r.method.params, TiesParams)
    rec = r.to_dict()
    assert rec["parameters"]["lambda"] == [{"filter": "mlp", "value": 0.5}] and rec["parameters"]["density"] == [
        0.2,
        0.6,
    ]
    assert all("density" not in m["parameters"] for m in rec["models"])  # the top-level gradient applies as given
    assert parse_recipe(rec).to_dict() == rec


def test_layer_positions_from_tensor_names():
    llama = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.embed_tokens.weight", "lm_head.weight"]
    pos = layer_positions(llama, {"num_hidden_layers": 5})
    assert [pos[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert pos["model.embed_tokens.weight"] == pos["lm_head.weight"] == 0  # outside the layers: t = 0, as mergekit
    t5 = [f"{s}.block.{i}.layer.0.SelfAttention.q.weight" for s in ("encoder", "decoder") for i in range(3)]
    t5 += ["decoder.block.1.layer.2.DenseReluDense.wo.weight", "shared.weight"]
    pos = layer_positions(t5, {"num_layers": 3})
    assert (
        pos["encoder.block.2.layer.0.SelfAttention.q.weight"]
        == pos["decoder.block.2.layer.0.SelfAttention.q.weight"]
        == 1
    )
    assert pos["decoder.block.1.layer.2.DenseReluDense.wo.weight"] == 0.5  # the block number, not the sub-layer's
    assert layer_index("transformer.h.3.attn.c_attn.weight").stack == "transformer.h"
    assert layer_index("bert.encoder.layer.2.output.dense.bias").index == 2
    assert layer_index("model.layers.0.mlp.experts.7.w1.weight").index == 0
    assert layer_positions(["model.layers.0.w", "model.norm.weight"], {"num_hidden_layers": 1})["model.layers.0.w"] == 1
    with pytest.raises(UserError, match=r"put 2 layers in the stack 'model.layers' .* config declares 4"):
        layer_positions(["model.layers.0.w", "model.layers.1.w"], {"num_hidden_layers": 4})
