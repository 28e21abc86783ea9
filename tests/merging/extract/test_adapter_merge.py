"""Merges that output an adapter (`out_format: adapter`): the exact concatenation equals the dense merge (float32
rounding), the compressed path stays within the error it records, PEFT's add_weighted_adapter agrees where the math
is the same (cat, svd, ties_svd, dare_ties_svd) and is wrong where we are right (rsLoRA, lora_bias), and bad
recipes are refused before anything is written."""

import json

import pytest
import torch
import yaml

from merging import run_merge
from peft_lab.errors import UserError
from peft_lab.tree import load_tree

BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
ADAPTERS = {  # name: (r, alpha, target modules, extra config)
    "a": (2, 5, ["query", "value", "word_embeddings"], {}),
    "b": (3, 4, ["query", "key", "intermediate.dense"], {}),
}


def _adapters(root, specs=ADAPTERS, base_name="base"):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    base = root / base_name
    if not base.exists():
        torch.manual_seed(0)
        BertModel(BertConfig(**BERT)).save_pretrained(base)
    dirs = []
    for i, (name, (r, alpha, targets, extra)) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
        pm = get_peft_model(BertModel.from_pretrained(base), cfg)
        if extra.get("lora_bias"):
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if n.endswith("lora_B.default.bias"):
                        p.normal_()
        pm.save_pretrained(root / name)
        dirs.append(root / name)
    return base, dirs


def _recipe(method, base, dirs, weights=(0.7, -0.4), params=None, **extra):
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(d), "parameters": {"weight": w}} for d, w in zip(dirs, weights, strict=True)],
        "parameters": params or {},
        **extra,
    }


def _applied(base, adapter_dir):
    """base + the adapter's deltas, as PEFT applies them (merge_and_unload)."""
    from peft import PeftModel
    from transformers import BertModel

    return PeftModel.from_pretrained(BertModel.from_pretrained(base), str(adapter_dir)).merge_and_unload().state_dict()


def _close(got: dict, want_dir, what: str, tol=1e-6):
    want = load_tree(want_dir)
    for k, leaf in want.items():
        if leaf.dtype.is_floating_point:
            scale = float(leaf.dense().abs().max()) + 1.0
            torch.testing.assert_close(got[k], leaf.dense(), rtol=0, atol=tol * scale, msg=f"{what}: {k}")


