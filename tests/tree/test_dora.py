"""PEFT DoRA adapter dirs as exact deltas (the magnitude applied: m ⊙ (W + s·BA)/‖W + s·BA‖ − W), with rsLoRA,
rank_pattern and alpha_pattern, on Linear, Embedding, Conv2d and GPT-2 Conv1D layers: equal to PEFT's
merge_and_unload, and merged by `peft-lab merge` to the same model."""

import pytest
import torch

from merging import run_merge
from peft_lab.errors import UserError
from peft_lab.tree import Tree, load_tree
from tests.helpers.adapters import ConvNet


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)
    return BertModel(cfg)


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16))


CASES = {
    "bert": (_bert, ["query", "value", "word_embeddings"], {}),
    "bert_rslora_patterns": (
        _bert,
        ["query", "value", "intermediate.dense"],
        {"use_rslora": True, "rank_pattern": {"value": 3}, "alpha_pattern": {"query": 5}},
    ),
    "conv": (ConvNet, ["conv", "proj"], {}),
    "gpt2_conv1d": (_gpt2, ["c_attn", "c_proj"], {"fan_in_fan_out": True}),
}


def _dora_dir(case: str, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    make, targets, extra = CASES[case]
    model = make()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=targets, use_dora=True, init_lora_weights=False, **extra)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():  # a trained magnitude: not the initial column norms
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    pm.save_pretrained(tmp_path / "dora")
    merged = pm.merge_and_unload().state_dict()
    return base, merged, tmp_path / "dora"


@pytest.mark.parametrize("case", list(CASES))
def test_dora_delta_equals_peft_merge_and_unload(case, tmp_path):
    base, merged, d = _dora_dir(case, tmp_path)
    delta = load_tree(d, base=Tree(base))
    assert delta, "no deltas"
    for name, leaf in delta.items():
        want = merged[name] - base[name]
        assert float(want.abs().max()) > 1e-3, f"{name}: the adapter should change it"
        torch.testing.assert_close(leaf.dense(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_dora_merged_by_peft_lab_is_peft_merge_and_unload(tmp_path):
    from transformers import BertModel

    base, merged, d = _dora_dir("bert", tmp_path)
    model = _bert()
    model.load_state_dict(base)
    model.save_pretrained(tmp_path / "base")
    run_merge(
        {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "models": [str(d)]},
        tmp_path / "out",
        progress=False,
    )
    out = BertModel.from_pretrained(tmp_path / "out").state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(out[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_dora_needs_the_base(tmp_path):
    _, _, d = _dora_dir("bert", tmp_path)
    with pytest.raises(UserError, match="DoRA adapter's change depends on the base"):
        load_tree(d)
