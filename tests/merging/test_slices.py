"""The recipe grammar beyond the parity fixtures: bad slices, tokenizer settings and model references are one
UserError each and leave no output; filters that match nothing warn; accepted options (int8_mask, dtype /
out_dtype, chat_template) do what docs/merging.md says; the output's config follows its layers; a recorded recipe
re-runs. On the tiny models of tests/fixtures/mergekit_grammar (5-layer Llamas, T5, Llamas whose vocabularies
differ)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from merging import run_merge
from merging.vocab import CHAT_TEMPLATES
from peft_lab.errors import UserError
from tests.conftest import REPO

FIX = REPO / "tests" / "fixtures" / "mergekit_grammar"


def src(model: str, a: int, b: int, **params) -> dict:
    return {"model": f"models/{model}", "layer_range": [a, b], **({"parameters": params} if params else {})}


def recipe(arch: str, case: str) -> dict:
    return yaml.safe_load((FIX / arch / "recipes" / f"{case}.yaml").read_text())


PASS = {"merge_method": "passthrough", "slices": [{"sources": [src("ft0", 0, 3)]}, {"sources": [src("ft1", 3, 5)]}]}
SLERP = {"merge_method": "slerp", "base_model": "models/base", "parameters": {"t": 0.5}}
TIES = {"merge_method": "ties", "base_model": "models/base", "parameters": {"weight": 1.0, "density": 0.5}}
BAD_LLAMA = [
    ({**PASS, "slices": [{"sources": [src("ft0", 0, 6)]}]},
     r"slices\[0\]: layer_range \[0, 6\] of models/ft0 is outside the model: it has 5 layers in model\.layers"),
    ({**PASS, "slices": [{"sources": [src("ft0", 3, 3)]}]}, r"layer_range \[3, 3\] is empty or reversed"),
    ({**SLERP, "slices": [{"sources": [src("base", 0, 3), src("ft0", 0, 3)]},
                          {"sources": [src("base", 2, 5), src("ft0", 2, 5)]}]},
     r"models/base gives layers \[0, 3\] in slices\[0\] and \[2, 5\] in slices\[1\]: with slerp each model's layer "
     r"ranges must follow each other without overlap .* use merge_method: passthrough"),
    ({"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [src("ft0", 3, 5), src("ft1", 3, 5)]}, {"sources": [src("ft0", 0, 3), src("ft1", 0, 3)]}]},
     r"models/ft0 gives layers \[3, 5\] in slices\[0\] and \[0, 3\] in slices\[1\]"),
    ({**SLERP, "slices": [{"sources": [src("base", 0, 3), src("ft0", 0, 2)]}]},
     r"slices\[0\]: its sources span different numbers of layers \(models/base \[0, 3\], models/ft0 \[0, 2\]\)"),
    ({**TIES, "slices": [{"sources": [src("ft0", 0, 5), src("ft1", 0, 5)]}]},
     r"ties needs a base model among the slice's sources; the slice's base_model models/base is not one of them"),
    ({**PASS, "slices": [{"sources": [src("ft0", 0, 2), src("ft1", 0, 2)]}]},
     r"passthrough merges exactly 1 model\(s\) per slice, got 2 \(a frankenmerge stacks one source per slice\)"),
    ({**TIES, "slices": [{"sources": [src("base", 0, 5), src("ft0", 0, 5)],
                          "parameters": {"trim_scope": ["tensor", "global"]}}]},
     r"slices\[0\]\.parameters: trim_scope=\['tensor', 'global'\]: trim_scope takes one value for the whole model"),
    ({**SLERP, "slices": [{"sources": [src("base", 0, 5), src("ft0", 0, 5, t=0.3)]}]},
     r"sources\[1\] \(models/ft0\): t applies to the whole merge, not to one model"),
    ({**SLERP, "slices": [{"sources": [src("base", 0, 5), src("ft0", 0, 5)], "bogus": 1}]},
     r"slices\[0\]: unknown key\(s\) bogus; a slice has sources, base_model, parameters"),
    ({**PASS, "models": ["models/ft0"]}, r"give exactly one of `models` .*; this recipe has models and slices"),
    ({**PASS, "tokenizer_source": "models/ft2"},
     r"tokenizer_source names models/ft2, which is not a model of this recipe \(its models: models/ft0, models/ft1\)"),
    ({**PASS, "tokenizer": {"tokens": {"x": {"source": "models/elsewhere"}}}},
     r"tokenizer\.tokens\['x'\]: the source names models/elsewhere, which is not a model of this recipe"),
    ({**PASS, "tokenizer_source": "union", "tokenizer": {"source": "base"}}, r"tokenizer_source or a tokenizer: "),
    ({**PASS, "chat_template": "chatmx"}, r"chat_template 'chatmx' is neither auto, a built-in template \(chatml"),
    ({**PASS, "slice": []}, r"unknown key\(s\) slice\. A recipe has merge_method, base_model, models, slices, modul"),
    ({"merge_method": "fisher", "slices": PASS["slices"]}, r"fisher learns .* it merges whole models"),
    ({**PASS, "slices": [{"sources": [{"model": "models/lora0", "layer_range": [0, 2]}]}]},
     r"models/lora0 is an adapter .* slices and modules take full models"),
    ({**PASS, "slices": [{"sources": [{"model": "models/ft0+models/ft1", "layer_range": [0, 2]}]}]},
     r"models/ft0\+models/ft1: models/ft1 is not a PEFT adapter dir"),
    ({**PASS, "slices": [{"sources": [{"model": {"model": "models/ft0", "lora": "models/nope"},
                                       "layer_range": [0, 2]}]}]}, r"No such file or directory: models/nope"),
]  # fmt: skip


@pytest.mark.parametrize("arch, bad, match", [("llama", b, m) for b, m in BAD_LLAMA] + [
    ("t5", {"merge_method": "passthrough", "slices": [{"sources": [src("ft0", 0, 2)]}]},
     r"slices need one stack of layers, but the model has 2 \(decoder\.block, encoder\.block\); give one module per"),
    ("t5", {"merge_method": "passthrough", "modules": {"encoder": {"models": ["models/ft0"]}}},
     r"modules: \d+ tensor\(s\) belong to none of the modules \(encoder\), e\.g\. decoder\."),
    ("t5", {"merge_method": "passthrough", "modules": {"text_decoder": {"models": ["models/ft0"]}}},
     r"modules\.text_decoder: no tensor of the model starts with 'text_decoder\.'.* not supported yet"),
    ("vocab", {"merge_method": "linear", "models": ["models/base", "models/ft_added"]},
     r"vocabularies differ in size \(models/base: 32, models/ft_added: 34 tokens.* tokenizer_source: union"),
    ("vocab", {"merge_method": "linear", "models": ["models/base", "models/ft_word"], "tokenizer": {"tokens": {
        "<x>": {"source": {"kind": "model_token", "model": "models/ft_word", "token": "nope"}}}}},
     r"tokenizer\.tokens\['<x>'\]: models/ft_word has no token 'nope'"),
])  # fmt: skip
def test_bad_input_is_one_error_and_leaves_no_output(arch, bad, match, tmp_path, monkeypatch):
    monkeypatch.chdir(FIX / arch)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        run_merge(bad, out, hash="none")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_filter_that_matches_nothing_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(FIX / "llama")
    r = {**SLERP, "models": ["models/ft0"], "parameters": {"t": [{"filter": "self_atn", "value": 0.9}, {"value": 0.5}]}}
    with caplog.at_level(logging.WARNING, logger="merging.plan"):
        run_merge(r, tmp_path / "out", hash="none")
    assert "parameters: the filter 'self_atn' of t matches no tensor of this merge" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="merging.plan"):  # a filter on source names (layer 3 of ft0)
        run_merge({**PASS, "slices": [{"sources": [src("ft0", 3, 5, scale=[{"filter": "layers.3.", "value": 2}])]}]},
                  tmp_path / "out2", hash="none")  # fmt: skip
    assert "matches no tensor" not in caplog.text


def test_slices_over_whole_models_equal_the_models_form(tmp_path, monkeypatch):
    """One slice spanning every layer of each model is the `models:` form: the same tensors, bit for bit."""
    monkeypatch.chdir(FIX / "llama")
    t = {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": [0.7, 0.2, 0.4]}]}
    a = run_merge({**SLERP, "parameters": t, "models": ["models/ft1"]}, tmp_path / "a", hash="none")
    b = run_merge({**SLERP, "parameters": t, "slices": [{"sources": [src("base", 0, 5), src("ft1", 0, 5)]}]},
                  tmp_path / "b", hash="none")  # fmt: skip
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_int8_mask_is_accepted_recorded_and_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(FIX / "llama")
    r = {**TIES, "models": ["models/ft0", "models/ft1"]}
    a = run_merge(r, tmp_path / "a", hash="none")
    b = run_merge({**r, "parameters": {**r["parameters"], "int8_mask": True}}, tmp_path / "b", hash="none")
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()  # the recipe differs ...
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # ... the tensors do not
    rec = yaml.safe_load((b / "merge_recipe.yaml").read_text())
    assert rec["parameters"]["int8_mask"] is True and rec["arithmetic"] == "float32"


def test_out_dtype_is_the_output_dtype_and_arithmetic_is_float32(tmp_path, monkeypatch):
    monkeypatch.chdir(FIX / "llama")
    r = {**PASS, "dtype": "float16", "out_dtype": "bfloat16"}
    out = run_merge(r, tmp_path / "out", hash="none")
    assert {v.dtype for v in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    rec = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert rec["dtype"] == "bfloat16" and rec["arithmetic"] == "float32"


@pytest.mark.parametrize(
    "arch, case", [("llama", "slices_ties_scopes"), ("llama", "lora_references"), ("vocab", "tokenizer_block"),
                   ("t5", "modules_passthrough")]
)  # fmt: skip
def test_the_recorded_recipe_reruns_to_the_same_tensors(arch, case, tmp_path, monkeypatch):
    monkeypatch.chdir(FIX / arch)
    first = run_merge(recipe(arch, case), tmp_path / "a")
    again = run_merge(first / "merge_recipe.yaml", tmp_path / "b")
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    rec = yaml.safe_load((first / "merge_recipe.yaml").read_text())
    if case == "lora_references":  # the LoRA dirs are inputs too, hashed
        loras = [e for e in rec["inputs"] if e["role"] == "lora"]
        assert [e["model"] for e in loras] == ["models/lora0", "models/lora1"]
        assert all(f.startswith("sha256:") for e in loras for f in e["files"].values())


def test_config_follows_the_output_layers(tmp_path, monkeypatch):
    monkeypatch.chdir(FIX / "gemma2")
    r = {**PASS, "slices": [{"sources": [src("ft0", 0, 3)]}, {"sources": [src("ft0", 0, 3)]},
                            {"sources": [src("ft1", 4, 5)]}]}  # fmt: skip
    cfg = json.loads((run_merge(r, tmp_path / "out", hash="none") / "config.json").read_text())
    types = json.loads((FIX / "gemma2" / "models" / "ft0" / "config.json").read_text())["layer_types"]
    assert cfg["num_hidden_layers"] == 7 and cfg["layer_types"] == types[0:3] * 2 + types[4:5]
    monkeypatch.chdir(FIX / "t5")
    cfg = json.loads((run_merge(recipe("t5", "modules_passthrough"), tmp_path / "t5") / "config.json").read_text())
    assert (cfg["num_layers"], cfg["num_decoder_layers"]) == (4, 4)


@pytest.fixture
def templated(tmp_path):
    """Copies of the vocab models: base and ft_word with template A, ft_added with template B."""
    a, b = (
        "{% for m in messages %}A:{{ m['content'] }}{% endfor %}",
        "{% for m in messages %}B:{{ m['content'] }}{% endfor %}",
    )
    for name, t in (("base", a), ("ft_added", b), ("ft_word", a)):
        shutil.copytree(FIX / "vocab" / "models" / name, tmp_path / "models" / name)
        (tmp_path / "models" / name / "chat_template.jinja").write_text(t)
    return tmp_path, a


@pytest.mark.parametrize("template", ["auto", "chatml", "{% for m in messages %}{{ m['content'] }}|{% endfor %}"])
@pytest.mark.parametrize("tokenizer", [None, "union"])
def test_chat_template_is_written_into_the_tokenizer(templated, template, tokenizer, monkeypatch):
    root, a = templated
    monkeypatch.chdir(root)
    three = ["models/base", "models/ft_added", "models/ft_word"]  # their vocabularies differ: one needs a tokenizer
    vocab = {"tokenizer_source": tokenizer, "models": three} if tokenizer else {"models": ["models/base"]}
    r = {"merge_method": "linear", "chat_template": template, **vocab}
    out = run_merge(r, root / "out", hash="none")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    want = {"auto": a, "chatml": CHAT_TEMPLATES["chatml"]}.get(template, template)
    assert tok.chat_template == want
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "hi" in text


@pytest.mark.parametrize(
    "spelling",
    ["models/ft0+models/lora0", {"model": "models/ft0", "lora": "models/lora0"},
     {"path": "models/ft0", "lora": "models/lora0"},
     {"model": {"path": "models/ft0"}, "lora": {"path": "models/lora0"}}],
)  # fmt: skip
def test_lora_references_in_every_spelling_are_the_model_plus_its_lora(spelling, tmp_path, monkeypatch):
    """Each of mergekit's spellings of a LoRA reference is the model with the LoRA's B·A (scaled) added."""
    import peft

    monkeypatch.chdir(FIX / "llama")
    out = run_merge({"merge_method": "passthrough", "models": [{"model": spelling}]}, tmp_path / "out", hash="none")
    model = transformers.AutoModelForCausalLM.from_pretrained("models/ft0")
    want = peft.PeftModel.from_pretrained(model, "models/lora0").merge_and_unload().state_dict()
    got = load_file(out / "model.safetensors")
    assert got.keys() <= want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    base = load_file("models/ft0/model.safetensors")
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