@pytest.mark.parametrize(
    "method,weights,params",
    [
        ("task_arithmetic", (0.7, -0.4), {"lambda": 1.3}),
        ("task_arithmetic", ([0.2, 1.0], 1.0), {}),  # a per-layer gradient: per-tensor coefficients
        ("linear", (1.0, 2.0), {}),  # the base is averaged in as one more model (normalize: true)
    ],
)
def test_concatenation_equals_the_dense_merge(tmp_path, method, weights, params):
    base, dirs = _adapters(tmp_path)
    rec = _recipe(method, base, dirs, weights, params)
    run_merge(rec, tmp_path / "model", progress=False)
    out = run_merge({**rec, "out_format": "adapter"}, tmp_path / "adapter", progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["base_model_name_or_path"] == str(base)  # query: 2 + 3
    record = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert record["out_format"] == "adapter"
    how = {v["how"] for v in record["adapter_report"].values()}
    assert how == {"no SVD (the factors as they are)"}
    assert record["adapter_report"]["encoder.layer.0.attention.self.query.weight"]["rank"] == 5
    _close(_applied(base, out), tmp_path / "model", f"{method} {weights}")
    # the recorded recipe re-runs (its adapter_report is a record, not a key)
    again = run_merge(out / "merge_recipe.yaml", tmp_path / "again", progress=False, hash="none")
    assert (again / "adapter_model.safetensors").read_bytes() != b""


def test_linear_without_normalize_is_not_low_rank(tmp_path):
    base, dirs = _adapters(tmp_path)
    rec = _recipe("linear", base, dirs, (1.0, 2.0), {"normalize": False}, out_format="adapter")
    with pytest.raises(UserError, match="give adapter_rank"):
        run_merge(rec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method,params",
    [
        ("ties", {"density": 0.5}),
        ("della", {"density": 0.5, "epsilon": 0.2}),  # methods of the extended grammar go the same way
        ("breadcrumbs", {"density": 0.6, "gamma": 0.1}),
        ("model_stock", {}),
    ],
)
def test_compressed_merge_is_within_its_recorded_error(tmp_path, method, params):
    base, dirs = _adapters(tmp_path)
    rec = _recipe(method, base, dirs, (1.0, 1.0), params)
    if method == "model_stock":  # no per-model weights
        rec["models"] = [{"model": str(d)} for d in dirs]
    run_merge(rec, tmp_path / "model", progress=False)
    out = run_merge({**rec, "out_format": "adapter", "adapter_rank": 4}, tmp_path / "adapter", progress=False)
    report = yaml.safe_load((out / "merge_recipe.yaml").read_text())["adapter_report"]
    b, m = load_tree(base), load_tree(tmp_path / "model")
    got = load_tree(out, base=b)
    assert report and all(v["rank"] <= 4 for v in report.values())
    for name, v in report.items():
        want = m[name].dense() - b[name].dense()
        err = float((got[name].dense() - want).norm() / want.norm())
        assert err == pytest.approx(v["error"], rel=1e-3, abs=1e-6), name
    assert max(v["error"] for v in report.values()) > 0.01  # TIES' merged deltas are not rank 4: a real error


# ---------------------------------------------------------------------------------------------------------
# against PEFT's add_weighted_adapter
# ---------------------------------------------------------------------------------------------------------
def _peft_weighted(base, dirs, weights, combination, **kw) -> dict[str, torch.Tensor]:
    """{weight name: delta} of PEFT's add_weighted_adapter result."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import BertModel

    pm = PeftModel.from_pretrained(BertModel.from_pretrained(base), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        pm.load_adapter(str(d), adapter_name=f"a{i}")
    pm.add_weighted_adapter([f"a{i}" for i in range(len(dirs))], list(weights), "m", combination_type=combination, **kw)
    return {
        f"{n}.weight": mod.get_delta_weight("m").detach()
        for n, mod in pm.base_model.model.named_modules()
        if isinstance(mod, LoraLayer) and ("m" in mod.lora_A or "m" in mod.lora_embedding_A)
    }


PEFT_CASES = {  # PEFT combination -> (our recipe method, parameters, adapter_rank)
    "cat": ("task_arithmetic", {}, None),
    "svd": ("task_arithmetic", {}, 3),
    "ties_svd": ("ties", {"density": 0.5}, 3),
    "dare_ties_svd": ("dare_ties", {"density": 1.0, "normalize": True}, 3),  # density 1: no random draw to differ
}


@pytest.mark.parametrize("combination", list(PEFT_CASES))
def test_equal_to_peft_add_weighted_adapter_where_the_math_is_the_same(tmp_path, combination):
    base, dirs = _adapters(tmp_path)
    method, params, rank = PEFT_CASES[combination]
    weights = (0.7, -0.4) if combination in ("cat", "svd") else (1.0, 1.0)  # PEFT's TIES weights differ from ours
    kw = {"svd_rank": rank} if rank else {}
    if "ties" in combination:
        kw["density"] = params["density"]
    theirs = _peft_weighted(base, dirs, weights, combination, **kw)
    extra = {"out_format": "adapter"} | ({"adapter_rank": rank} if rank else {})
    out = run_merge(_recipe(method, base, dirs, weights, params, **extra), tmp_path / "ours", progress=False)
    ours = load_tree(out, base=load_tree(base))
    assert sorted(ours) == sorted(theirs)
    for name, want in theirs.items():
        torch.testing.assert_close(ours[name].dense(), want, rtol=1e-4, atol=1e-5, msg=f"{combination}: {name}")


def test_rslora_merges_right_where_peft_overscales(tmp_path):
    """PEFT 0.21.2 keeps use_rslora in the merged config while setting r = lora_alpha = new rank, so its result is
    scaled by sqrt(new rank) (huggingface/peft#3761); ours folds each input's own scaling into the factors."""
    specs = {k: (r, a, t, {"use_rslora": True}) for k, (r, a, t, _) in ADAPTERS.items()}
    base, dirs = _adapters(tmp_path, specs)
    run_merge(_recipe("task_arithmetic", base, dirs), tmp_path / "model", progress=False)
    out = run_merge(_recipe("task_arithmetic", base, dirs, out_format="adapter"), tmp_path / "ours", progress=False)
    _close(_applied(base, out), tmp_path / "model", "rslora")
    theirs = _peft_weighted(base, dirs, (0.7, -0.4), "cat")
    b, m = load_tree(base), load_tree(tmp_path / "model")
    q = "encoder.layer.0.attention.self.query.weight"
    ratio = float(theirs[q].norm() / (m[q].dense() - b[q].dense()).norm())
    assert ratio == pytest.approx(5**0.5, rel=1e-4)  # PEFT's merged adapter: sqrt(r = 5) times too large


def test_lora_bias_merges_right_where_peft_drops_it(tmp_path):
    """PEFT's add_weighted_adapter combines the lora_A/lora_B weights only: the inputs' lora_B biases are lost, and the
    new adapter's lora_B bias keeps its random initialisation (huggingface/peft#3761). Ours merges the bias deltas
    and carries them in lora_bias."""
    specs = {"a": (2, 5, ["query", "value"], {"lora_bias": True}), "b": (3, 4, ["query", "key"], {"lora_bias": True})}
    base, dirs = _adapters(tmp_path, specs)
    run_merge(_recipe("task_arithmetic", base, dirs), tmp_path / "model", progress=False)
    out = run_merge(_recipe("task_arithmetic", base, dirs, out_format="adapter"), tmp_path / "ours", progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["lora_bias"]
    _close(_applied(base, out), tmp_path / "model", "lora_bias")
    from peft import PeftModel
    from transformers import BertModel

    pm = PeftModel.from_pretrained(BertModel.from_pretrained(base), str(dirs[0]), adapter_name="a0")
    pm.load_adapter(str(dirs[1]), adapter_name="a1")
    pm.add_weighted_adapter(["a0", "a1"], [0.7, -0.4], "m", combination_type="cat")
    pm.set_adapter("m")
    theirs = pm.merge_and_unload().state_dict()
    b, m = load_tree(base), load_tree(tmp_path / "model")
    k = "encoder.layer.0.attention.self.query.bias"
    want = m[k].dense() - b[k].dense()
    assert float(want.abs().max()) > 0.1
    assert float((theirs[k] - m[k].dense()).norm()) > 0.5 * float(want.norm())  # PEFT's merged bias is not the merge


# ---------------------------------------------------------------------------------------------------------
# bad recipes
# ---------------------------------------------------------------------------------------------------------
def test_adapters_on_different_bases_are_refused(tmp_path):
    base, dirs = _adapters(tmp_path)
    cfg_path = dirs[1] / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "some-org/another-model"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="different base models.*another-model"):
        run_merge(_recipe("task_arithmetic", base, dirs, out_format="adapter"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"out_format": "adapter", "base_model": None}, "has no base_model"),
        ({"energy": 0.9}, "only apply with out_format: adapter"),
        ({"out_format": "lora"}, "out_format must be model or adapter"),
        ({"out_format": "adapter", "adapter_rank": 0}, "out of range"),
        ({"out_format": "adapter", "adapter_options": {"bogus": 1}}, "bogus"),
    ],
)
def test_bad_adapter_keys(tmp_path, extra, match):
    base, dirs = _adapters(tmp_path)
    rec = _recipe("task_arithmetic", base, dirs, **extra)
    if rec.get("base_model") is None:
        rec.pop("base_model")
        rec["merge_method"] = "linear"
    with pytest.raises(UserError, match=match):
        run_merge(rec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["slices", "tokenizer_source", "chat_template", "base_with_lora", "passthrough"])
