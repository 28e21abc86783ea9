"""Bad values of the added methods' parameters: each is one UserError naming the key, the value and the range."""

from __future__ import annotations

import pytest

from merging.recipe import parse_recipe
from peft_lab.errors import UserError

CASES = [
    ("nearswap", {"t": -0.1}, r"t=-0\.1 is out of range: must be >= 0"),
    ("ram", {"epsilon": -1}, r"epsilon=-1 is out of range: must be >= 0"),
    ("ramplus_tl", {"r": -0.5}, r"r=-0\.5 is out of range: must be >= 0"),
    ("ramplus_tl", {"alpha": "x"}, r"alpha='x' must be a finite number"),
    ("model_stock", {"filter_wise": "yes"}, r"filter_wise='yes' must be true or false"),
    ("nuslerp", {"nuslerp_flatten": 1}, r"nuslerp_flatten=1 must be true or false"),
    ("nuslerp", {"weight": float("nan")}, r"weight=nan must be a finite number"),
    ("multislerp", {"eps": 0}, r"eps=0 is out of range: must be > 0"),
    ("karcher", {"max_iter": -1}, r"max_iter=-1 is out of range: must be >= 0"),
    ("karcher", {"max_iter": 2.5}, r"max_iter=2\.5 must be an integer"),
    ("karcher", {"tol": 0}, r"tol=0 is out of range: must be > 0"),
    ("breadcrumbs", {"density": 1.5}, r"density=1\.5 is out of range: must be in \[0, 1\]"),
    ("breadcrumbs", {"gamma": -0.1}, r"gamma=-0\.1 is out of range: must be in \[0, 1\]"),
    ("breadcrumbs_ties", {"rescale": "l2"}, r"rescale='l2' must be one of: none, l1"),
    ("breadcrumbs", {"scope": "layer"}, r"scope='layer' must be one of: tensor, row"),
    ("della", {"density": 0}, r"density=0 is out of range: must be in \(0, 1\]"),
    ("della", {"epsilon": 1}, r"epsilon=1 is out of range: must be in \[0, 1\)"),
    ("della_linear", {"density": 0.05, "epsilon": 0.1}, r"density=0\.05 and epsilon=0\.1 .* density − epsilon > 0"),
    ("della", {"rescale": "q"}, r"rescale='q' must be one of: l1, keep_rate, none"),
    ("della", {"seed": -2}, r"seed=-2 is out of range: must be >= 0"),
    ("sce", {"select_topk": 1.2}, r"select_topk=1\.2 is out of range: must be in \[0, 1\]"),
    ("tsv", {"alpha": -1}, r"alpha=-1 is out of range: must be >= 0"),
    ("iso_c", {"exclude": {"a": 1}}, r"exclude=\{'a': 1\} must be a list of strings"),
    ("iso_cts", {"common_space_fraction": 1.1}, r"common_space_fraction=1\.1 is out of range: must be in \[0, 1\]"),
    ("consensus", {"k": -1}, r"k=-1 is out of range: must be >= 0"),
    ("consensus", {"lambda": -0.2}, r"lambda=-0\.2 is out of range: must be >= 0"),
    ("consensus", {"aggregate": "dare"}, r"aggregate='dare' must be one of: task_arithmetic, ties"),
    ("pcb", {"ratio": 0}, r"ratio=0 is out of range: must be in \(0, 1\]"),
    ("pcb", {"scope": "row"}, r"scope='row' must be one of: global, tensor"),
    ("regmean", {"alpha": 2}, r"alpha=2 is out of range: must be in \[0, 1\]"),
    ("regmean", {"num_examples": 0}, r"num_examples=0 is out of range: must be >= 1"),
    ("regmean", {"plusplus": "true"}, r"plusplus='true' must be true or false"),
]


@pytest.mark.parametrize("method, params, match", CASES)
def test_bad_parameter_values_name_the_key_and_the_range(method, params, match):
    recipe = {"merge_method": method, "base_model": "base", "models": ["m0", "m1"], "parameters": params}
    if method in ("nearswap", "arcee_fusion"):
        recipe["models"] = ["m0"]
    with pytest.raises(UserError, match=match) as e:
        parse_recipe(recipe)
    assert "\n" not in str(e.value)


def test_static_parameters_refuse_gradients():
    recipe = {"merge_method": "pcb", "base_model": "b", "models": ["m0", "m1"], "parameters": {"scope": ["tensor"]}}
    with pytest.raises(UserError, match=r"scope takes one value for the whole model"):
        parse_recipe(recipe)


def test_pcb_global_ratio_is_one_value():
    recipe = {"merge_method": "pcb", "base_model": "b", "models": ["m0", "m1"], "parameters": {"ratio": [0.1, 0.3]}}
    with pytest.raises(UserError, match=r"pcb: ratio is given per layer or per tensor, but scope=global"):
        parse_recipe(recipe)
    parse_recipe({**recipe, "parameters": {"ratio": [0.1, 0.3], "scope": "tensor"}})