def test_recipes_that_do_not_keep_the_base_layout_are_refused(tmp_path, case):
    """An adapter output is each merged tensor as a change to the same tensor of base_model: slices (layers built
    from pieces of models), tokenizer settings (embedding rows rebuilt), a chat template (no tokenizer files), a
    base with a LoRA applied (not a model PEFT loads onto) and passthrough (no base) are refused, one message each,
    nothing written."""
    base, dirs = _adapters(tmp_path)
    rec = _recipe("task_arithmetic", base, dirs, out_format="adapter")
    match = {
        "slices": "slices does not go with out_format: adapter",
        "base_with_lora": "plain model",
        "passthrough": "passthrough copies one model.*peft-lab extract",
    }.get(case, f"{case} does not go with out_format: adapter")
    if case == "slices":
        del rec["models"]
        models = [str(base)] + [f"{base}+{d}" for d in dirs]
        rec["slices"] = [{"sources": [{"model": m, "layer_range": [0, 2]} for m in models]}]
    elif case == "tokenizer_source":
        rec["tokenizer_source"] = "union"
    elif case == "chat_template":
        rec["chat_template"] = "chatml"
    elif case == "base_with_lora":
        rec["base_model"] = f"{base}+{dirs[0]}"
    else:
        rec = {"merge_method": "passthrough", "models": [{"model": f"{base}+{dirs[0]}"}], "out_format": "adapter"}
    if case != "tokenizer_source":  # (which needs tokenizer files that these models lack)
        run_merge({**rec, "out_format": "model"}, tmp_path / "as_model", progress=False)  # valid as a model merge
    with pytest.raises(UserError, match=match):
        run_merge(rec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_hydra_form(tmp_path, cli):
    base, dirs = _adapters(tmp_path)
    r = cli(
        "merge",
        "method=task_arithmetic",
        f"base={base}",
        f"models=[{dirs[0]},{dirs[1]}]",
        f"out={tmp_path / 'h'}",
        "out_format=adapter",
        "progress=false",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "h" / "adapter_config.json").read_text())["r"] == 5
